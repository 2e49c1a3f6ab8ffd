// Waypost's status page: reads the management app's JSON endpoints (and two scrapes of the
// metrics path, for rates) every few seconds and renders them with textContent only: the
// decisions carry client-supplied values (hosts), never parsed as HTML.
"use strict";

const TOKEN_KEY = "waypost-admin-token";
const METRICS_PATH = document.body.dataset.metricsPath;
// ?refresh=SECONDS (at least 1) overrides the default period.
const PERIOD_MS = Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 5) * 1000;
let previous = null; // the last scrape's totals, for rates: {at, total, client, server}
let refreshes = 0;
let tokenNote = ""; // why the last token was dropped, shown until another one is typed

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function show(id, ...nodes) {
  document.querySelector(`#${id} .body`).replaceChildren(...nodes);
}

function table(headers, rows) {
  return el("table", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))), ...rows);
}

function state(text, good) {
  return el("span", { class: good ? "ok" : "bad" }, text);
}

function hidden(what) {
  return el("p", { class: "hidden" }, `${what}: hidden without the admin token.`);
}

function short(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

async function get(path, admin) {
  const headers = admin ? { Authorization: `Bearer ${token()}` } : {};
  try {
    const r = await fetch(path, { headers, cache: "no-store" });
    const type = r.headers.get("Content-Type") || "";
    const body = type.includes("json") ? await r.json() : await r.text();
    return { status: r.status, body };
  } catch (e) {
    return { status: 0, body: null, error: String(e) };
  }
}

// The instance app (several workers) answers /admin/* with each worker's answer listed under
// "workers": [[worker or null, body], ...] either way.
function perWorker(answer, key) {
  const body = answer.body || {};
  if (!Array.isArray(body.workers)) return [[null, body]];
  return body.workers.filter((w) => w.body && key in w.body).map((w) => [w.worker, w.body]);
}

// Readiness's checks per process: the instance app nests each worker's under checks.workers.
function workerChecks(readiness) {
  const checks = (readiness.body && readiness.body.checks) || {};
  const nested = checks.workers && checks.workers.workers;
  if (!Array.isArray(nested)) return [[null, checks]];
  return nested.map((w) => [w.worker, w.checks || {}]);
}

function failed(answer) {
  if (answer.status === 0) return `no answer (${answer.error})`;
  const err = answer.body && answer.body.error;
  return `HTTP ${answer.status}${err ? `: ${err.code} ${err.message}` : ""}`;
}

// --- Prometheus text exposition: name{labels} value ------------------------------------------

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function samples(text, name) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = SAMPLE.exec(line);
    if (!m || m[1] !== name) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(LABEL)) labels[l[1]] = l[2];
    out.push({ labels, value: Number(m[3]) });
  }
  return out;
}

function traffic(text) {
  const now = { at: performance.now(), total: 0, client: 0, server: 0 };
  for (const s of samples(text, "http_requests_total")) {
    now.total += s.value;
    const status = Number(s.labels.status);
    if (status >= 400 && status < 500) now.client += s.value;
    if (status >= 500) now.server += s.value;
  }
  const blocked = samples(text, "policy_decisions_total")
    .filter((s) => s.labels.decision !== "would_block")
    .reduce((sum, s) => sum + s.value, 0);
  const stat = (label, value) => el("div", {}, el("div", { class: "big" }, value), label);
  const rate = (key) => {
    if (!previous) return "…";
    const seconds = (now.at - previous.at) / 1000;
    return seconds > 0 ? (Math.max(0, now[key] - previous[key]) / seconds).toFixed(2) : "…";
  };
  const shown = el(
    "div",
    { class: "stats" },
    stat("requests/s", rate("total")),
    stat("4xx/s", rate("client")),
    stat("5xx/s", rate("server")),
    stat("requests", now.total),
    stat("policy refusals", blocked),
  );
  previous = now;
  return shown;
}

// --- sections ---------------------------------------------------------------------------------

function checkRow(name, check, nested) {
  const ok = check && typeof check === "object" && "ok" in check ? check.ok : null;
  return el(
    "tr",
    { "data-check": name },
    el("td", nested ? { "data-indent": "" } : {}, name),
    el("td", {}, ok === null ? "" : state(ok ? "ok" : "failing", ok)),
    el("td", {}, el("code", {}, short(check))),
  );
}

function renderHealth(liveness, readiness) {
  const checks = (readiness.body && readiness.body.checks) || {};
  const rows = [];
  for (const [name, check] of Object.entries(checks)) {
    if (name === "workers" && check && Array.isArray(check.workers)) {
      // An instance: one row per worker, then that worker's own checks.
      for (const w of check.workers) {
        rows.push(checkRow(`worker ${w.worker}`, { ok: w.ok, status: w.status, pid: w.pid }));
        for (const [inner, value] of Object.entries(w.checks || {})) rows.push(checkRow(inner, value, true));
      }
    } else {
      rows.push(checkRow(name, check));
    }
  }
  const ready = readiness.body && readiness.body.status;
  show(
    "health",
    el("p", {}, "Liveness: ", state(liveness.status === 200 ? "alive" : failed(liveness), liveness.status === 200)),
    el("p", { id: "readiness", "data-status": ready || "" }, "Readiness: ", state(ready || failed(readiness), readiness.status === 200)),
    table(["check", "state", "value"], rows),
  );
}

// The "worker" column only when an instance of several workers answered.
function withWorker(multi, headers) {
  return multi ? ["worker", ...headers] : headers;
}

function backendRow(multi, worker, b) {
  const healthy = b.status === "healthy";
  return el(
    "tr",
    { "data-backend": b.name, "data-status": b.status, "data-circuit": b.circuit },
    ...(multi ? [el("td", {}, worker)] : []),
    el("td", {}, b.name),
    el("td", {}, b.url),
    el("td", {}, state(b.status, healthy)),
    el("td", {}, state(b.circuit, b.circuit === "closed")),
    el("td", {}, short(b.active_requests)),
    el("td", {}, short(b.requests)),
    el("td", {}, short(b.consecutive_failures)),
  );
}

function renderBackends(readiness, admin) {
  const headers = ["name", "url", "health", "circuit", "active", "requests", "failures"];
  if (admin && admin.status === 200) {
    const answers = perWorker(admin, "backends");
    const multi = answers.some(([w]) => w !== null);
    const rows = answers.flatMap(([w, body]) => body.backends.map((b) => backendRow(multi, w, b)));
    show("backends", rows.length ? table(withWorker(multi, headers), rows) : el("p", {}, "No backends configured."));
    return;
  }
  // Without the token, the readiness check's list: name, url, health and circuit.
  const listed = workerChecks(readiness);
  const multi = listed.some(([w]) => w !== null);
  const rows = listed.flatMap(([w, checks]) =>
    Array.isArray(checks.backends) ? checks.backends.map((b) => backendRow(multi, w, b)) : [],
  );
  show(
    "backends",
    rows.length ? table(withWorker(multi, headers), rows) : el("p", {}, "No backends configured."),
    admin ? el("p", { class: "bad" }, `/admin/backends: ${failed(admin)}`) : hidden("Active requests and failures"),
  );
}

function renderCache(answer) {
  if (!answer) return show("cache", hidden("Cache statistics"));
  if (answer.status === 404) return show("cache", el("p", {}, "No cache is loaded."));
  if (answer.status !== 200) return show("cache", el("p", { class: "bad" }, failed(answer)));
  const tables = perWorker(answer, "entries").map(([w, body]) => {
    const rows = Object.entries(body).map(([key, value]) => el("tr", {}, el("td", {}, key), el("td", {}, short(value))));
    return el("div", {}, w === null ? "" : el("h3", {}, `worker ${w}`), table(["", ""], rows));
  });
  show("cache", ...tables);
}

function renderDecisions(answer) {
  if (!answer) return show("decisions", hidden("Recent policy decisions"));
  if (answer.status !== 200) return show("decisions", el("p", { class: "bad" }, failed(answer)));
  const answers = perWorker(answer, "decisions");
  const multi = answers.some(([w]) => w !== null);
  const all = answers.flatMap(([w, body]) => body.decisions.map((d) => [w, d]));
  all.sort((a, b) => (a[1].timestamp < b[1].timestamp ? 1 : -1));
  if (!all.length) return show("decisions", el("p", {}, "No policy decision yet."));
  const known = new Set(["timestamp", "policy", "decision", "rule", "client_ip", "request_id"]);
  const rows = all.map(([w, d]) =>
    el(
      "tr",
      { "data-policy": d.policy, "data-decision": d.decision, "data-rule": d.rule },
      el("td", {}, d.timestamp),
      ...(multi ? [el("td", {}, w)] : []),
      el("td", {}, d.policy),
      el("td", {}, state(d.decision, d.decision === "allow")),
      el("td", {}, d.rule),
      el("td", {}, short(d.client_ip)),
      el("td", {}, short(d.request_id)),
      el("td", {}, el("code", {}, short(Object.fromEntries(Object.entries(d).filter(([k]) => !known.has(k)))))),
    ),
  );
  const headers = ["policy", "decision", "rule", "client", "request id", "details"];
  show("decisions", table(["time", ...withWorker(multi, headers)], rows));
}

async function renderConfig(readiness, profile) {
  const parts = [];
  for (const [w, checks] of workerChecks(readiness)) {
    const check = checks.config;
    if (!check) continue;
    const who = w === null ? "" : `Worker ${w}: `;
    parts.push(el("p", {}, `${who}Loaded: `, state(check.loaded ? "yes" : "no", check.loaded)));
    if (check.error) parts.push(el("p", { class: "bad" }, `${who}Last reload failed: ${check.error}`));
  }
  if (!profile) {
    parts.push(hidden("The profile path and the effective config"));
  } else if (profile.status !== 200) {
    parts.push(el("p", { class: "bad" }, `/admin/profile: ${failed(profile)}`));
  } else {
    const body = profile.body;
    parts.push(el("p", { id: "profile" }, "Profile: ", el("code", {}, body.profile || "none (options only)")));
    if (body.config_endpoint) {
      const config = await get(body.config_endpoint, true);
      parts.push(
        config.status === 200
          ? el("details", {}, el("summary", {}, "Effective config"), el("pre", {}, JSON.stringify(config.body, null, 2)))
          : el("p", { class: "bad" }, `${body.config_endpoint}: ${failed(config)}`),
      );
    } else {
      parts.push(el("p", {}, "The effective config is not served by this build (no /admin/config)."));
    }
  }
  show("config", ...parts);
}

// --- refresh loop -------------------------------------------------------------------------------

async function refresh() {
  const admin = token() !== "";
  const [liveness, readiness, metrics] = await Promise.all([
    get("/health/liveness"),
    get("/health/readiness"),
    get(METRICS_PATH),
  ]);
  let [backends, cache, decisions, profile] = admin
    ? await Promise.all([
        get("/admin/backends", true),
        get("/admin/cache/stats", true),
        get("/admin/decisions", true),
        get("/admin/profile", true),
      ])
    : [null, null, null, null];
  // /admin/profile is served next to this page: 404 there means the admin API is off, and
  // 401/403 a refused token. Either way the token is dropped, so that no later refresh repeats
  // the refused requests, and the note says why until another token is typed.
  if (profile && [401, 403, 404].includes(profile.status)) {
    tokenNote =
      profile.status === 404
        ? "The admin API is off on this proxy (no admin token is configured): admin data is unavailable."
        : "The admin token was refused: admin data is hidden. Enter it again.";
    sessionStorage.removeItem(TOKEN_KEY);
    [backends, cache, decisions, profile] = [null, null, null, null];
  }
  renderHealth(liveness, readiness);
  show("traffic", metrics.status === 200 ? traffic(metrics.body) : el("p", { class: "bad" }, `${METRICS_PATH}: ${failed(metrics)}`));
  renderBackends(readiness, backends);
  renderCache(cache);
  renderDecisions(decisions);
  await renderConfig(readiness, profile);
  document.getElementById("token-note").textContent = profile
    ? "Admin token in use (kept in this tab only)."
    : tokenNote ||
      "Without the admin token: health, traffic and backend health only (cache, decisions, config source and backend details are hidden).";
  refreshes += 1;
  document.body.dataset.refreshes = String(refreshes);
  document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()} · every ${PERIOD_MS / 1000} s`;
}

async function loop() {
  try {
    await refresh();
  } finally {
    setTimeout(loop, PERIOD_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  tokenNote = "";
  refresh();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  tokenNote = "";
  refresh();
});
loop();
