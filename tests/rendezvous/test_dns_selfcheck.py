"""At start a TLS server looks up its own domain's records once (real `serve` processes, a
real dnsmasq) and logs what nodes and other domains' servers would find: no records, or
another domain key, is a warning that says what to publish."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from rendezvous.domainkey import fingerprint, load_or_create, txt_value
from tests.dnstest import Dnsmasq

from .conftest import DOMAIN
from .test_operator import serve

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _records(key: bytes, port: int) -> list[str]:
    return [f"_peerpost._tcp.{DOMAIN}. 300 IN SRV 10 0 {port} rv.{DOMAIN}.",
            f'_peerpost.{DOMAIN}. 300 IN TXT "{txt_value(key)}"']


async def _check_line(data: Path, ns: Dnsmasq, port: int) -> str:
    async with serve(data, "--resolver", ns.hostport, "--stun-port", "off", "--dht-port",
                     "off", listen=f"127.0.0.1:{port}", expect=1) as srv:
        return await srv.wait_log("event=dns.check")


async def test_a_server_says_what_dns_publishes_of_it(
        tmp_path: Path, dns_server: Callable[..., Dnsmasq]) -> None:
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    key = load_or_create(data).public
    hosts = {f"rv.{DOMAIN}": "127.0.0.1"}

    no_srv = dns_server(_records(key, 1)[1:], hosts=hosts, local=["net"])  # the TXT alone
    line = await _check_line(data, no_srv, _port())
    assert "level=warning" in line
    assert f"no _peerpost._tcp.{DOMAIN} SRV record" in line, line
    assert "publish what `peerpost-rendezvous dns-records` prints" in line

    port = _port()
    right = dns_server(_records(key, port), hosts=hosts, local=["net"])
    line = await _check_line(data, right, port)
    assert "level=info" in line
    assert f"DNS publishes this server's key and 127.0.0.1:{port} for {DOMAIN}" in line

    (tmp_path / "other").mkdir(mode=0o700)
    other = load_or_create(tmp_path / "other").public
    wrong = dns_server(_records(other, port), hosts=hosts, local=["net"])
    line = await _check_line(data, wrong, port)
    assert "level=warning" in line
    assert (f"publishes domain key {fingerprint(other)}, but this server's is "
            f"{fingerprint(key)}") in line
