"""The DHT is no amplifier and no free-for-all: per-source rate limits, replies bounded by
the request until the source proves its address with a token, provider records ranked for
reachability and diversity."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kademlia.node import Node

from crypto.identity import DeviceIdentity
from overlay.dht import DhtNode, ProviderRecord
from overlay.dht.ranking import rank_providers
from overlay.dht.ratelimit import dht_source_limiter
from overlay.dht.wire import (
    AMPLIFICATION_FACTOR,
    FindNode,
    FindProviders,
    Nodes,
    Reply,
    Request,
    RequestBody,
    decode_datagram,
    decode_reply_body,
)

CID = b"\x11" * 32
HOME = "mail.example.org:7000"
Addr = tuple[str, int]


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(n.to_bytes(2, "big") * 16)


def record(n: int, addresses: list[str], *, home: str = HOME, age: int = 0) -> ProviderRecord:
    return ProviderRecord.create(ident(n), CID, addresses, home, time.time() - age)


class Raw(asyncio.DatagramProtocol):
    """A bare UDP socket: sends what it is told, keeps every datagram that comes back."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)

    async def exchange(self, to: Addr, body: RequestBody, token: bytes = b"",
                       padding: int = 0) -> tuple[int, int, Nodes]:
        """(request bytes, reply bytes, reply body)."""
        req = Request(os.urandom(20), ident(999).public.verify_key, False, body, token,
                      padding).encode()
        self.transport.sendto(req, to)
        data = await asyncio.wait_for(self.got.get(), 5)
        reply = decode_datagram(data)
        assert isinstance(reply, Reply)
        decoded = decode_reply_body(reply, body.TAG)
        assert isinstance(decoded, Nodes)
        return len(req), len(data), decoded


@pytest.fixture
async def busy_node() -> AsyncIterator[tuple[DhtNode, Addr]]:
    """A node with a full routing table and 20 fat provider records for CID."""
    node = DhtNode(ident(1))
    addr = await node.listen("127.0.0.1", 0)
    for i in range(60):
        node.protocol.router.add_contact(Node(os.urandom(20), f"81.2.{i}.{i + 1}", 40000 + i))
    for i in range(20):
        node.storage.put(record(100 + i, [f"81.3.{i}.10:45123", f"[2a00:1450::{i:x}]:45123",
                                          f"host{i}.example.org:45123"]))
    yield node, addr
    await node.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    _, sock = await asyncio.get_running_loop().create_datagram_endpoint(
        Raw, local_addr=("127.0.0.1", 0))
    yield sock
    sock.transport.close()


async def test_replies_to_tokenless_requests_stay_within_three_times_the_request(
        busy_node: tuple[DhtNode, Addr], raw: Raw) -> None:
    node, addr = busy_node
    for body in (FindNode(os.urandom(20)), FindProviders(CID)):
        sent, got, reply = await raw.exchange(addr, body)
        assert got <= AMPLIFICATION_FACTOR * sent, (body, sent, got)
        assert reply.truncated and reply.token
        # The token proves the address: now the full answer comes.
        sent, got, full = await raw.exchange(addr, body, token=reply.token)
        assert len(full.contacts) == 20 and not full.truncated
        if isinstance(body, FindProviders):
            assert len(full.records) == 20 and got > 10 * sent
    assert node.stats()["replies.truncated"] == 2


async def test_a_padded_request_buys_a_full_list_of_contacts(
        busy_node: tuple[DhtNode, Addr], raw: Raw) -> None:
    _, addr = busy_node
    sent, got, reply = await raw.exchange(addr, FindNode(os.urandom(20)), padding=400)
    assert len(reply.contacts) == 20 and not reply.truncated
    assert got <= AMPLIFICATION_FACTOR * sent


async def test_a_node_gets_every_record_through_truncated_replies(
        busy_node: tuple[DhtNode, Addr]) -> None:
    node, addr = busy_node
    async with DhtNode(ident(2)) as asker:
        await asker.listen("127.0.0.1", 0)
        # Known, never asked: the first request goes without a token.
        asker.protocol.router.add_contact(Node(node.peer_id, *addr))
        found = await asker.find_providers(CID)
        assert len(found) == 20
        assert asker.stats()["rpc.reasked"] >= 1


async def test_requests_over_a_sources_rate_go_unanswered_others_are_served(
        raw: Raw) -> None:
    async with DhtNode(ident(1), source_rate=0.001, source_burst=5) as node:
        addr = await node.listen("127.0.0.1", 0)
        for _ in range(12):
            raw.transport.sendto(Request(os.urandom(20), ident(9).public.verify_key, False,
                                         FindNode(os.urandom(20))).encode(), addr)
        # A reply to the probe below arrives after every reply to the flood before it.
        probe = await asyncio.get_running_loop().create_datagram_endpoint(
            Raw, local_addr=("127.0.0.2", 0))
        try:
            await probe[1].exchange(addr, FindNode(os.urandom(20)))
        finally:
            probe[0].close()
        assert raw.got.qsize() == 5
        assert node.stats()["dropped.rate_limited"] == 7


def test_the_source_table_is_bounded() -> None:
    limiter = dht_source_limiter(rate=1.0, burst=1.0, max_sources=3)
    for i in range(10):
        assert limiter.allow(f"192.0.2.{i}", 0.0)
    assert len(limiter) == 3
    assert not limiter.allow("192.0.2.9", 0.0)  # still tracked: its burst is spent
    assert limiter.allow("192.0.2.0", 0.0)      # evicted long ago: a fresh bucket


def test_fresh_addresses_of_one_ipv6_64_neither_multiply_the_rate_nor_evict() -> None:
    limiter = dht_source_limiter(rate=1.0, burst=5.0, max_sources=3)
    assert limiter.allow("192.0.2.1", 0.0)
    answered = sum(limiter.allow(f"2001:db8:1:2::{i + 1:x}", 0.0) for i in range(1000))
    assert answered == 5
    assert len(limiter) == 2
    assert limiter.allow("2001:db8:1:3::1", 0.0)
    # 192.0.2.1 kept its bucket through the flood: its burst is still partly spent.
    assert sum(limiter.allow("192.0.2.1", 0.0) for _ in range(10)) == 4


def test_providers_are_ranked_diverse_then_direct_then_fresh() -> None:
    same_net = [record(i, [f"81.2.3.{i}:4000"], age=i) for i in range(1, 9)]
    nat_only = [record(20 + i, [f"192.168.1.{i}:4000"], home=f"rv{i}.example:7000")
                for i in range(2)]
    other_nets = [record(30 + i, [f"81.2.{10 + i}.1:4000"], age=100) for i in range(2)]
    ranked = rank_providers(same_net + nat_only + other_nets, 8)
    # Three of the crowded /24 (the freshest), then the other networks' direct records,
    # then the NAT-only ones, then the rest of the crowded /24.
    assert ranked[:3] == same_net[:3]
    assert set(ranked[3:5]) == set(other_nets)
    assert set(ranked[5:7]) == set(nat_only)
    assert ranked[7] == same_net[3]
    # Nothing is lost when one network holds every provider.
    assert rank_providers(same_net, 20) == same_net


def test_nat_only_records_are_grouped_by_home_server() -> None:
    crowded = [record(i, ["10.0.0.1:4000"], home="rv.example:7000", age=i) for i in range(6)]
    lone = record(50, ["10.0.0.2:4000"], home="other.example:7000", age=1000)
    ranked = rank_providers([*crowded, lone], 4)
    assert ranked == [*crowded[:3], lone]
