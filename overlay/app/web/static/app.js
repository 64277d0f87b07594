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
    a.textContent = e.title || e.file_name || e.id.slice(0, 12);
    t.appendChild(a);
    cell(tr, e.from, "from");
    cell(tr, size(e.size), "size");
    cell(tr, e.state + (e.junk ? " (junk)" : ""), `state state-${e.state}`);
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
}

function renderMessage(e) {
  const st = document.getElementById("msg-state");
  if (!st || st.dataset.id !== e.id) return;
  st.textContent = `${e.state} ${Math.round(e.progress * 100)}%`;
  st.className = `state state-${e.state}`;
  const src = document.getElementById("msg-sources");
  if (src) {
    const items = e.sources.map((s) => {
      const li = document.createElement("li");
      li.textContent = `${s.peer} via ${s.path}: ${size(s.bytes)}`;
      return li;
    });
    src.replaceChildren(...items);
  }
}

function listen() {
  const page = document.body.dataset.page;
  if (page !== "inbox" && page !== "message") return;
  const events = new EventSource("/events");
  events.addEventListener("inbox", (ev) => {
    const entries = JSON.parse(ev.data);
    renderInbox(entries);
    for (const e of entries) renderMessage(e);
  });
}

async function post(url, body) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const flash = document.getElementById("flash");
  if (!res.ok) {
    if (flash) flash.textContent = await res.text();
    return null;
  }
  return res.json();
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  ev.preventDefault();
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
  if (await post(form.dataset.action, body)) window.location.reload();
});

listen();
