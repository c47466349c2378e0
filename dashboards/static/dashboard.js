// The commlens dashboard's script: fetches the collector's SVG graph and JSON
// API and refreshes them in place. No framework, no third-party code.
//
// The view (tab, window, find/hide/focus/depth, the selected node or edge,
// the open trace) lives in the address's fragment, so a link to it can be
// shared in an incident channel and opens on the same view:
//   /dashboard/#tab=graph-tab&window=15m&focus=nova-conductor&select=node:nova-conductor
"use strict";

const REFRESH_MS = 10000;
const state = { selected: null, services: [], nodes: {}, trace: null };
const $ = (id) => document.getElementById(id);

function windowArg() { return $("window").value; }

function setStatus(text) { $("status").textContent = text; }

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) { throw new Error(body.error || response.statusText); }
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") { node.className = value; } else { node.setAttribute(key, value); }
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Three significant digits, never an exponent ("100%", not "1.0e+2%"),
// thousands grouped: the rules of dashboards/formatting.py.
const SMALLEST = 0.001;
function number(value) {
  if (value === 0) { return "0"; }
  const magnitude = Math.abs(value);
  if (magnitude < SMALLEST) { return (value < 0 ? "-" : "") + "<" + SMALLEST; }
  if (magnitude >= 1000) { return Math.round(value).toLocaleString("en-US"); }
  const decimals = Math.max(0, 2 - Math.floor(Math.log10(magnitude)));
  const text = value.toFixed(decimals);
  return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
}
function rate(value) { return number(value) + "/s"; }
function ms(seconds, estimated = false) {
  if (seconds == null) { return "–"; }
  const text = seconds >= 1 ? number(seconds) + " s" : number(seconds * 1000) + " ms";
  return (estimated ? "~" : "") + text;
}
function percent(ratio) { return number(ratio * 100) + "%"; }
// A percentile cell: "~" marks an estimate; the title says the range the
// true value lies in (the API's pNN_range_seconds).
function percentile(row, name) {
  const range = row[name + "_range_seconds"];
  const title = !range ? "" : row[name + "_estimated"]
    ? `estimate: between ${ms(range[0])} and ${range[1] == null ? "more" : ms(range[1])}`
    : "exact";
  return element("td", { class: "num", title }, ms(row[name + "_seconds"], row[name + "_estimated"]));
}
function when(epoch) { return new Date(epoch * 1000).toLocaleTimeString(); }
// "compute (os-compute-1)": a service or topic and the RPC server (host) it ran on.
function named(service, server) { return server ? `${service} (${server})` : `${service}`; }

// -- graph ------------------------------------------------------------------

function graphQuery() {
  const query = new URLSearchParams({ window: windowArg() });
  for (const name of ["find", "hide", "focus"]) {
    if ($(name).value.trim()) { query.set(name, $(name).value.trim()); }
  }
  query.set("depth", $("depth").value || "1");
  return query;
}

async function refreshGraph() {
  const response = await fetch("/dashboard/graph.svg?" + graphQuery(), { credentials: "same-origin" });
  if (!response.ok) {
    const body = await response.json().catch(() => ({ error: response.statusText }));
    $("filter-error").textContent = body.error;
    return;
  }
  $("filter-error").textContent = "";
  $("graph").innerHTML = await response.text();
  fitGraph();
  $("graph").dataset.nodes = response.headers.get("X-Commlens-Nodes");
  $("graph").dataset.edges = response.headers.get("X-Commlens-Edges");
  for (const group of $("graph").querySelectorAll("g.node, g.edge")) {
    group.addEventListener("click", () => select(group.id));
    if (state.selected && group.id === state.selected.id) { group.classList.add("selected"); }
  }
}

// Shrink a wide graph to the panel, but never below 60 %: past that the
// labels get too small to read, and the panel scrolls instead.
function fitGraph() {
  const svg = $("graph").querySelector("svg");
  if (!svg) { return; }
  const natural = svg.width.baseVal.value;
  const available = $("graph").clientWidth - 2;
  const scale = Math.max(0.6, Math.min(1, available / natural));
  svg.style.width = `${(natural * scale).toFixed(0)}px`;
  svg.style.height = `${(svg.height.baseVal.value * scale).toFixed(0)}px`;
}

async function refreshServices() {
  const graph = await getJSON("/api/graph?window=" + windowArg());
  state.nodes = Object.fromEntries(graph.nodes.map((node) => [node.service, node]));
  renderSilentServers(graph.silent_servers || []);
  renderSilentReporters(graph.silent_reporters || []);
  renderReplicas(graph.replicas);
  const services = graph.nodes.map((node) => node.service);
  if (services.join() === state.services.join()) { return; }
  state.services = services;
  const focus = $("focus");
  const chosen = focus.value;
  focus.replaceChildren(element("option", { value: "" }, "(all services)"),
    ...services.map((name) => element("option", { value: name }, nodeName(state.nodes[name]))));
  // A focus the graph does not draw (any more, or yet: a shared link) stays
  // chosen; the graph says there is no such service in this window.
  if (chosen) { ensureOption(focus, chosen); } else { focus.value = ""; }
}

// Replicas that answer as one (exporters/fleet.py): say when some did not.
function renderReplicas(replicas) {
  const missing = (replicas && replicas.missing) || [];
  $("replicas").hidden = missing.length === 0;
  $("replicas").textContent = missing.length === 0 ? "" :
    `partial: ${missing.length} replica(s) did not answer (${missing.map((m) => m.error).join(", ")})`;
}

// A node that does not report itself (exporters/graph.py): an unknown caller
// known by its client's User-Agent, or a destination only its callers count.
function nodeName(node) {
  if (!node || node.instrumented !== false) { return node ? node.service : ""; }
  return node.user_agent ? `unknown caller (${node.user_agent})` : `${node.service} (not instrumented)`;
}

// Calls addressed to one server (a host) that timed out: which host.
function renderSilentServers(servers) {
  $("silent-servers").hidden = servers.length === 0;
  $("silent-servers").querySelector("tbody").replaceChildren(...servers.map((row) =>
    element("tr", {}, element("td", { class: "err" }, named(row.target, row.server)),
      element("td", { class: "num" }, row.timeouts),
      element("td", {}, when(row.last_seen)), element("td", {}, row.callers.join(", ")),
      element("td", {}, row.operations.join(", ")))));
}

// Periodic reporters (state reports) that stopped sending: which host
// (exporters/reporters.py). Its own panel beside the silent servers.
function renderSilentReporters(reporters) {
  const panel = $("silent-reporters");
  if (!panel) { return; }
  panel.hidden = reporters.length === 0;
  panel.querySelector("tbody").replaceChildren(...reporters.map((row) =>
    element("tr", {}, element("td", { class: "err" }, row.host),
      element("td", {}, `${row.service} → ${row.target} ${row.method}`),
      element("td", { class: "num" }, `${row.interval_seconds}s`),
      element("td", { class: "num" }, row.missed),
      element("td", {}, when(row.last_seen) + (row.ended ? " (process exited)" : "")))));
}

function select(id, refresh = true) {
  if (id.startsWith("node:")) {
    state.selected = { id, kind: "node", service: id.slice(5) };
  } else {
    const body = id.slice(5);
    const colon = body.lastIndexOf(":");
    const [client, server] = body.slice(0, colon).split("->");
    state.selected = { id, kind: "edge", client, server, protocol: body.slice(colon + 1) };
  }
  for (const group of $("graph").querySelectorAll("g.selected")) { group.classList.remove("selected"); }
  const group = document.getElementById(id);
  if (group) { group.classList.add("selected"); }
  saveView();
  if (refresh) { refreshDetails(); }
}

async function refreshDetails() {
  const chosen = state.selected;
  if (!chosen) { return; }
  let details;
  if (chosen.kind === "node") {
    details = await getJSON(`/api/graph/node/${encodeURIComponent(chosen.service)}?window=${windowArg()}`);
    $("details-title").textContent = nodeName(state.nodes[chosen.service]) || chosen.service;
    $("details-note").textContent = state.nodes[chosen.service]?.instrumented === false
      ? "Not instrumented: what its callers counted, by method."
      : "What it serves, by caller and method or route.";
  } else {
    const query = new URLSearchParams({ client: chosen.client, server: chosen.server,
      protocol: chosen.protocol, window: windowArg() });
    details = await getJSON("/api/graph/edge?" + query);
    $("details-title").textContent = `${chosen.client} → ${chosen.server} (${chosen.protocol.toUpperCase()})`;
    $("details-note").textContent = chosen.protocol === "rpc"
      ? "As the caller sees it: latency is the reply wait of successful calls."
      : state.nodes[chosen.server]?.instrumented === false
        ? "As the caller counted it (the server is not instrumented): by method, successful requests."
        : "As the server sees it: latency is the route's, successful requests, all callers.";
  }
  const degraded = parseFloat(document.body.dataset.degraded);
  const failing = parseFloat(document.body.dataset.failing);
  $("methods").tBodies[0].replaceChildren(...details.methods.map((row) => element("tr",
    { class: row.error_ratio >= failing ? "failing" : row.error_ratio >= degraded ? "degraded" : "" },
    element("td", {}, (row.caller ? row.caller + " → " : "") + row.operation),
    element("td", { class: "num" }, rate(row.rate)),
    element("td", { class: "num" }, `${row.errors.toFixed(0)} (${percent(row.error_ratio)})` +
      (row.timeouts ? `, ${row.timeouts.toFixed(0)} timeouts` : "")),
    percentile(row, "p50"),
    percentile(row, "p99"),
    element("td", { class: "num" }, row.waiting_replies.toFixed(0)),
    changeCell(row.change))));
  renderTimeoutBudget(details.timeout_budget);
  renderEdgeWaitSplit(chosen.kind === "edge" ? details.wait_split : null);
  sparkline($("spark-waiting"), details.series.map((p) => [p.seconds_ago, p.waiting_replies]));
  sparkline($("spark-errors"), details.series.map((p) => [p.seconds_ago, p.errors_per_second]));
  $("details").hidden = false;
  fitGraph();
}

// -- timeout budget (an RPC edge's detail) ------------------------------------

// How close the edge's calls ran to their timeout: the API's timeout_budget
// (docs/operator-guide.md); hidden for REST edges, nodes, and RPC edges with
// no call that ended in the window.
function renderTimeoutBudget(budget) {
  const box = $("timeout-budget");
  box.hidden = !budget;
  if (!budget) { return; }
  const over = budget.over_half_ratio >= 0.5 ? "failing" : budget.over_half ? "degraded" : "";
  box.querySelector("dl").replaceChildren(
    ...timeoutBudgetRow("timeout", budget.timeout_seconds == null ? "–" : ms(budget.timeout_seconds)),
    ...timeoutBudgetRow("used, p50", budgetFraction(budget, "p50")),
    ...timeoutBudgetRow("used, p99", budgetFraction(budget, "p99")),
    ...timeoutBudgetRow("calls over half", `${number(budget.over_half)} of ${number(budget.calls)}` +
      ` (${percent(budget.over_half_ratio)}, ${rate(budget.over_half_per_second)})`, over));
}

function timeoutBudgetRow(name, value, cls = "") {
  return [element("dt", {}, name), element("dd", { class: cls, "data-budget": name }, value)];
}

// A fraction of the timeout as a percentage; "~" marks an estimate (a range).
function budgetFraction(budget, name) {
  const range = budget[name + "_range"];
  const exact = !range || range[0] === range[1];
  if (budget[name] >= 1 && range && range[1] == null) { return "≥ 100% (timed out)"; }
  return (exact ? "" : "~") + percent(budget[name]);
}

function sparkline(svg, points) {
  const width = 300, height = 60, span = 900;
  const top = Math.max(1, ...points.map((p) => p[1]));
  const coordinates = points.map(([ago, value]) =>
    `${(width * (1 - ago / span)).toFixed(1)},${(height - 4 - (height - 8) * value / top).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coordinates.join(" "));
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", "4"); label.setAttribute("y", "12"); label.setAttribute("font-size", "10");
  label.textContent = "max " + number(top);
  svg.replaceChildren(line, label);
  svg.dataset.points = String(points.length);
}

// -- advice -----------------------------------------------------------------
// Tuning findings (/api/advice, exporters/advice.py) beside the graph: the
// last minute against the 15 before, whatever the graph's window.

async function refreshAdvice() {
  const body = await getJSON("/api/advice?window=1m&baseline=15m");
  renderAdvice(body.findings);
}

function renderAdvice(findings) {
  $("advice-empty").hidden = findings.length > 0;
  $("advice-findings").replaceChildren(...findings.map(adviceItem));
}

function adviceItem(finding) {
  const subject = finding.subject;
  const who = (subject.edge || subject.service) + (subject.topic ? ` (topic ${subject.topic})` : "");
  const title = element("p", { class: "subject", title: "show it on the graph" }, who);
  // The service the finding is about, selected on the graph if it is drawn.
  title.addEventListener("click", () => {
    if (document.getElementById("node:" + subject.service)) { select("node:" + subject.service); }
  });
  const sure = finding.confidence;
  const change = finding.option
    ? element("p", {}, "Change ", element("span", { class: "option" }, finding.option),
      finding.set_on.length ? ` on ${finding.set_on.join(", ")}` : "")
    : element("p", {}, "No setting: see above.");
  return element("li", { class: finding.severity, "data-rule": finding.rule }, title,
    element("p", {}, finding.finding), element("p", {}, finding.recommendation), change,
    element("p", { class: "sure" }, `${finding.severity} · ${finding.rule} · ${sure.level} ` +
      `confidence: ${sure.observations.toLocaleString("en-US")} over ${Math.round(sure.seconds)} s`));
}

// -- chains -----------------------------------------------------------------

async function refreshChains() {
  const body = await getJSON(`/api/chains?since=${windowArg()}&limit=25`);
  $("chains").tBodies[0].replaceChildren(...body.chains.map((chain) => {
    const path = element("td", { class: "chain-path" });
    const origin = chain.origin;
    // A callee that did not answer has no hop of its own: named first, with
    // the server the call was addressed to, as the CLI does.
    if (chain.hops.length && origin.service !== chain.hops[0].service) {
      path.append(element("span", { class: "hop origin" },
        `${named(origin.service, origin.server)} ${origin.operation} `,
        element("span", { class: "err" }, origin.error ? `(${origin.error})` : "")),
        element("span", { class: "arrow" }, "→"));
    }
    chain.hops.forEach((hop, index) => {
      if (index) { path.append(element("span", { class: "arrow" }, "→")); }
      const service = hop.side === "server" ? named(hop.service, hop.server) : hop.service;
      path.append(element("span", { class: "hop" }, `${service} ${hop.operation} `,
        element("span", { class: "err" }, hop.error ? `(${hop.error})` : "")));
    });
    const examples = element("td", {}, ...chain.examples.map((example) => {
      const link = element("a", { href: "#", class: "request-id" }, example.request_id || example.trace_id);
      link.addEventListener("click", (event) => { event.preventDefault(); openTrace(example.trace_id); });
      return link;
    }));
    return element("tr", { class: chain.absorbed ? "absorbed" : "" },
      element("td", { class: "num" }, chain.count), chainOriginCell(chain), path,
      element("td", {}, when(chain.first_seen)), element("td", {}, when(chain.last_seen)), examples);
  }));
}

// -- traces -----------------------------------------------------------------

async function openTrace(id) {
  state.trace = id;
  showTab("trace-tab");
  $("trace-hops").replaceChildren();
  try {
    const trace = await getJSON("/api/traces/" + encodeURIComponent(id));
    renderTrace(trace);
  } catch (error) {
    $("trace-title").textContent = error.message;
  }
}

function renderTrace(trace) {
  const hops = [...trace.hops].sort((a, b) => a.start - b.start);
  const byId = new Map(hops.map((hop) => [hop.span_id, hop]));
  const depth = (hop) => {
    let level = 0;
    for (let parent = byId.get(hop.parent_id); parent && level < 50; parent = byId.get(parent.parent_id)) { level++; }
    return level;
  };
  const start = Math.min(...hops.map((hop) => hop.start));
  const end = Math.max(...hops.map((hop) => hop.start + hop.duration));
  const total = Math.max(end - start, 1e-6);
  traceTitle(trace, hops, total);
  $("trace-hops").replaceChildren(...hops.map((hop) => {
    const failed = hop.error || (hop.outcome && hop.outcome !== "ok");
    const text = (hop.side === "client" ? `${hop.service} → ${named(hop.target, hop.server)} `
      : `${named(hop.service, hop.server)} `) +
      `${hop.operation} ${hop.error ? "(" + hop.error + ")" : ""} ${ms(hop.duration)}`;
    const label = element("div", { class: "label", title: `${text} ${hop.request_id || ""}` },
      "\u00a0\u00a0".repeat(depth(hop)) + text);
    const bar = element("div", { class: "bar" });
    bar.style.left = `${(100 * (hop.start - start) / total).toFixed(2)}%`;
    bar.style.width = `${(100 * hop.duration / total).toFixed(2)}%`;
    return element("div", { class: "hop" + (failed ? " failed" : ""), "data-span": hop.span_id },
      label, element("div", { class: "lane" }, bar));
  }));
  renderTraceWaitSplits(trace.wait_splits || []);
}

// -- where the wait goes ------------------------------------------------------
// An RPC call's wait = queued and in transit + waiting for a worker + processing
// (exporters/wait_split.py): slow (processing), starved (pool wait) or backed
// up (queue and transit) at a glance, in the edge details and the trace.

const SPLIT_PARTS = [["queue_transit", "seg-queue", "queue"], ["pool_wait", "seg-pool", "pool"],
  ["processing", "seg-processing", "processing"]];
const SPLIT_VERDICTS = {
  processing: ["slow", "Slow: processing takes most of the wait."],
  pool_wait: ["starved", "Starved: calls wait for a free worker of the server's pool."],
  queue_transit: ["backed_up", "Backed up: calls wait in the broker's queue or on the way."],
};

// Segments of one split ({part: seconds}) in proportion to ``total`` seconds
// (or to the parts' sum, when percentiles of parts add up past the wait's).
function splitSegments(split, total) {
  total = Math.max(total || 0, SPLIT_PARTS.reduce((sum, [part]) => sum + Math.max(0, split[part] || 0), 0));
  return SPLIT_PARTS.map(([part, css, name]) => {
    const segment = element("span", { class: css, title: `${name} ${ms(split[part])}` });
    segment.style.width = `${(100 * Math.max(0, split[part] || 0) / Math.max(total, 1e-9)).toFixed(2)}%`;
    return segment;
  });
}

function splitFigures(split) {
  return SPLIT_PARTS.map(([part, , name]) => `${name} ${ms(split[part])}`).join(" · ");
}

function renderEdgeWaitSplit(split) {
  $("wait-split").hidden = !split;
  if (!split) { return; }
  const verdict = SPLIT_VERDICTS[split.dominant];
  $("wait-split-verdict").className = verdict ? verdict[0] : "";
  $("wait-split-verdict").textContent = verdict ? verdict[1] : "No answered call in this window.";
  $("wait-split-bars").replaceChildren(...["p50", "p99"].filter((name) => split[name].wait != null)
    .map((name) => {
      const figures = split[name];
      const range = figures.queue_transit_range;
      return element("div", { class: "split-row", "data-percentile": name,
        title: range ? `queue and transit between ${ms(range[0])} and ` +
          `${range[1] == null ? "more" : ms(range[1])}` : "" },
      element("span", { class: "split-name" }, name),
      element("span", { class: "split-bar" }, ...splitSegments(figures, figures.wait)),
      element("span", { class: "split-figures" }, `${ms(figures.wait)}: ${splitFigures(figures)}`));
    }));
  $("wait-split-pools").textContent = split.pools.map((pool) =>
    `pool of ${pool.target}: ${number(pool.handlers_in_flight)} of ${number(pool.pool_size)} ` +
    `workers busy, peak ${percent(pool.saturation_peak)}`).join("; ");
}

// A traced call's bar shows its parts, and its label says them.
function renderTraceWaitSplits(splits) {
  for (const split of splits) {
    const row = $("trace-hops").querySelector(`.hop[data-span="${CSS.escape(split.span_id)}"]`);
    if (!row) { continue; }
    const bar = row.querySelector(".bar");
    bar.classList.add("split");
    bar.dataset.dominant = split.dominant || "";
    bar.replaceChildren(...splitSegments(split, split.wait));
    const label = row.querySelector(".label");
    label.append(element("span", { class: "split-note" }, ` [${splitFigures(split)}]`));
    label.title += ` · ${splitFigures(split)}`;
  }
}

// The trace's title names the request its entry served; the other request
// ids its hops carry (work handed over) are counted, listed on hover.
function traceTitle(trace, hops, total) {
  const entry = trace.entry_request_id || trace.request_id || null;
  const others = [...new Set(hops.map((hop) => hop.request_id).filter(Boolean))]
    .filter((id) => id !== entry);
  const title = $("trace-title");
  title.textContent = `trace ${trace.trace_id} · ${hops.length} hops · ${ms(total)}` +
    (entry ? ` · request ${entry}` : "") +
    (others.length ? ` (+${others.length} other request id${others.length > 1 ? "s" : ""})` : "");
  title.title = others.join(", ");
}

// -- lost messages and change against the baseline (issue 18 item 4) -------

// Casts, fanouts and notifications sent and not received (exporters/lost.py).
async function refreshLostMessages() {
  renderLostMessages(await getJSON(`/api/lost-messages?window=${windowArg()}`));
}

function renderLostMessages(body) {
  const rows = body.messages || [];
  $("lost-messages").hidden = rows.length === 0;
  $("lost-messages-note").textContent = `Sent over ${number(body.window_seconds)} s until ` +
    `${number(body.grace_seconds)} s ago and received by no instrumented server ` +
    "(a queue nobody reads, a message dropped). A lower bound.";
  $("lost-messages").querySelector("tbody").replaceChildren(...rows.map((row) => {
    const where = [...row.servers.map((s) => `${s.server} (${s.unreceived} of ${s.sampled} sampled)`),
      ...Object.entries(row.queues).map(([name, q]) => `queue ${name}: ${q.ready} ready, no consumer`)];
    return element("tr", {}, element("td", {}, row.target), element("td", {}, row.method),
      element("td", {}, row.kind), element("td", { class: "num" }, row.sent),
      element("td", { class: "num" }, row.received),
      element("td", { class: "num err" }, row.unreceived),
      element("td", {}, row.callers.join(", ")), element("td", {}, where.join("; ")));
  }));
}

// "rate ×3, err +10%, p99 ×12" against the baseline window (exporters/change.py).
function changeText(change) {
  if (!change) { return "–"; }
  const parts = [];
  if (change.rate.ratio != null) { parts.push(`rate ×${number(change.rate.ratio)}`); }
  else if (!change.rate.baseline) { parts.push("new"); }
  if (change.error_ratio.difference) {
    parts.push(`err ${change.error_ratio.difference > 0 ? "+" : ""}${percent(change.error_ratio.difference)}`);
  }
  if (change.p99_seconds.ratio != null) { parts.push(`p99 ×${number(change.p99_seconds.ratio)}`); }
  return (parts.join(", ") || "same") + (change.confident ? "" : " (short baseline)");
}

function changeCell(change) {
  const worse = change && ((change.error_ratio.difference || 0) > 0.01 ||
    (change.p99_seconds.ratio || 0) >= 2);
  const title = !change ? "no baseline yet: the collector has not heard long enough"
    : `baseline: ${rate(change.rate.baseline)}, ` +
      `${change.error_ratio.baseline == null ? "–" : percent(change.error_ratio.baseline)} errors, ` +
      `p99 ${ms(change.p99_seconds.baseline)}, ${change.baseline_requests} requests`;
  return element("td", { class: "change" + (worse ? " worse" : ""), title }, changeText(change));
}

// -- origins (issue 18 item 5) ------------------------------------------------

// The chain's origin as `commlens chains` prints it: a topic that did not
// answer with the server the calls were addressed to, its operation and error.
function chainOriginCell(chain) {
  const origin = chain.origin;
  return element("td", { class: "chain-origin" }, named(origin.service, origin.server),
    element("br"), `${origin.operation || ""}`, element("br"), `${origin.error || ""}`);
}

// -- wiring -----------------------------------------------------------------

function showTab(id) {
  if (!document.querySelector(`.tab[data-tab="${CSS.escape(id)}"]`)) { return; }
  for (const tab of document.querySelectorAll(".tab")) { tab.classList.toggle("active", tab.dataset.tab === id); }
  for (const body of document.querySelectorAll(".tab-body")) { body.classList.toggle("active", body.id === id); }
  saveView();
}

// -- the view in the address ----------------------------------------------

const DURATION = /^\d+(\.\d+)?[smhd]?$/;

function currentTab() {
  const active = document.querySelector(".tab.active");
  return active ? active.dataset.tab : "graph-tab";
}

// The view as fragment parameters; defaults left out so links stay short.
function viewParams() {
  const params = new URLSearchParams();
  const tab = currentTab();
  if (tab !== "graph-tab") { params.set("tab", tab); }
  params.set("window", windowArg());
  for (const name of ["find", "hide", "focus"]) {
    if ($(name).value.trim()) { params.set(name, $(name).value.trim()); }
  }
  if (($("depth").value || "1") !== "1") { params.set("depth", $("depth").value); }
  if (state.selected) { params.set("select", state.selected.id); }
  if (state.trace && tab === "trace-tab") { params.set("trace", state.trace); }
  return params;
}

let restoring = false;

function saveView() {
  if (restoring) { return; }
  const fragment = "#" + viewParams().toString();
  if (location.hash !== fragment) {
    history.replaceState(null, "", location.pathname + location.search + fragment);
  }
}

// An option for a value the list does not have yet (a focus on a service
// the graph has not drawn yet, a window typed into the address).
function ensureOption(select, value, label = value) {
  if (![...select.options].some((option) => option.value === value)) {
    select.append(element("option", { value }, label));
  }
  select.value = value;
}

// Apply the fragment's view to the controls; returns the trace to open, if any.
function restoreView() {
  const params = new URLSearchParams(location.hash.slice(1));
  restoring = true;
  try {
    const windowValue = params.get("window");
    if (windowValue && DURATION.test(windowValue)) { ensureOption($("window"), windowValue); }
    for (const name of ["find", "hide"]) { $(name).value = params.get(name) || ""; }
    const focus = params.get("focus");
    if (focus) { ensureOption($("focus"), focus); } else { $("focus").value = ""; }
    const depth = params.get("depth");
    $("depth").value = depth && /^\d+$/.test(depth) ? depth : "1";
    const selected = params.get("select");
    if (selected && /^(node|edge):/.test(selected)) { select(selected, false); } else { state.selected = null; }
    showTab(params.get("tab") || "graph-tab");
  } finally {
    restoring = false;
  }
  const trace = params.get("trace");
  return params.get("tab") === "trace-tab" && trace ? trace : null;
}

function openView() {
  const trace = restoreView();
  refreshAll();
  if (trace) { openTrace(trace); }
}

async function refreshAll() {
  try {
    await Promise.all([refreshGraph(), refreshServices(), refreshChains(), refreshDetails(),
      refreshLostMessages(), refreshAdvice()]);
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (error) {
    setStatus("refresh failed: " + error.message);
  }
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showTab(tab.dataset.tab));
}
for (const id of ["find", "hide", "depth", "focus"]) {
  $(id).addEventListener("change", () => { saveView(); refreshGraph(); });
}
window.addEventListener("resize", fitGraph);
$("window").addEventListener("change", () => { saveView(); refreshAll(); });
// A link pasted into the address bar of an open dashboard changes only the
// fragment: no reload, so the view is applied here.
window.addEventListener("hashchange", openView);
$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const id = $("search-input").value.trim();
  if (id) { openTrace(id); }
});
setInterval(() => { if ($("auto-refresh").checked) { refreshAll(); } }, REFRESH_MS);
openView();
