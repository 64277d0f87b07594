"""Hostile mail through a real server to a real node process: names too long in bytes or
blank, 2 GiB in 1 KiB chunks, a million-chunk offer, terminal escapes in a title, more
messages than the inbox holds. The node stays up and small, refuses and acknowledges what
does not fit, and an honest message sent afterwards arrives with its bytes intact."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from crypto.codec import packb
from crypto.envelope import seal_for_recipients
from crypto.identity import DeviceIdentity, PublicIdentity
from crypto.location import Description, Handle, Headers, LocationMessage, _to_wire
from overlay.app.lab import LocalNetwork
from rendezvous.client import RendezvousClient

pytestmark = pytest.mark.slow

INBOX_MAX = 4
GiB = 1 << 30
RSS_LIMIT_KIB = 300 * 1024


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def test_hostile_mail_then_an_honest_message(net: LocalNetwork, tmp_path: Path) -> None:
    alice = net.add_node("alice")
    bob = net.add_node("bob", extra=["--inbox-max", str(INBOX_MAX)])
    net.start_node(alice)
    net.start_node(bob)

    mallory = DeviceIdentity.generate()
    host, port = net.server_addr or ("", 0)
    async with RendezvousClient(host, port, mallory, "mallory@example.net", register=True,
                                reconnect=False, tls=net.tls) as rc:
        (dev,) = (await rc.finger(bob.address)).devices
        bob_key = PublicIdentity(dev.verify_key)

        def message(n: int, *, size: int = 3 * GiB, chunk: int = 1 << 20,
                    name: str = "clip.ts", title: str = "hi") -> tuple[bytes, bytes]:
            mid = n.to_bytes(16, "big")
            msg = LocationMessage(
                headers=Headers(message_id=mid, sender="mallory@example.net",
                                sender_peer_id=mallory.peer_id, recipients=(bob.address,),
                                created=1_700_000_000),
                description=Description(title=title, file_name=name),
                handle=Handle(content_id=os.urandom(32), size=size, chunk_size=chunk,
                              content_key=b"k" * 32, capability=b"p" * 32))
            # packb of the wire form, not encode(): encode() refuses what the node must.
            ((_, blob),) = seal_for_recipients(mallory, "location", packb(_to_wire(msg)),
                                               [bob_key])
            return mid, blob

        async def send(mid: bytes, blob: bytes) -> None:
            await rc.send(mid, [(bob.address, bob_key.peer_id, blob)])

        # Refused by the decoder: each would have broken the download queue or the memory.
        await send(*message(1, name="é" * 121))  # 242 bytes, 121 characters
        await send(*message(2, name="   "))
        await send(*message(3, size=2 * GiB, chunk=1024))  # 2,097,152 chunks
        # Accepted, but larger than auto-download-max: they wait in `offered`.
        await send(*message(4, size=64 * GiB, chunk=64 << 10))  # 2^20 chunks
        await send(*message(5, title="[red]pwn[/red]\x1b[2J\x1b]0;owned\x07\rX"))
        await send(*message(6))
        await send(*message(7))
        # The inbox holds INBOX_MAX: these are refused, and acknowledged.
        await send(*message(8))
        await send(*message(9))

    def settled() -> dict[str, int] | None:
        c: dict[str, int] = net.cli_json(bob, "info")["counters"]
        return c if c.get("refused-inbox-full", 0) >= 2 and \
            c.get("dropped-location", 0) >= 3 else None

    counters = net.wait_until(settled, 60, "bob to file, drop and refuse mallory's mail")
    assert counters["refused-inbox-full"] == 2 and counters["dropped-location"] == 3
    info = net.cli_json(bob, "info")
    assert info["inbox"] == {"messages": 4, "max": 4, "full": True, "junk": 0, "refused": 2,
                             "listed": 1000}
    entries = net.cli_json(bob, "inbox", "--all")
    # Larger than auto-download-max, so none started (held ones wait as `unverified`).
    assert {e["state"] for e in entries} <= {"offered", "unverified"}
    # The human view says it is full, and shows the title's escapes instead of obeying them.
    shown = net.cli(bob, "inbox")
    assert "inbox full" in shown.stderr
    assert "pwn" in "".join(shown.stdout.split())  # the table may wrap the title
    assert not any(ord(c) < 0x20 and c != "\n" for c in shown.stdout + shown.stderr)

    # Make room, then the honest message.
    for e in entries[:2]:
        net.cli(bob, "rm", e["id"])
    assert net.cli_json(bob, "info")["inbox"]["messages"] == 2
    good = tmp_path / "good.bin"
    good.write_bytes(os.urandom(700_000))
    mid = net.cli(alice, "send", str(good), "--to", bob.address).stdout.strip()
    done = net.wait_until(lambda: (e := net.inbox_entry(bob, mid)) and e["state"] == "complete"
                          and e, 60, "the honest message")
    assert Path(done["path"]).read_bytes() == good.read_bytes()

    assert bob.proc is not None and bob.proc.alive()
    peak = peak_rss_kib(bob.proc.popen.pid)
    assert peak < RSS_LIMIT_KIB, f"bob's peak RSS {peak} KiB"
    assert "Traceback" not in bob.proc.log()

    # What was refused or dropped was acknowledged: a restart brings none of it back.
    net.stop_node(bob)
    net.start_node(bob)
    c = net.cli_json(bob, "info")["counters"]
    assert not any(k.startswith(("dropped-", "refused-")) for k in c), c
    assert len(net.cli_json(bob, "inbox", "--all")) == 3


def test_blank_and_long_names_would_not_encode() -> None:
    # The sending side refuses them too, so only a hand-made message carries them.
    msg = LocationMessage(
        headers=Headers(message_id=b"m" * 16, sender="a@example.net",
                        sender_peer_id=b"p" * 20, recipients=("b@example.net",), created=1),
        description=Description(file_name="x"),
        handle=Handle(content_id=b"c" * 32, size=1, chunk_size=1 << 20,
                      content_key=b"k" * 32, capability=b"p" * 32))
    msg.encode()
    for name in ("é" * 121, "  "):
        with pytest.raises(Exception, match="name"):
            dataclasses.replace(msg, description=Description(file_name=name)).encode()
