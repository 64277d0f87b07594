"""On ::1 every HOST:PORT a script or a browser reads back brackets the host: `serve`'s
`listening [::1]:P` lines, the node's `ready ... listen=[::1]:P web=http://[::1]:W` line,
and the web inbox's one-time login URL, which signs a browser in over ::1. In ::1:8470 the
port could be the address's last group. Real processes, as in test_e2e_cli."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from crypto.address import parse_hostport
from overlay.app.lab import LISTENING, LocalNetwork, listening
from tests.overlay.test_quic import NEEDS_V6
from tests.web.conftest import login_url, web_base
from tests.web.test_web_access import request

pytestmark = [pytest.mark.slow, NEEDS_V6]

READY = re.compile(r"^ready address=\S+ listen=(\S+) control=\S+ web=(\S+)$")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    with LocalNetwork(tmp_path / "lab") as n:
        n.server_addr = ("::1", 0)
        n.start_server()
        yield n


def test_the_server_prints_each_ipv6_address_in_brackets(net: LocalNetwork) -> None:
    assert net.server is not None and net.server_addr is not None
    assert net.server_addr[0] == "::1"
    services = {"": net.server_addr}
    while len(services) < 4:  # the mailbox, stun, dht, stun_tcp
        name, addr = listening(net.server.lines.wait_for(LISTENING, 30, "serve"))
        services[name] = addr
    lines = net.server.log().splitlines()
    for name, (host, port) in services.items():
        assert host == "::1" and port > 0
        assert f"{name} listening [::1]:{port}".strip() in lines


def test_the_ready_line_and_the_login_url_bracket_the_host(net: LocalNetwork) -> None:
    bob = net.add_node("bob", extra=["--web", "[::1]:0"], listen="[::1]:0")
    net.start_node(bob, ready=False)
    assert bob.proc is not None
    m = bob.proc.lines.wait_for(READY, 30, "peerpost node (bob)")
    host, port = parse_hostport(m.group(1))
    assert host == "::1" and port > 0 and m.group(1) == f"[::1]:{port}"
    base = web_base(bob)
    web_port = urlsplit(base).port
    assert m.group(2) == base == f"http://[::1]:{web_port}"

    url = login_url(net, bob)
    assert re.fullmatch(rf"http://\[::1\]:{web_port}/login\?token=\S+", url), url
    # The URL signs a browser in (http.client sends Host: [::1]:W, as a browser does),
    # and a write from the inbox's own origin is taken.
    status, headers, _ = request(base, "GET", url[len(base):])
    assert status == 303 and headers["location"] == "/"
    session = headers["set-cookie"].split(";")[0]
    status, _, page = request(base, "GET", "/", {"Cookie": session})
    assert status == 200 and b"Inbox" in page
    csrf = page.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()
    status, _, _ = request(base, "POST", "/api/sender", {
        "Cookie": session, "Content-Type": "application/json", "X-CSRF-Token": csrf,
        "Origin": base}, b'{"address": "spam@example.net", "list": "junk"}')
    assert status == 200
    assert "spam@example.net" in net.cli(bob, "prefs").stdout
