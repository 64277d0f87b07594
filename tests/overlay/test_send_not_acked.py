"""A SEND the server never acknowledged (it went away mid-send for longer than the request
timeout) leaves a clear state: the CLI's error names the message and `peerpost resend`, and
`peerpost status` shows those recipients failed with the reason, not `queued` forever.

Found by the chaos soak (`python -m benchmarks soak --harsh`): a server restart during a
send whose reconnect took over the 10 s request timeout left an outbox row `queued` that
nothing would ever send.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from crypto.identity import DeviceIdentity
from overlay.content.catalog import ContentStore
from overlay.mail.contacts import Contacts
from overlay.mail.db import NodeDB
from overlay.mail.outbox import NOT_SENT, Outbox, RecipientStatus
from overlay.mail.outgoing import MailSender, SendError
from rendezvous.errors import RequestTimeoutError
from rendezvous.records import DeviceInfo, FingerResult

ALICE = DeviceIdentity.from_seed(b"\x01" * 32)
BOB = DeviceIdentity.from_seed(b"\x02" * 32).public.verify_key


class _GoneServer:
    """Answers FINGER; the SEND never gets its acknowledgement."""

    async def finger(self, address: str) -> FingerResult:
        return FingerResult(address, (DeviceInfo(BOB, True, None, {}),))

    async def send(self, message_id: bytes, items: list[Any]) -> None:
        raise RequestTimeoutError("not connected to 127.0.0.1:4500 within 10.0s")


async def test_an_unacknowledged_send_fails_its_recipients_with_the_reason(
        db: NodeDB, store: ContentStore, tmp_path: Path) -> None:
    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"x" * 5000)
    outbox = Outbox(db)
    sender = MailSender(ALICE, "alice@a.test", rendezvous=cast(Any, _GoneServer()),
                        store=store, contacts=Contacts(db), outbox=outbox,
                        announce=lambda c: None, direct_addresses=list,
                        home_server="a.test", wall=lambda: 1000.0)
    with pytest.raises(SendError) as err:
        await sender.send(clip, ["bob@a.test"], "t", "")
    (m,) = outbox.list()
    short = m.id.hex()[:12]
    assert str(err.value) == (
        f"{short} was not sent to bob@a.test: the server did not take it (not connected to "
        f"127.0.0.1:4500 within 10.0s); `peerpost resend {short}` sends it again")
    (r,) = m.recipients
    assert r.state is RecipientStatus.FAILED
    assert r.reason == f"{NOT_SENT}: not connected to 127.0.0.1:4500 within 10.0s"

    # The server may have committed it and lost only the acknowledgement: bob's receipts
    # still count.
    assert outbox.set_recipient_state(m.id, "bob@a.test", RecipientStatus.DOWNLOADED, 1001.0)
    assert outbox.all_downloaded(m.id)


def test_other_failures_stay_final(db: NodeDB) -> None:
    outbox = Outbox(db)
    mid = b"\x07" * 16
    outbox.add(id=mid, path="/x", title="t", size=1, content_id=b"\x01" * 32,
               created_at=1.0, recipients=["bob@a.test"])
    outbox.set_recipient_state(mid, "bob@a.test", RecipientStatus.FAILED, 2.0,
                               reason="cancelled by the sender")
    assert not outbox.set_recipient_state(mid, "bob@a.test", RecipientStatus.DOWNLOADED, 3.0)


def test_a_send_cut_by_the_nodes_own_end_is_failed_at_the_next_start(
        db: NodeDB, store: ContentStore) -> None:
    # The row was written, then the node was killed before the server's acknowledgement:
    # at the next start the recipient still `queued` is failed with the reason; one the
    # server acknowledged (`sent`) is left alone.
    outbox = Outbox(db)
    cut, fine = b"\x08" * 16, b"\x09" * 16
    for mid in (cut, fine):
        outbox.add(id=mid, path="/x", title="t", size=1, content_id=b"\x01" * 32,
                   created_at=1.0, recipients=["bob@a.test"])
    outbox.set_recipient_state(fine, "bob@a.test", RecipientStatus.SENT, 2.0)
    sender = MailSender(ALICE, "alice@a.test", rendezvous=cast(Any, _GoneServer()),
                        store=store, contacts=Contacts(db), outbox=outbox,
                        announce=lambda c: None, direct_addresses=list,
                        home_server="a.test", wall=lambda: 5.0)
    assert sender.fail_unacknowledged() == 1
    states = {m.id: m.recipients[0] for m in outbox.list()}
    assert states[fine].state is RecipientStatus.SENT
    assert states[cut].state is RecipientStatus.FAILED
    reason = states[cut].reason
    assert reason is not None and reason.startswith(NOT_SENT)
    assert "resend" in reason
