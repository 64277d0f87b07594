// The web inbox's only script: live inbox rows (server-sent events) and POST actions
// carrying the session's CSRF token. Outside text is set with textContent, never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (text !== undefined) td.textContent = text;
  row.appendChild(td);
  return td;
}

function renderInbox(entries) {
  const body = document.getElementById("inbox-rows");
  if (!body) return;
  const rows = [];
  for (const e of entries) {
    if (e.junk) continue; // a junk sender's message is listed by `peerpost inbox --all` only
    const tr = document.createElement("tr");
    tr.dataset.id = e.id;
    tr.className = "msg";
    const th = cell(tr, undefined, "thumb");
    if (e.thumbnail) {
      const img = document.createElement("img");
      img.src = `/thumb/${e.id}`;
      img.alt = "";
      th.appendChild(img);
    } else {
      const d = document.createElement("div");
      d.className = "none";
      th.appendChild(d);
    }
    const t = cell(tr, undefined, "title");
    const a = document.createElement("a");
    a.href = `/message/${e.id}`;
    a.textContent = e.title || e.file_name || "(no title)";
    t.appendChild(a);
    cell(tr, e.from, "from");
    cell(tr, size(e.size), "size");
    cell(tr, e.state_text, `state state-${e.state}`);
    const p = cell(tr, undefined, "progress");
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.round(e.progress * 100)}%`;
    bar.appendChild(fill);
    p.appendChild(bar);
    p.appendChild(document.createTextNode(` ${Math.round(e.progress * 100)}%`));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const empty = document.getElementById("inbox-empty");
  if (empty) empty.hidden = rows.length > 0;
}

// A <video> or <audio> whose loading stopped: `stalled` (no data for 3 s) and no data
// since. When /media cuts a range short and answers Chromium's retry with a 503 (a chunk
// that did not come in 20 s), Chromium asks no more and fires no error: played, the clip
// ends where its data ends. A stalled load still waiting for its chunk counts too: it is
// told from a dead one only once the node holds more (`awaitStalled`).
const stalled = new WeakSet();
// Media the user set playing: the pause Chromium adds to a network error does not count.
const playing = new WeakSet();
// Where a reloaded clip goes on (seconds, and whether it plays), kept until its metadata
// is in: a reload that fails too leaves currentTime at 0.
const resumeAt = new WeakMap();
// What the node held of the message (its progress, and whether complete) as this page
// last saw it, and when each player's load began or last failed. Loaded again before
// the node holds more, a player fails the same way: the same end of data, or the same
// 404 of a download that has not reopened its file.
const st0 = document.getElementById("msg-state");
let shown = st0 ? { progress: Number(st0.dataset.progress || 0),
  complete: st0.dataset.state === "complete" } : null;
const triedWith = new WeakMap();
for (const el of document.querySelectorAll("[data-states][src]")) triedWith.set(el, shown);

function onMedia(type, handle, all) {
  document.addEventListener(type, (ev) => {
    if (ev.target instanceof HTMLMediaElement
        || (all && ev.target instanceof HTMLImageElement)) handle(ev.target);
  }, true); // media events do not bubble
}
onMedia("stalled", (el) => { stalled.add(el); triedWith.set(el, shown); });
onMedia("progress", (el) => stalled.delete(el));
onMedia("loadstart", (el) => stalled.delete(el));
onMedia("error", (el) => triedWith.set(el, shown), true);
onMedia("play", (el) => playing.add(el));
onMedia("pause", (el) => { if (!el.error) playing.delete(el); });
onMedia("loadedmetadata", (el) => {
  const at = resumeAt.get(el);
  if (!at) return;
  resumeAt.delete(el);
  if (at.time > 0) el.currentTime = at.time;
  if (at.play) el.play().catch(() => {}); // refused (no user gesture yet): it waits paused
});

// A player whose load failed: /media answered 404 before the download reopened its file
// (after a node restart), 503 after a stall, or the connection was cut. The browser never
// asks again by itself.
function loadFailed(el) {
  if (!el.getAttribute("src")) return false;
  if (el instanceof HTMLImageElement) return el.complete && el.naturalWidth === 0;
  return el instanceof HTMLMediaElement && (el.error !== null || stalled.has(el));
}

// Whether the node holds more of the message than when `el`'s load began or failed.
function holdsMore(el) {
  const then = triedWith.get(el);
  return !then || shown.progress > then.progress || (shown.complete && !then.complete);
}

// A load stalled at the end of what the node held may be alive: /media streams a chunk
// the moment it is stored, and `progress` fires about every 350 ms (+-200, the HTML
// spec) while data comes. So while the download runs, a stalled player is loaded again
// only if it is still stalled this long after the node held more; loaded again at once,
// a clip played while it downloads would start its load over at each chunk that came
// after a stall. Once the file is complete it is loaded again at once: the page offers
// to play and save it then.
const STALL_GRACE_MS = 1500;
const awaiting = new WeakSet();

function awaitStalled(el) {
  if (awaiting.has(el)) return;
  awaiting.add(el);
  setTimeout(() => {
    awaiting.delete(el);
    if (!el.hidden && loadFailed(el) && holdsMore(el)) reload(el);
  }, STALL_GRACE_MS);
}

// Load a failed player again: a new query, so neither the browser's cache nor its list of
// images already fetched answers with the old failure. A clip goes on where it stopped,
// playing if it was.
function reload(el) {
  if (el instanceof HTMLMediaElement && !resumeAt.has(el)) {
    resumeAt.set(el, { time: el.ended ? 0 : el.currentTime, play: playing.has(el) });
  }
  const url = new URL(el.getAttribute("src"), document.baseURI);
  url.searchParams.set("try", String(Number(url.searchParams.get("try") || 0) + 1));
  triedWith.set(el, shown);
  el.src = url.pathname + url.search;
}

// The message page as the server would render it now: which buttons, links and player
// show (data-states), the state, the error and the sources.
function renderMessage(entries) {
  const st = document.getElementById("msg-state");
  if (!st) return;
  const e = entries.find((x) => x.id === st.dataset.id);
  if (!e) {
    document.getElementById("msg-gone").hidden = false;
    for (const b of document.querySelectorAll("button[data-action]")) b.disabled = true;
    return;
  }
  const pct = Math.round(e.progress * 100);
  shown = { progress: e.progress, complete: e.state === "complete" };
  st.textContent = e.state_text + (pct > 0 && pct < 100 ? ` ${pct}%` : "");
  st.className = `state state-${e.state}`;
  st.dataset.state = e.state;
  // The player's source once the node holds some of the file (the server's _held): an
  // <img> given it earlier got a 404 and stayed broken after the download completed.
  const held = e.state === "complete" || (e.progress > 0 && !e.queued);
  // A failed player is loaded again once the node holds more of the file: more
  // progress, or all of it. A state change alone (`retrying` to `downloading` and back,
  // while the sender is away) brings no byte.
  for (const el of document.querySelectorAll("[data-states]")) {
    el.hidden = !el.dataset.states.split(" ").includes(e.state);
    if (!el.hidden && held && el.dataset.src && !el.getAttribute("src")) {
      triedWith.set(el, shown);
      el.src = el.dataset.src;
    } else if (!el.hidden && held && loadFailed(el) && holdsMore(el)) {
      if (el instanceof HTMLMediaElement && el.error === null && !shown.complete) {
        awaitStalled(el);
      } else reload(el);
    }
  }
  const path = document.getElementById("msg-path");
  if (path) path.textContent = e.path || "";
  const err = document.getElementById("msg-error");
  if (err) {
    document.getElementById("msg-error-text").textContent = e.error_text;
    document.getElementById("msg-error-raw").textContent = e.error || "";
    err.hidden = !e.error;
  }
  const src = document.getElementById("msg-sources");
  if (src) {
    src.replaceChildren(...e.sources.map((s) => {
      const li = document.createElement("li");
      li.textContent = s.text;
      return li;
    }));
    document.getElementById("msg-from").hidden = e.sources.length === 0;
  }
}

const LOST = "Lost contact with peerpost on this computer. Is it still running? "
  + "This page catches up by itself once it is back.";
const UNREACHED = "Could not reach peerpost on this computer: is it still running? "
  + "Nothing was changed.";
const SIGNED_OUT = "This page is signed out (30 days unused, or `peerpost web --sign-out`). "
  + "Open the inbox again with `peerpost web` on this computer.";

function banner(text) {
  const b = document.getElementById("offline");
  b.textContent = text || "";
  b.hidden = !text;
}

function listen() {
  const page = document.body.dataset.page;
  if (page !== "inbox" && page !== "message") return;
  // A message page asks for its message by id: it may be older than the newest the
  // inbox lists.
  const st = document.getElementById("msg-state");
  const events = new EventSource(st ? `/events?id=${encodeURIComponent(st.dataset.id)}`
    : "/events");
  events.addEventListener("open", () => banner(""));
  events.addEventListener("inbox", (ev) => {
    const entries = JSON.parse(ev.data);
    renderInbox(entries);
    renderMessage(entries);
  });
  // The server counts junk in the whole inbox: the entries are its newest 1,000 only.
  events.addEventListener("junk", (ev) => {
    const junk = document.getElementById("inbox-junk");
    if (junk) junk.textContent = JSON.parse(ev.data);
  });
  events.addEventListener("server", (ev) => {
    const down = document.getElementById("server-down");
    down.textContent = JSON.parse(ev.data);
    down.hidden = !down.textContent;
  });
  events.addEventListener("error", async () => {
    banner(LOST);
    if (events.readyState !== EventSource.CLOSED) return; // the browser tries again
    // Refused rather than unreachable: signed out (`peerpost web --sign-out`, or unused).
    try {
      const res = await fetch("/api/inbox", { credentials: "same-origin" });
      if (res.status === 401) { banner(SIGNED_OUT); return; }
    } catch (err) { /* still unreachable */ }
    setTimeout(listen, 2000);
  });
}

async function post(url, body) {
  const flash = document.getElementById("flash");
  if (flash) flash.className = "";
  let res;
  try {
    res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
  } catch (err) {
    if (flash) flash.textContent = UNREACHED;
    return null;
  }
  if (!res.ok) {
    if (flash) flash.textContent = res.status === 401 ? SIGNED_OUT : await res.text();
    return null;
  }
  return res.json();
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  ev.preventDefault();
  if (b.dataset.confirm && !window.confirm(b.dataset.confirm)) return;
  const out = await post(b.dataset.action, JSON.parse(b.dataset.body || "{}"));
  if (out && b.dataset.then) window.location.assign(b.dataset.then);
  else if (out) window.location.reload();
});

document.addEventListener("submit", async (ev) => {
  const form = ev.target.closest("form[data-action]");
  if (!form) return;
  ev.preventDefault();
  const body = {};
  for (const [k, v] of new FormData(form)) body[k] = String(v);
  // The form shows what was saved already: say so rather than reload.
  if (await post(form.dataset.action, body)) {
    const flash = document.getElementById("flash");
    flash.textContent = "Saved.";
    flash.className = "ok";
  }
});

listen();
