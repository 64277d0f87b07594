"""Each bad input over a real socket: a clear error reply (or a closed connection for
framing errors), nothing stored, and another session carries on unaffected."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from crypto.codec import packb
from rendezvous.client import RendezvousClient
from rendezvous.limits import Limits
from rendezvous.messages import Authorization, Deliver, Reply, Send, SendItem, encode_request
from rendezvous.server import RendezvousServer
from rendezvous.status import Status

from .conftest import DOMAIN, RawSession, ident, mid, port_of, running_server

ALICE, BOB, MALLORY = ident(1), ident(2), ident(9)
LIMITS = Limits(max_frame=64 * 1024, max_envelope=1000, quota_count=5)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[RendezvousServer, RendezvousClient,
                                                       RendezvousClient]]:
    """A server with Alice and Bob online (Bob has 1 envelope queued: the baseline)."""
    async with running_server(tmp_path, limits=LIMITS) as server:
        port = port_of(server)
        a = RendezvousClient("127.0.0.1", port, ALICE, "alice@example.net", register=True)
        b = RendezvousClient("127.0.0.1", port, BOB, "bob@example.net", register=True)
        m = RendezvousClient("127.0.0.1", port, MALLORY, "mallory@example.net", register=True)
        async with a, b:
            await m.start()
            await m.aclose()
            await a.send(mid(), [("bob@example.net", BOB.peer_id, b"baseline")])
            pushes = b.pushes()
            assert isinstance(await anext(pushes), Deliver)
            yield server, a, b


async def queued(server: RendezvousServer) -> int:
    return (await server.store.stats()).queued_envelopes


async def others_unaffected(server: RendezvousServer, a: RendezvousClient,
                            b: RendezvousClient, before: int) -> None:
    assert await queued(server) == before  # nothing stored by the bad input
    m = mid()
    await a.send(m, [("bob@example.net", BOB.peer_id, b"still works")])
    push = await anext(b.pushes())
    assert isinstance(push, Deliver) and push.envelope.message_id == m


async def mallory(server: RendezvousServer) -> RawSession:
    s = await RawSession.open(port_of(server))
    r = await s.auth(MALLORY, "mallory@example.net")
    assert r.ok, r.text
    return s


def send_to(to: str, device: bytes, blob: bytes, rid: int = 5) -> bytes:
    body = encode_request(Send(rid, mid(), 0, (SendItem(to, device, blob),)))
    return struct.pack(">I", len(body)) + body


Case = Callable[[RendezvousServer], Awaitable[None]]


async def random_bytes(server: RendezvousServer) -> None:
    rng = random.Random(7)
    for n in range(12):
        s = await RawSession.open(port_of(server))
        junk = rng.randbytes(rng.randint(1, 3000))
        if n % 2:
            junk = struct.pack(">I", len(junk)) + junk  # well framed, garbage inside
        await s.write(junk)
        if n % 2:
            r = await s.reply()
            assert r.status == Status.BAD_REQUEST and r.text
        await s.close()


async def oversize_prefix(server: RendezvousServer) -> None:
    s = await RawSession.open(port_of(server))
    await s.write(struct.pack(">I", 64 * 1024 + 1))
    r = await s.reply()
    assert (r.status, r.text) == (Status.TOO_LARGE,
                                  "frame of 65537 bytes over the limit 65536")
    assert await s.closed_by_server()


async def truncated_frame(server: RendezvousServer) -> None:
    s = await mallory(server)
    frame = send_to("bob@example.net", BOB.peer_id, b"half")
    await s.write(frame[:-2])
    s.writer.write_eof()
    assert await s.closed_by_server()


async def unknown_verb(server: RendezvousServer) -> None:
    s = await mallory(server)
    await s.frame(packb({"t": "DELETE_EVERYTHING", "id": 3}))
    r = await s.reply()
    assert (r.id, r.status, r.text) == (3, 400, "unknown verb 'DELETE_EVERYTHING'")
    await s.close()


async def verb_before_auth(server: RendezvousServer) -> None:
    s = await RawSession.open(port_of(server))
    await s.write(send_to("bob@example.net", BOB.peer_id, b"sneaky", rid=4))
    r = await s.reply()
    assert (r.id, r.status, r.text) == (4, 401, "authenticate first (SEND before AUTHORIZATION)")
    await s.close()


async def bad_signature(server: RendezvousServer) -> None:
    s = await RawSession.open(port_of(server))
    if s.challenge is None:
        raise AssertionError("no challenge")
    good = Authorization.signed(1, MALLORY, DOMAIN, s.challenge.nonce, "mallory@example.net")
    forged = Authorization(1, "mallory@example.net", MALLORY.public.verify_key,
                           bytes(64), None, False, None, client_nonce=bytes(32))
    await s.frame(encode_request(forged))
    r = await s.reply()
    assert r.status == Status.UNAUTHORIZED and "bad signature" in r.text
    # Alice's key claiming to be mallory signs with the wrong key: refused too.
    await s.frame(encode_request(Authorization.signed(
        2, ALICE, DOMAIN, s.challenge.nonce, "mallory@example.net")))
    r2 = await s.reply()
    assert r2.status in (Status.UNAUTHORIZED, Status.FORBIDDEN)
    assert good.signature != forged.signature
    await s.close()


async def replayed_signature(server: RendezvousServer) -> None:
    s1 = await RawSession.open(port_of(server))
    if s1.challenge is None:
        raise AssertionError("no challenge")
    auth = Authorization.signed(1, MALLORY, DOMAIN, s1.challenge.nonce, "mallory@example.net")
    await s1.frame(encode_request(auth))
    assert (await s1.reply()).ok
    s2 = await RawSession.open(port_of(server))  # an eavesdropper replays it
    await s2.frame(encode_request(auth))
    r = await s2.reply()
    assert r.status == Status.UNAUTHORIZED and "bad signature" in r.text
    await s1.close()
    await s2.close()


async def send_to_unknown_address(server: RendezvousServer) -> None:
    s = await mallory(server)
    await s.write(send_to("nobody@example.net", bytes(20), b"x", rid=8))
    r = await s.reply()
    assert (r.id, r.status, r.text) == (8, 404, "no such address: nobody@example.net")
    await s.close()


async def oversize_envelope(server: RendezvousServer) -> None:
    s = await mallory(server)
    await s.write(send_to("bob@example.net", BOB.peer_id, b"x" * 1001, rid=9))
    r = await s.reply()
    assert (r.id, r.status, r.text) == (9, 413, "envelope too large: 1001 bytes, limit 1000")
    await s.close()


async def same_device_twice(server: RendezvousServer) -> None:
    s = await mallory(server)
    item = SendItem("bob@example.net", BOB.peer_id, b"x")
    await s.frame(encode_request(Send(11, mid(), 0, (item, item))))
    r = await s.reply()
    assert (r.id, r.status, r.text) == (11, 400, "SEND.items: a device appears more than once")
    await s.close()


async def exceed_quota(server: RendezvousServer) -> None:
    s = await mallory(server)
    replies: list[Reply] = []
    for i in range(10):
        await s.write(send_to("mallory@example.net", MALLORY.peer_id, b"spam", rid=100 + i))
        replies.append(await s.reply())
    assert [r.status for r in replies] == [200] * 5 + [507] * 5
    assert replies[-1].text.startswith("quota exceeded for mallory@example.net: 5 envelopes")
    await s.close()


# Well-formed requests the server refuses on its data: answered, but not misbehaviour.
REFUSALS = {"SEND to an unknown address", "exceeding a quota"}
CASES: dict[str, Case] = {
    "random bytes": random_bytes,
    "length prefix over the limit": oversize_prefix,
    "truncated frame": truncated_frame,
    "unknown verb": unknown_verb,
    "verb before auth": verb_before_auth,
    "bad signature": bad_signature,
    "replayed signature": replayed_signature,
    "SEND to an unknown address": send_to_unknown_address,
    "oversize envelope": oversize_envelope,
    "one device twice in a SEND": same_device_twice,
    "exceeding a quota": exceed_quota,
}


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input(name: str, world: tuple[RendezvousServer, RendezvousClient,
                                                 RendezvousClient]) -> None:
    server, a, b = world
    before = await queued(server)
    bad_before = server.bad_input
    await CASES[name](server)
    if name == "exceeding a quota":
        before += 5  # the five within quota were legitimately stored, not one more
    if name not in REFUSALS:
        assert server.bad_input > bad_before  # counted as misbehaviour
    await others_unaffected(server, a, b, before)
