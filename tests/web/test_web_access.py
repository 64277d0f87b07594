"""The web inbox refuses everyone but its owner: a real node, plain HTTP requests."""

from __future__ import annotations

import http.client
import os
import stat
from urllib.parse import urlsplit

import pytest

from overlay.app.lab import LocalNetwork
from tests.web.conftest import login_url, web_base

pytestmark = pytest.mark.slow


def request(base: str, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_only_the_owner_with_a_session_and_csrf_token_gets_in(net: LocalNetwork) -> None:
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(bob)
    base = web_base(bob)
    host = urlsplit(base).netloc

    # No cookie: 401, for pages, data and media alike.
    for path in ("/", "/api/inbox", "/events", "/media/00", "/sent"):
        assert request(base, "GET", path)[0] == 401, path

    url = login_url(net, bob)
    token_file = bob.home / "web_token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    path = url[len(base):]
    # A wrong token gets nothing and leaves the real one usable.
    assert request(base, "GET", "/login?token=nope")[0] == 401
    status, headers, _ = request(base, "GET", path)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";")[0]
    # The token works once.
    assert request(base, "GET", path)[0] == 401
    assert not token_file.exists()

    status, _, page = request(base, "GET", "/", {"Cookie": session})
    assert status == 200 and b"Inbox" in page
    csrf = page.split(b'name="csrf-token" content="')[1].split(b'"')[0].decode()

    # DNS rebinding: a foreign Host is refused even with the cookie.
    evil_host = f"evil.test:{urlsplit(base).port}"
    assert request(base, "GET", "/", {"Cookie": session, "Host": evil_host})[0] == 403
    # A foreign Origin is refused, for a read and for a write.
    assert request(base, "GET", "/api/inbox", {"Cookie": session,
                                               "Origin": "http://evil.test"})[0] == 403
    post = {"Cookie": session, "Content-Type": "application/json", "X-CSRF-Token": csrf}
    body = b'{"address": "spam@example.net", "list": "junk"}'
    assert request(base, "POST", "/api/sender", {**post, "Origin": "http://evil.test"},
                   body)[0] == 403
    # A POST without the CSRF token, or with another one: 403; nothing changed.
    no_csrf = {k: v for k, v in post.items() if k != "X-CSRF-Token"}
    assert request(base, "POST", "/api/sender", no_csrf, body)[0] == 403
    assert request(base, "POST", "/api/sender", {**post, "X-CSRF-Token": "x" * 43},
                   body)[0] == 403
    assert "spam@example.net" not in net.cli(bob, "prefs").stdout
    # With it, same origin: the change is made, and the CLI sees it.
    status, _, _ = request(base, "POST", "/api/sender", {**post, "Origin": f"http://{host}"},
                           body)
    assert status == 200
    assert "spam@example.net" in net.cli(bob, "prefs").stdout


def test_a_sign_in_outlives_a_restart_of_the_node_until_sign_out(net: LocalNetwork) -> None:
    bob = net.add_node("bob", extra=["--web", "127.0.0.1:0"])
    net.start_node(bob)
    base = web_base(bob)
    status, headers, _ = request(base, "GET", login_url(net, bob)[len(base):])
    assert status == 303
    cookie = headers["set-cookie"]
    assert "Max-Age=2592000" in cookie  # the browser keeps it as long as the node does
    session = cookie.split(";")[0]
    saved = bob.home / "web_sessions"
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert session.split("=", 1)[1] not in saved.read_text()  # only its hash is kept
    _, _, page = request(base, "GET", "/", {"Cookie": session})
    csrf = page.split(b'name="csrf-token" content="')[1].split(b'"')[0]

    # A restart (same port, so the same cookie name) keeps the browser signed in, with
    # the CSRF token its open pages carry.
    net.stop_node(bob)
    bob.extra = ["--web", f"127.0.0.1:{urlsplit(base).port}"]
    net.start_node(bob)
    assert web_base(bob) == base
    status, _, page = request(base, "GET", "/", {"Cookie": session})
    assert status == 200 and b"Inbox" in page
    assert csrf in page
    post = {"Cookie": session, "Content-Type": "application/json", "X-CSRF-Token": csrf.decode()}
    assert request(base, "POST", "/api/prefs", post, b"{}")[0] != 403

    # `web --sign-out` ends it in the running node at once.
    assert "signed out" in net.cli(bob, "web", "--sign-out").stdout
    assert request(base, "GET", "/", {"Cookie": session})[0] == 401
    assert net.cli(bob, "web", "--sign-out").stdout.strip() == "no browser was signed in"
