"""Bad input arriving from the server: a real node process receives garbage,
forged and malformed location messages from another account, drops and counts each, keeps
running, and loses nothing it already had."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from crypto.codec import packb, unpackb
from crypto.envelope import seal_for_recipients, sign_payload
from crypto.identity import DeviceIdentity, PublicIdentity, seal
from overlay.app.lab import LocalNetwork
from rendezvous.client import RendezvousClient

pytestmark = pytest.mark.slow


async def test_garbage_and_forgeries_from_the_server_are_dropped(net: LocalNetwork,
                                                                 tmp_path: Path) -> None:
    alice, bob = net.add_node("alice"), net.add_node("bob")
    net.start_node(alice)
    net.start_node(bob)
    good = tmp_path / "good.bin"
    good.write_bytes(os.urandom(300_000))
    mid = net.cli(alice, "send", str(good), "--to", bob.address).stdout.strip()
    net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "complete",
                   60, "the good message")

    mallory = DeviceIdentity.generate()
    host, port = net.server_addr or ("", 0)
    async with RendezvousClient(host, port, mallory, "mallory@example.net", register=True,
                                reconnect=False, tls=net.tls) as rc:
        (dev,) = (await rc.finger(bob.address)).devices
        bob_key = PublicIdentity(dev.verify_key)

        def to(blob: bytes) -> list[tuple[str, bytes, bytes]]:
            return [(bob.address, bob_key.peer_id, blob)]

        # 1. random bytes where a sealed envelope should be
        await rc.send(os.urandom(16), to(os.urandom(500)))
        # 2. a signature by Mallory's key over a body claiming another signer key
        signed = unpackb(sign_payload(mallory, "location", b"x" * 40), max_bytes=4096)
        signed["key"] = DeviceIdentity.generate().public.verify_key
        await rc.send(os.urandom(16), to(seal(bob_key, packb(signed))))
        # 3. properly signed and sealed, but the body is not a location message
        ((_, blob),) = seal_for_recipients(mallory, "location", b"\x93\x01\x02", [bob_key])
        await rc.send(os.urandom(16), to(blob))
        # 4. an envelope kind nobody knows
        ((_, blob),) = seal_for_recipients(mallory, "launch-missiles", b"", [bob_key])
        await rc.send(os.urandom(16), to(blob))

    def all_dropped() -> Any:
        c = net.cli_json(bob, "info")["counters"]
        dropped = sum(v for k, v in c.items() if k.startswith("dropped-"))
        return c if dropped >= 4 else None

    counters = net.wait_until(all_dropped, 30, "bob to drop all four")
    assert counters["dropped-envelope"] >= 2  # garbage, bad signature
    assert counters["dropped-location"] >= 1
    assert counters["dropped-unknown-kind"] >= 1
    # Still running, and nothing lost.
    assert bob.proc is not None and bob.proc.alive()
    entries = net.cli_json(bob, "inbox", "--all")
    assert [e["id"] for e in entries] == [mid]
    assert Path(entries[0]["path"]).read_bytes() == good.read_bytes()
    # The junk was acknowledged: it does not come back at the next login.
    net.stop_node(bob)
    net.start_node(bob)
    c = net.cli_json(bob, "info")["counters"]
    assert not any(k.startswith("dropped-") for k in c)
