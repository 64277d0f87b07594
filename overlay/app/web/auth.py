"""Who may use the web inbox: the owner of the home folder, and only from this machine.

- Login: `peerpost web` writes a random token into the home folder (`web_token`, mode
  0600: only the owner can read it) and opens `/login?token=...`; the server redeems it
  once, within `TOKEN_TTL` seconds, for a session cookie (HttpOnly, SameSite=Strict), and
  deletes the file. Any other page without a live session cookie is a 401.
- Sessions outlive the node: each is kept in the home folder (`web_sessions`, 0600) under
  the SHA-256 of its cookie, so a restarted node (a reboot, an upgrade) does not sign the
  browser out. A session unused for `SESSION_IDLE` seconds ends; `peerpost web --sign-out`
  deletes the file, which ends every session, the running node's included.
- CSRF: every session has its own random token, written into each page; a POST must carry
  it in the `X-CSRF-Token` header (a cross-site form can't set headers; SameSite=Strict
  already keeps the cookie off cross-site requests).
- DNS rebinding: the `Host` header must name the listen address or localhost with our
  port, and an `Origin` header, when present, the same origin; anything else is a 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crypto.address import format_hostport
from rendezvous.keyfile import write_secret_file

log = logging.getLogger(__name__)

TOKEN_FILE = "web_token"
SESSIONS_FILE = "web_sessions"
TOKEN_TTL = 600.0  # seconds a login token stays redeemable
MAX_SESSIONS = 32  # live sessions kept; the least recently used goes first
SESSION_IDLE = 30 * 86400.0  # seconds a session may go unused before it ends
TOUCH_EVERY = 3600.0  # a session's last use is saved at most this often
SESSION_COOKIE = "peerpost_session"  # + "_PORT": see WebAuth.cookie
CSRF_HEADER = "X-CSRF-Token"


def issue_login_token(home_root: Path, now: float) -> str:
    """Write a fresh login token into the home folder (0600) and return it."""
    token = secrets.token_urlsafe(32)
    write_secret_file(Path(home_root) / TOKEN_FILE, json.dumps({"token": token, "issued": now}))
    return token


@dataclass(slots=True)
class Session:
    csrf: str
    used: float  # wall-clock time of its last use, saved to within TOUCH_EVERY
    sid: str = ""  # the cookie: known only in the process that made the session


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def sign_out_all(home_root: Path) -> bool:
    """End every web session of a home (the running node's too); whether there were any."""
    try:
        (Path(home_root) / SESSIONS_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


class WebAuth:
    """Login tokens, sessions and the origin rules of one web inbox."""

    def __init__(self, token_path: Path, sessions_path: Path | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.token_path = token_path
        self.sessions_path = sessions_path
        self.wall = wall
        self.port = 0
        self.hosts: frozenset[str] = frozenset()
        # SHA-256 of the cookie -> session, least recently used first.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._seen: tuple[int, int] | None = None  # (inode, mtime) of the file as last read
        self._load()

    def _stat(self) -> tuple[int, int] | None:
        if self.sessions_path is None:
            return None
        try:
            st = os.stat(self.sessions_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _load(self) -> None:
        """Read the sessions file; a missing one means no sessions, a damaged one is
        logged and counts as none (signing in again writes a good one)."""
        self._sessions.clear()
        self._seen = self._stat()
        if self._seen is None or self.sessions_path is None:
            return
        try:
            rows = json.loads(self.sessions_path.read_text())
            kept = sorted(((str(k), Session(str(v["csrf"]), float(v["used"])))
                           for k, v in rows.items()), key=lambda kv: kv[1].used)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("web inbox: %s is unreadable (%s): every browser must sign in again",
                        self.sessions_path, exc)
            return
        now = self.wall()
        self._sessions.update((k, v) for k, v in kept if now - v.used <= SESSION_IDLE)

    def _save(self) -> None:
        if self.sessions_path is None:
            return
        rows = {k: {"csrf": v.csrf, "used": v.used} for k, v in self._sessions.items()}
        try:
            write_secret_file(self.sessions_path, json.dumps(rows))
        except OSError as exc:  # a full disk: the sessions still work until a restart
            log.warning("web inbox: cannot save sessions to %s: %s", self.sessions_path, exc)
        self._seen = self._stat()

    def _sync(self) -> None:
        """Reread the file if someone else changed it (`peerpost web --sign-out`)."""
        if self.sessions_path is not None and self._stat() != self._seen:
            self._load()

    def bind(self, host: str, port: int) -> None:
        """The address actually listened on: what Host and Origin must name."""
        self.port = port
        names = {"127.0.0.1", "localhost", "::1"}
        if host not in ("0.0.0.0", "::", ""):
            names.add(host)
        self.hosts = frozenset(format_hostport(n, port) for n in names)

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
        self._sync()
        session = Session(secrets.token_urlsafe(32), now, sid=secrets.token_urlsafe(32))
        self._sessions[_key(session.sid)] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        self._save()
        return session

    def session(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        self._sync()
        key = _key(cookie)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.wall()
        if now - session.used > SESSION_IDLE:
            del self._sessions[key]
            self._save()
            return None
        self._sessions.move_to_end(key)
        if now - session.used >= TOUCH_EVERY:
            session.used = now
            self._save()
        return session

    def csrf_ok(self, session: Session, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(session.csrf.encode(),
                                                          header.encode())
