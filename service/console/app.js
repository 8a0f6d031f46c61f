// The Evergreen console: polls the JSON API, draws what it says, and sends admin actions.
"use strict";

const KEY = "evergreen.adminKey";  // sessionStorage: gone when the tab closes
const POLL_MS = 3000, POLL_BUSY_MS = 1000;
const $ = (id) => document.getElementById(id);
const state = { data: {}, seen: {}, selected: null, lastSync: 0, timer: null };

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "data") Object.entries(v).forEach(([dk, dv]) => { node.dataset[dk] = dv; });
    else node[k] = v;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function ago(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor(s % 86400 / 3600)} h`;
}
const now = () => Date.now() / 1000;
const fixed = (v, d = 3) => (typeof v === "number" ? v.toFixed(d) : "–");
const signed = (v) => (typeof v === "number" ? `${v >= 0 ? "+" : ""}${(v * 100).toFixed(1)} pts` : "–");

// -- talking to the API -------------------------------------------------------------------
async function api(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  return { ok: response.ok, status: response.status, data };
}

function refusal(result) {
  const detail = result.data && result.data.detail;
  const text = typeof detail === "string" ? detail : JSON.stringify(detail || "no detail");
  if (result.status === 401) {
    return `Refused (401): ${text}. Enter the admin key at the top right to ${sessionStorage.getItem(KEY) ? "replace the one given" : "act"}.`;
  }
  if (result.status === 403) return `Refused (403): ${text}.`;
  return `Failed (${result.status}): ${text}.`;
}

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  clearTimeout(say.timer);
  if (kind !== "error") say.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function act(label, method, path, done = () => `${label}: done.`) {
  const result = await api(method, path);
  if (result.ok) say(done(result.data), "ok");
  else say(`${label}: ${refusal(result)}`, "error");
  await refresh();
  return result;
}

// -- polling --------------------------------------------------------------------------------
// The newest versions and windows of the history (and the live version wherever it is): 20 x 20
// cells stay readable, and the answers are as small at version 2,000 as at version 20. Likewise
// the newest 8 updates, which the list shows (a running one is always the newest).
const SOURCES = {
  adapters: "/v1/adapters?limit=20", forgetting: "/v1/forgetting?limit=20&window_limit=20",
  buffer: "/v1/buffer", updates: "/v1/updates?limit=8", privacy: "/v1/privacy",
};
const RENDER = {
  adapters: renderAdapters, forgetting: renderForgetting, buffer: renderBuffer, updates: renderUpdates,
  privacy: renderPrivacy,
};

async function load(names) {
  const results = await Promise.all(names.map(async (name) => {
    const response = await fetch(SOURCES[name]);
    if (!response.ok) throw new Error(`${SOURCES[name]}: ${response.status}`);
    return [name, await response.text()];
  }));
  const changed = [];
  for (const [name, body] of results) {
    if (state.seen[name] === body) continue;  // unchanged: keep the DOM (and any hover) as it is
    state.seen[name] = body;
    state.data[name] = JSON.parse(body);
    RENDER[name](state.data[name]);
    changed.push(name);
  }
  return changed;
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    const changed = await load(["adapters", "buffer", "updates", "privacy"]);
    // The matrix only changes when an update gates a candidate or the live pointer moves, and
    // it is the costliest figure to serve: ask for it only then.
    if (!state.seen.forgetting || changed.includes("adapters") || changed.includes("updates")) await load(["forgetting"]);
    state.lastSync = now();
    $("sync").classList.remove("down");
    tick();
  } catch (error) {
    $("sync").textContent = `offline: ${error.message}; retrying`;
    $("sync").classList.add("down");
  }
  const busy = (state.data.updates || []).some((u) => u.status === "running");
  state.timer = setTimeout(refresh, busy ? POLL_BUSY_MS : POLL_MS);
}

function tick() {
  const adapters = state.data.adapters;
  if (adapters && adapters.live) {
    const since = adapters.live_since || (adapters.adapters.find((a) => a.live) || {}).created_at;
    $("live-age").textContent = since ? `for ${ago(now() - since)}` : "";
  }
  for (const age of document.querySelectorAll("#timeline .age")) age.textContent = `${ago(now() - Number(age.dataset.since))} ago`;
  if (state.lastSync && !$("sync").classList.contains("down")) {
    $("sync").textContent = `updated ${ago(now() - state.lastSync)} ago`;
  }
}

// -- adapters: timeline and gate reports -----------------------------------------------------
function renderAdapters(data) {
  $("live-version").textContent = data.live || "none";
  const items = data.adapters.map((a) => h("li", {},
    h("button", {
      class: `version ${a.gate ? a.verdict : "initial"}${a.live ? " live" : ""}${a.name === state.selected ? " selected" : ""}`,
      type: "button", data: { name: a.name, verdict: a.verdict }, title: a.gate ? a.gate.reason || a.verdict : "initial adapter (never gated)",
      onclick: () => { state.selected = state.selected === a.name ? null : a.name; renderAdapters(state.data.adapters); },
    },
    h("span", { class: "dot" }),
    h("strong", {}, a.name),
    h("span", { class: "verdict" }, a.live ? "live" : a.gate ? a.verdict : "initial"),
    h("small", { class: "age", data: { since: a.created_at } }, `${ago(now() - a.created_at)} ago`),
    h("small", {}, a.windows_trained.length ? `windows ${a.windows_trained.join(", ")}` : "no window"),
    a.overrides.length ? h("small", { class: "override" }, "admin override") : null,
    a.pruned_at !== null ? h("small", {}, "pruned") : null)));
  $("timeline").replaceChildren(h("ol", {}, ...items));
  showGate(state.selected);
}

// The listing summarizes each gate report: the selected version's whole report (every window's
// scores, every check) is asked for on its own, so a page of versions stays small.
async function showGate(name) {
  if (!name) { renderGate(null); return; }
  const result = await api("GET", `/v1/adapters/${encodeURIComponent(name)}`);
  if (state.selected !== name) return;  // another version was selected while this one loaded
  if (result.ok) renderGate(result.data);
  else say(`Gate report of ${name}: ${refusal(result)}`, "error");
}

function renderGate(version) {
  const panel = $("gate");
  if (!version) { panel.hidden = true; return; }
  const g = version.gate;
  const promote = h("button", {
    type: "button", id: "promote",
    onclick: () => act(`Promote ${version.name}`, "POST", `/v1/adapters/${encodeURIComponent(version.name)}/promote`,
      (a) => `${a.name} is live${a.overrides.length ? " (recorded as an admin override)" : ""}.`),
  },
    version.verdict === "rejected" ? `Promote ${version.name} anyway (override)` : `Promote ${version.name}`);
  promote.disabled = version.live || version.pruned_at !== null;  // a pruned version's weights are gone
  const head = h("div", { class: "gate-head" },
    h("h3", {}, `Gate report: ${version.name}`),
    h("span", { class: `pill ${g ? version.verdict : "initial"}` }, g ? version.verdict : "not gated"),
    h("span", { class: "muted" }, version.parent ? `trained from ${version.parent}` : "initial version"),
    promote);
  if (!g) {
    panel.replaceChildren(head, h("p", { class: "muted" }, "The initial adapter is untrained: the gate never judged it."));
    panel.hidden = false;
    return;
  }
  const windows = Object.keys(g.candidate).sort((a, b) => a - b);
  const scores = h("table", { class: "list" },
    h("tr", {}, h("th", {}, "window"), h("th", {}, "candidate"), h("th", {}, "live"), h("th", {}, "base"), h("th", {}, "probes")),
    ...windows.map((w) => h("tr", {},
      h("td", {}, `${w}${g.new_windows.includes(Number(w)) ? " (new)" : ""}`),
      h("td", {}, Charts.pct(g.candidate[w].accuracy)),
      h("td", {}, g.live[w] ? Charts.pct(g.live[w].accuracy) : "–"),
      h("td", {}, g.base && g.base[w] ? Charts.pct(g.base[w].accuracy) : "–"),
      h("td", {}, String(g.candidate[w].n ?? "–")))));
  const checks = h("table", { class: "list" },
    h("tr", {}, h("th", {}, "check"), h("th", {}, "observed"), h("th", {}, "threshold"), h("th", {}, "p"), h("th", {}, "")),
    ...g.checks.map((c) => h("tr", { class: c.passed ? "" : "failed" },
      h("td", { title: c.detail }, c.name), h("td", {}, fixed(c.observed)), h("td", {}, fixed(c.threshold)),
      h("td", {}, c.p_value === null ? "–" : fixed(c.p_value, 4)), h("td", {}, c.passed ? "pass" : "fail"))));
  const canary = g.canary ? h("p", { class: "muted" },
    `Canary loss: candidate ${fixed(g.canary.candidate)}, live ${fixed(g.canary.live)}, base ${fixed(g.canary.base)} nats/token`) : null;
  panel.replaceChildren(head, h("p", { class: "reason" }, g.reason || ""),
    h("div", { class: "grid2 tight" }, scores, checks), replyTable(g), canary);
  panel.hidden = false;
}

// Earlier windows' replies (tickets that carry one): greedy answers' ROUGE-L and answer loss.
function replyTable(g) {
  const windows = Object.keys(g.replies_candidate || {}).sort((a, b) => a - b);
  if (!windows.length) return null;
  const rouge = (r) => (r && r.rouge_l !== null ? fixed(r.rouge_l) : "–");
  return h("table", { class: "list replies" },
    h("tr", {}, h("th", {}, "replies: window"), h("th", {}, "ROUGE-L candidate"), h("th", {}, "live"),
      h("th", {}, "loss candidate"), h("th", {}, "live"), h("th", {}, "probes")),
    ...windows.map((w) => {
      const c = g.replies_candidate[w], l = (g.replies_live || {})[w];
      return h("tr", {}, h("td", {}, w), h("td", {}, rouge(c)), h("td", {}, rouge(l)),
        h("td", {}, fixed(c.loss)), h("td", {}, l ? fixed(l.loss) : "–"), h("td", {}, `${c.answered} / ${c.n}`));
    }));
}

// -- forgetting: heatmap, per-window lines, summary lines ------------------------------------
function renderForgetting(data) {
  const versions = data.versions;
  const rows = versions.map((v) => ({ name: v.name, cls: `${v.verdict}${v.live ? " live" : ""}`, accuracy: v.accuracy,
    trained: v.windows_trained }));
  if (!data.windows.length) {
    $("forgetting-note").textContent = "";
    Charts.placeholder($("heatmap"), "No window measured yet: once tickets have arrived, trigger an update.");
    for (const id of ["window-lines", "summary-lines"]) Charts.placeholder($(id), "Drawn after the first gated update.");
    return;
  }
  const live = versions.find((v) => v.live);
  const s = live && live.summary;
  const shown = data.versions_total > versions.length || data.windows_total > data.windows.length
    ? ` (newest ${versions.length} of ${data.versions_total} versions, ${data.windows.length} of ${data.windows_total} windows)` : "";
  $("forgetting-note").textContent = (s && s.average_accuracy !== null
    ? `live ${live.name}: average accuracy ${Charts.pct(s.average_accuracy)}, forgetting ${signed(s.average_forgetting)}, BWT ${signed(s.backward_transfer)}`
    : "") + shown;
  Charts.heatmap($("heatmap"), rows, data.windows, (row, w) => row.accuracy[String(w)]);
  const names = versions.map((v) => v.name);
  const rejected = versions.map((v) => v.verdict === "rejected");
  Charts.lines($("window-lines"), names, data.windows.map((w, i) => ({
    name: `window ${w}`, colour: Charts.PALETTE[i % Charts.PALETTE.length], hollow: rejected,
    values: versions.map((v) => v.accuracy[String(w)] ?? null),
  })));
  const summary = (key) => versions.map((v) => v.summary[key]);
  const bwt = summary("backward_transfer").filter((v) => typeof v === "number");
  Charts.lines($("summary-lines"), names, [
    { name: "average accuracy", colour: "#1e8449", values: summary("average_accuracy"), hollow: rejected },
    { name: "average forgetting", colour: "#c0392b", values: summary("average_forgetting"), hollow: rejected },
    { name: "backward transfer (BWT)", colour: "#2e86c1", values: summary("backward_transfer"), dashed: true, hollow: rejected },
  ], { yMin: Math.min(0, Math.floor(Math.min(0, ...bwt) * 4) / 4), yMax: 1, height: 190 });
}

// -- updates --------------------------------------------------------------------------------
function renderUpdates(updates) {
  const running = updates.find((u) => u.status === "running");
  $("progress").hidden = !running;
  $("update-state").textContent = running ? `update #${running.id} ${running.stage}` : updates.length ? "idle" : "no update yet in this process";
  if (running) {
    const p = running.progress || {};
    const share = p.steps ? p.step / p.steps : 0;
    $("progress-bar").style.width = `${(share * 100).toFixed(1)}%`;
    const eta = running.stage === "gating" ? "evaluating probes"
      : typeof p.eta_s === "number" ? `${ago(p.eta_s)} of training` : "estimating";
    figures($("progress-figures"), [
      ["stage", running.stage], ...(p.trial ? [["trial", `${p.trial} / ${p.trials}`]] : []),
      ["step", p.steps ? `${p.step} / ${p.steps}` : "–"], ["loss", fixed(p.loss)],
      ["tokens/s", typeof p.tokens_per_s === "number" ? p.tokens_per_s.toFixed(0) : "–"], ["ETA", eta],
      ["running for", ago(now() - running.started_at)]]);
  }
  $("update-list").replaceChildren(
    h("tr", {}, h("th", {}, "#"), h("th", {}, "trigger"), h("th", {}, "status"), h("th", {}, "version"), h("th", {}, "took"), h("th", {}, "reason")),
    ...updates.map((u) => h("tr", { class: u.status },
      h("td", {}, String(u.id)), h("td", {}, u.trigger), h("td", {}, h("span", { class: `pill ${u.status}` }, u.status)),
      h("td", {}, u.version || "–"), h("td", {}, u.finished_at ? ago(u.finished_at - u.started_at) : "…"),
      h("td", { class: "reason", title: u.reason || "" }, u.reason || ""))));
  renderSearch(updates);
}

// The hyperparameter search (`hpo.trials`): the newest search's trials, and each search's winner.
function renderSearch(updates) {
  const searched = updates.filter((u) => u.search).reverse();  // oldest first
  $("search").hidden = !searched.length;
  if (!searched.length) return;
  const last = searched[searched.length - 1].search;
  const accuracy = last.metric === "label_probability";  // between 0 and 1, like an accuracy
  const scale = (values) => {
    const low = Math.min(0, ...values.filter((v) => typeof v === "number"));
    return accuracy ? { yMin: 0, yMax: 1 } : { yMin: Math.floor(low), yMax: 0, step: Math.max(1, -Math.floor(low)) / 4,
      format: (v) => v.toFixed(2) };
  };
  const winner = last.trials.find((t) => t.winner) || {};
  const number = (v) => (Number.isInteger(v) ? String(v) : Math.abs(v) < 0.01 ? v.toExponential(1) : v.toPrecision(3));
  const params = Object.entries(winner.params || {}).map(([k, v]) => `${k} ${number(v)}`).join(", ");
  $("search-caption").textContent = `Update #${searched[searched.length - 1].id}: ${last.trials.length} trials, `
    + `${accuracy ? "mean label probability" : "minus answer loss"} on ${last.validation_rows} held-out training rows (hollow: pruned); winner #${winner.number}: ${params}`;
  const values = last.trials.map((t) => t.value);
  Charts.lines($("search-trials"), last.trials.map((t) => `#${t.number}`),
    [{ name: "validation score", colour: "#2e86c1", values, hollow: last.trials.map((t) => t.pruned) }],
    { ...scale(values), height: 150 });
  const winners = searched.map((u) => (u.search.trials.find((t) => t.winner) || {}).value);
  Charts.lines($("search-winners"), searched.map((u) => `#${u.id}`),
    [{ name: "winner's validation score", colour: "#1e8449", values: winners }], { ...scale(winners), height: 150 });
}

function figures(list, pairs) {
  list.replaceChildren(...pairs.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, String(v)))));
}

// -- buffer ---------------------------------------------------------------------------------
function renderBuffer(b) {
  const closed = b.windows.filter((w) => w.closed).length;
  const dead = Object.values(b.dead_lettered).reduce((a, n) => a + n, 0);
  figures($("buffer-figures"), [
    ["records", b.records.toLocaleString()], ["open window", b.pending.toLocaleString()],
    ["windows closed", closed], ["labels", Object.keys(b.labels).length],
    ["duplicates dropped", b.duplicates_dropped.toLocaleString()], ["evicted", b.evicted.toLocaleString()],
    ["suspect labels", b.suspects], ["dead letters", dead],
    ["consumer lag", b.ingest ? b.ingest.total_lag.toLocaleString() : "no consumer"]]);
  $("buffer-note").textContent = b.ingest ? (b.ingest.paused ? "ingest paused (backpressure)" : `${b.ingest.consumed.toLocaleString()} consumed`) : "Kafka ingestion off";
  const sorted = (o) => Object.entries(o).sort((a, c) => c[1] - a[1]);
  Charts.bars($("labels"), sorted(b.labels).slice(0, 16), "no labelled record yet");
  Charts.bars($("dead-letters"), sorted(b.dead_lettered));
  Charts.bars($("redactions"), sorted(b.redactions));
  Charts.bars($("lag"), b.ingest ? b.ingest.lag.map((p) => [`${p.topic}[${p.partition}]`, p.lag]) : [], b.ingest ? "no partition assigned" : "no consumer");
}

// Shown once updates train privately (`train.privacy`), or ever did.
function renderPrivacy(p) {
  $("privacy-figures").hidden = !p.enabled && p.rounds === 0;
  figures($("privacy-figures"), [
    ["ε spent", p.epsilon_spent.toFixed(2)], ["ε budget", p.epsilon_budget], ["δ", p.delta],
    ["private rounds", p.rounds], ["budget", p.refused ? "spent: updates refused" : "open"]]);
  $("privacy-figures").title = p.refused || "";
}

// -- playground -----------------------------------------------------------------------------
async function classify(event) {
  event.preventDefault();
  const text = $("ticket").value.trim();
  if (!text) { say("Type a ticket first.", "error"); return; }
  $("classification").replaceChildren(h("p", { class: "muted" }, "scoring every label…"));
  const result = await api("POST", "/v1/classify", { text, top_k: 5 });
  if (!result.ok) { $("classification").replaceChildren(h("p", { class: "error" }, refusal(result))); return; }
  const r = result.data;
  const top = h("div", { class: "bars" });
  Charts.bars(top, r.top.map((t) => [t.label, Math.round(t.confidence * 1000) / 10]));
  $("classification").replaceChildren(
    h("p", { class: "label" }, h("strong", { id: "answer-label" }, r.label), ` ${Charts.pct(r.confidence)} confident`),
    h("p", { class: "muted", id: "answer-source" }, r.zero_shot
      ? `zero-shot: ${r.adapter_version} has learned no labels yet, so the base model scored the ${r.candidates} labels the buffer holds; confidence (%):`
      : `answered by ${r.adapter_version} among ${r.candidates} labels (${r.labels_from}); confidence (%):`), top);
}

async function reply() {
  const text = $("ticket").value.trim();
  if (!text) { say("Type a ticket first.", "error"); return; }
  $("chat").replaceChildren(h("p", { class: "muted" }, "generating…"));
  const result = await api("POST", "/v1/chat/completions",
    { model: "live", max_tokens: 48, temperature: 0, messages: [{ role: "user", content: text }] });
  if (!result.ok) { $("chat").replaceChildren(h("p", { class: "error" }, refusal(result))); return; }
  const c = result.data;
  $("chat").replaceChildren(h("blockquote", { id: "answer-reply" }, c.choices[0].message.content || "(empty reply)"),
    h("p", { class: "muted" }, `${c.model}, ${c.usage.completion_tokens} tokens, ${c.choices[0].finish_reason}`));
}

// -- admin key ------------------------------------------------------------------------------
function renderKey() {
  const has = Boolean(sessionStorage.getItem(KEY));
  $("key-state").textContent = has ? "key set for this tab" : "no key: read-only";
  $("key-forget").hidden = !has;
  $("admin-key").value = "";
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (key) sessionStorage.setItem(KEY, key);
    renderKey();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); renderKey(); });
  $("trigger-update").addEventListener("click", () => act("Trigger update", "POST", "/v1/updates",
    (u) => `Update #${u.id} started: the open window closes and a candidate trains.`));
  $("rollback").addEventListener("click", () => act("Roll back", "POST", "/v1/rollback",
    (a) => `Rolled back: ${a.name} is live again.`));
  $("play-form").addEventListener("submit", classify);
  $("reply").addEventListener("click", reply);
  renderKey();
  refresh();
  setInterval(tick, 1000);
}

document.addEventListener("DOMContentLoaded", start);
