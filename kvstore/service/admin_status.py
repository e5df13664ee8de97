"""The status page at ``/``: one self-contained HTML document (inline CSS and JS, no network).

The page's script polls ``/v1/stats`` every 2 s and ``/v1/history`` (the
daemon's ring buffer of 10-second samples) and renders tier occupancy, hit
rates, misses by reason and throughput over the window. Every number it
shows also sits in a ``data-value`` attribute, unformatted, so tests (and
scrapers) can compare it with /v1/stats. With auth on, the token is taken
from ``#token=...`` in the URL or typed into the form, and kept in
sessionStorage; it is sent as a bearer header, never in a URL the server sees.
"""

from __future__ import annotations

_CSS = """
:root { --fg:#1d2430; --muted:#5b6678; --line:#d8dde6; --accent:#2f6fdb; --bg:#f6f8fb; --warn:#c0392b; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 0; padding: 16px 24px; }
header { display: flex; align-items: baseline; gap: 16px; }
h1 { font-size: 20px; margin: 0; } h2 { font-size: 15px; margin: 20px 0 8px; color: var(--muted); }
#state[data-state=error] { color: var(--warn); } #state { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.card .label { color: var(--muted); font-size: 12px; } .card .num { font-size: 22px; font-weight: 600; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: right; }
th:first-child, td:first-child { text-align: left; } th { color: var(--muted); font-weight: 500; }
.bar { display: inline-block; width: 90px; height: 8px; background: #e7ebf2; border-radius: 4px; margin-right: 6px; }
.bar span { display: block; height: 100%; background: var(--accent); border-radius: 4px; }
.down { color: var(--warn); font-weight: 600; }
svg { background: #fff; border: 1px solid var(--line); border-radius: 6px; }
.legend span { margin-right: 14px; } .k1 { color: #2f6fdb; } .k2 { color: #17a673; } .k3 { color: #d68910; }
#auth { margin: 12px 0; }
"""

_BODY = """
<header><h1>kvstore</h1><span id="state" data-state="loading">loading&hellip;</span>
<span id="uptime" data-value=""></span></header>
<form id="auth" hidden><label>Bearer token <input id="token" type="password" size="40"></label>
<button type="submit">Use</button></form>
<h2>Hit rate</h2>
<div class="cards">
 <div class="card"><div class="label">lookup chunks hit</div><div class="num" id="hit-rate-lookup">&mdash;</div>
  <div class="label" id="lookup-counts"></div></div>
 <div class="card"><div class="label" id="top-tier-label">top-tier reads hit</div>
  <div class="num" id="hit-rate-top">&mdash;</div><div class="label" id="top-counts"></div></div>
 <div class="card"><div class="label">store gets hit (lower tiers, admin)</div><div class="num" id="hit-rate-gets">&mdash;</div>
  <div class="label" id="get-counts"></div></div>
 <div class="card"><div class="label">namespaces</div><div class="num" id="namespaces">&mdash;</div></div>
 <div class="card"><div class="label">live leases (pinned chunks)</div><div class="num" id="leases">&mdash;</div></div>
 <div class="card"><div class="label">background queue (dropped)</div><div class="num" id="writer">&mdash;</div></div>
</div>
<h2>Tiers</h2>
<table id="tiers"><thead><tr><th>tier</th><th>kind</th><th>occupancy</th><th>used</th><th>capacity</th>
<th>entries</th><th>hits</th><th>misses</th><th>evictions</th><th>state</th></tr></thead><tbody></tbody></table>
<h2>Misses by reason</h2>
<table id="misses"><thead><tr><th>tier</th></tr></thead><tbody></tbody></table>
<h2>Throughput <span id="window" data-value=""></span></h2>
<div class="cards">
 <div class="card"><div class="label">gets in window</div><div class="num" id="window-gets">&mdash;</div></div>
 <div class="card"><div class="label">puts in window</div><div class="num" id="window-puts">&mdash;</div></div>
 <div class="card"><div class="label">bytes written in window</div><div class="num" id="window-put-bytes">&mdash;</div></div>
 <div class="card"><div class="label">bytes read in window</div><div class="num" id="window-read-bytes">&mdash;</div></div>
 <div class="card"><div class="label">latest rate (ops/s)</div><div class="num" id="rate-ops">&mdash;</div></div>
</div>
<p class="legend"><span class="k1">&#9632; gets/s</span><span class="k2">&#9632; puts/s</span>
<span class="k3">&#9632; data-plane requests/s</span> <span id="chart-max"></span></p>
<svg id="chart" width="720" height="160" viewBox="0 0 720 160" role="img" aria-label="throughput"></svg>
"""

_JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "kvstore-token";
const m = location.hash.match(/token=([^&]+)/);
if (m) { sessionStorage.setItem(KEY, decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
$("auth").addEventListener("submit", (e) => { e.preventDefault(); sessionStorage.setItem(KEY, $("token").value);
  $("auth").hidden = true; refresh(); });

async function get(path) {
  const headers = {}; const t = sessionStorage.getItem(KEY);
  if (t) headers["Authorization"] = "Bearer " + t;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) { $("auth").hidden = false; throw new Error("a bearer token is needed"); }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(2) : String(n)) + " " + u[i];
}
const fmtInt = (n) => Number(n).toLocaleString("en-US");
const fmtPct = (x) => (x === null || x === undefined) ? "n/a" : (100 * x).toFixed(1) + "%";
function put(el, value, text) { el.dataset.value = value === null ? "" : String(value); el.textContent = text; }
function cell(tr, field, value, text) {
  const td = document.createElement("td"); td.dataset.field = field; put(td, value, text); tr.appendChild(td); return td;
}
function renderTiers(s) {
  const body = $("tiers").tBodies[0]; body.textContent = "";
  for (const t of s.tiers) {
    const tr = document.createElement("tr"); tr.dataset.tier = t.name;
    cell(tr, "name", t.name, t.name); cell(tr, "kind", t.kind || "", t.kind || "");
    const occ = t.capacity_bytes ? t.used_bytes / t.capacity_bytes : 0;
    const td = cell(tr, "occupancy", occ, (100 * occ).toFixed(1) + "%");
    const bar = document.createElement("span"); bar.className = "bar";
    const fill = document.createElement("span"); fill.style.width = Math.min(100, 100 * occ).toFixed(1) + "%";
    bar.appendChild(fill); td.prepend(bar);
    cell(tr, "used_bytes", t.used_bytes, fmtBytes(t.used_bytes));
    cell(tr, "capacity_bytes", t.capacity_bytes, fmtBytes(t.capacity_bytes));
    cell(tr, "entries", t.entries, fmtInt(t.entries));
    const misses = t.misses ? Object.values(t.misses).reduce((a, b) => a + b, 0) : null;
    cell(tr, "hits", t.hits ?? null, t.hits === undefined ? "n/a" : fmtInt(t.hits));
    cell(tr, "misses", misses, misses === null ? "n/a" : fmtInt(misses));
    cell(tr, "evictions", t.evictions ?? null, t.evictions === undefined ? "n/a" : fmtInt(t.evictions));
    const up = cell(tr, "up", t.up === false ? 0 : 1, t.up === false ? "down" : "up");
    if (t.up === false) up.className = "down";
    body.appendChild(tr);
  }
}
function renderMisses(s) {
  const table = $("misses"); const reasons = s.tiers.length && s.tiers[0].misses ? Object.keys(s.tiers[0].misses) : [];
  table.tHead.rows[0].innerHTML = "<th>tier</th>" + reasons.map((r) => "<th>" + r + "</th>").join("");
  const body = table.tBodies[0]; body.textContent = "";
  for (const t of s.tiers) {
    if (!t.misses) continue;
    const tr = document.createElement("tr"); tr.dataset.tier = t.name; cell(tr, "name", t.name, t.name);
    for (const r of reasons) cell(tr, "miss-" + r, t.misses[r], fmtInt(t.misses[r]));
    body.appendChild(tr);
  }
}
function renderCounters(s) {
  if (s.scope !== "all") { put($("state"), "tenant", "tenant " + s.tenant + ": own chunks only"); return; }
  put($("hit-rate-lookup"), s.hit_rate.lookup_chunks, fmtPct(s.hit_rate.lookup_chunks));
  put($("lookup-counts"), s.lookup_hit_chunks, fmtInt(s.lookup_hit_chunks) + " of " + fmtInt(s.lookup_query_chunks));
  const top = s.tiers[0]; const topMisses = Object.values(top.misses).reduce((a, b) => a + b, 0);
  $("top-tier-label").textContent = top.name + " reads hit";
  put($("hit-rate-top"), s.hit_rate.top_tier_reads, fmtPct(s.hit_rate.top_tier_reads));
  put($("top-counts"), top.hits, fmtInt(top.hits) + " of " + fmtInt(top.hits + topMisses));
  put($("hit-rate-gets"), s.hit_rate.gets, fmtPct(s.hit_rate.gets));
  put($("get-counts"), s.get_hits, fmtInt(s.get_hits) + " of " + fmtInt(s.gets));
  put($("namespaces"), s.namespaces, fmtInt(s.namespaces));
  put($("leases"), s.leases.active, fmtInt(s.leases.active) + " (" + fmtInt(s.leases.pinned_chunks) + ")");
  put($("writer"), s.writer.depth, fmtInt(s.writer.depth) + " (" + fmtInt(s.writer.dropped) + ")");
  put($("uptime"), s.uptime_s, "up " + Math.round(s.uptime_s) + " s");
}
function sampleOf(s) {
  const reqs = Object.values(s.requests || {}).reduce((a, r) => a + r.count, 0);
  return { t: s.time, gets: s.gets, puts: s.tiers[0].puts, put_bytes: s.tiers[0].put_bytes,
           read_bytes: s.tiers.reduce((a, t) => a + t.hit_bytes, 0), requests: reqs };
}
function renderThroughput(h, s) {
  const pts = h.samples.concat([sampleOf(s)]); const first = pts[0]; const last = pts[pts.length - 1];
  put($("window"), last.t - first.t, "(last " + Math.max(1, Math.round((last.t - first.t) / 60)) + " min)");
  put($("window-gets"), last.gets - first.gets, fmtInt(last.gets - first.gets));
  put($("window-puts"), last.puts - first.puts, fmtInt(last.puts - first.puts));
  put($("window-put-bytes"), last.put_bytes - first.put_bytes, fmtBytes(last.put_bytes - first.put_bytes));
  put($("window-read-bytes"), last.read_bytes - first.read_bytes, fmtBytes(last.read_bytes - first.read_bytes));
  const rates = [];
  for (let i = 1; i < pts.length; i++) {
    const dt = Math.max(1e-3, pts[i].t - pts[i - 1].t);
    rates.push({ t: pts[i].t, gets: (pts[i].gets - pts[i - 1].gets) / dt, puts: (pts[i].puts - pts[i - 1].puts) / dt,
                 reqs: (pts[i].requests - pts[i - 1].requests) / dt });
  }
  const lr = rates.length ? rates[rates.length - 1] : { gets: 0, puts: 0 };
  put($("rate-ops"), lr.gets + lr.puts, (lr.gets + lr.puts).toFixed(2));
  drawChart(rates);
}
function drawChart(rates) {
  const svg = $("chart"); const W = 720, H = 160, P = 8; svg.textContent = "";
  if (rates.length === 0) return;
  const max = Math.max(1e-9, ...rates.map((r) => Math.max(r.gets, r.puts, r.reqs)));
  put($("chart-max"), max, "max " + max.toFixed(2) + "/s");
  const t0 = rates[0].t, span = Math.max(1e-3, rates[rates.length - 1].t - t0);
  const series = [["gets", "#2f6fdb"], ["puts", "#17a673"], ["reqs", "#d68910"]];
  for (const [k, color] of series) {
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", color); pl.setAttribute("stroke-width", "2");
    pl.setAttribute("points", rates.map((r) => {
      const x = rates.length === 1 ? W - P : P + (W - 2 * P) * (r.t - t0) / span;
      return x.toFixed(1) + "," + (H - P - (H - 2 * P) * r[k] / max).toFixed(1);
    }).join(" "));
    svg.appendChild(pl);
  }
}
async function refresh() {
  try {
    const s = await get("/v1/stats");
    renderTiers(s); renderMisses(s); renderCounters(s);
    if (s.scope === "all") renderThroughput(await get("/v1/history"), s);
    $("state").dataset.state = "ok";
    if (s.scope === "all") $("state").textContent = "live, updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("state").dataset.state = "error"; $("state").textContent = String(e.message || e);
  }
}
refresh();
setInterval(refresh, 2000);
"""

STATUS_PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    "<title>kvstore status</title><style>"
    + _CSS
    + "</style></head>\n<body>"
    + _BODY
    + "<script>"
    + _JS
    + "</script>\n</body></html>\n"
)
