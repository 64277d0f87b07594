"""The STUN Binding service: RFC 5389 answers that aioice understands, and a rate limit."""

from __future__ import annotations

import asyncio
import ipaddress
import os

from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.stun import (
    StunDecodeError,
    StunResponder,
    StunServerProtocol,
    binding_request,
    binding_success,
    parse_binding_response,
    parse_message,
    query_mapping,
    serve_stun,
)

_ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
_ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))


@given(host=_ipv4 | _ipv6, port=st.integers(0, 65535), tid=st.binary(min_size=12, max_size=12))
def test_mapped_address_round_trips(host: str, port: int, tid: bytes) -> None:
    assert parse_binding_response(binding_success(tid, (host, port)), tid) == (host, port)


@given(data=st.binary(max_size=600))
@settings(max_examples=300)
def test_garbage_is_dropped_never_raises(data: bytes) -> None:
    responder = StunResponder()
    responder.datagram_received(data, ("192.0.2.9", 5000), 0.0)
    st_ = responder.stats
    assert st_.answered + st_.malformed + st_.unknown_attribute == 1


def test_aioice_reads_our_answer_and_we_read_its_request() -> None:
    req = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    req.attributes["SOFTWARE"] = "aioice"
    req.add_fingerprint()
    responder = StunResponder()
    reply = responder.datagram_received(bytes(req), ("2001:db8::7", 40000), 1.0)
    assert reply is not None
    parsed = aioice_stun.parse_message(reply)
    assert parsed.message_class == aioice_stun.Class.RESPONSE
    assert parsed.transaction_id == req.transaction_id
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 40000)
    assert "FINGERPRINT" in parsed.attributes  # aioice checked our CRC while parsing


def test_unknown_required_attribute_gets_420() -> None:
    req = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    req.attributes["PRIORITY"] = 1  # 0x0024: comprehension-required, unknown to a STUN server
    reply = StunResponder().datagram_received(bytes(req), ("192.0.2.1", 1), 0.0)
    assert reply is not None
    parsed = aioice_stun.parse_message(reply)
    assert parsed.message_class == aioice_stun.Class.ERROR
    assert parsed.attributes["ERROR-CODE"] == (420, "Unknown Attribute")


def test_corrupt_fingerprint_and_responses_are_dropped() -> None:
    request, tid = binding_request()
    bad = request[:-1] + bytes([request[-1] ^ 1])
    responder = StunResponder()
    assert responder.datagram_received(bad, ("192.0.2.1", 1), 0.0) is None
    assert responder.datagram_received(binding_success(tid, ("1.2.3.4", 5)),
                                       ("192.0.2.1", 1), 0.0) is None
    assert responder.stats.malformed == 2
    try:
        parse_binding_response(binding_success(tid, ("1.2.3.4", 5)), os.urandom(12))
    except StunDecodeError as exc:
        assert "another transaction" in str(exc)
    else:
        raise AssertionError("a response to another transaction was accepted")
    assert parse_message(request).transaction_id == tid


def test_flood_from_one_source_is_limited_others_still_answered() -> None:
    responder = StunResponder(rate=10, burst=20)
    request, _ = binding_request()
    answers = [responder.datagram_received(request, ("198.51.100.1", p), 5.0)
               for p in range(1000)]
    assert sum(a is not None for a in answers) == 20
    assert responder.stats.rate_limited == 980
    assert responder.datagram_received(request, ("198.51.100.2", 9), 5.0) is not None
    # One second later the flooder has earned ten more answers.
    later = [responder.datagram_received(request, ("198.51.100.1", 1), 6.0) for _ in range(15)]
    assert sum(a is not None for a in later) == 10


def test_fresh_addresses_of_one_ipv6_64_share_one_bucket() -> None:
    responder = StunResponder(rate=10, burst=20)
    request, _ = binding_request()
    # A new source address per request, all of one /64: 20 answers in all, not 1000.
    answers = [responder.datagram_received(request, (f"2001:db8:1:2::{n + 1:x}", 9), 5.0)
               for n in range(1000)]
    assert sum(a is not None for a in answers) == 20
    assert responder.stats.sources == 1
    assert responder.datagram_received(request, ("2001:db8:1:3::1", 9), 5.0) is not None
    # A dual-stack socket's IPv4 peers count as their IPv4 addresses, one each.
    for n in range(30):
        assert responder.datagram_received(request, (f"::ffff:198.51.100.{n}", 9), 5.0)
    assert responder.stats.sources == 32


def test_source_table_is_bounded() -> None:
    responder = StunResponder(max_sources=100)
    request, _ = binding_request()
    for n in range(1000):
        responder.datagram_received(request, (str(ipaddress.IPv4Address(n)), 1), 0.0)
    assert responder.stats.sources == 100
    assert responder.stats.answered == 1000


async def test_server_on_udp_answers_with_the_client_socket_address() -> None:
    t1, addr1 = await serve_stun("127.0.0.1", 0)
    t2, addr2 = await serve_stun("127.0.0.1", 0)
    try:
        mapped = await query_mapping([addr1, addr2], local_addr=("127.0.0.1", 0))
        assert mapped[0] == mapped[1]
        assert mapped[0][0] == "127.0.0.1" and mapped[0][1] not in (0, addr1[1], addr2[1])
        proto = t1.get_protocol()
        assert isinstance(proto, StunServerProtocol)
        assert proto.responder.stats.answered == 1
    finally:
        t1.close()
        t2.close()


async def test_query_names_a_silent_server() -> None:
    loop = asyncio.get_running_loop()
    silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                    local_addr=("127.0.0.1", 0))
    addr = silent.get_extra_info("sockname")
    try:
        try:
            await query_mapping([addr], timeout=0.3, retransmit=0.1)
        except TimeoutError as exc:
            assert f"127.0.0.1:{addr[1]}" in str(exc)
        else:
            raise AssertionError("a silent server produced a mapping")
    finally:
        silent.close()
