"""The web inbox: an aiohttp server on the node's own event loop, owned by the Node.

Pages are rendered on the server from the same control operations the CLI calls
(overlay.app.operations), so both show the same data; `/events` pushes the inbox as
server-sent events and static/app.js redraws rows from it. Every outside string goes
through `html.escape` here or `textContent` in the script. Access rules: overlay.app.web.auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import string
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from crypto.address import format_hostport, parse_hostport
from crypto.codec import Fields
from crypto.errors import DecodeError
from crypto.location import decode_location
from overlay.app.control import ControlError
from overlay.app.control_wire import KEEP_ON_TEXT
from overlay.app.operations import CANCELLED_TEXT, ControlOperations, key_mismatch_text
from overlay.app.web.auth import (
    CSRF_HEADER,
    SESSION_IDLE,
    SESSIONS_FILE,
    TOKEN_FILE,
    Session,
    WebAuth,
)
from overlay.app.web.media import Wanter, file_response, serve_partial
from overlay.content.catalog import ContentStore
from overlay.content.partial import PartialContent
from overlay.mail.db import LIST_LIMIT
from overlay.mail.downloads import TOLD_NO_SOURCE
from overlay.mail.outbox import devices_to_fetch_text
from overlay.mail.prefs import RETENTIONS, size_text
from overlay.transfer.downloader import WITHDRAWN_FAILURE, changed_source

log = logging.getLogger("peerpost.web")

WEB_FILE = "web.json"  # where the running node says which URL it serves
EVENT_EVERY = 0.5  # seconds between inbox snapshots compared for the event stream
MAX_STREAMS = 16  # concurrent event streams
PREF_KEYS = ("auto-download", "auto-download-max", "retention")  # what the form changes
# What Chromium and Firefox play in <video>, <audio> and <img>.
PLAYABLE = {
    "video/webm": "video", "video/mp4": "video", "audio/webm": "audio", "audio/mpeg": "audio",
    "audio/mp4": "audio", "audio/ogg": "audio", "audio/wav": "audio", "audio/flac": "audio",
    "image/jpeg": "img", "image/png": "img", "image/webp": "img", "image/gif": "img",
}

# What each state is called on the page; `offered` and `failed` depend on more (state_text).
STATE_TEXT = {"unverified": "on hold: sender not confirmed", "downloading": "downloading",
              "retrying": "waiting for the sender", "complete": "received"}
# How a source's bytes come: every path but the relay is a direct connection.
PATH_TEXT = {"tcp": "direct", "tcp-punch": "direct", "quic": "direct", "webrtc": "direct",
             "relay": "through the mail server"}
FACT_TEXT = {"video_codec": "video format", "audio_codec": "sound format",
             "modified": "file date", "recorded": "recorded"}
# Which message-page elements show in which states (data-states; app.js keeps it so).
PLAYS_IN = "downloading retrying complete"
SESSION = web.RequestKey("session", Session)  # the signed-in session, set by the middleware
SIGN_IN = ("Open the inbox with <code>peerpost web</code> on this computer (it signs this "
           "browser in), or ask whoever set peerpost up for you.")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def media_kind(media_type: str, file_name: str) -> tuple[str, str] | None:
    """(element, MIME type) a browser plays this as, or None for a download only.
    A Matroska file named .webm is WebM (the demuxer is the same)."""
    if media_type in ("video/x-matroska", "application/octet-stream") and \
            file_name.lower().endswith(".webm"):
        media_type = "video/webm"
    kind = PLAYABLE.get(media_type)
    return (kind, media_type) if kind else None


_size = size_text


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _limit(n: int | None) -> str:
    """A byte count as `parse_size` reads it back, in the largest unit that is exact."""
    if n is None:
        return "none"
    for unit, size in (("GB", 10**9), ("GiB", 1 << 30), ("MB", 10**6), ("MiB", 1 << 20),
                       ("KB", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


def state_text(e: dict[str, Any]) -> str:
    """The state of an inbox entry in words: `offered` is waiting to download only when
    the node's `queued` says auto-download takes it, and `failed` says who stopped it."""
    state = str(e["state"])
    if state == "offered":
        if e["junk"]:
            return "not downloaded (junk sender)"
        return "waiting to download" if e["queued"] else "not downloaded yet"
    if state == "failed":
        if e["error"] == CANCELLED_TEXT:
            return "stopped"
        if e["error"] == WITHDRAWN_FAILURE:
            return "cancelled by the sender"
        if changed_source(e["error"]):
            return "the sender's file changed"
        return "failed"
    if state == "downloading" and e["queued"]:
        return "waiting for another download"
    return STATE_TEXT.get(state, state)


def error_text(e: dict[str, Any]) -> str:
    """Why a download stopped or waits, in words and with what happens next; the text
    the node recorded (peer ids, errno, status codes) goes under Details."""
    error, state = e["error"], e["state"]
    if not error:
        return ""
    if error == CANCELLED_TEXT:
        return "You stopped this download. “Try again” goes on from where it stopped."
    if error == WITHDRAWN_FAILURE:
        return "The sender cancelled this message: it can no longer be downloaded."
    if changed_source(error):
        return ("The sender's file was changed, moved or deleted after they sent it; they "
                "are told, and can send it again.")
    if error.startswith(TOLD_NO_SOURCE + ":"):
        return (f"No computer that has this file answered. {e['from']} was told you would "
                f"not download it, and may have stopped serving it: ask them to send it "
                f"again.")
    if state == "retrying":
        when = e["next_attempt"]
        then = (f" (next try at {time.strftime('%H:%M:%S', time.localtime(when))})"
                if when else "")
        if error.startswith("the disk is full"):
            return (f"This computer's disk is full: delete files you no longer need. The "
                    f"download goes on by itself{then}.")
        if error.startswith("no source reachable"):
            return (f"No computer that has this file can be reached right now (is "
                    f"{e['from']}'s switched off?). The download goes on by itself{then}.")
        return f"The download was interrupted. It goes on by itself{then}."
    return "The download failed. “Try again” starts it once more."


# How the contacts page shows a key in each state of `contacts_list`'s `keys`.
_KEY_LINES = {"pinned": "{fp}", "pending": "{fp} (waiting for you to accept)",
              "unvouched": "{fp} (new device, not confirmed)",
              "listed_again": "{fp} (removed from their account {at}, now listed again: not "
                              "trusted until you accept it)",
              "retired": "{fp} (removed from their account {at}: no longer trusted)"}
# The warning for each of a contact's `alerts`.
_ALERT_NOTES = {
    "key_changed": '<span class="changed">Their key changed: this may be someone else. '
                   'Compare the fingerprint with them in person or on the phone before you '
                   'accept it.</span>',
    "unvouched": '<span class="warn">A new device that none of theirs confirmed: ask them '
                 'whether they set it up and compare its fingerprint, then accept it. Until '
                 'then its messages are on hold.</span>',
    "listed_again": '<span class="warn">A device you trusted before, removed from their '
                    'account, is listed again: their server may have lost it for a while, '
                    'they may have put it back, or someone else may have that device. Ask '
                    'them, then accept it. Until then its messages are on hold.</span>'}


def contact_cells(c: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The contacts page's fingerprint lines and warnings (HTML) for one contact. A key
    removed from their account (retired) that their server lists again is shown once, as
    that: trusted before, and Accept is the way back (or in, for whoever has the device).
    The last line says when their server last confirmed the devices, if it was ever asked."""
    fps = [_KEY_LINES[k["state"]].format(fp=_e(k["fingerprint"]), at=_when(k["retired_at"]))
           for k in c["keys"]]
    warn = [_ALERT_NOTES[a] for a in c["alerts"]]
    if c["keys_confirmed_at"] is not None:
        warn.append(f'<span class="confirmed">Their server confirmed these devices '
                    f'{_when(c["keys_confirmed_at"])}.</span>')
    return fps, warn


# A recipient's state as the sender's page says it (`shown` when the node knows more).
RECIPIENT_TEXT = {"queued": "waiting to be sent", "sent": "in their inbox, not downloaded yet",
                  "downloading": "downloading it now", "downloaded": "has it",
                  "declined": "will not download it", "failed": "did not get it"}


def recipient_text(r: dict[str, Any]) -> str:
    """What the Sent page says of one recipient: `status`'s own words for a cancelled
    message, a changed file or mail waiting at the server for another domain; a declined
    one in the page's words, with its reason, and one that downloaded it with `status`'s
    count of their other devices still to fetch it."""
    state = str(r["state"])
    if state == "downloaded" and (n := int(r.get("devices_owed") or 0)):
        return f"{RECIPIENT_TEXT[state]} ({devices_to_fetch_text(n)})"
    if r.get("shown") and r["shown"] != state and state != "declined":
        return str(r["shown"])
    text = RECIPIENT_TEXT.get(state, state)
    return f"{text} ({r['reason']})" if r.get("reason") else text


def junk_text(n: int) -> str:
    """The line under the list that says the `n` junk senders' messages are left out of
    it; "" for none."""
    if not n:
        return ""
    return (f"{n} message{'s' if n > 1 else ''} from senders on your junk list "
            f"{'are' if n > 1 else 'is'} not shown (see Preferences).")


def cut_text(shown: int, total: int, finds: str) -> str:
    """The line under a list of the newest `shown` of `total` messages, naming the command
    that `finds` the older ones; "" when the list holds them all."""
    if total <= shown:
        return ""
    return (f"The {shown:,} newest of {total:,} messages are shown. The older ones are "
            f"kept: {finds} them.")


def _states(states: str, state: str) -> str:
    """The data-states attribute, and `hidden` when `state` is not one of them."""
    return f'data-states="{states}"' + ("" if state in states.split() else " hidden")


def _held(e: dict[str, Any]) -> bool:
    """Whether /media can answer for this inbox entry: complete, or some of it in and its
    download not waiting its turn (app.js's renderMessage has the same rule)."""
    return bool(e["state"] == "complete" or (e["progress"] > 0 and not e["queued"]))


def notice_page(title: str, text: str, status: int) -> web.Response:
    """A page for someone without a session (or a message that has gone): the site's
    look, what happened and the way forward, never a bare line of text."""
    body = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport"'
            f' content="width=device-width, initial-scale=1"><title>{_e(title)} · peerpost'
            f'</title><link rel="stylesheet" href="/static/style.css"></head><body><header>'
            f'<strong>peerpost</strong></header><main><h1>{_e(title)}</h1><p>{text}</p>'
            f'</main></body></html>')
    return web.Response(status=status, text=body, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


class WebInbox:
    """Serves the pages; `start()` binds (falling back to a free port), `aclose()` stops."""

    def __init__(self, home_root: Path, ops: ControlOperations, store: ContentStore, *,
                 listen: str, want: Wanter | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.home_root = Path(home_root)
        self.ops = ops
        self.store = store
        self.listen = listen
        self.want = want
        self.wall = wall
        self.auth = WebAuth(self.home_root / TOKEN_FILE, self.home_root / SESSIONS_FILE,
                            wall=wall)
        self.url = ""
        self._streams = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._template = string.Template(
            resources.files(__package__).joinpath("templates/base.html").read_text())
        self._static = Path(str(resources.files(__package__).joinpath("static")))

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> str:
        host, port = parse_hostport(self.listen, what="web")
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/login", self.login)
        app.router.add_get("/", self.inbox_page)
        app.router.add_get("/message/{id}", self.message_page)
        app.router.add_get("/sent", self.sent_page)
        app.router.add_get("/contacts", self.contacts_page)
        app.router.add_get("/prefs", self.prefs_page)
        app.router.add_get("/events", self.events)
        app.router.add_get("/api/inbox", self.api_inbox)
        app.router.add_get("/thumb/{id}", self.thumb)
        app.router.add_get("/media/{id}", self.media)
        app.router.add_post("/api/message/{id}/fetch", self.act_fetch)
        app.router.add_post("/api/message/{id}/rm", self.act_rm)
        app.router.add_post("/api/message/{id}/cancel", self.act_cancel)
        app.router.add_post("/api/prefs", self.act_prefs)
        app.router.add_post("/api/sender", self.act_sender)
        app.router.add_post("/api/contacts/accept", self.act_accept)
        app.router.add_static("/static/", self._static)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            if not port:
                raise
            log.warning("web inbox: port %d is taken (%s); using a free port", port, exc)
            site = web.TCPSite(self._runner, host, 0)
            await site.start()
        bound = self._runner.addresses[-1]  # (host, port, ...) of the socket just bound
        self.auth.bind(host, int(bound[1]))
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{format_hostport(shown, bound[1])}"
        (self.home_root / WEB_FILE).write_text(json.dumps({"url": self.url}))
        log.info("web inbox at %s (open it with `peerpost web`)", self.url)
        return self.url

    async def aclose(self) -> None:
        self._closing.set()
        with contextlib.suppress(FileNotFoundError):
            (self.home_root / WEB_FILE).unlink()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- access ------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.auth.host_ok(request.headers.get("Host")):
            return web.Response(status=403, text="forbidden: unexpected Host header\n")
        if not self.auth.origin_ok(request.headers.get("Origin")):
            return web.Response(status=403, text="forbidden: cross-origin request\n")
        if request.path == "/login" or request.path.startswith("/static/"):
            return await handler(request)
        session = self.auth.session(request.cookies.get(self.auth.cookie))
        if session is None:
            if request.method == "GET" and not request.path.startswith(
                    ("/api/", "/events", "/media/", "/thumb/")):
                return notice_page("Not signed in", SIGN_IN, 401)
            return web.Response(status=401, text="log in with `peerpost web` first\n")
        if request.method not in ("GET", "HEAD") and \
                not self.auth.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return web.Response(status=403, text="forbidden: missing or wrong CSRF token\n")
        request[SESSION] = session
        return await handler(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self.auth.session(request.cookies.get(self.auth.cookie)) is not None:
            # Signed in already: the link again from the history, a reload or a bookmark.
            return web.HTTPSeeOther("/")
        session = self.auth.redeem(request.query.get("token", ""), self.wall())
        if session is None:
            return notice_page("This sign-in link has expired",
                               "A link works once, within 10 minutes. " + SIGN_IN, 401)
        resp = web.HTTPSeeOther("/")
        # Kept by the browser as long as the node keeps the session unused: closing the
        # browser or restarting the node does not sign its owner out.
        resp.set_cookie(self.auth.cookie, session.sid, httponly=True, samesite="Strict",
                        path="/", max_age=int(SESSION_IDLE))
        return resp

    # --- data --------------------------------------------------------------------------
    async def _inbox(self) -> list[dict[str, Any]]:
        """The newest 1,000 entries (`LIST_LIMIT`), junk senders' too (a message page of
        one still updates; the list leaves them out), each with its state in words and who
        its sources are."""
        entries: list[dict[str, Any]] = await self.ops.inbox_list(
            Fields({"include_junk": True}, "web"))
        return self._shown(entries)

    def _shown(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`entries` (`inbox --json`'s) each with its state in words, whether it has a
        thumbnail, and who its sources are."""
        names = {f.replace(" ", ""): c.address for c in self.ops.contacts.list()
                 for f in c.fingerprints}
        for e in entries:
            e["thumbnail"] = self._thumb_of(e["id"]) is not None
            e["state_text"] = state_text(e)
            e["error_text"] = error_text(e)
            for s in e["sources"]:
                who = next((a for f, a in names.items() if f.startswith(s["peer"])), None)
                s["text"] = (f"{who or 'another recipient'}, "
                             f"{PATH_TEXT.get(s['path'], s['path'])}: {_size(s['bytes'])}")
        return entries

    def _entry(self, mid: str) -> Any:
        try:
            return self.ops.find(mid)
        except ControlError:
            raise web.HTTPNotFound(text="no such message\n") from None

    def _thumb_of(self, mid: str) -> bytes | None:
        try:
            return decode_location(self.ops.find(mid).message).description.thumbnail
        except (ControlError, DecodeError):
            return None

    def _server_down(self) -> str:
        """What the banner says while the node is not logged in to its server, or ''."""
        rv = self.ops.rendezvous
        if rv.connected:
            return ""
        if rv.refused:
            return (f"The mail server does not accept this computer ({rv.refused}): ask "
                    f"whoever set peerpost up for you.")
        if (m := rv.mismatch) is not None:
            return (f"Not connected to the mail server: something else answers at its "
                    f"address ({key_mismatch_text(m.server, m.error)}). New mail comes in "
                    "once your own server answers there again.")
        return ("Not connected to the mail server: new mail comes in once the connection is "
                "back. peerpost keeps trying by itself.")

    def _page(self, request: web.Request, page: str, title: str, body: str) -> web.Response:
        session = request[SESSION]
        down = self._server_down()
        banner = (f'<p id="server-down" class="warn" role="status"{"" if down else " hidden"}>'
                  f'{_e(down)}</p>')
        text = self._template.substitute(title=_e(title), csrf=_e(session.csrf), page=page,
                                         address=_e(self.ops.address), body=banner + body)
        return web.Response(text=text, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self'; "
                                       "media-src 'self'; object-src 'none'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"})

    # --- pages -------------------------------------------------------------------------
    async def inbox_page(self, request: web.Request) -> web.StreamResponse:
        rows = []
        entries = await self._inbox()
        for e in entries:
            if e["junk"]:
                continue
            thumb = (f'<img src="/thumb/{_e(e["id"])}" alt="">' if e["thumbnail"]
                     else '<div class="none"></div>')
            pct = round(e["progress"] * 100)
            rows.append(
                f'<tr class="msg" data-id="{_e(e["id"])}"><td class="thumb">{thumb}</td>'
                f'<td class="title"><a href="/message/{_e(e["id"])}">'
                f'{_e(e["title"] or e["file_name"] or "(no title)")}</a></td>'
                f'<td class="from">{_e(e["from"])}</td><td class="size">{_size(e["size"])}</td>'
                f'<td class="state state-{_e(e["state"])}">{_e(e["state_text"])}</td>'
                f'<td class="progress"><span class="bar"><span style="width:{pct}%"></span>'
                f'</span> {pct}%</td></tr>')
        junk = self._junk_held(entries)
        cut = self._cut_text(entries, len(rows), junk)
        body = ('<h1>Inbox</h1><table id="inbox"><thead><tr><th></th><th>Title</th>'
                '<th>From</th><th>Size</th><th>State</th><th>Progress</th></tr></thead>'
                f'<tbody id="inbox-rows">{"".join(rows)}</tbody></table>'
                f'<p id="inbox-empty"{" hidden" if rows else ""}>No messages yet. New ones '
                'show up here by themselves.</p>'
                f'<p id="inbox-junk" class="hint">{_e(junk_text(junk))}</p>'
                f'<p id="inbox-cut" class="hint">{_e(cut)}</p>')
        return self._page(request, "inbox", "Inbox", body)

    def _junk_held(self, entries: list[dict[str, Any]]) -> int:
        """How many junk senders' messages the inbox holds. `entries` (its newest 1,000,
        junk too) are all of it unless the list is full: only then is node.db counted."""
        if len(entries) < LIST_LIMIT:
            return sum(1 for e in entries if e["junk"])
        return self.ops.inbox.count(junk_only=True)

    def _cut_text(self, entries: list[dict[str, Any]], rows: int, junk: int) -> str:
        """The line that says the list holds only the newest (`entries`, of which `rows`
        are listed: not junk) when the inbox holds more not junk (all but its `junk`);
        else ""."""
        if len(entries) < LIST_LIMIT:
            return ""  # not cut: no need to count the inbox
        return cut_text(rows, self.ops.inbox.count() - junk,
                        "`peerpost fetch ID` and `peerpost rm ID` find")

    async def message_page(self, request: web.Request) -> web.StreamResponse:
        try:
            entry = self.ops.find(request.match_info["id"])
        except ControlError:
            return notice_page("This message is not in your inbox",
                               'It was removed, or the link is wrong. '
                               '<a href="/">Back to the inbox</a>', 404)
        # This entry alone: of an inbox past the 1,000 newest the list has not all.
        (e,) = self._shown([self.ops.entry_json(entry)])
        mid, state = _e(e["id"]), e["state"]
        kind = media_kind(e["media_type"], e["file_name"])
        try:
            d = decode_location(entry.message).description
            photo = kind is not None and kind[0] == "img"
            facts = [(FACT_TEXT.get(k, k), v) for k, v in d.fields if not photo]
            facts += [(FACT_TEXT.get(k, k), _when(v)) for k, v in d.stamps]
            if d.duration_ms and not photo:
                facts.append(("duration", f"{d.duration_ms / 1000:.1f} s"))
            if d.width and d.height:
                facts.append(("size in pixels", f"{d.width} x {d.height}"))
        except DecodeError:
            facts = []
        src = f"/media/{mid}"
        plays = _states(PLAYS_IN, state)
        # The player's source is set once the node holds some of the file (app.js sets it
        # then): /media has nothing to answer before, and a photo that got its 404 stayed
        # broken once complete. A download waiting its turn may not have its file open.
        at = f'src="{src}"' if "hidden" not in plays and _held(e) else f'data-src="{src}"'
        if kind is None:
            player, what = "", "file"
        elif kind[0] == "img":
            player, what = f'<img class="media" id="player" {plays} {at} alt="">', "photo"
        else:
            player = f'<{kind[0]} id="player" controls preload="auto" {plays} {at}></{kind[0]}>'
            what = kind[0]
        folder = e.get("folder")
        # A folder is unpacked on this computer: there is no one file to save or play.
        save = _states("complete", state)
        named = ("file name", e["file_name"])
        if folder is not None:
            n = folder["files"]
            what, save = f"folder of {n} file{'s' if n != 1 else ''}", 'data-states="" hidden'
            named = ("folder name", f'{folder["name"]}/')  # not the NAME.tar it came in
        sources = "".join(f"<li>{_e(s['text'])}</li>" for s in e["sources"])
        try:
            rule = self.ops.prefs.rule_for(e["from"])
        except DecodeError:  # a sender that doesn't parse is classed junk, by no rule
            rule = None
        if rule is not None:
            # The undo takes off the pattern that matched. For a domain's rule that is the
            # domain, and the note and the button say so: the address is on no list.
            pattern, sender = rule
            scope = f" (all of {_e(pattern)})" if pattern.startswith("@") else ""
            said, undo = {
                "junk": (f"is on your junk list{scope}: new messages from them are hidden "
                         "and not downloaded.", "Not junk"),
                "priority": (f"is a priority sender{scope}: their messages download first.",
                             "No longer priority")}[sender]
            if scope:
                undo = f"{undo}: all of {_e(pattern)}"
            body_json = _e(json.dumps({"address": pattern, "list": sender,
                                       "action": "remove"}))
            lists = (f'<p class="sender-note" id="sender-note"><strong>{_e(e["from"])}</strong>'
                     f" {said} <button data-action=\"/api/sender\" data-body='{body_json}'>"
                     f"{undo}</button></p>")
            buttons = ""
        else:
            lists = ""
            buttons = "".join(
                f"<button data-action=\"/api/sender\" data-body='"
                f"{_e(json.dumps({'address': e['from'], 'list': k}))}'>{label}</button>"
                for k, label in (("priority", "Mark sender priority"),
                                 ("junk", "Mark sender junk")))
        title = e["title"] or e["file_name"] or "(no title)"
        pct = round(e["progress"] * 100)
        declined = self.ops.declined_json(entry.id)
        told = (f'<p class="warn" id="msg-declined" {_states("failed downloading retrying", state)}'
                f'>{_e(e["from"])} was told you would not download this '
                f'({_e(declined["reason"])}), and may have stopped serving it: “Try again” '
                f'gets it only if someone still has it.</p>'
                if declined is not None and declined["sent"] else "")
        confirm = _e(f"Remove “{title}” from your inbox? A file already received stays "
                     f"where it was saved.")
        body = (
            f'<h1>{_e(title)}</h1><p id="msg-gone" class="warn" hidden>This message was '
            f'removed from your inbox. <a href="/">Back to the inbox</a></p>{player}'
            f'<p>from <strong>{_e(e["from"])}</strong> · {_size(e["size"])} · {what} · '
            f'<span id="msg-state" role="status" data-id="{mid}" data-state="{_e(state)}" '
            f'data-progress="{e["progress"]}" '
            f'class="state state-{_e(state)}">{_e(e["state_text"])}'
            f'{f" {pct}%" if 0 < pct < 100 else ""}</span></p>{lists}'
            f'<p class="warn" {_states("unverified", state)}>On hold: this message is signed '
            f'by a new device of {_e(e["from"])} that you have not confirmed yet. Check with '
            f'them, then accept it on the <a href="/contacts">Contacts</a> page.</p>'
            f'{told}<div id="msg-error" class="state-failed"{"" if e["error"] else " hidden"}>'
            f'<p id="msg-error-text">{_e(e["error_text"])}</p><details><summary>Details'
            f'</summary><p id="msg-error-raw">{_e(e["error"] or "")}</p></details></div>'
            f'<p class="note">{_e(e["note"])}</p>'
            f'<p {save}><a id="save" href="{src}" '
            f'download="{_e(e["file_name"])}">Save to this computer</a></p>'
            f'<p class="hint" {_states("downloading retrying", state)}>It can be saved to this '
            f'computer once all of it has arrived.</p>'
            + '<dl>' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
            + f'<dt>{named[0]}</dt><dd>{_e(named[1])}</dd>'
            + f'<div class="fact" {_states("complete", state)}><dt>saved on this computer '
            f'as</dt><dd id="msg-path">{_e(e["path"] or "")}</dd></div>'
            + f'<dt>received</dt><dd>{_when(e["received_at"])}</dd></dl>'
            + f'<div id="msg-from"{"" if sources else " hidden"}><h2>Coming from</h2>'
            f'<ul id="msg-sources">{sources}</ul></div>'
            + f'<p class="actions"><button {_states("offered", state)} '
            f'data-action="/api/message/{mid}/fetch">Download it</button>'
            f'<button {_states("failed", state)} data-action="/api/message/{mid}/fetch">'
            f'Try again</button>'
            f'<button id="cancel" {_states("downloading retrying", state)} '
            f'data-action="/api/message/{mid}/cancel">Stop download</button>'
            f'<button data-action="/api/message/{mid}/rm" data-then="/" '
            f'data-confirm="{confirm}">Remove</button>{buttons}</p><p id="flash" role="alert"></p>')
        return self._page(request, "message", title, body)

    async def sent_page(self, request: web.Request) -> web.StreamResponse:
        items = await self.ops.status(Fields({}, "web"))
        rows = []
        # Someone may still download (here, or queued or delivered at another domain):
        # the file goes from this computer.
        owed = False
        for m in items:
            for i, r in enumerate(m["recipients"]):
                first = i == 0
                owed = owed or bool(r["owed"])
                rows.append(
                    f'<tr><td>{_e(m["title"]) if first else ""}</td>'
                    f'<td>{_size(m["size"]) if first else ""}</td><td>{_e(r["address"])}</td>'
                    f'<td class="state">{_e(recipient_text(r))}</td>'
                    f'<td>{_when(r.get("updated_at"))}</td></tr>')
        owed = owed or self._owed_older(items)
        body = ('<h1>Sent</h1><table id="sent"><thead><tr><th>Title</th><th>Size</th>'
                '<th>Recipient</th><th>State</th><th>Updated</th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table>'
                + ("" if rows else "<p>Nothing sent from this computer yet.</p>")
                + f'<p id="sent-cut" class="hint">{_e(self._sent_cut(items))}</p>'
                + (f'<p id="sent-owed" class="warn">{_e(KEEP_ON_TEXT)}</p>' if owed else ""))
        return self._page(request, "sent", "Sent", body)

    def _owed_older(self, items: list[dict[str, Any]]) -> bool:
        """Whether a sent message older than the newest 1,000 (`items`, `status`'s) still
        needs this computer: a recipient `sent` or `downloading` (node.db's every row),
        and its file not changed since. Their foreign recipients are not tracked at the
        server (a request each), so one whose mail bounced counts."""
        if len(items) < LIST_LIMIT:
            return False
        after = (float(items[-1]["created_at"]), bytes.fromhex(items[-1]["id"]))
        while page := self.ops.outbox.awaited(after=after):
            if any(self.ops.source_changed(m) is None for m in page):
                return True
            after = (page[-1].created_at, page[-1].id)
        return False

    def _sent_cut(self, items: list[dict[str, Any]]) -> str:
        """The line that says the Sent page lists only the newest `items`, if so; else ""."""
        if len(items) < LIST_LIMIT:
            return ""  # not cut: no need to count the outbox
        return cut_text(len(items), self.ops.outbox.count(), "`peerpost status ID` finds")

    async def contacts_page(self, request: web.Request) -> web.StreamResponse:
        rows = []
        for c in await self.ops.contacts_list(Fields({}, "web")):
            fps, warn = contact_cells(c)
            if c["pending"] or c["unvouched"] or c["changed"]:
                body = _e(json.dumps({"address": c["address"]}))
                warn.append(f"<button data-action=\"/api/contacts/accept\" "
                            f"data-body='{body}'>Accept</button>")
            rows.append(f'<tr><td>{_e(c["address"])}</td><td>{"<br>".join(fps)}</td>'
                        f'<td>{_when(c["first_seen"])}</td><td>{" ".join(warn)}</td></tr>')
        body = ('<h1>Contacts</h1><p>The people who sent you mail, and the fingerprint of '
                'each of their devices. To be sure a device is theirs, compare its '
                'fingerprint with them in person or on the phone.</p>'
                '<table id="contacts"><thead><tr><th>Address</th><th>Fingerprints</th>'
                '<th>First seen</th><th></th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table><p id="flash" role="alert"></p>')
        return self._page(request, "contacts", "Contacts", body)

    async def prefs_page(self, request: web.Request) -> web.StreamResponse:
        prefs = await self.ops.prefs_get(Fields({}, "web"))
        on = "on" if prefs["auto_download"] else "off"
        auto = "".join(f'<option value="{v}"{" selected" if v == on else ""}>{text}</option>'
                       for v, text in (("on", "yes"), ("off", "no, only when I ask")))
        # The node's default when no archive folder is set (overlay.app.node).
        archive = prefs["archive_dir"] or str(self.home_root / "archive")
        said = {"keep": "keep them", "delete": "delete them from this computer",
                "archive": f"move them to {archive}"}
        keep = "".join(f'<option value="{_e(v)}"{" selected" if v == prefs["retention"] else ""}'
                       f'>{_e(said.get(v, v))}</option>' for v in RETENTIONS)

        def senders(key: str, heading: str, undo: str, empty: str) -> str:
            items = "".join(
                f"<li>{_e(a)} <button data-action=\"/api/sender\" data-body='"
                f"{_e(json.dumps({'address': a, 'list': key, 'action': 'remove'}))}'>"
                f"{undo}</button></li>" for a in prefs[f"{key}_senders"])
            return f'<h2>{heading}</h2><ul id="{key}-senders">{items or f"<li>{empty}</li>"}</ul>'

        rate = prefs["max_upload_rate"]
        body = (
            '<h1>Preferences</h1><form id="prefs-form" data-action="/api/prefs">'
            '<p><label>Download new mail by itself: <select name="auto-download">'
            f'{auto}</select></label></p>'
            '<p><label>… when it is at most <input name="auto-download-max" size="10" '
            f'value="{_e(_limit(prefs["auto_download_max"]))}"></label> '
            '<span class="hint">(for example 500 MB or 2 GB; none: any size)</span></p>'
            '<p><label>Files you sent, once everyone has them: <select name="retention">'
            f'{keep}</select></label></p>'
            '<p><button type="submit">Save</button></p></form><p id="flash" role="alert"></p>'
            + senders("priority", "Priority senders (their messages download first)",
                      "Remove", "none")
            + senders("junk", "Junk senders (their messages are hidden, not downloaded)",
                      "Not junk", "none")
            + '<h2>Set with <code>peerpost prefs</code></h2><dl id="prefs">'
            f'<dt>upload speed limit</dt><dd>{"none" if rate is None else _size(rate) + "/s"}'
            f'</dd><dt>archive folder</dt><dd>{_e(archive)}</dd></dl>')
        return self._page(request, "prefs", "Preferences", body)

    # --- data endpoints ----------------------------------------------------------------
    async def api_inbox(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._inbox())

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self._streams >= MAX_STREAMS:
            return web.Response(status=503, headers={"Retry-After": "5"}, text="busy\n")
        self._streams += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
            await resp.prepare(request)
            last, last_down, last_junk = "", None, None
            cookie = request.cookies.get(self.auth.cookie)
            # A message page's own message (`?id=`), sent also when it is older than the
            # newest 1,000 the list holds: else the page took it for removed.
            mid = request.query.get("id", "")[:32]
            while not self._closing.is_set():
                if self.auth.session(cookie) is None:
                    break  # signed out meanwhile: the browser's retry meets the 401
                entries = await self._inbox()
                if mid and not any(e["id"] == mid for e in entries):
                    with contextlib.suppress(ControlError):
                        entries += self._shown([self.ops.entry_json(self.ops.find(mid))])
                data = json.dumps(entries)
                if data != last:
                    last = data
                    await resp.write(f"event: inbox\ndata: {data}\n\n".encode())
                # The inbox page's junk line: of the whole inbox, not of the newest 1,000.
                junk = None if mid else junk_text(self._junk_held(entries))
                if junk != last_junk:
                    last_junk = junk
                    await resp.write(f"event: junk\ndata: {json.dumps(junk)}\n\n".encode())
                down = self._server_down()
                if down != last_down:
                    last_down = down
                    await resp.write(f"event: server\ndata: {json.dumps(down)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), EVENT_EVERY)
            return resp
        finally:
            self._streams -= 1

    async def thumb(self, request: web.Request) -> web.StreamResponse:
        data = self._thumb_of(request.match_info["id"])
        if data is None:
            raise web.HTTPNotFound(text="no thumbnail\n")
        # A sender's bytes: served only as JPEG, never sniffed into anything else.
        return web.Response(body=data, content_type="image/jpeg",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def media(self, request: web.Request) -> web.StreamResponse:
        entry = self._entry(request.match_info["id"])
        kind = media_kind(entry.media_type, entry.file_name)
        # What we can't play goes out as a download, never rendered by the browser.
        ctype = kind[1] if kind else "application/octet-stream"
        held = self.store.lookup(entry.content_id)
        if isinstance(held, PartialContent) and held.final_path is None:
            return await serve_partial(request, held, ctype, self.want)
        local = self.store.local(entry.content_id)
        path = local.path if local is not None else (Path(entry.path) if entry.path else None)
        if path is None and isinstance(held, PartialContent):
            # Renamed to its final name, not yet recorded complete: the file is whole.
            path = held.final_path
        if path is None or not path.is_file():
            raise web.HTTPNotFound(text="not fetched yet: fetch it first\n")
        resp = file_response(path, ctype)
        if kind is None:
            resp.headers["Content-Disposition"] = "attachment"
        return resp

    # --- actions -----------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise web.HTTPBadRequest(text="expected a JSON body\n") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object\n")
        return body

    async def _call(self, op: Callable[[Fields], Awaitable[Any]],
                    args: dict[str, Any]) -> web.Response:
        try:
            return web.json_response(await op(Fields(args, "web")))
        except (ControlError, DecodeError) as exc:
            return web.Response(status=400, text=f"{exc}\n")

    async def act_fetch(self, request: web.Request) -> web.StreamResponse:
        return await self._call(self.ops.fetch, {"id": request.match_info["id"]})

    async def act_rm(self, request: web.Request) -> web.StreamResponse:
        return await self._call(self.ops.rm, {"id": request.match_info["id"]})

    async def act_cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._call(self.ops.cancel, {"id": request.match_info["id"]})

    async def act_prefs(self, request: web.Request) -> web.StreamResponse:
        """Set the form's preferences (auto-download, auto-download-max, retention), each
        through the same operation as `peerpost prefs set`; the first refusal stops."""
        body = await self._body(request)
        changes = [(k, body[k]) for k in PREF_KEYS if k in body]
        if not changes or any(not isinstance(v, str) for _, v in changes):
            return web.Response(status=400, text=f"expected text values for some of "
                                                 f"{', '.join(PREF_KEYS)}\n")
        resp = web.Response(status=400, text="nothing to change\n")
        for key, value in changes:
            resp = await self._call(self.ops.prefs_set, {"key": key, "value": value})
            if resp.status != 200:
                break
        return resp

    async def act_sender(self, request: web.Request) -> web.StreamResponse:
        """Put a sender on the priority or junk list, or (`action` remove) take it off."""
        body = await self._body(request)
        action = body.get("action", "add")
        if action not in ("add", "remove"):
            return web.Response(status=400, text="action is add or remove\n")
        return await self._call(self.ops.prefs_list, {
            "list": body.get("list"), "action": action, "address": body.get("address")})

    async def act_accept(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._call(self.ops.contacts_accept, {"address": body.get("address")})


def web_url(home_root: Path) -> str | None:
    """The URL the running node serves its web inbox at, if any."""
    try:
        url = json.loads((Path(home_root) / WEB_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(url) if isinstance(url, str) else None


def login_url(base: str, token: str) -> str:
    return f"{base}/login?token={token}"


