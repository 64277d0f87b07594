"""DHT cores without sockets: records, tokens, timeouts, storage bounds, the lookup, wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from crypto.identity import DeviceIdentity
from overlay.dht.errors import LocalProtocolError, RemoteProtocolError
from overlay.dht.lookup import Lookup
from overlay.dht.records import RECORD_TTL, ProviderRecord
from overlay.dht.rtt import INITIAL_RTO, MAX_RTO, MIN_RTO, RttTable
from overlay.dht.storage import ProviderStore
from overlay.dht.tokens import TokenIssuer
from overlay.dht.wire import FindNode, Request, decode_datagram

NOW = 1_700_000_000.0
CID = bytes(range(32))


def ident(n: int) -> DeviceIdentity:
    return DeviceIdentity.from_seed(bytes([n]) * 32)


def record(n: int = 1, cid: bytes = CID, now: float = NOW, ttl: int = RECORD_TTL
           ) -> ProviderRecord:
    return ProviderRecord.create(ident(n), cid, ["192.0.2.1:4000", "[2001:db8::1]:4000"],
                                 "rv.example.net:7000", now, ttl)


def test_record_round_trips_and_names_its_provider() -> None:
    r = record()
    back = ProviderRecord.decode(r.encode(), now=NOW + 10)
    assert back == r
    assert back.peer_id == ident(1).peer_id
    assert back.expires == int(NOW) + 48 * 3600


def test_forged_record_is_refused() -> None:
    r = record()
    tampered = ProviderRecord(r.content_id, r.provider_key, ("198.51.100.7:1",), r.home_server,
                              r.expires, r.signature)
    with pytest.raises(RemoteProtocolError) as e:
        ProviderRecord.decode(tampered.encode(), now=NOW)
    assert e.value.reason == "forged_record"
    stolen_key = ProviderRecord(r.content_id, ident(2).public.verify_key, r.addresses,
                                r.home_server, r.expires, r.signature)
    with pytest.raises(RemoteProtocolError, match="forged_record"):
        ProviderRecord.decode(stolen_key.encode(), now=NOW)


def test_expired_and_overlong_records_are_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="expired_record"):
        ProviderRecord.decode(record(ttl=60).encode(), now=NOW + 61)
    far_future = record(now=NOW + 3 * 24 * 3600)
    with pytest.raises(RemoteProtocolError, match="beyond the 48 h TTL"):
        ProviderRecord.decode(far_future.encode(), now=NOW)


@pytest.mark.parametrize("addr", ["nohost", "h:0", "h:70000", "a b:1", "[zz]:1", "x" * 70 + ":1"])
def test_bad_addresses_are_our_error_when_signing(addr: str) -> None:
    with pytest.raises(LocalProtocolError):
        ProviderRecord.create(ident(1), CID, [addr], "rv.example:1", NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_records_only_ever_raise_remote_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ProviderRecord.decode(data, now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                              | st.binary(max_size=40)
                              | st.text(max_size=10),
                              lambda kids: st.lists(kids, max_size=6)
                              | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                              max_leaves=20).map(lambda o: __import__("msgpack").packb(o))))
def test_garbage_datagrams_only_ever_raise_remote_protocol_error(data: bytes) -> None:
    try:
        decode_datagram(data)
    except RemoteProtocolError:
        pass


def test_oversized_datagram_is_refused_before_decoding() -> None:
    with pytest.raises(RemoteProtocolError, match="oversize"):
        decode_datagram(b"\x00" * 20_000)


def test_request_round_trips() -> None:
    req = Request(b"m" * 20, ident(1).public.verify_key, True, FindNode(b"t" * 20))
    assert decode_datagram(req.encode()) == req


def test_tokens_live_five_to_ten_minutes_and_bind_the_address() -> None:
    counter = iter(range(1000))
    issuer = TokenIssuer(0.0, secret_source=lambda n: bytes([next(counter)]) * n)
    token = issuer.issue("192.0.2.1", 4000, now=10.0)
    assert issuer.check(token, "192.0.2.1", 4000, now=250.0)
    assert not issuer.check(token, "192.0.2.2", 4000, now=250.0)
    assert not issuer.check(token, "192.0.2.1", 4001, now=250.0)
    assert issuer.check(token, "192.0.2.1", 4000, now=590.0)   # after one rotation
    assert not issuer.check(token, "192.0.2.1", 4000, now=610.0)  # after two


def test_timeouts_adapt_and_stay_clamped() -> None:
    table = RttTable()
    assert table.timeout_for(b"a") == INITIAL_RTO
    for _ in range(10):
        table.sample(b"a", 0.001)
    assert table.timeout_for(b"a") == MIN_RTO
    assert table.timeout_for(b"never-seen") == MIN_RTO  # falls back to the overall estimate
    for _ in range(10):
        table.sample(b"slow", 5.0)
    assert table.timeout_for(b"slow") == MAX_RTO


def test_storage_is_bounded_per_key_and_in_total_and_forgets_expired() -> None:
    clock = [NOW]
    store = ProviderStore(lambda: clock[0], max_per_key=3, max_total=5)
    for n in range(1, 5):
        store.put(record(n, ttl=1000 * n))
    kept = store.providers(CID, 20)
    assert [r.peer_id for r in kept] == [ident(n).peer_id for n in (4, 3, 2)]
    other = bytes(32)
    assert store.put(record(5, cid=other))
    assert store.put(record(6, cid=other))
    assert len(store) == 5
    assert not store.put(record(7, cid=other))  # full
    clock[0] = NOW + 2500  # records 1..2 lapsed
    assert store.put(record(7, cid=other, now=NOW + 2500))
    assert len(store.providers(CID, 20)) == 2


def _nodes(n: int) -> list[Node]:
    return [Node(i.to_bytes(20, "big")) for i in range(1, n + 1)]


def test_lookup_refills_a_slot_as_soon_as_one_query_fails() -> None:
    lookup = Lookup(bytes(20), k=3, alpha=2, self_id=b"\xff" * 20)
    nodes = _nodes(6)
    lookup.add(nodes)
    first = lookup.next_queries()
    assert [n.long_id for n in first] == [1, 2]
    assert lookup.next_queries() == []  # both slots busy
    lookup.failed(first[0].id)  # node 1 is dead: its slot is refilled at once
    assert [n.long_id for n in lookup.next_queries()] == [3]
    lookup.answered(first[1].id, [])
    assert [n.long_id for n in lookup.next_queries()] == [4]
    lookup.answered(nodes[2].id, [])
    assert not lookup.done
    lookup.answered(nodes[3].id, [])
    assert lookup.done  # 2, 3, 4 are the three closest live nodes and all answered
    assert [n.long_id for n in lookup.closest_answered()] == [2, 3, 4]


def test_lookup_follows_closer_nodes_learned_from_replies() -> None:
    lookup = Lookup(bytes(20), k=2, alpha=1, self_id=b"\xff" * 20)
    far = Node((1000).to_bytes(20, "big"))
    lookup.add([far])
    (asked,) = lookup.next_queries()
    lookup.answered(asked.id, _nodes(2))
    assert [n.long_id for n in lookup.next_queries()] == [1]
    assert not lookup.done
