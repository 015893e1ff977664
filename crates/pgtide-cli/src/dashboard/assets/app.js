// pgtide dashboard: renders /api/overview and /api/history, then follows /api/events (SSE).
// Everything from the server is inserted as text (never as HTML): stream names, errors and
// payloads are data, not markup.
"use strict";

const HOUR = 3600;
const COLORS = ["#1e6fd9", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#d35400", "#2c3e50"];
const state = { points: [], charts: {}, writes: false, dead: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function age(secs) {
  if (secs == null) return "–";
  if (secs < 60) return secs.toFixed(1) + "s";
  if (secs < 3600) return Math.floor(secs / 60) + "m" + Math.floor(secs % 60) + "s";
  if (secs < 86400) return Math.floor(secs / 3600) + "h" + Math.floor((secs % 3600) / 60) + "m";
  return Math.floor(secs / 86400) + "d" + Math.floor((secs % 86400) / 3600) + "h";
}

const rate = (v) => (v == null ? "–" : v.toFixed(1));

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}

function render(o) {
  $("namespace").textContent = o.namespace ? "· " + o.namespace + (o.backend && o.backend !== "postgres" ? " (" + o.backend + ")" : "") : "";
  const note = $("rates-note");
  note.hidden = o.rates !== false;
  note.textContent = o.rates === false ? "Publish and ack rates: not available on the " + o.backend + " backend, which keeps no publish counts; lag is charted." : "";
  $("at").textContent = o.at ? "sampled " + new Date(o.at).toLocaleTimeString() : "";
  const err = $("error");
  err.hidden = !o.error;
  err.textContent = o.error ? "Sampling failed: " + o.error : "";
  state.writes = !!o.writes;
  $("writes").hidden = !state.writes;

  const rows = (o.groups || []).map((g) => {
    const dead = g.group && g.dead > 0
      ? el("button", { class: "link", type: "button", onclick: () => loadDead(g.stream, g.group) }, g.dead)
      : String(g.dead);
    return el("tr", { "data-stream": g.stream, "data-group": g.group || "" },
      el("td", {}, g.stream), el("td", {}, g.group || "(no group)"),
      el("td", { class: "num ready" }, g.ready), el("td", { class: "num" }, g.delayed),
      el("td", { class: "num" }, g.in_flight), el("td", { class: "num dead" }, dead),
      el("td", { class: "num" }, age(g.oldest_ready_age_secs)),
      el("td", { class: "num" }, rate(g.publish_rate)), el("td", { class: "num" }, rate(g.ack_rate)));
  });
  $("groups").tBodies[0].replaceChildren(...rows);

  const s = o.scout || {};
  $("scout").replaceChildren(s.unavailable ? el("span", { class: "muted" }, s.unavailable)
    : s.error ? el("span", { class: "bad" }, s.error)
    : s.holder ? el("span", {}, el("b", { class: "ok" }, s.holder), " holds the lease, term ", el("b", { id: "scout-term" }, s.term),
        s.since ? ", since " + new Date(s.since).toLocaleString() : "", ", expires " + new Date(s.expires_at).toLocaleTimeString())
      : el("span", { class: "bad" }, "no scout holds the lease: run `pgtide scout` or a consuming process"));

  const l = o.listener || {};
  $("listener").replaceChildren(l.unavailable ? el("span", { class: "muted" }, l.unavailable) : el("span", {},
    el("b", { class: l.connected ? "ok" : "bad" }, l.connected ? "connected" : "not connected"),
    ", last notification " + (l.last_notification_at ? new Date(l.last_notification_at).toLocaleTimeString() : "none yet"),
    ", reconnects " + (l.reconnects || 0),
    l.last_error ? ", last error: " + l.last_error : ""));
}

function addPoint(p) {
  state.points.push(p);
  const oldest = p.t - HOUR;
  while (state.points.length && state.points[0].t < oldest) state.points.shift();
}

function drawCharts() {
  for (const kind of ["publish", "ack", "lag"]) drawChart(kind);
}

function drawChart(kind) {
  const box = $("chart-" + kind);
  const keys = [...new Set(state.points.flatMap((p) => Object.keys(p[kind] || {})))].sort();
  const data = [state.points.map((p) => p.t), ...keys.map((k) => state.points.map((p) => (p[kind] && k in p[kind] ? p[kind][k] : null)))];
  box.dataset.points = String(state.points.length);
  box.dataset.series = keys.join(",");
  const old = state.charts[kind];
  if (old && old.keys === keys.join("\n")) { old.plot.setData(data); return; }
  if (old) old.plot.destroy();
  const opts = {
    width: Math.max(300, box.clientWidth || 400), height: 200,
    series: [{}, ...keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
    axes: [{}, { size: 50 }],
    scales: { x: { time: true } },
  };
  state.charts[kind] = { keys: keys.join("\n"), plot: new uPlot(opts, data, box) };
}

async function loadDead(stream, group) {
  state.dead = { stream, group };
  $("dead-of").textContent = "of " + stream + " / " + group;
  $("dead-detail").hidden = true;
  try {
    const r = await api("/api/dead?" + new URLSearchParams({ stream, group, limit: "100" }));
    const rows = r.dead_letters.map((d) => el("tr", { "data-id": d.id },
      el("td", {}, el("button", { class: "link", type: "button", onclick: () => showDead(d) }, d.id)),
      el("td", {}, d.group), el("td", { class: "num" }, d.attempts), el("td", { class: "reason" }, d.reason),
      el("td", {}, new Date(d.dead_at).toLocaleString()), el("td", { class: "err" }, d.error || ""),
      el("td", {}, state.writes ? el("span", {},
        el("button", { type: "button", "data-action": "replay", onclick: () => settle("replay", { ids: [d.id] }) }, "Replay"), " ",
        el("button", { type: "button", class: "danger", "data-action": "purge", onclick: () => settle("purge", { ids: [d.id] }) }, "Purge")) : "")));
    $("dead-letters").tBodies[0].replaceChildren(...rows);
    $("dead-msg").textContent = rows.length ? "" : "no dead letters";
  } catch (e) {
    $("dead-msg").textContent = "Cannot list dead letters: " + e.message;
  }
}

async function showDead(d) {
  const pre = $("dead-detail");
  try {
    const full = await api("/api/dead/" + [d.stream, d.group, d.id].map(encodeURIComponent).join("/"));
    pre.textContent = JSON.stringify({ headers: full.headers, payload: full.payload, payload_encoding: full.payload_encoding }, null, 2);
  } catch (e) {
    pre.textContent = "Cannot read the dead letter: " + e.message;
  }
  pre.hidden = false;
}

async function settle(action, body) {
  const d = state.dead;
  if (!d) return;
  if (action === "purge" && !window.confirm("Delete these dead letters for good?")) return;
  const token = $("token").value.trim();
  try {
    const r = await api("/api/dead/" + encodeURIComponent(d.stream) + "/" + encodeURIComponent(d.group) + "/" + action, {
      method: "POST", headers: { "content-type": "application/json", "x-pgtide-token": token }, body: JSON.stringify(body),
    });
    sessionStorage.setItem("pgtide-token", token);
    await loadDead(d.stream, d.group);
    $("dead-msg").textContent = action === "replay" ? "replayed " + r.replayed : "purged " + r.purged;
  } catch (e) {
    $("dead-msg").textContent = action + " failed: " + e.message;
  }
}

function takeToken() {
  // A token in the fragment (#token=…) never reaches a server log; keep it for this tab only.
  const m = location.hash.match(/token=([!-~]+)/);
  if (m) {
    sessionStorage.setItem("pgtide-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  $("token").value = sessionStorage.getItem("pgtide-token") || "";
}

async function start() {
  takeToken();
  $("replay-all").addEventListener("click", () => settle("replay", { all: true }));
  $("purge-all").addEventListener("click", () => settle("purge", { all: true }));
  try {
    // Both at once, drawn together: a page loaded once (a headless browser dumping the DOM)
    // shows the tables and the charts at the same time.
    const [overview, history] = await Promise.all([api("/api/overview"), api("/api/history")]);
    for (const p of history.points) addPoint(p);
    render(overview);
  } catch (e) {
    $("status").textContent = "cannot reach the dashboard: " + e.message;
  }
  drawCharts();
  // `/?snapshot`: the page as loaded, without the live connection (for printing and for
  // headless browsers, whose virtual clock stops while a request stays open).
  if (new URLSearchParams(location.search).has("snapshot")) {
    $("status").textContent = "snapshot";
    return;
  }
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => { $("status").textContent = "live"; });
  events.addEventListener("error", () => { $("status").textContent = "reconnecting…"; });
  events.addEventListener("sample", (e) => {
    const msg = JSON.parse(e.data);
    render(msg.overview);
    if (msg.point) { addPoint(msg.point); drawCharts(); }
  });
  window.addEventListener("resize", () => {
    for (const [kind, c] of Object.entries(state.charts)) c.plot.setSize({ width: Math.max(300, $("chart-" + kind).clientWidth), height: 200 });
  });
}

start();
