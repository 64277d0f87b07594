"""Who may use the web inbox: the owner of the home folder, and only from this machine.

- Login: `peerpost web` writes a random token into the home folder (`web_token`, mode
  0600: only the owner can read it) and opens `/login?token=...`; the server redeems it
  once, within `TOKEN_TTL` seconds, for a session cookie (HttpOnly, SameSite=Strict), and
  deletes the file. Any other page without a live session cookie is a 401.
- CSRF: every session has its own random token, written into each page; a POST must carry
  it in the `X-CSRF-Token` header (a cross-site form can't set headers; SameSite=Strict
  already keeps the cookie off cross-site requests).
- DNS rebinding: the `Host` header must name the listen address or localhost with our
  port, and an `Origin` header, when present, the same origin; anything else is a 403.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rendezvous.keyfile import write_secret_file

TOKEN_FILE = "web_token"
TOKEN_TTL = 600.0  # seconds a login token stays redeemable
MAX_SESSIONS = 32  # live sessions kept; the oldest goes first
SESSION_COOKIE = "peerpost_session"  # + "_PORT": see WebAuth.cookie
CSRF_HEADER = "X-CSRF-Token"


def issue_login_token(home_root: Path, now: float) -> str:
    """Write a fresh login token into the home folder (0600) and return it."""
    token = secrets.token_urlsafe(32)
    write_secret_file(Path(home_root) / TOKEN_FILE, json.dumps({"token": token, "issued": now}))
    return token


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    csrf: str


class WebAuth:
    """Login tokens, sessions and the origin rules of one web inbox."""

    def __init__(self, token_path: Path) -> None:
        self.token_path = token_path
        self.port = 0
        self.hosts: frozenset[str] = frozenset()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def bind(self, host: str, port: int) -> None:
        """The address actually listened on: what Host and Origin must name."""
        self.port = port
        names = {"127.0.0.1", "localhost", "[::1]"}
        if host not in ("0.0.0.0", "::", ""):
            names.add(f"[{host}]" if ":" in host else host)
        self.hosts = frozenset(f"{n}:{port}" for n in names)

    @property
    def cookie(self) -> str:
        """The session cookie's name. Browsers keep cookies per host, not per port: two
        nodes on one machine (two people's, or the demo's receivers) under one name
        would sign each other's sessions out."""
        return f"{SESSION_COOKIE}_{self.port}"

    def host_ok(self, host: str | None) -> bool:
        return host is not None and host.lower() in self.hosts

    def origin_ok(self, origin: str | None) -> bool:
        if origin is None:
            return True
        return origin.lower() in {f"http://{h}" for h in self.hosts}

    def redeem(self, token: str, now: float) -> Session | None:
        """A new session for the token in the home folder, if `token` is it and fresh;
        the token is used up either way once it matched."""
        try:
            data = json.loads(self.token_path.read_text())
            want, issued = str(data["token"]), float(data["issued"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not want or not hmac.compare_digest(want.encode(), token.encode()):
            return None
        self.token_path.unlink(missing_ok=True)
        if not 0 <= now - issued <= TOKEN_TTL:
            return None
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        self._sessions[session.sid] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def session(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        return self._sessions.get(cookie)

    def csrf_ok(self, session: Session, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(session.csrf.encode(),
                                                          header.encode())
