"""DHT cores without sockets: records, tokens, timeouts, storage bounds, the lookup, wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node
from kademlia.routing import RoutingTable

from crypto.errors import DecodeError
from crypto.identity import DeviceIdentity
from overlay.dht.errors import LocalProtocolError, RemoteProtocolError
from overlay.dht.lookup import Lookup
from overlay.dht.records import RECORD_TTL, ProviderRecord
from overlay.dht.routing import ClockedRoutingTable
from overlay.dht.rtt import INITIAL_RTO, MAX_RTO, MIN_RTO, RttTable
from overlay.dht.storage import ProviderStore
from overlay.dht.tokens import TokenIssuer
from overlay.dht.wire import FindNode, Request, contact_item, decode_datagram

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


@pytest.mark.parametrize(("host", "canonical"), [
    ("192.0.2.7", "192.0.2.7"), ("2001:DB8:0:0::1", "2001:db8::1"),
    ("::ffff:1.2.3.4", "::ffff:102:304")])
def test_contacts_carry_the_canonical_ip_text(host: str, canonical: str) -> None:
    # Canonical, so a reply's source address compares equal to the address we asked.
    assert contact_item([b"i" * 20, host, 4000], "nodes[0]").host == canonical


@pytest.mark.parametrize(("host", "error"), [
    ("node.example.net", "IP literal"), ("1.2.3", "IP literal"), ("", "IP literal"),
    ("0.0.0.0", "unusable"), ("::", "unusable"), ("224.0.0.1", "unusable")])
def test_contacts_with_host_names_or_unusable_addresses_are_refused(host: str,
                                                                    error: str) -> None:
    # Twice: the second answer comes from the cache and must be the same refusal.
    for _ in range(2):
        with pytest.raises(DecodeError, match=error):
            contact_item([b"i" * 20, host, 4000], "nodes[0]")


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


def test_a_full_candidate_list_still_takes_closer_nodes() -> None:
    # The list holds 8k candidates. When it was full and its farthest entry had already
    # answered, every closer node a later reply named was dropped, so the lookup ended on
    # the nodes it had and missed the closest ones (about 5% of lookups at 10,000 nodes).
    lookup = Lookup(bytes(20), k=2, alpha=1, self_id=b"\xff" * 20)
    far = Node((10_000).to_bytes(20, "big"))
    lookup.add([far])
    (asked,) = lookup.next_queries()
    lookup.answered(asked.id, [Node(i.to_bytes(20, "big")) for i in range(100, 115)])
    closest = Node((1).to_bytes(20, "big"))
    lookup.add([closest])
    assert lookup.next_queries() == [closest]
    lookup.answered(closest.id, [])
    (second,) = lookup.next_queries()
    assert second.long_id == 100
    lookup.answered(second.id, [])
    assert lookup.done
    assert [n.long_id for n in lookup.closest_answered()] == [1, 100]


def test_a_contact_seen_before_is_not_matched_by_a_lookalike_of_another_type() -> None:
    assert contact_item([b"i" * 20, "192.0.2.7", 1], "nodes[0]").port == 1  # now cached
    for port in (True, 1.0):  # equal to 1, and hash alike, but not a port number
        with pytest.raises(DecodeError, match="port outside"):
            contact_item([b"i" * 20, "192.0.2.7", port], "nodes[0]")
    with pytest.raises(DecodeError, match="node id"):
        contact_item([bytearray(b"i" * 20), "192.0.2.7", 1], "nodes[0]")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(1, 3)),
                max_size=400),
       st.integers(0, 300))
def test_neighbours_stay_the_closest_contacts_as_the_table_changes(
        ops: list[tuple[bool, int, int]], near: int) -> None:
    # find_neighbors keeps a flat list between membership changes: after any mix of adds,
    # re-adds from a new address, removals (which promote replacements) and splits, it must
    # still answer what a scan of the live contacts answers.
    me = Node((7).to_bytes(20, "big"))
    table = ClockedRoutingTable(4, me, lambda: 0.0, lambda head: None)
    spread = 2**160 // 301
    target = near * spread + 1  # next to one of the ids the ops use
    for add, i, port in ops:
        node = Node((i * spread).to_bytes(20, "big"), "192.0.2.1", port)
        if add:
            table.add_contact(node)
        else:
            table.remove_contact(node)
        probe = Node((target + i).to_bytes(20, "big"))
        assert table.get_bucket_for(probe) == RoutingTable.get_bucket_for(table, probe)
        want = sorted((n for n in table.contacts() if n.id != target.to_bytes(20, "big")),
                      key=lambda n: n.long_id ^ target)[:4]
        got = table.find_neighbors(Node(target.to_bytes(20, "big")), k=4)
        assert [(n.id, n.port) for n in got] == [(n.id, n.port) for n in want]


def test_a_lookup_counts_the_longest_chain_of_answers_as_its_hops() -> None:
    def node(n: int) -> Node:
        return Node(bytes([n]) * 20, "192.0.2.1", 4000 + n)

    lookup = Lookup(bytes(20), k=2, alpha=1, self_id=bytes([255]) * 20)
    lookup.add([node(9)])
    assert lookup.hops == 0
    (first,) = lookup.next_queries()
    lookup.answered(first.id, [node(5)])  # the table's node answered: one hop
    (second,) = lookup.next_queries()
    lookup.answered(second.id, [node(1)])  # a node it named answered: two
    (third,) = lookup.next_queries()
    lookup.answered(third.id, [])
    assert third.id == node(1).id
    assert lookup.hops == 3
