"""HOST:PORT text: `format_hostport` writes what `parse_hostport` and a URL reader read back."""

from __future__ import annotations

from urllib.parse import urlsplit

from hypothesis import given
from hypothesis import strategies as st

from crypto.address import format_hostport, parse_hostport

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
zoned = st.builds(lambda ip, zone: f"{ip}%{zone}", ipv6, st.sampled_from(["eth0", "lo", "3"]))
# Host names: dot-joined labels (hypothesis.provisional.domains is too slow on a busy host).
label = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda t: t[0] != "-" and t[-1] != "-")
names = st.lists(label, min_size=1, max_size=4).map(".".join)


@given(host=ipv4 | ipv6 | zoned | names, port=ports)
def test_parse_reads_back_what_format_writes(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)


@given(host=ipv4 | ipv6 | names, port=ports)
def test_a_url_reader_finds_the_same_host_and_port(host: str, port: int) -> None:
    # urlsplit takes an IPv6 host only in brackets: ::1:8470 has no port it can find.
    u = urlsplit(f"http://{format_hostport(host, port)}/")
    assert (u.hostname, u.port) == (host, port)


@given(host=ipv4 | names, port=ports)
def test_an_ipv4_host_or_a_name_is_written_as_before(host: str, port: int) -> None:
    assert format_hostport(host, port) == f"{host}:{port}"


def test_an_ipv6_host_is_in_brackets() -> None:
    assert format_hostport("::1", 8470) == "[::1]:8470"
    assert format_hostport("2001:db8::1", 0) == "[2001:db8::1]:0"
