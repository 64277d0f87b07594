"""Hostile input on real UDP sockets: each is refused, counted, and never raises in the loop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
from kademlia.node import Node

from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode, ProviderRecord
from overlay.dht.protocol import REPLY_CONTEXT, Answer, RpcFailure
from overlay.dht.records import RECORD_TTL
from overlay.dht.wire import (
    ErrorReply,
    FindProviders,
    Nodes,
    Ping,
    Pong,
    Reply,
    ReplyBody,
    Request,
    RequestBody,
    Stored,
    StoreProvider,
    decode_datagram,
    decode_reply_body,
    encode_reply_body,
)

HOME = "rv.example.net:7000"
CID = b"\x11" * 32
OTHER_CID = b"\x22" * 32

Addr = tuple[str, int]


class Peer(asyncio.DatagramProtocol):
    """A scripted UDP peer: sends raw datagrams, queues replies, answers requests itself."""

    def __init__(self, identity: DeviceIdentity,
                 answer: Callable[[RequestBody], ReplyBody] | None = None,
                 sign_with: DeviceIdentity | None = None) -> None:
        self.identity = identity
        self.answer = answer
        self.sign_with = sign_with or identity
        self.replies: asyncio.Queue[Reply] = asyncio.Queue()
        self.transport: Any = None
        self.tokens: dict[Addr, bytes] = {}  # as a node does: the last token each gave us

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        msg = decode_datagram(data)
        if isinstance(msg, Reply):
            self.replies.put_nowait(msg)
        elif self.answer is not None:
            body = encode_reply_body(self.answer(msg.body))
            sig = self.sign_with.sign(REPLY_CONTEXT, msg.msg_id + body)
            self.transport.sendto(
                Reply(msg.msg_id, self.identity.public.verify_key, body, sig).encode(), addr)

    @property
    def address(self) -> Addr:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def ask(self, to: Addr, body: RequestBody) -> ReplyBody:
        msg_id = os.urandom(20)
        token = self.tokens.get(to, b"")
        self.transport.sendto(Request(msg_id, self.identity.public.verify_key, False, body,
                                      token, 0 if token else 400).encode(), to)
        reply = await asyncio.wait_for(self.replies.get(), 5)
        assert reply.msg_id == msg_id
        decoded = decode_reply_body(reply, body.TAG)
        if isinstance(decoded, Nodes):
            self.tokens[to] = decoded.token
        return decoded


PeerFactory = Callable[..., Any]


@pytest.fixture
async def open_peer() -> AsyncIterator[PeerFactory]:
    peers: list[Peer] = []

    async def open_one(identity: DeviceIdentity, **kw: Any) -> Peer:
        _, peer = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: Peer(identity, **kw), local_addr=("127.0.0.1", 0))
        peers.append(peer)
        return peer

    yield open_one
    for peer in peers:
        peer.transport.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
    yield errors
    assert errors == [], "something raised inside the event loop"


@pytest.fixture
async def target(loop_errors: list[dict[str, Any]]) -> AsyncIterator[tuple[DhtNode, Addr]]:
    node = DhtNode(DeviceIdentity.from_seed(b"\x01" * 32))
    addr = await node.listen("127.0.0.1", 0)
    yield node, addr
    await node.aclose()


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([n]) * 32)


async def test_garbage_and_oversized_datagrams_are_dropped_and_counted(
        target: tuple[DhtNode, Addr], open_peer: PeerFactory) -> None:
    node, addr = target
    peer = await open_peer(ident(9))
    garbage = [
        b"\xc1",                                           # never valid msgpack
        os.urandom(300),
        msgpack.packb({"a": 1}),                           # wrong shape
        msgpack.packb([0, b"m" * 20, b"k" * 32, True, {"t": 99}]),  # unknown message tag
        msgpack.packb([0, b"m" * 20, b"k" * 32, True, {"t": 2, "target": b"short"}]),
        msgpack.packb([0, b"m" * 19, b"k" * 32, True, {"t": 1}]),   # msg id too short
        msgpack.packb(msgpack.ExtType(1, b"x")),                # ext types refused
    ]
    for data in garbage:
        peer.transport.sendto(data, addr)
    peer.transport.sendto(b"\x00" * 20_000, addr)
    # Datagrams on loopback arrive in order: once this is answered, the rest were handled.
    assert await peer.ask(addr, Ping()) == Pong()
    stats = node.stats()
    assert stats["dropped.garbage"] == len(garbage)
    assert stats["dropped.oversize"] == 1
    assert stats["rpc.served"] == 1


async def test_store_needs_a_token_issued_to_the_storing_address(
        target: tuple[DhtNode, Addr], open_peer: PeerFactory) -> None:
    node, addr = target
    provider = ident(7)
    record = ProviderRecord.create(provider, CID, ["127.0.0.1:4000"], HOME, time.time())
    peer, other = await open_peer(provider), await open_peer(provider)

    reply = await peer.ask(addr, StoreProvider(CID, record.encode(), b"\x00" * 16))
    assert isinstance(reply, ErrorReply) and "token" in reply.text

    found = await peer.ask(addr, FindProviders(CID))
    assert isinstance(found, Nodes) and found.records == ()
    stolen = await other.ask(addr, StoreProvider(CID, record.encode(), found.token))
    assert isinstance(stolen, ErrorReply) and "token" in stolen.text  # another port
    assert node.stats()["records"] == 0
    assert node.stats()["store_refused.token"] == 2

    assert await peer.ask(addr, StoreProvider(CID, record.encode(), found.token)) == Stored()
    again = await peer.ask(addr, FindProviders(CID))
    assert isinstance(again, Nodes)
    assert [ProviderRecord.decode(r, now=time.time()) for r in again.records] == [record]


async def test_forged_expired_and_misfiled_records_are_not_stored(
        target: tuple[DhtNode, Addr], open_peer: PeerFactory) -> None:
    node, addr = target
    now = time.time()
    good = ProviderRecord.create(ident(7), CID, [], HOME, now)
    forged = ProviderRecord(CID, ident(8).public.verify_key, good.addresses, HOME,
                            good.expires, good.signature)
    expired = ProviderRecord.create(ident(7), CID, [], HOME, now - RECORD_TTL - 5)
    peer = await open_peer(ident(7))
    found = await peer.ask(addr, FindProviders(CID))
    assert isinstance(found, Nodes)
    cases: list[tuple[bytes, ProviderRecord | bytes, str]] = [
        (CID, forged, "signature does not verify"), (CID, expired, "expired"),
        (OTHER_CID, good, "another content id"), (CID, b"\x93\x01\x02\x03", "record")]
    for cid, rec, why in cases:
        blob = rec if isinstance(rec, bytes) else rec.encode()
        reply = await peer.ask(addr, StoreProvider(cid, blob, found.token))
        assert isinstance(reply, ErrorReply) and why in reply.text, reply
    stats = node.stats()
    assert stats["records"] == 0
    assert stats["store_refused.forged_record"] == 1
    assert stats["store_refused.expired_record"] == 1
    assert stats["store_refused.wrong_content"] == 1
    assert stats["store_refused.bad_record"] == 1


async def test_lookups_drop_bad_records_in_replies_and_keep_the_good_one(
        loop_errors: list[dict[str, Any]], open_peer: PeerFactory) -> None:
    now = time.time()
    good = ProviderRecord.create(ident(7), CID, ["127.0.0.1:4000"], HOME, now)
    elsewhere = ProviderRecord.create(ident(7), OTHER_CID, [], HOME, now)
    forged = ProviderRecord(CID, ident(8).public.verify_key, (), HOME, good.expires,
                            good.signature)
    expired = ProviderRecord.create(ident(9), CID, [], HOME, now - RECORD_TTL - 5)

    def answer(body: RequestBody) -> ReplyBody:
        if isinstance(body, FindProviders):
            return Nodes((), b"t" * 16, tuple(r.encode() for r in (elsewhere, forged, expired,
                                                                     good)))
        return Nodes((), b"t" * 16) if not isinstance(body, Ping) else Pong()

    liar = await open_peer(ident(5), answer=answer)
    async with DhtNode(ident(1)) as node:
        await node.listen("127.0.0.1", 0)
        assert await node.bootstrap([liar.address]) == 1
        assert await node.find_providers(CID) == [good]
        stats = node.stats()
        assert stats["dropped.wrong_content"] == 1
        assert stats["dropped.forged_record"] == 1
        assert stats["dropped.expired_record"] == 1


async def test_a_node_whose_key_does_not_hash_to_its_claimed_id_is_refused(
        target: tuple[DhtNode, Addr], open_peer: PeerFactory) -> None:
    node, _ = target
    honest = await open_peer(ident(5), answer=lambda b: Pong())
    claimed_id = ident(6).peer_id  # someone else's id, advertised at the honest peer's address
    outcome = await node.protocol.call_ping(Node(claimed_id, *honest.address))
    assert outcome == RpcFailure("forged_id")
    assert node.stats()["dropped.forged_id"] == 1
    assert node.contacts() == []

    # Keeps its id but signs with another key: the signature fails; the RPC then times out.
    impostor = await open_peer(ident(6), answer=lambda b: Pong(), sign_with=ident(7))
    outcome = await node.protocol.call_ping(Node(claimed_id, *impostor.address))
    assert outcome == RpcFailure("timeout")
    assert node.stats()["dropped.bad_signature"] == 1
    assert node.contacts() == []

    # The real holder of that key proves it and is let in.
    real = await open_peer(ident(6), answer=lambda b: Pong())
    outcome = await node.protocol.call_ping(Node(claimed_id, *real.address))
    assert isinstance(outcome, Answer) and outcome.node.id == claimed_id
    assert [c.node_id for c in node.contacts()] == [claimed_id]


async def test_a_requester_claiming_a_key_it_cannot_sign_for_is_not_added(
        target: tuple[DhtNode, Addr], open_peer: PeerFactory) -> None:
    node, addr = target
    # Claims to be a serving node with ident(6)'s key, but answers the check ping with ident(5).
    spoofer = await open_peer(ident(6), answer=lambda b: Pong(), sign_with=ident(5))
    msg_id = os.urandom(20)
    spoofer.transport.sendto(
        Request(msg_id, ident(6).public.verify_key, True, Ping()).encode(), addr)
    assert (await asyncio.wait_for(spoofer.replies.get(), 5)).msg_id == msg_id
    # The check ping went out; wait for it to fail (bad signature, then timeout).
    await asyncio.wait([p.future for p in node.protocol._pending.values()])
    assert node.contacts() == []
    assert node.stats()["dropped.bad_signature"] == 1
