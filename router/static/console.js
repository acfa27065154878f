// pdserve ops console: polls console/api/state once a second, draws uPlot charts from the
// router's history of samples, and sends the admin controls (Bearer admin token).
// Every URL is relative: the page works under any route prefix.
"use strict";

const POLL_MS = 1000;
const POOL_COLORS = { prefill: "#1f77b4", decode: "#d62728", colocated: "#2ca02c" };
const $ = (id) => document.getElementById(id);
const state = { charts: {}, last: null, busy: false, migration: null };

// ---- formatting --------------------------------------------------------------------------
const fmt = {
  s: (v) => (v == null ? "–" : v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(2) + " s"),
  pct: (v) => (v == null ? "–" : (v * 100).toFixed(1) + "%"),
  num: (v, d = 2) => (v == null ? "–" : Number(v).toFixed(d)),
  mbps: (v) => (v == null ? "–" : (v / 1e6).toFixed(2) + " MB/s"),
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
  age: (s) => (s < 120 ? s.toFixed(0) + " s" : (s / 60).toFixed(0) + " min"),
};
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// ---- admin calls ---------------------------------------------------------------------------
function token() { return sessionStorage.getItem("pdserve-admin-token") || ""; }

async function admin(path, body) {
  const r = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || r.statusText;
    throw new Error(`${path}: ${r.status} ${msg}`);
  }
  return data;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "muted";
}

async function act(label, fn) {
  if (!token()) { say("enter the admin token first", true); return; }
  say(label + " …");
  try {
    await fn();
    say(label + ": done");
    await poll();
  } catch (e) {
    say(label + " failed: " + e.message, true);
  }
}

// ---- charts --------------------------------------------------------------------------------
function size(el) { return { width: Math.max(300, el.clientWidth - 10), height: 200 }; }

function makeChart(id, series, opts = {}) {
  const el = $(id);
  const data = [[]].concat(series.map(() => []));
  const u = new uPlot({
    ...size(el),
    series: [{}].concat(series),
    scales: { x: { time: true }, ...(opts.scales || {}) },
    axes: opts.axes || [{}, {}],
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
    hooks: opts.hooks || {},
  }, data, el);
  state.charts[id] = u;
  return u;
}

function setup() {
  const dash = [6, 4];
  makeChart("ch-ttft", [
    { label: "p50", stroke: "#1f77b4", width: 2 },
    { label: "p99", stroke: "#ff7f0e", width: 2 },
    { label: "SLO", stroke: "#000", dash, width: 1 },
  ]);
  makeChart("ch-tpot", [
    { label: "p50", stroke: "#1f77b4", width: 2 },
    { label: "p99", stroke: "#ff7f0e", width: 2 },
    { label: "SLO", stroke: "#000", dash, width: 1 },
  ]);
  makeChart("ch-rate", [
    { label: "req/s", stroke: "#2ca02c", width: 2, scale: "rate" },
    { label: "attainment", stroke: "#9467bd", width: 2, scale: "pct" },
  ], {
    scales: { rate: { auto: true }, pct: { range: [0, 1] } },
    axes: [{}, { scale: "rate" }, { scale: "pct", side: 1, grid: { show: false } }],
  });
  window.addEventListener("resize", () => {
    for (const [id, u] of Object.entries(state.charts)) u.setSize(size($(id)));
  });
}

function poolCharts(pools) {
  // the per-pool charts are made once the pool names are known
  if (state.charts["ch-replicas"]) return;
  const names = Object.keys(pools);
  const rep = [];
  for (const p of names) {
    rep.push({ label: p + " target", stroke: POOL_COLORS[p], width: 1, dash: [4, 4] });
    rep.push({ label: p + " running", stroke: POOL_COLORS[p], width: 2 });
  }
  makeChart("ch-replicas", rep, {
    scales: { y: { range: (u, lo, hi) => [0, Math.max(2, hi + 1)] } },
    hooks: { draw: [drawDecisions] },
  });
  const kv = [];
  for (const p of names) {
    kv.push({ label: p + " KV use", stroke: POOL_COLORS[p], width: 2, scale: "pct" });
    kv.push({ label: p + " queue", stroke: POOL_COLORS[p], width: 1, dash: [2, 3], scale: "q" });
  }
  makeChart("ch-kv", kv, {
    scales: { pct: { range: [0, 1] }, q: { auto: true } },
    axes: [{}, { scale: "pct" }, { scale: "q", side: 1, grid: { show: false } }],
  });
  makeChart("ch-prefix", [
    { label: "prefix hit rate", stroke: "#8c564b", width: 2, scale: "pct" },
    { label: "KV transfer MB/s", stroke: "#17becf", width: 2, scale: "mb" },
  ], {
    scales: { pct: { range: [0, 1] }, mb: { auto: true } },
    axes: [{}, { scale: "pct" }, { scale: "mb", side: 1, grid: { show: false } }],
  });
}

// decisions drawn as vertical ticks on the replicas chart (green: out, red: in)
function drawDecisions(u) {
  const s = state.last;
  if (!s) return;
  const ctx = u.ctx;
  ctx.save();
  for (const d of s.autoscaling.decisions) {
    if (d.t < u.scales.x.min || d.t > u.scales.x.max) continue;
    const x = Math.round(u.valToPos(d.t, "x", true));
    ctx.strokeStyle = d.action === "out" ? "#2ca02c" : d.action === "in" ? "#d62728" : "#999";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(x, u.bbox.top);
    ctx.lineTo(x, u.bbox.top + u.bbox.height);
    ctx.stroke();
  }
  ctx.restore();
}

function col(hist, f) { return hist.map((h) => { const v = f(h); return v == null ? null : v; }); }

function drawCharts(s) {
  const h = s.history;
  if (!h.length) return;
  const t = col(h, (x) => x.t);
  const slo = s.autoscaling.slo;
  state.charts["ch-ttft"].setData([t, col(h, (x) => x.ttft_p50), col(h, (x) => x.ttft_p99),
    h.map(() => slo.ttft_s)]);
  state.charts["ch-tpot"].setData([t, col(h, (x) => x.tpot_p50), col(h, (x) => x.tpot_p99),
    h.map(() => slo.tpot_s)]);
  state.charts["ch-rate"].setData([t, col(h, (x) => x.rate), col(h, (x) => x.attainment)]);
  const names = Object.keys(s.pools);
  const rep = [t], kv = [t];
  for (const p of names) {
    rep.push(col(h, (x) => x.pools[p] && x.pools[p].target));
    rep.push(col(h, (x) => x.pools[p] && x.pools[p].running));
    kv.push(col(h, (x) => x.pools[p] && x.pools[p].kv_util));
    kv.push(col(h, (x) => x.pools[p] && x.pools[p].queue));
  }
  state.charts["ch-replicas"].setData(rep);
  state.charts["ch-kv"].setData(kv);
  state.charts["ch-prefix"].setData([t, col(h, (x) => x.prefix_hit_rate),
    col(h, (x) => (x.transfer_bytes_per_s == null ? null : x.transfer_bytes_per_s / 1e6))]);
}

// ---- cards, pools, decisions ----------------------------------------------------------------
function drawCards(s) {
  const w = s.window, last = s.history[s.history.length - 1] || {};
  $("c-rate").textContent = fmt.num(last.rate);
  $("c-attain").textContent = fmt.pct(w.attainment.both) + ` (${w.requests} in ${w.window_s}s)`;
  $("c-ttft").textContent = `${fmt.s(w.ttft.p50)} / ${fmt.s(w.ttft.p99)}`;
  $("c-tpot").textContent = `${fmt.s(w.tpot.p50)} / ${fmt.s(w.tpot.p99)}`;
  $("c-prefix").textContent = fmt.pct(last.prefix_hit_rate);
  $("c-transfer").textContent = fmt.mbps(last.transfer_bytes_per_s);
  const mig = state.migration ? state.migration.migrations : "–";
  $("c-moves").textContent = `${mig} / ${s.orchestrator.recoveries ?? 0}`;
  ["c-ttft", "c-tpot"].forEach((id, i) => {
    const p99 = i === 0 ? w.ttft.p99 : w.tpot.p99;
    const lim = i === 0 ? w.slo.ttft_s : w.slo.tpot_s;
    $(id).className = "v" + (p99 != null && p99 > lim ? " bad" : "");
  });
}

function drawPools(s) {
  const root = $("pools");
  const a = s.autoscaling;
  let html = "";
  for (const [name, p] of Object.entries(s.pools)) {
    const lim = a.limits[name];
    const last = a.last[name];
    html += `<div class="pool" data-pool="${esc(name)}">
      <h2><span class="dot" style="background:${POOL_COLORS[name]}"></span>${esc(name)} pool
        <span class="muted">TP ${p.tp} · target <b class="target">${p.target}</b> ·
        ${p.replicas.length} replica(s)</span></h2>
      <div class="pool-controls">
        <button class="scale" data-delta="-1">− replica</button>
        <button class="scale" data-delta="1">+ replica</button>
        min <input class="min" type="number" min="1" value="${lim.min_replicas}" size="3">
        max <input class="max" type="number" min="1" value="${lim.max_replicas}" size="3">
        <button class="limits">set min/max</button>
        <span class="muted">${last ? "autoscaler: " + esc(last.reason) : ""}</span>
      </div>
      <table class="replicas"><thead><tr><th>replica</th><th>state</th><th>batch</th>
        <th>waiting</th><th>queued prompt tokens</th><th>KV use</th><th>age</th><th></th></tr>
      </thead><tbody>`;
    for (const r of p.replicas) {
      const kv = r.kv_blocks_total ? r.kv_blocks_used / r.kv_blocks_total : 0;
      const drain = name === "decode" && r.state === "RUNNING"
        ? `<button class="drain" data-id="${esc(r.replica_id)}">drain</button>` : "";
      html += `<tr data-replica="${esc(r.replica_id)}"><td class="mono">${esc(r.replica_id)}</td>
        <td class="state ${esc(r.state)}">${esc(r.state)}</td><td>${r.running}</td>
        <td>${r.waiting}</td><td>${r.queued_prompt_tokens}</td>
        <td><div class="bar"><div style="width:${(kv * 100).toFixed(1)}%"></div></div>
          ${r.kv_blocks_used}/${r.kv_blocks_total}</td>
        <td>${fmt.age(r.age_s)}</td><td>${drain}</td></tr>`;
    }
    html += "</tbody></table></div>";
  }
  // keep what the operator is typing: no redraw while an input of the pools has focus
  const focus = document.activeElement;
  if (!(root.contains(focus) && focus.tagName === "INPUT")) root.innerHTML = html;
}

function drawDecisionsTable(s) {
  const rows = s.autoscaling.decisions.slice().reverse().slice(0, 50).map((d) =>
    `<tr class="${esc(d.action)}"><td>${fmt.time(d.t)}</td><td>${esc(d.pool)}</td>
     <td>${esc(d.source)}</td><td>${esc(d.action)}${d.applied === false ? " (failed)" : ""}</td>
     <td>${d.current} → ${d.target}</td><td>${esc(d.reason)}${d.error ? " — " + esc(d.error) : ""}</td></tr>`);
  $("decisions").tBodies[0].innerHTML = rows.join("");
}

function drawControls(s) {
  const slo = s.autoscaling.slo;
  for (const [id, v] of [["slo-ttft", slo.ttft_s], ["slo-tpot", slo.tpot_s]]) {
    if (document.activeElement !== $(id)) $(id).value = v;
  }
  $("autoscaling").checked = s.autoscaling.enabled;
  $("migration").disabled = !state.migration;  // colocated: no migration
  if (state.migration) $("migration").checked = !!state.migration.enabled;
  $("token-note").textContent = s.admin_enabled ? "" : "(admin endpoints are disabled on this server)";
}

// ---- polling -------------------------------------------------------------------------------
async function poll() {
  if (state.busy) return;
  state.busy = true;
  try {
    const r = await fetch("console/api/state", { cache: "no-store" });
    if (!r.ok) throw new Error(`state: ${r.status}`);
    const s = await r.json();
    state.last = s;
    state.migration = s.migration;
    $("model").textContent = s.model;
    $("mode").textContent = s.mode;
    $("status").textContent = "live · updated " + fmt.time(s.now) +
      (s.snapshot_at ? "" : " · measuring pools…");
    poolCharts(s.pools);
    drawCharts(s);
    drawCards(s);
    drawPools(s);
    drawDecisionsTable(s);
    drawControls(s);
  } catch (e) {
    $("status").textContent = "disconnected: " + e.message;
  } finally {
    state.busy = false;
  }
}

// ---- wiring --------------------------------------------------------------------------------
function wire() {
  const tok = $("token");
  tok.value = token();
  tok.addEventListener("change", () => sessionStorage.setItem("pdserve-admin-token", tok.value.trim()));
  $("token-form").addEventListener("submit", (e) => e.preventDefault());
  $("slo-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = { ttft_s: parseFloat($("slo-ttft").value), tpot_s: parseFloat($("slo-tpot").value) };
    act("set SLO", () => admin("admin/slo", body));
  });
  $("autoscaling").addEventListener("change", (e) =>
    act("autoscaling " + (e.target.checked ? "on" : "off"),
      () => admin("admin/autoscaling", { enabled: e.target.checked })));
  $("migration").addEventListener("change", (e) =>
    act("migration " + (e.target.checked ? "on" : "off"),
      () => admin("admin/migration", { enabled: e.target.checked })));
  $("pools").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    const pool = b.closest(".pool").dataset.pool;
    const p = state.last && state.last.pools[pool];
    if (b.classList.contains("scale") && p) {
      const n = p.target + parseInt(b.dataset.delta, 10);
      act(`scale ${pool} to ${n}`, () => admin("admin/scale", { pool, replicas: n }));
    } else if (b.classList.contains("limits")) {
      const div = b.closest(".pool");
      const body = { pool, min_replicas: parseInt(div.querySelector(".min").value, 10),
        max_replicas: parseInt(div.querySelector(".max").value, 10) };
      act(`${pool} min/max`, () => admin("admin/autoscaling", body));
    } else if (b.classList.contains("drain")) {
      act(`drain ${b.dataset.id}`, () => admin("admin/drain", { instance_id: b.dataset.id }));
    }
  });
}

setup();
wire();
poll();
setInterval(poll, POLL_MS);
