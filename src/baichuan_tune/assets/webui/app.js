"use strict";
// The baichuan-tune browser UI. Chat talks to this server's own OpenAI-compatible API (/v1, streamed as
// server-sent events); Runs reads the training runs through /ui/api and draws their curves as SVG.
// Plain JavaScript with no library: nothing is loaded from anywhere but this server. Text from the
// model or a run is always set as text, never parsed as HTML.

const $ = (selector) => document.querySelector(selector);
const KEY_STORE = "baichuan-tune.api-key";  // sessionStorage: this tab only, never sent with the page
const LIST_POLL_MS = 5000;
const RUN_POLL_MS = 2000;
const PALETTE = ["#1f6feb", "#e36209", "#1a7f37", "#8250df", "#cf222e", "#0a7ea4"];
const SAMPLING = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"];

const state = {info: null, defaultsShown: false};
const chat = {messages: [], busy: false, controller: null, epoch: 0};  // epoch: bumped by Clear
const runs = {selected: null, records: [], logId: "", shown: {}, started: false};

// ----------------------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;  // through the CSSOM: the page's CSP refuses style attributes
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function fmt(value) {
  if (typeof value !== "number") return value === null || value === undefined ? "–" : String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e7) return String(value);
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) return Number(value.toPrecision(3)).toExponential();
  return String(Number(value.toPrecision(4)));
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

function notice(text, isError) {
  const box = $("#notice");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
}

// ----------------------------------------------------------------------------- the API

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const key = $("#api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

async function api(path, options) {
  const opts = Object.assign({}, options);
  opts.headers = authHeaders(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    notice("This server needs its API key: enter it at the top right.", true);
    $("#api-key").focus();
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (err) {
    return `HTTP ${response.status}`;
  }
}

async function getJSON(path) {
  const response = await api(path);
  if (!response.ok) throw Object.assign(new Error(await errorText(response)), {status: response.status});
  return response.json();
}

async function load() {
  try {
    const [info, models] = await Promise.all([getJSON("api/info"), getJSON("../v1/models")]);
    state.info = info;
    const select = $("#model");
    const chosen = select.value;
    select.replaceChildren(...models.data.map((m) => el("option", {value: m.id}, m.id)));
    if (models.data.some((m) => m.id === chosen)) select.value = chosen;
    if (!state.defaultsShown) showDefaults();
    $("#system").disabled = !info.system_prompt;
    $("#system-note").hidden = info.system_prompt;
    $("#served").textContent = `${models.data.map((m) => m.id).join(", ")} · ${info.format} chat format · ` +
      `context ${info.context} tokens`;
    notice("");
    document.body.dataset.ready = "true";
    startRuns();
  } catch (err) {
    if (err.status !== 401) notice(`Cannot reach the server: ${err.message}`, true);
  }
}

// ----------------------------------------------------------------------------- chat

function showDefaults() {
  for (const [key, value] of Object.entries(state.info.defaults)) {
    $("#" + key).value = value === null || value === undefined ? "" : value;
  }
  state.defaultsShown = true;
}

function readNumber(id) {
  const text = $("#" + id).value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : undefined;  // a fraction for an integer field: the server says so
}

function requestBody() {
  const messages = [];
  const system = $("#system").value;
  if (state.info && state.info.system_prompt && system.trim()) messages.push({role: "system", content: system});
  for (const m of chat.messages) messages.push({role: m.role, content: m.content});
  const body = {model: $("#model").value, messages, stream: true, stream_options: {include_usage: true}};
  for (const key of SAMPLING) {
    const value = readNumber(key);
    if (value !== undefined) body[key] = value;
  }
  const seed = readNumber("seed");
  if (seed !== undefined) body.seed = seed;
  return body;
}

function addMessage(role, text) {
  $("#empty-chat").hidden = true;
  const view = el("div", {class: `message ${role}`},
    el("div", {class: "role"}, role === "user" ? "You" : "Assistant"), el("div", {class: "text"}, text),
    el("div", {class: "meta"}));
  $("#messages").append(view);
  view.scrollIntoView({block: "end"});
  return view;
}

function setBusy(busy) {
  chat.busy = busy;
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
  $("#regenerate").disabled = busy || chat.messages.length === 0;
}

// Server-sent events: "data: {...}" lines, events separated by a blank line, then "data: [DONE]".
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function generate() {
  const body = requestBody();
  const view = addMessage("assistant", "");
  const text = view.querySelector(".text");
  const reply = {role: "assistant", content: ""};
  let usage = null, finish = null;
  const epoch = chat.epoch;
  view.dataset.state = "streaming";
  chat.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  try {
    const response = await api("../v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), headers: {"Content-Type": "application/json"},
      signal: chat.controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply.content += choice.delta.content;
        text.textContent = reply.content;
        view.scrollIntoView({block: "end"});
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (epoch === chat.epoch) chat.messages.push(reply);
    view.dataset.state = "done";
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    view.querySelector(".meta").textContent = [tokens !== null ? `${tokens} tokens` : null,
      tokens ? `${(tokens / seconds).toFixed(1)} tokens/s` : null, finish === "length" ? "stopped at max new tokens" : null]
      .filter(Boolean).join(" · ");
  } catch (err) {
    if (err.name === "AbortError") {
      if (reply.content && epoch === chat.epoch) chat.messages.push(reply);
      view.dataset.state = "stopped";
      view.querySelector(".meta").textContent = "stopped";
    } else {
      view.dataset.state = "error";
      text.textContent = err.message;
    }
  } finally {
    chat.controller = null;
    setBusy(false);
  }
}

function send(event) {
  event.preventDefault();
  const prompt = $("#prompt").value;
  if (chat.busy || !prompt.trim() || !state.info) return;
  chat.messages.push({role: "user", content: prompt});
  addMessage("user", prompt);
  $("#prompt").value = "";
  generate();
}

function regenerate() {
  if (chat.busy || chat.messages.length === 0) return;
  const views = [...document.querySelectorAll("#messages .message")];
  const last = views[views.length - 1];
  if (chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (last && last.classList.contains("assistant")) last.remove();  // the old answer (or its error)
  generate();
}

function clearChat() {
  chat.epoch++;
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  for (const view of document.querySelectorAll("#messages .message")) view.remove();
  $("#empty-chat").hidden = false;
  setBusy(false);
}

// ----------------------------------------------------------------------------- runs: list

function encodeName(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

function startRuns() {
  if (runs.started) return;
  runs.started = true;
  const loop = (work, ms) => async () => {
    if (!document.hidden && !$("#page-runs").hidden) await work().catch((err) => notice(err.message, true));
    setTimeout(loop(work, ms), ms);
  };
  loop(refreshList, LIST_POLL_MS)();
  setTimeout(loop(refreshRun, RUN_POLL_MS), RUN_POLL_MS);
}

async function refreshList() {
  const data = await getJSON("api/runs");
  $("#runs-root").textContent = data.root === null ? "No runs folder given (--runs)." :
    data.exists ? `Runs in ${data.root}` : `${data.root} does not exist yet; runs appear here when it does.`;
  const items = data.runs.map((run) => {
    const item = el("li", {"data-name": run.name, class: run.name === runs.selected ? "selected" : ""},
      el("div", {class: "name"}, run.name),
      el("div", {class: "sub"}, badges(run), `step ${run.step}`,
        ...Object.entries(run.last).map(([k, v]) => ` · ${k} ${fmt(v)}`), ` · ${ago(run.updated)}`));
    item.addEventListener("click", () => { location.hash = "#runs/" + encodeName(run.name); });
    return item;
  });
  $("#run-list").replaceChildren(...items);
  if (!data.runs.length) $("#run-list").append(el("li", {class: "muted"}, "No training runs found."));
}

function badges(run) {
  return [run.kind ? el("span", {class: "badge"}, run.kind) : null,
    el("span", {class: "badge " + run.status.replace(" ", "-")}, run.status)];
}

// ----------------------------------------------------------------------------- runs: one run

function openRun(name) {
  if (name === runs.selected) return;
  runs.selected = name;
  runs.records = [];
  runs.logId = "";
  runs.shown = {};
  for (const item of document.querySelectorAll("#run-list li")) {
    item.classList.toggle("selected", item.dataset.name === name);
  }
  const detail = $("#run-detail");
  detail.replaceChildren(el("div", {id: "run-head"}), el("div", {class: "charts", id: "charts"}),
    el("details", {id: "more-charts"}, el("summary"), el("div", {class: "charts", id: "other-charts"})),
    el("div", {id: "run-results"}), el("div", {id: "run-evals"}), el("div", {id: "run-checkpoints"}),
    el("div", {id: "run-outputs"}), el("div", {id: "run-config"}));
  detail.dataset.run = name;
  refreshRun().catch((err) => notice(err.message, true));
}

async function refreshRun() {
  const name = runs.selected;
  if (!name) return;
  const data = await getJSON(`api/runs/${encodeName(name)}?since=${runs.records.length}` +
    `&log=${encodeURIComponent(runs.logId)}`);
  if (name !== runs.selected) return;  // another run was chosen meanwhile
  const changed = data.reset || data.records.length > 0;
  if (changed && runs.records.length) refreshList().catch(() => {});  // the list shows the new step too
  runs.records = data.reset ? data.records : runs.records.concat(data.records);
  runs.logId = data.log_id;
  renderHead(data);
  if (changed || !runs.shown.charts) renderCharts(runs.records);
  renderOnce("results", data.results, renderResults);
  renderOnce("evaluations", data.evaluations, renderEvaluations);
  renderOnce("checkpoints", data.checkpoints, renderCheckpoints);
  renderOnce("outputs", data.outputs, renderOutputs);
  renderOnce("config", data.config_text, renderConfig);
  $("#run-detail").dataset.records = runs.records.length;
}

function renderOnce(part, value, render) {
  const key = JSON.stringify(value === undefined ? null : value);
  if (runs.shown[part] === key) return;  // unchanged: keep the reader's scroll and selection
  runs.shown[part] = key;
  render(value);
}

function renderHead(run) {
  const steps = run.max_steps > 0 ? `step ${run.step} of ${run.max_steps}` : `step ${run.step}`;
  $("#run-head").replaceChildren(el("h2", {}, run.name),
    el("div", {class: "run-sub"}, badges(run), run.finetuning_type ? el("span", {class: "badge"}, run.finetuning_type) : null,
      `${steps} · updated ${ago(run.updated)}`, run.model ? ` · model ${run.model}` : null),
    el("div", {class: "muted small run-path"}, run.path));
}

function section(id, title, ...content) {
  $("#" + id).replaceChildren(...(content.length ? [el("h3", {}, title), ...content] : []));
}

function table(headings, rows) {
  return el("table", {}, headings ? el("tr", {}, headings.map((h) => el("th", {}, h))) : null,
    rows.map((row) => el("tr", {}, row.map((cell) => el("td", {class: typeof cell === "number" ? "num" : ""},
      typeof cell === "number" ? fmt(cell) : cell)))));
}

function renderResults(results) {
  if (!results || typeof results !== "object") return section("run-results", "Results");
  section("run-results", "Results (train_results.json)",
    table(null, Object.entries(results).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v])));
}

function renderEvaluations(evals) {
  if (!evals || !evals.length) return section("run-evals", "Evaluations");
  section("run-evals", "Evaluations (baichuan-tune eval)", table(["folder", "task", "split", "shots", "accuracy %", "questions", "perplexity"],
    evals.map((e) => [e.path, e.task, e.split, e.n_shot, e.accuracy, e.questions, e.perplexity])));
}

function renderCheckpoints(list) {
  if (!list || !list.length) return section("run-checkpoints", "Checkpoints");
  section("run-checkpoints", "Checkpoints (resume with --resume true)", table(["folder", "step", "epoch", "size", "saved"],
    list.map((c) => [c.name, c.step, c.epoch, bytes(c.bytes), new Date(c.saved * 1000).toLocaleString()])));
}

function renderOutputs(out) {
  if (!out || !out.files.length) return section("run-outputs", "Result");
  section("run-outputs", "Result", table(["file", "size"], out.files.map((f) => [f.name, bytes(f.bytes)])),
    out.chat_command ? el("p", {}, "Chat with it: ", el("code", {}, out.chat_command)) : null);
}

function renderConfig(text) {
  if (!text) return section("run-config", "Config");
  section("run-config", "Config (config.yaml)", el("pre", {}, text));
}

// ----------------------------------------------------------------------------- curves

// Curves in the order a reader looks for them; every other numeric field gets its own chart below.
const CHARTS = [
  {title: "Loss", keys: ["loss", "eval_loss"]},
  {title: "Learning rate", keys: ["lr"]},
  {title: "Throughput", keys: ["tokens_per_s", "rollout_tokens_per_s", "pairs_per_s"]},
  {title: "GPU memory (GiB)", keys: ["memory_gib", "max_memory_gib"]},
  {title: "Reward", keys: ["reward", "eval_reward"]},
  {title: "KL", keys: ["kl"]},
  {title: "Accuracy", keys: ["accuracy", "eval_accuracy"]},
  {title: "Margin", keys: ["margin", "eval_margin"]},
  {title: "Gradient norm", keys: ["grad_norm"]},
];
const NOT_CURVES = new Set(["step", "epoch", "elapsed"]);

function points(records, key) {
  return records.filter((r) => typeof r[key] === "number" && Number.isFinite(r[key]) && typeof r.step === "number")
    .map((r) => [r.step, r[key]]);
}

function renderCharts(records) {
  const numeric = [];
  for (const r of records) {
    for (const [k, v] of Object.entries(r)) if (typeof v === "number" && !NOT_CURVES.has(k) && !numeric.includes(k)) numeric.push(k);
  }
  const used = new Set();
  const main = CHARTS.map((c) => ({title: c.title, keys: c.keys.filter((k) => numeric.includes(k))}))
    .filter((c) => c.keys.length);
  main.forEach((c) => c.keys.forEach((k) => used.add(k)));
  const others = numeric.filter((k) => !used.has(k)).map((k) => ({title: k, keys: [k]}));
  $("#charts").replaceChildren(...main.map((c) => drawChart(c.title, c.keys, records)));
  if (!main.length) $("#charts").append(el("p", {class: "muted"}, "Nothing logged yet."));
  $("#other-charts").replaceChildren(...others.map((c) => drawChart(c.title, c.keys, records)));
  $("#more-charts").hidden = !others.length;
  $("#more-charts summary").textContent = `${others.length} more logged values`;
  runs.shown.charts = true;
}

function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / magnitude;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * magnitude;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function bounds(values, pad) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) {
    const d = Math.abs(lo) * 0.1 || 1;
    return [lo - d, hi + d];
  }
  return [lo - (hi - lo) * pad, hi + (hi - lo) * pad];
}

function drawChart(title, keys, records) {
  const W = 460, H = 190, L = 56, R = 12, T = 10, B = 24;
  const series = keys.map((key, i) => ({key, color: PALETTE[i % PALETTE.length], points: points(records, key)}))
    .filter((s) => s.points.length);
  const all = series.flatMap((s) => s.points);
  const [x0, x1] = bounds(all.map((p) => p[0]), 0);
  const [y0, y1] = bounds(all.map((p) => p[1]), 0.06);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  for (const t of niceTicks(y0, y1, 4)) {
    root.append(svg("line", {class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t)}));
    const label = svg("text", {x: L - 6, y: sy(t) + 3, "text-anchor": "end"});
    label.textContent = fmt(t);
    root.append(label);
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    const label = svg("text", {x: sx(t), y: H - 8, "text-anchor": "middle"});
    label.textContent = t;
    root.append(label, svg("line", {class: "axis", x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4}));
  }
  root.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  for (const s of series) {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    root.append(svg("path", {class: "line", d, stroke: s.color, "data-key": s.key, "data-points": s.points.length}));
    if (s.key.startsWith("eval_") || s.points.length === 1) {
      for (const p of s.points) root.append(svg("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.8, fill: s.color}));
    }
  }
  hover(root, series, sx, sy, {W, H, L, R, T, B});
  const legend = el("div", {class: "legend"}, series.map((s) => el("span", {},
    el("i", {style: `background:${s.color}`}), `${s.key} ${fmt(s.points[s.points.length - 1][1])}`)));
  return el("div", {class: "chart", "data-title": title}, el("div", {class: "title"}, title), legend, root);
}

// A dashed line at the step under the pointer, with every series' value at that step.
function hover(root, series, sx, sy, box) {
  const steps = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const cursor = svg("line", {class: "cursor", y1: box.T, y2: box.H - box.B, visibility: "hidden"});
  const tip = svg("g", {visibility: "hidden"});
  const area = svg("rect", {x: box.L, y: box.T, width: box.W - box.L - box.R, height: box.H - box.T - box.B,
                            fill: "transparent"});
  root.append(cursor, tip, area);
  area.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); tip.setAttribute("visibility", "hidden"); });
  area.addEventListener("mousemove", (event) => {
    const rect = root.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width * box.W;
    const step = steps.reduce((best, s) => Math.abs(sx(s) - x) < Math.abs(sx(best) - x) ? s : best, steps[0]);
    const lines = [`step ${step}`];
    for (const s of series) {
      const p = s.points.find((q) => q[0] === step);
      if (p) lines.push(`${s.key} ${fmt(p[1])}`);
    }
    cursor.setAttribute("x1", sx(step));
    cursor.setAttribute("x2", sx(step));
    cursor.setAttribute("visibility", "visible");
    const width = 12 + 6.2 * Math.max(...lines.map((l) => l.length));
    const left = sx(step) + width + 8 > box.W ? sx(step) - width - 6 : sx(step) + 6;
    tip.replaceChildren(svg("rect", {class: "tipbox", x: left, y: box.T, width, height: 8 + 14 * lines.length, rx: 4}),
      ...lines.map((line, i) => {
        const text = svg("text", {class: "tip", x: left + 6, y: box.T + 16 + 14 * i});
        text.textContent = line;
        return text;
      }));
    tip.setAttribute("visibility", "visible");
  });
}

// ----------------------------------------------------------------------------- pages

function route() {
  const hash = location.hash.slice(1) || "chat";
  const cut = hash.indexOf("/");
  const page = cut < 0 ? hash : hash.slice(0, cut);
  const onRuns = page === "runs";
  $("#page-chat").hidden = onRuns;
  $("#page-runs").hidden = !onRuns;
  $("#tab-chat").classList.toggle("active", !onRuns);
  $("#tab-runs").classList.toggle("active", onRuns);
  if (onRuns) {
    if (state.info) refreshList().catch((err) => notice(err.message, true));
    if (cut >= 0) openRun(decodeURIComponent(hash.slice(cut + 1)));
  }
}

function start() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  const useKey = (event) => {
    if (event) event.preventDefault();
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    load();
  };
  key.addEventListener("change", useKey);
  $("#key-form").addEventListener("submit", useKey);  // Enter in the key field: no page reload
  $("#composer").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("#stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#regenerate").addEventListener("click", regenerate);
  $("#clear").addEventListener("click", clearChat);
  $("#defaults").addEventListener("click", () => state.info && showDefaults());
  window.addEventListener("hashchange", route);
  route();
  load();
}

start();
