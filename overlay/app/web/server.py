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

from crypto.address import parse_hostport
from crypto.codec import Fields
from crypto.errors import DecodeError
from crypto.location import decode_location
from overlay.app.control import ControlError
from overlay.app.operations import ControlOperations
from overlay.app.web.auth import CSRF_HEADER, SESSION_COOKIE, TOKEN_FILE, Session, WebAuth
from overlay.app.web.media import Wanter, file_response, serve_partial
from overlay.content.catalog import ContentStore
from overlay.content.partial import PartialContent
from overlay.mail.prefs import RETENTIONS

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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


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
        self.auth = WebAuth(self.home_root / TOKEN_FILE)
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
        self.url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound[1]}"
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
        session = self.auth.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return web.Response(status=401, text="log in with `peerpost web` first\n")
        if request.method not in ("GET", "HEAD") and \
                not self.auth.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            return web.Response(status=403, text="forbidden: missing or wrong CSRF token\n")
        request["session"] = session
        return await handler(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        session = self.auth.redeem(request.query.get("token", ""), self.wall())
        if session is None:
            return web.Response(status=401, text="this login link is used up or expired: "
                                                 "run `peerpost web` again\n")
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(SESSION_COOKIE, session.sid, httponly=True, samesite="Strict",
                        path="/")
        return resp

    # --- data --------------------------------------------------------------------------
    async def _inbox(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = await self.ops.inbox_list(Fields({}, "web"))
        for e in entries:
            e["thumbnail"] = self._thumb_of(e["id"]) is not None
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

    def _page(self, request: web.Request, page: str, title: str, body: str) -> web.Response:
        session: Session = request["session"]
        text = self._template.substitute(title=_e(title), csrf=_e(session.csrf), page=page,
                                         address=_e(self.ops.address), body=body)
        return web.Response(text=text, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self'; "
                                       "media-src 'self'; object-src 'none'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"})

    # --- pages -------------------------------------------------------------------------
    async def inbox_page(self, request: web.Request) -> web.StreamResponse:
        rows = []
        for e in await self._inbox():
            thumb = (f'<img src="/thumb/{_e(e["id"])}" alt="">' if e["thumbnail"]
                     else '<div class="none"></div>')
            pct = round(e["progress"] * 100)
            rows.append(
                f'<tr class="msg" data-id="{_e(e["id"])}"><td class="thumb">{thumb}</td>'
                f'<td class="title"><a href="/message/{_e(e["id"])}">'
                f'{_e(e["title"] or e["file_name"] or e["id"][:12])}</a></td>'
                f'<td class="from">{_e(e["from"])}</td><td class="size">{_size(e["size"])}</td>'
                f'<td class="state state-{_e(e["state"])}">{_e(e["state"])}'
                f'{" (junk)" if e["junk"] else ""}</td>'
                f'<td class="progress"><span class="bar"><span style="width:{pct}%"></span>'
                f'</span> {pct}%</td></tr>')
        body = ('<h1>Inbox</h1><table id="inbox"><thead><tr><th></th><th>Title</th>'
                '<th>From</th><th>Size</th><th>State</th><th>Progress</th></tr></thead>'
                f'<tbody id="inbox-rows">{"".join(rows)}</tbody></table>')
        return self._page(request, "inbox", "Inbox", body)

    async def message_page(self, request: web.Request) -> web.StreamResponse:
        e = self.ops.entry_json(self._entry(request.match_info["id"]))
        mid = _e(e["id"])
        try:
            d = decode_location(self._entry(e["id"]).message).description
            facts = [(k, v) for k, v in d.fields] + [(k, _when(v)) for k, v in d.stamps]
            if d.duration_ms:
                facts.append(("duration", f"{d.duration_ms / 1000:.1f} s"))
            if d.width and d.height:
                facts.append(("resolution", f"{d.width}x{d.height}"))
        except DecodeError:
            facts = []
        kind = media_kind(e["media_type"], e["file_name"])
        src = f"/media/{mid}"
        if kind is None or e["state"] not in ("downloading", "complete", "retrying"):
            player = ""
        elif kind[0] == "img":
            player = f'<img class="media" src="{src}" alt="">'
        else:
            player = (f'<{kind[0]} id="player" controls preload="auto" src="{src}">'
                      f'</{kind[0]}>')
        sources = "".join(f"<li>{_e(s['peer'])} via {_e(s['path'])}: {_size(s['bytes'])}</li>"
                          for s in e["sources"])
        prio = _e(json.dumps({"address": e["from"], "list": "priority"}))
        junk = _e(json.dumps({"address": e["from"], "list": "junk"}))
        body = (
            f'<h1>{_e(e["title"] or e["file_name"])}</h1>{player}'
            f'<p>from <strong>{_e(e["from"])}</strong> · {_size(e["size"])} · '
            f'{_e(e["media_type"])} · <span id="msg-state" data-id="{mid}" '
            f'class="state state-{_e(e["state"])}">{_e(e["state"])} '
            f'{round(e["progress"] * 100)}%</span></p>'
            + (f'<p class="warn">held: signed by a device key of {_e(e["from"])} you do not '
               f'trust yet (see <a href="/contacts">contacts</a>)</p>'
               if e["state"] == "unverified" else "")
            + (f'<p class="state-failed">{_e(e["error"])}</p>' if e["error"] else "")
            + f'<p class="note">{_e(e["note"])}</p>'
            + f'<p><a href="{src}" download="{_e(e["file_name"])}">download</a></p>'
            + '<dl>' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
            + f'<dt>file</dt><dd>{_e(e["file_name"])}</dd>'
            + f'<dt>received</dt><dd>{_when(e["received_at"])}</dd></dl>'
            + f'<h2>Sources</h2><ul id="msg-sources">{sources}</ul>'
            + f'<p><button data-action="/api/message/{mid}/fetch">Fetch</button>'
            + (f'<button id="cancel" data-action="/api/message/{mid}/cancel">Cancel download'
               f'</button>' if e["state"] in ("downloading", "retrying") else "")
            + f'<button data-action="/api/message/{mid}/rm" data-then="/">Remove</button>'
            + f"<button data-action=\"/api/sender\" data-body='{prio}'>Mark sender priority"
            + f"</button><button data-action=\"/api/sender\" data-body='{junk}'>Mark sender "
            + 'junk</button></p><p id="flash"></p>')
        return self._page(request, "message", e["title"] or e["file_name"], body)

    async def sent_page(self, request: web.Request) -> web.StreamResponse:
        items = await self.ops.status(Fields({}, "web"))
        rows = []
        for m in items:
            for i, r in enumerate(m["recipients"]):
                first = i == 0
                rows.append(
                    f'<tr><td>{_e(m["title"]) if first else ""}</td>'
                    f'<td>{_size(m["size"]) if first else ""}</td><td>{_e(r["address"])}</td>'
                    f'<td class="state">{_e(r["state"])}'
                    f'{" (" + _e(r["reason"]) + ")" if r.get("reason") else ""}</td>'
                    f'<td>{_when(r.get("updated_at"))}</td></tr>')
        body = ('<h1>Sent</h1><table id="sent"><thead><tr><th>Title</th><th>Size</th>'
                '<th>Recipient</th><th>State</th><th>Updated</th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table>')
        return self._page(request, "sent", "Sent", body)

    async def contacts_page(self, request: web.Request) -> web.StreamResponse:
        rows = []
        for c in await self.ops.contacts_list(Fields({}, "web")):
            fps = [_e(f) for f in c["fingerprints"]]
            fps += [f"{_e(f)} (pending)" for f in c["pending"]]
            fps += [f"{_e(f)} (unvouched)" for f in c["unvouched"]]
            warn = []
            if c["changed"]:
                warn.append('<span class="changed">KEY CHANGED: compare fingerprints out of '
                            'band before accepting</span>')
            if c["unvouched"]:
                warn.append('<span class="warn">new device key nobody vouched for: '
                            'unverified</span>')
            if c["pending"] or c["unvouched"] or c["changed"]:
                body = _e(json.dumps({"address": c["address"]}))
                warn.append(f"<button data-action=\"/api/contacts/accept\" "
                            f"data-body='{body}'>Accept</button>")
            rows.append(f'<tr><td>{_e(c["address"])}</td><td>{"<br>".join(fps)}</td>'
                        f'<td>{_when(c["first_seen"])}</td><td>{" ".join(warn)}</td></tr>')
        body = ('<h1>Contacts</h1><p>Compare fingerprints with each contact out of band.</p>'
                '<table id="contacts"><thead><tr><th>Address</th><th>Fingerprints</th>'
                '<th>First seen</th><th></th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table><p id="flash"></p>')
        return self._page(request, "contacts", "Contacts", body)

    async def prefs_page(self, request: web.Request) -> web.StreamResponse:
        prefs = await self.ops.prefs_get(Fields({}, "web"))
        rows = "".join(
            f"<dt>{_e(k)}</dt><dd>{_e(', '.join(v) if isinstance(v, list) else v)}</dd>"
            for k, v in prefs.items())
        on = "on" if prefs["auto_download"] else "off"
        auto = "".join(f'<option value="{v}"{" selected" if v == on else ""}>{v}</option>'
                       for v in ("on", "off"))
        limit = prefs["auto_download_max"]
        keep = "".join(f'<option value="{_e(v)}"{" selected" if v == prefs["retention"] else ""}'
                       f'>{_e(v)}</option>' for v in RETENTIONS)
        body = (
            '<h1>Preferences</h1><form id="prefs-form" data-action="/api/prefs">'
            f'<label>auto-download <select name="auto-download">{auto}</select></label> '
            '<label>auto-download at most <input name="auto-download-max" size="10" '
            f'value="{"none" if limit is None else _e(limit)}"></label> '
            f'<label>sent files after delivery <select name="retention">{keep}</select>'
            '</label> <button type="submit">Save</button></form><p id="flash"></p>'
            f'<dl id="prefs">{rows}</dl>'
            '<p>Sender lists and the rest: <code>peerpost prefs</code>.</p>')
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
            last = ""
            while not self._closing.is_set():
                data = json.dumps(await self._inbox())
                if data != last:
                    last = data
                    await resp.write(f"event: inbox\ndata: {data}\n\n".encode())
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
        body = await self._body(request)
        return await self._call(self.ops.prefs_list, {
            "list": body.get("list"), "action": "add", "address": body.get("address")})

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


