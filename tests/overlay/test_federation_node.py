"""The node's side of mail across domains: sealing for a contact whose server is out of
reach, the error for a stranger there, and how `peerpost status` words forwarding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from crypto.identity import DeviceIdentity
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.outbox import forwarding_text
from overlay.mail.outgoing import MailSender, SendError
from rendezvous.errors import error_for
from rendezvous.status import Status

BOB = DeviceIdentity.from_seed(b"\x02" * 32)


class _Unreachable:
    """A rendezvous client whose server says the other domain is out of reach."""

    async def finger(self, address: str) -> Any:
        raise error_for(Status.UNAVAILABLE, "b.test is unreachable: cannot connect")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[NodeDB]:
    with NodeDB.open(tmp_path) as opened:
        yield opened


def _sender(db: NodeDB) -> MailSender:
    return MailSender(DeviceIdentity.from_seed(b"\x01" * 32), "alice@a.test",
                      rendezvous=cast(Any, _Unreachable()), store=cast(Any, None),
                      contacts=Contacts(db), outbox=cast(Any, None), announce=lambda c: None,
                      direct_addresses=list, home_server="a.test", wall=lambda: 1000.0)


async def test_unreachable_domain_and_unknown_keys_is_a_clear_error(db: NodeDB) -> None:
    with pytest.raises(SendError) as err:
        await _sender(db)._recipient("bob@b.test")
    assert str(err.value) == ("b.test is unreachable: cannot connect; bob@b.test's keys are "
                              "unknown, so nothing was sent: check the address, or try again "
                              "later")


async def test_unreachable_domain_seals_for_the_pinned_keys(db: NodeDB) -> None:
    Contacts(db).pin_keys("bob@b.test", [BOB.public.verify_key], 900.0)
    r = await _sender(db)._recipient("bob@b.test")
    assert [d.verify_key for d in r.devices] == [BOB.public.verify_key]


def test_status_words() -> None:
    assert forwarding_text("queued", "a.test", "bob@b.test", None, None) == "queued at a.test"
    assert forwarding_text("queued", "a.test", "bob@b.test", 0.0, "x") == (
        "queued at a.test (b.test unreachable since 1970-01-01 00:00 UTC)")
    assert forwarding_text("delivered", "a.test", "bob@b.test", None, None) == \
        "delivered to b.test"
    assert forwarding_text("bounced", "a.test", "bob@b.test", None, "b.test refused it") == \
        "bounced: b.test refused it"
