"""What a per-address limit counts a source under: an IPv4 address as itself, an IPv6
address as its /64, so fresh addresses from one /64 can't multiply a limit by 2^64."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.limits import SourceLimiter, source_key, source_label, source_of


def test_ipv4_is_itself_ipv6_is_its_64() -> None:
    assert source_key("203.0.113.7") == "203.0.113.7"
    assert source_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert source_key("::1") == "::/64"
    assert source_label(source_key("203.0.113.7")) == "your IP address"
    assert source_label(source_key("2001:db8::1")) == "your network (IPv6 /64)"


def test_an_ipv4_mapped_address_is_the_ipv4_one() -> None:
    # What a dual-stack socket reports for an IPv4 peer: without this every IPv4 client of
    # a server listening on :: would share ::ffff:0:0/64.
    assert source_key("::ffff:198.51.100.9") == "198.51.100.9"
    assert source_key("::ffff:198.51.100.9") != source_key("::ffff:198.51.100.10")


def test_one_64_shares_a_key_two_64s_do_not() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("2001:db8:1:2::1") == source_key("2001:DB8:1:2:0:0:0:5")


def test_brackets_and_zones() -> None:
    assert source_key("[2001:db8:1:2::5]") == "2001:db8:1:2::/64"
    # A zone names the link: the same /64 on two links is two networks.
    assert source_key("fe80::1%eth0") == source_key("fe80::2%eth0") == "fe80::/64%eth0"
    assert source_key("fe80::1%eth1") != source_key("fe80::1%eth0")


@pytest.mark.parametrize("text", ["", "example.net", "[::1]:4500", "198.51.100.1:80",
                                  "2001:db8::/64", "[::1", "1.2.3.4%eth0"])
def test_what_is_no_ip_literal_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError) as err:
        source_key(text)
    assert str(err.value) == f"not an IP address: {text!r}"
    assert source_of(text) == text  # counted as itself where a limit must count it


@given(st.integers(0, 2**32 - 1))
def test_an_ipv4_key_is_the_address(n: int) -> None:
    text = str(ipaddress.IPv4Address(n))
    assert source_key(text) == text
    assert source_key(str(ipaddress.IPv6Address(0xFFFF << 32 | n))) == text


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1))
def test_a_v6_key_is_stable_over_its_64_and_holds_the_address(n: int, low: int) -> None:
    ip = ipaddress.IPv6Address(n)
    if ip.ipv4_mapped is not None:
        return
    key = source_key(str(ip))
    assert key == source_key(ip.exploded) == source_key(f"[{ip}]")
    assert key == source_key(str(ipaddress.IPv6Address(n >> 64 << 64 | low)))
    net = ipaddress.IPv6Network(key)
    assert net.prefixlen == 64 and ip in net


def _reference_key(host: str) -> str:
    """`source_key` as the ipaddress module would give it (ten times slower)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    net = ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))
    return f"{net}%{ip.scope_id}" if ip.scope_id else str(net)


_ADDRESSY = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.exploded),
    st.builds(lambda ip, zone: f"{ip}%{zone}", st.ip_addresses(v=6),
              st.text("abc0%/", max_size=4)),
    st.text("0123456789abcdefABCDEF:.%[]/ ", max_size=45),
    st.text(max_size=20),
)


@settings(max_examples=1000)
@given(_ADDRESSY)
def test_the_key_is_what_the_ipaddress_module_makes_of_it(host: str) -> None:
    try:
        want = _reference_key(host)
    except ValueError:
        with pytest.raises(ValueError, match="not an IP address"):
            source_key(host)
    else:
        assert source_key(host) == want


def test_the_limiter_gives_one_64_one_bucket() -> None:
    limiter = SourceLimiter(rate=1.0, burst=3.0, max_sources=10)
    fresh = [f"2001:db8:1:2::{i:x}" for i in range(1, 11)]
    assert [limiter.allow(a, 0.0) for a in fresh] == [True] * 3 + [False] * 7
    assert len(limiter) == 1  # ten fresh addresses evicted nobody
    assert limiter.allow("2001:db8:1:3::1", 0.0)
    assert limiter.allow("198.51.100.1", 0.0) and limiter.allow("198.51.100.2", 0.0)
