// The dashboard's pages: fetch /api/<page>, draw plots (plotly.js) and tables (DOM, text only),
// and redraw in place whenever the live stream (/api/stream) reports a new log position.
"use strict";

const PALETTE = ["#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777"];
const KIND_COLOURS = { "deployed": "#16a34a", "deployment failed": "#f97316", "rolled back": "#dc2626",
                       "drift": "#9333ea" };
const KIND_SYMBOLS = { "deployed": "circle", "deployment failed": "x", "rolled back": "triangle-down",
                       "drift": "diamond" };
// an hourly mean is drawn in the middle of its hour, among that hour's dots, not at its start
const HOUR_MS = 3600000;
const HOURLY = { xperiod: HOUR_MS, xperiodalignment: "middle" };

// A time axis for hourly bars: at least MIN_HOURS wide around the data, so that one hour of data gets
// hour ticks (plotly alone zooms into a single bar down to sub-millisecond ticks).
const MIN_HOURS = 6;
function hourAxis(series) {
  const times = series.flatMap((s) => s.x || []).map((x) => new Date(x).getTime()).filter((t) => !isNaN(t));
  if (!times.length) return { type: "date" };
  const first = Math.min(...times), last = Math.max(...times) + HOUR_MS;
  const pad = Math.max(0, MIN_HOURS * HOUR_MS - (last - first)) / 2;
  const iso = (t) => new Date(t).toISOString();
  return { type: "date", range: [iso(first - pad), iso(last + pad)], tickformat: "%H:%M\n%b %d" };
}

// which way is better: +1 up is better, -1 worse, 0 no change (from the server, per figure)
function deltaClass(m) { return m.better > 0 ? "up" : m.better < 0 ? "down" : ""; }

function verdictOf(e) { return e.verdict || (e.passed ? "passed" : "failed"); }

function num(v, scale, digits) { return (v === null || v === undefined) ? "–" : (scale * v).toFixed(digits); }

// one check of the gate: status, figure, interval and how many items it rests on
function checkLine(c) {
  const pct = c.name === "task pass rate";  // a difference of shares, shown in points
  const scale = pct ? 100 : 1, digits = pct ? 1 : 2;
  const interval = c.low === null || c.low === undefined ? "" :
    ` [${num(c.low, scale, digits)}, ${num(c.high, scale, digits)}]`;
  const value = c.value === null || c.value === undefined ? "" : ` ${num(c.value, scale, digits)}${pct ? " pts" : ""}`;
  const items = c.items === null || c.items === undefined ? "" : ` · n=${c.items}`;
  const p = c.p_value === null || c.p_value === undefined ? "" : ` · p=${c.p_value.toPrecision(2)}`;
  return el("li", { title: c.detail }, fmt.badge(c.status), " ", el("b", {}, c.name), value + interval + items + p);
}
const PAGE = document.body.dataset.page;
const CAN_TRAIN = document.body.dataset.canTrain === "true";
let shownPosition = -1;

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(id, ...children) {
  const node = document.getElementById(id);
  if (node) node.replaceChildren(...children);
}

const fmt = {
  // YYYY-MM-DD HH:MM:SS in UTC, like the plots' time axes (the log's times are UTC)
  time: (iso) => iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") : "",
  num: (v, digits = 3) => (v === null || v === undefined) ? "–" :
    (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits)) : String(v)),
  pct: (v) => (v === null || v === undefined) ? "–" : (100 * v).toFixed(1) + " %",
  hash: (h) => h ? el("span", { class: "hash", title: h }, h.slice(0, 12)) : "–",
  badge: (text, kind) => el("span", { class: "badge " + String(kind || text).replace(/ /g, "-") }, text),
  secs: (s) => (s === null || s === undefined) ? "–" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min",
};

// columns: [{title, value: row => node|text, num: bool}]
function table(columns, rows, emptyText, attrs) {
  if (!rows.length) return el("div", { class: "empty" }, emptyText);
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : "" }, c.title)));
  const body = rows.map((row) => el("tr", { "data-row": "" },
    columns.map((c) => el("td", { class: c.num ? "num" : (c.cls || "") }, c.value(row)))));
  return el("table", attrs || {}, el("thead", {}, head), el("tbody", {}, body));
}

function tiles(items) {
  fill("tiles", ...items.map(([label, value]) =>
    el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value))));
}

const BASE_LAYOUT = {
  margin: { l: 52, r: 16, t: 8, b: 40 },
  paper_bgcolor: "#ffffff", plot_bgcolor: "#ffffff",
  font: { family: "system-ui, sans-serif", size: 12, color: "#0f172a" },
  colorway: PALETTE,
  legend: { orientation: "h", y: -0.18 },
  xaxis: { gridcolor: "#eef2f7", zeroline: false },
  yaxis: { gridcolor: "#eef2f7", zeroline: false },
  hovermode: "closest",
};

// Draw (or redraw in place) a plot; with no traces, say so instead.
function plot(id, traces, layout, emptyText) {
  const node = document.getElementById(id);
  if (!node) return;
  if (!traces.length) {
    if (node.dataset.drawn) { Plotly.purge(node); delete node.dataset.drawn; }
    node.replaceChildren(el("div", { class: "empty" }, emptyText));
    node.dataset.points = "0";
    return;
  }
  if (!node.dataset.drawn) node.replaceChildren();
  const merged = { ...BASE_LAYOUT, ...layout,
                   xaxis: { ...BASE_LAYOUT.xaxis, ...(layout.xaxis || {}) },
                   yaxis: { ...BASE_LAYOUT.yaxis, ...(layout.yaxis || {}) } };
  Plotly.react(node, traces, merged, { displayModeBar: false, responsive: true });
  node.dataset.drawn = "1";
  node.dataset.points = String(traces.reduce((n, t) => n + (t.x ? t.x.length : 0), 0));
}

function colourOf(i) { return PALETTE[i % PALETTE.length]; }

// ------------------------------------------------------------------ pages

function rewardTraces(series) {
  const traces = [];
  series.forEach((s, i) => {
    const colour = colourOf(i);
    traces.push({ type: "scatter", mode: "markers", name: s.name, legendgroup: s.name, x: s.x, y: s.y,
                  marker: { color: colour, size: 6, opacity: 0.55 },
                  hovertemplate: "%{x}<br>reward %{y:.3f}<extra>" + s.name + "</extra>" });
    traces.push({ type: "scatter", mode: s.hour.length > 1 ? "lines" : "lines+markers", name: s.name + " (hourly mean)",
                  legendgroup: s.name, showlegend: false, x: s.hour, y: s.mean, customdata: s.n, ...HOURLY,
                  line: { color: colour, width: 2.5, shape: "linear" }, marker: { color: colour, size: 9 },
                  hovertemplate: "hour of %{x|%Y-%m-%d %H}:00<br>mean %{y:.3f} of %{customdata}<extra>" + s.name + "</extra>" });
  });
  return traces;
}

const RENDER = {
  overview(d) {
    const t = d.totals || {};
    tiles([
      ["Interactions", fmt.num(t.interactions || 0)], ["Assessed", fmt.num(t.assessed || 0)],
      ["Mean reward", fmt.num(t.mean_reward)], ["Datasets", fmt.num(t.datasets || 0)],
      ["Training runs", fmt.num(t.runs || 0)],
      ["Evaluations passed", `${t.evaluations_passed || 0} / ${t.evaluations || 0}` +
        (t.evaluations_inconclusive ? ` (${t.evaluations_inconclusive} inconclusive)` : "")],
      ["Deployments", fmt.num(t.deployments || 0)], ["Rollbacks", fmt.num(t.rollbacks || 0)],
      ["Rejected events", fmt.num(t.rejections || 0)],
    ]);
    const perHour = d.interactions_per_hour || [];
    plot("plot-interactions",
      perHour.map((s) => ({ type: "bar", name: s.name, x: s.x, y: s.y, ...HOURLY, width: 0.88 * HOUR_MS,
        hovertemplate: "hour of %{x|%Y-%m-%d %H}:00<br>%{y} interactions<extra>" + s.name + "</extra>" })),
      { barmode: "stack", yaxis: { title: { text: "interactions" } }, xaxis: hourAxis(perHour) },
      "No interactions yet.");
    plot("plot-reward-role", rewardTraces(d.reward_by_role || []),
      { yaxis: { title: { text: "reward" }, range: [-0.03, 1.03] }, xaxis: { type: "date" } }, "No rewards yet.");
    plot("plot-reward-model", rewardTraces(d.reward_by_model || []),
      { yaxis: { title: { text: "reward" }, range: [-0.03, 1.03] }, xaxis: { type: "date" } }, "No rewards yet.");
    const arms = (d.arms || []).filter((a) => a.share !== null);
    const names = [...new Set(arms.map((a) => a.arm))];
    plot("plot-arms", names.map((name) => {
      const mine = arms.filter((a) => a.arm === name);
      return { type: "bar", name, x: mine.map((a) => `${a.role} · ${a.decision.replace("_", " ")}`),
               y: mine.map((a) => a.share), customdata: mine.map((a) => a.selected),
               hovertemplate: "%{x}<br>%{y:.1%} (%{customdata} choices)<extra>" + name + "</extra>" };
    }), { barmode: "stack", yaxis: { title: { text: "share of choices" }, tickformat: ".0%", range: [0, 1] } },
    "No bandit choices yet.");
    fill("table-arms", table([
      { title: "role", value: (a) => a.role }, { title: "decision", value: (a) => a.decision.replace("_", " ") },
      { title: "arm", value: (a) => el("code", {}, a.arm) },
      { title: "chosen", num: true, value: (a) => fmt.num(a.selected) },
      { title: "share", num: true, value: (a) => fmt.pct(a.share) },
      { title: "assessed", num: true, value: (a) => fmt.num(a.pulls) },
      { title: "mean reward", num: true, value: (a) => fmt.num(a.mean_reward) },
    ], d.arms || [], "No bandit arms yet.", { id: "arms" }));
  },

  datasets(d) {
    const sets = d.datasets || [];
    const latest = [...new Map([...sets].reverse().map((s) => [s.role, s])).values()]  // newest per role
      .sort((a, b) => a.role.localeCompare(b.role));
    const cells = latest.flatMap((s) => s.balance.map((c) => ({ ...c, role: s.role })));
    const labels = cells.map((c) => `${c.role} · ${c.domain} · ${c.complexity}`);
    plot("plot-balance", cells.length ? [
      { type: "bar", name: "available", x: labels, y: cells.map((c) => c.available), marker: { color: "#cbd5e1" } },
      { type: "bar", name: "kept", x: labels, y: cells.map((c) => c.kept), marker: { color: PALETTE[0] } },
    ] : [], { barmode: "group", yaxis: { title: { text: "examples" } } }, "No dataset built yet.");
    fill("table-datasets", table([
      { title: "built", value: (s) => fmt.time(s.time) },
      { title: "role", value: (s) => s.role },
      { title: "dataset", value: (s) => fmt.hash(s.dataset_hash) },
      { title: "sizes", value: (s) => Object.entries(s.sizes).map(([k, v]) => `${k} ${v}`).join(" · ") },
      { title: "rehearsal", num: true, value: (s) => fmt.pct(s.rehearsal_share) },
      { title: "lineage", value: (s) => el("span", {},
          `${fmt.num(s.lineage_total)} events up to log #${s.log_position}`,
          s.request_id ? el("div", { class: "small" }, "request ", el("code", {}, s.request_id)) : null) },
      { title: "trained → evaluated → deployed", value: (s) => s.runs.length ? el("div", {}, s.runs.map((r) =>
          el("div", {}, el("code", {}, r.run_id), " ", fmt.badge(r.status),
             r.verdict ? [" ", fmt.badge(r.verdict)] : "",
             r.deployed ? [" ", fmt.badge("deployed")] : ""))) : el("span", { class: "small" }, "not trained yet") },
      { title: "balance", value: (s) => el("details", {}, el("summary", {}, `${s.balance.length} cells`),
          table([
            { title: "domain", value: (c) => c.domain }, { title: "complexity", value: (c) => c.complexity },
            { title: "available", num: true, value: (c) => fmt.num(c.available) },
            { title: "kept", num: true, value: (c) => fmt.num(c.kept) },
          ], s.balance, "no balance rows")) },
    ], sets, "No dataset built yet.", { id: "datasets" }));
    fill("table-skips", table([
      { title: "time", value: (s) => fmt.time(s.time) }, { title: "role", value: (s) => s.role },
      { title: "reason", value: (s) => fmt.badge(s.reason, "bad") },
      { title: "detail", cls: "reason", value: (s) => s.detail },
      { title: "log position", num: true, value: (s) => fmt.num(s.log_position) },
    ], d.skips || [], "No skipped requests.", { id: "skips" }));
  },

  training(d) {
    const traces = [];
    (d.curves || []).forEach((c, i) => {
      const colour = colourOf(i);
      const name = c.run_id;
      if (c.step.length) traces.push({ type: "scatter", mode: "lines+markers", name, x: c.step, y: c.loss,
        line: { color: colour, width: 2 }, marker: { size: 5 }, legendgroup: c.run_id });
      if (c.val_step.length) traces.push({ type: "scatter", mode: "lines+markers", name: name + " (val)",
        x: c.val_step, y: c.val_loss, line: { color: colour, dash: "dash", width: 2 }, marker: { size: 5 },
        legendgroup: c.run_id });
    });
    plot("plot-loss", traces, { xaxis: { title: { text: "optimizer step" } }, yaxis: { title: { text: "loss" } } },
      "No training progress yet.");
    fill("table-runs", table([
      { title: "run", value: (r) => el("code", {}, r.run_id) },
      { title: "role", value: (r) => r.role || "?" },
      { title: "status", value: (r) => fmt.badge(r.status) },
      { title: "started", value: (r) => fmt.time(r.started) },
      { title: "steps", num: true, value: (r) => r.total_steps ? `${r.step} / ${r.total_steps}` : fmt.num(r.step) },
      { title: "train loss", num: true, value: (r) => fmt.num(r.train_loss) },
      { title: "val loss", num: true, value: (r) => fmt.num(r.val_loss) },
      { title: "tokens/s", num: true, value: (r) => fmt.num(r.tokens_per_s, 0) },
      { title: "duration", num: true, value: (r) => fmt.secs(r.duration_s) },
      { title: "dataset", value: (r) => fmt.hash(r.dataset_hash) },
      { title: "adapter", value: (r) => fmt.hash(r.adapter_hash) },
      { title: "reason", cls: "reason", value: (r) => r.reason || "" },
    ], d.runs || [], "No training runs yet.", { id: "runs" }));
    if (CAN_TRAIN) {
      const holder = document.getElementById("train-actions") || document.querySelector("main").appendChild(
        el("section", { class: "card wide", id: "train-actions" }));
      holder.replaceChildren(el("h2", {}, "Request training"),
        el("p", { class: "hint" }, "publishes a manual training.requested for the role, as `flywheel train`"),
        ...(d.roles || []).map((role) => el("button", { class: "train", onclick: () => requestTraining(role) },
          role)), el("span", { id: "train-result", class: "small" }));
    }
  },

  evaluations(d) {
    fill("table-evaluations", table([
      { title: "time", value: (e) => fmt.time(e.time) },
      { title: "role", value: (e) => e.role },
      { title: "run", value: (e) => el("code", {}, e.run_id) },
      { title: "adapter", value: (e) => fmt.hash(e.adapter_hash) },
      { title: "gate", value: (e) => el("div", {}, fmt.badge(verdictOf(e)),
          (e.checks || []).length ? el("ul", { class: "checks" }, e.checks.map(checkLine)) : "") },
      { title: "candidate vs baseline", value: (e) => e.metrics.length ? table([
          { title: "metric", value: (m) => m.name },
          { title: "candidate", num: true, value: (m) => fmt.num(m.candidate) },
          { title: "baseline", num: true, value: (m) => fmt.num(m.baseline) },
          { title: "Δ", num: true, value: (m) => m.delta === null ? "" :
              el("span", { class: deltaClass(m) },
                 (m.delta > 0 ? "+" : "") + fmt.num(m.delta)) },
        ], e.metrics, "") : "–" },
      { title: "reasons", cls: "reason", value: (e) => e.reasons.length ? el("ul", {}, e.reasons.map((r) =>
          el("li", {}, r))) : el("span", { class: "small" }, "none") },
    ], d.evaluations || [], "No evaluations yet.", { id: "evaluations" }));
  },

  deployments(d) {
    const events = d.timeline || [];
    const kinds = [...new Set(events.map((e) => e.kind))];
    plot("plot-timeline", kinds.map((kind) => {
      const mine = events.filter((e) => e.kind === kind);
      return { type: "scatter", mode: "markers", name: kind, x: mine.map((e) => e.time), y: mine.map((e) => e.role),
               text: mine.map((e) => e.summary),
               marker: { size: 14, color: KIND_COLOURS[kind] || "#64748b", symbol: KIND_SYMBOLS[kind] || "circle",
                         line: { width: 1, color: "#ffffff" } },
               hovertemplate: "%{x}<br>%{y}: %{text}<extra>" + kind + "</extra>" };
    }), { xaxis: { type: "date" }, yaxis: { type: "category", title: { text: "role" } } },
    "No deployments yet.");
    fill("table-current", table([
      { title: "role", value: (e) => e.role },
      { title: "state", value: (e) => fmt.badge(e.kind) },
      { title: "since", value: (e) => fmt.time(e.time) },
      { title: "runtime", value: (e) => e.runtime || "" },
      { title: "adapter", value: (e) => fmt.hash(e.adapter_hash) },
      { title: "detail", cls: "reason", value: (e) => e.summary },
    ], d.current || [], "Nothing deployed yet.", { id: "current" }));
    fill("table-timeline", table([
      { title: "time", value: (e) => fmt.time(e.time) },
      { title: "event", value: (e) => fmt.badge(e.kind) },
      { title: "role", value: (e) => e.role },
      { title: "runtime", value: (e) => e.runtime || "" },
      { title: "adapter", value: (e) => fmt.hash(e.adapter_hash) },
      { title: "detail", cls: "reason", value: (e) => e.summary },
    ], events, "No deployments, rollbacks or drift yet.", { id: "timeline" }));
  },

  rejections(d) {
    const by = d.by_processor || [];
    tiles([["Rejected events", fmt.num(d.total || 0)], ["Processors", fmt.num(by.length)]]);
    plot("plot-rejections", by.length ? [{ type: "bar", orientation: "h", x: by.map((p) => p.count),
      y: by.map((p) => p.processor), marker: { color: PALETTE[3] },
      hovertemplate: "%{y}: %{x}<extra></extra>" }] : [],
      { yaxis: { type: "category", automargin: true }, bargap: 0.45,
        xaxis: { title: { text: "events" }, rangemode: "tozero",  // whole numbers: at most ~8 ticks
                 dtick: Math.max(1, Math.ceil(Math.max(0, ...by.map((p) => p.count)) / 8)) } }, "No rejections.");
    fill("table-rejections", table([
      { title: "time", value: (r) => fmt.time(r.time) },
      { title: "processor", value: (r) => el("code", {}, r.processor) },
      { title: "subject", value: (r) => el("code", {}, r.subject) },
      { title: "stream seq", num: true, value: (r) => `${r.stream} #${r.sequence}` },
      { title: "attempts", num: true, value: (r) => fmt.num(r.attempts) },
      { title: "reason", cls: "reason", value: (r) => r.reason },
    ], d.rejections || [], "No rejected events.", { id: "rejections" }));
  },
};

// ------------------------------------------------------------------ data and live updates

async function requestTraining(role) {
  const result = document.getElementById("train-result");
  const response = await fetch(`/api/train/${encodeURIComponent(role)}`,
                               { method: "POST", headers: { "X-Flywheel-Action": "1" } });
  const body = await response.json();
  if (result) result.textContent = response.ok ? ` requested for ${role}: ${body.event_id}` : ` ${body.detail}`;
}

let loading = null;
async function load() {
  if (loading) return loading;
  loading = (async () => {
    try {
      const response = await fetch(`/api/${PAGE}`, { cache: "no-store" });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const data = await response.json();
      RENDER[PAGE](data);
      shownPosition = data.position;
      document.body.dataset.position = String(data.position);
      setLive(true, `log position ${data.position} · ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      setLive(false, `cannot read the dashboard data: ${error.message}`);
    } finally {
      loading = null;
    }
  })();
  return loading;
}

function setLive(ok, text) {
  document.getElementById("live-dot").className = "dot " + (ok ? "on" : "off");
  document.getElementById("live-text").textContent = text;
}

function follow() {
  const source = new EventSource("/api/stream");
  source.addEventListener("position", async (message) => {
    const { position } = JSON.parse(message.data);
    if (position !== shownPosition) await load();
  });
  source.onerror = () => setLive(false, "reconnecting…");
}

if (PAGE.startsWith("pages/")) {
  // a plugin's page is rendered on the server: show it as it is, and say that it is a snapshot
  setLive(true, "a plugin's page: reload to see new rows");
} else {
  load().then(follow);
}
