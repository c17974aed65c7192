// lorakit ui: one page, four views (#runs, #adapters, #playground, #launch), plain DOM + uPlot (vendored).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const page = () => $("#page");
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7f8a", "#e16f24", "#57606a"];
const POLL_MS = 1500;
let timers = [];   // intervals of the current view, cleared on navigation
let charts = [];   // uPlot instances of the current view
let info = null;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(digits);
  return String(v);
}
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KB", "MB", "GB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw new Error(body.error?.message || body.error || JSON.stringify(body));
  return body;
}
function badge(status) { return `<span class="badge ${esc(status)}">${esc(status)}</span>`; }

function clearView() {
  timers.forEach(clearInterval); timers = [];
  charts.forEach(c => c.destroy()); charts = [];
}

// ------------------------------------------------------------------------------------------------ charts
const PANELS = [
  {title: "loss", keys: ["loss", "eval_loss"]},
  {title: "eval metric", keys: ["eval_ppl", "accuracy", "exact_match"]},
  {title: "learning rate", keys: ["lr"]},
  {title: "grad norm", keys: ["grad_norm"]},
  {title: "tokens/s", keys: ["tokens_per_s"]},
];

function tick(v) {  // axis labels: enough digits to tell ticks apart (a learning rate of 2e-4 decaying to 1.9e-4)
  if (v === null) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : String(+v.toPrecision(4));
}

// Draw every panel for `runs` ({name: metrics}); x is "step" or "wall". Returns the number of loss points per run.
function drawCharts(container, runs, xKey) {
  charts.forEach(c => c.destroy()); charts = [];
  container.innerHTML = "";
  const names = Object.keys(runs);
  for (const panel of PANELS) {
    const tables = [], series = [{label: xKey === "step" ? "step" : "wall time (s)"}];
    names.forEach((name, ri) => {
      const m = runs[name];
      for (const key of panel.keys) {
        if (!m[key]) continue;
        const xs = [], ys = [];
        m[xKey].forEach((x, i) => { if (x !== null && m[key][i] !== null) { xs.push(x); ys.push(m[key][i]); } });
        if (!xs.length) continue;
        tables.push([xs, ys]);
        series.push({label: names.length > 1 ? `${name} ${key}` : key, stroke: COLORS[(ri * 2 + panel.keys.indexOf(key)) % COLORS.length],
                     width: 1.5, spanGaps: true, points: {show: xs.length < 60}, dash: key.startsWith("eval") ? [6, 3] : undefined});
      }
    });
    if (!tables.length) continue;
    const div = document.createElement("div");
    div.className = "chart";
    div.dataset.panel = panel.title;
    div.innerHTML = `<div class="title">${esc(panel.title)}</div>`;
    container.appendChild(div);
    const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
    const width = Math.max(400, div.clientWidth - 12);
    charts.push(new uPlot({width, height: 220, series, scales: {x: {time: false}},
                           axes: [{label: series[0].label}, {size: 64, values: (u, ticks) => ticks.map(tick)}],
                           cursor: {drag: {x: true, y: false}}}, data, div));   // drag to zoom, double-click resets
  }
  if (!container.children.length) container.innerHTML = `<p class="muted">No metrics yet.</p>`;
}

// ------------------------------------------------------------------------------------------------ runs
async function runsView() {
  page().innerHTML = `
    <h2>Runs <span class="muted">in ${esc(info.runs_dir)}</span></h2>
    <table id="runs-table"><thead><tr><th></th><th>run</th><th>status</th><th class="num">step</th>
      <th class="num">loss</th><th class="num">trainable params</th><th class="num">adapter</th>
      <th class="num">peak memory</th><th>resume</th></tr></thead><tbody></tbody></table>
    <div class="toolbar"><span>x axis:</span>
      <label><input type="radio" name="x" value="step" checked> step</label>
      <label><input type="radio" name="x" value="wall"> wall time</label>
      <span class="muted">tick runs to overlay them; drag on a chart to zoom, double-click to reset</span></div>
    <div class="charts" id="charts"></div>`;
  const selected = new Set();
  let first = true, x = "step", last = "";
  page().querySelectorAll("input[name=x]").forEach(r => r.onchange = () => { x = r.value; last = ""; refresh(); });
  async function refresh() {
    const runs = await api("/api/runs");
    if (first) { runs.forEach(r => selected.add(r.name)); first = false; }
    $("#runs-table tbody").innerHTML = runs.map(r => `
      <tr data-run="${esc(r.name)}" data-status="${esc(r.status)}">
        <td><input type="checkbox" ${selected.has(r.name) ? "checked" : ""} data-pick="${esc(r.name)}"></td>
        <td><a href="#runs/${encodeURIComponent(r.name)}">${esc(r.name)}</a><div class="muted" title="${esc(r.model || "")}">${esc((r.model || "").split("/").filter(Boolean).pop() || "")}</div></td>
        <td>${badge(r.status)}<div class="muted">${esc(r.why)}</div></td>
        <td class="num">${fmt(r.step)}${r.max_steps ? " / " + fmt(r.max_steps) : ""}</td>
        <td class="num">${fmt(r.last_loss)}</td>
        <td class="num">${fmt(r.trainable_params)}${r.trainable_pct != null ? ` (${fmt(r.trainable_pct, 3)}%)` : ""}</td>
        <td class="num">${bytes(r.adapter_bytes)}</td>
        <td class="num">${r.peak_memory_mb != null ? fmt(r.peak_memory_mb) + " MB" : "—"}</td>
        <td>${r.resume ? `<code class="cmd">${esc(r.resume)}</code>` : ""}</td></tr>`).join("")
      || `<tr><td colspan="9" class="muted">No run folders yet: start one with <code>lorakit train</code> or the Launch page.</td></tr>`;
    page().querySelectorAll("[data-pick]").forEach(c => c.onchange = () => {
      c.checked ? selected.add(c.dataset.pick) : selected.delete(c.dataset.pick); last = ""; refresh(); });
    const metrics = {};
    for (const r of runs.filter(r => selected.has(r.name))) metrics[r.name] = await api(`/api/runs/${encodeURIComponent(r.name)}/metrics`);
    const key = JSON.stringify(metrics) + x;
    if (key !== last) { last = key; drawCharts($("#charts"), metrics, x); }
    for (const [name, m] of Object.entries(metrics)) {
      const row = page().querySelector(`tr[data-run="${CSS.escape(name)}"]`);
      if (row) row.dataset.points = (m.loss || []).filter(v => v !== null).length;
    }
  }
  await refresh();
  timers.push(setInterval(() => refresh().catch(showError), POLL_MS));
}

async function runView(name) {
  page().innerHTML = `<p><a href="#runs">← all runs</a></p><div id="run-head"></div>
    <div class="toolbar"><span>x axis:</span>
      <label><input type="radio" name="x" value="step" checked> step</label>
      <label><input type="radio" name="x" value="wall"> wall time</label>
      <span class="muted" id="wall-note"></span></div>
    <div class="charts" id="charts" data-run="${esc(name)}"></div>
    <div class="grid2"><div><h3>Resolved config (config.yaml)</h3><pre id="config"></pre></div>
      <div><h3>Summary</h3><div id="summary"></div><h3>Launch log</h3><pre id="log" class="muted">—</pre></div></div>`;
  let x = "step", last = "";
  page().querySelectorAll("input[name=x]").forEach(r => r.onchange = () => { x = r.value; last = ""; refresh(); });
  async function refresh() {
    const [run, m] = await Promise.all([api(`/api/runs/${encodeURIComponent(name)}`),
                                        api(`/api/runs/${encodeURIComponent(name)}/metrics`)]);
    $("#run-head").innerHTML = `<h2>${esc(run.name)} ${badge(run.status)}</h2>
      <p class="muted">${esc(run.path)} — ${esc(run.why)}</p>
      <p>step <b id="run-step">${fmt(run.step)}</b>${run.max_steps ? " / " + fmt(run.max_steps) : ""} ·
         checkpoints: ${run.checkpoints.length ? run.checkpoints.join(", ") : "none"} ·
         trainable params: ${fmt(run.trainable_params)} · adapter: ${bytes(run.adapter_bytes)} ·
         peak memory: ${run.peak_memory_mb != null ? fmt(run.peak_memory_mb) + " MB" : "—"}</p>
      ${run.resume ? `<p>Stopped; continue it with <code class="cmd" id="resume-cmd">${esc(run.resume)}</code></p>` : ""}
      ${["running", "starting"].includes(run.status) && run.why.includes("this page")
        ? `<p><button id="stop">Stop (Ctrl-C: checkpoint, then exit)</button></p>` : ""}
      ${run.adapter ? `<p>Adapter: <a href="#adapters/${encodeURIComponent("run:" + run.name + "/adapter")}">${esc(run.adapter)}</a></p>` : ""}`;
    const stop = $("#stop");
    if (stop) stop.onclick = () => api(`/api/runs/${encodeURIComponent(name)}/stop`, {method: "POST",
      headers: {"Content-Type": "application/json"}, body: "{}"}).catch(showError);
    $("#config").textContent = run.config_yaml || "—";
    $("#summary").innerHTML = run.summary ? `<table>${Object.entries(run.summary).map(([k, v]) =>
      `<tr><td>${esc(k)}</td><td class="num">${esc(fmt(v))}</td></tr>`).join("")}</table>` : `<p class="muted">no summary.json yet</p>`;
    if (run.log_tail) $("#log").textContent = run.log_tail;
    $("#wall-note").textContent = m.wall_estimated ? "(wall time estimated from file times)" : "";
    const key = JSON.stringify(m) + x;
    if (key !== last) { last = key; drawCharts($("#charts"), {[name]: m}, x); }
    $("#charts").dataset.points = (m.loss || []).filter(v => v !== null).length;
  }
  await refresh();
  timers.push(setInterval(() => refresh().catch(showError), POLL_MS));
}

// ------------------------------------------------------------------------------------------------ adapters
async function adaptersView() {
  const list = await api("/api/adapters");
  page().innerHTML = `<h2>Adapters <span class="muted">in ${esc(info.adapters_dir)} and the runs</span></h2>
    <table id="adapters-table"><thead><tr><th>adapter</th><th class="num">r</th><th class="num">alpha</th><th>targets</th>
      <th>base</th><th class="num">size</th><th>eval results</th></tr></thead><tbody>${list.map(a => `
      <tr data-adapter="${esc(a.id)}"><td><a href="#adapters/${encodeURIComponent(a.id)}">${esc(a.id)}</a></td>
        <td class="num">${fmt(a.r)}</td><td class="num">${fmt(a.alpha)}</td><td>${esc(JSON.stringify(a.target_modules))}</td>
        <td>${esc(a.base_model || "—")}</td><td class="num">${bytes(a.size_bytes)}</td>
        <td>${a.results ? "yes" : "—"}</td></tr>`).join("")
      || `<tr><td colspan="7" class="muted">No adapter folders found.</td></tr>`}</tbody></table>`;
}

async function adapterView(ident) {
  page().innerHTML = `<p><a href="#adapters">← all adapters</a></p><div id="adapter-head">loading…</div>`;
  const a = await api(`/api/adapters/${encodeURIComponent(ident)}`);
  $("#adapter-head").innerHTML = `<h2 id="adapter-title">${esc(a.id)}</h2><p class="muted">${esc(a.path)}</p>
    <p>Base: <b>${esc(a.base_model || "unknown")}</b> ${a.base_model_class ? `(${esc(a.base_model_class)})` : ""} ·
       fingerprint ${a.base_sha256 ? `<code>${esc(a.base_sha256.slice(0, 16))}…</code> over ${a.fingerprint_modules} modules` : "none"} ·
       size ${bytes(a.size_bytes)} (weights ${bytes(a.weights_bytes)})</p>
    <p>Matches the loaded base${info.base ? ` (<b>${esc(info.base)}</b>)` : ""}: <span id="base-match" class="muted">checking…</span></p>
    <div class="grid2"><div><h3>Per-layer ‖ΔW‖ and effective rank</h3><div id="layers" class="muted">computing…</div></div>
      <div><h3>Config</h3><pre>${esc(JSON.stringify(a.config, null, 2) || a.problem)}</pre>
        <h3>Eval results</h3>${a.results ? `<pre>${esc(JSON.stringify(a.results, null, 2))}</pre>` : `<p class="muted">no results.json</p>`}</div></div>`;
  api(`/api/adapters/${encodeURIComponent(ident)}/base`).then(m => {
    const cls = m.match === true ? "yes" : m.match === false ? "no" : "unknown";
    $("#base-match").className = "";
    $("#base-match").innerHTML = `${badge(cls === "yes" ? "yes" : cls === "no" ? "no" : "unknown")} <span class="muted">${esc(m.detail)}</span>`;
    $("#base-match").dataset.match = cls;
  }).catch(e => { $("#base-match").textContent = e.message; });
  api(`/api/adapters/${encodeURIComponent(ident)}/analysis`).then(rows => {
    const top = Math.max(...rows.map(r => r.delta_norm), 1e-12);
    $("#layers").className = "";
    $("#layers").innerHTML = `<table id="layers-table"><thead><tr><th>module</th><th class="num">r</th><th>‖ΔW‖<sub>F</sub></th>
      <th class="num">effective rank</th></tr></thead><tbody>${rows.map(r => `<tr><td>${esc(r.module)}</td>
      <td class="num">${r.r}</td><td><span class="bar" style="width:${Math.round(120 * r.delta_norm / top)}px"></span>
      ${fmt(r.delta_norm, 3)}</td><td class="num">${fmt(r.effective_rank, 3)}</td></tr>`).join("")}</tbody></table>`;
  }).catch(e => { $("#layers").innerHTML = `<div class="error">${esc(e.message)}</div>`; });
}

// ------------------------------------------------------------------------------------------------ playground
// Each column is one streamed request to lorakit serve's own endpoint (mounted at /serve), so the page shows
// exactly what the server answers.
const history = {};  // chat mode: model id -> messages so far
function playgroundView() {
  if (!info.base) {
    page().innerHTML = `<h2>Playground</h2><p class="error">No base model loaded: start <code>lorakit ui --model MODEL</code>
      to compare the base and its adapters here.</p>`;
    return;
  }
  const options = `<option value="">—</option>` + info.servable.map(n => `<option>${esc(n)}</option>`).join("");
  page().innerHTML = `<h2>Playground <span class="muted">base ${esc(info.base)}; adapters from ${esc(info.adapters_dir)}</span></h2>
    <textarea id="prompt" rows="3" placeholder="Type a prompt"></textarea>
    <div class="toolbar">
      ${[0, 1, 2, 3].map(i => `<label>adapter ${i + 1} <select class="pick" id="pick-${i}">${options}</select></label>`).join("")}
    </div>
    <div class="toolbar">
      <label><input type="radio" name="mode" value="greedy" checked> greedy</label>
      <label><input type="radio" name="mode" value="sample"> sampled:</label>
      <label>temperature <input type="number" id="temperature" value="0.8" step="0.1" min="0" max="2" style="width:70px"></label>
      <label>top-p <input type="number" id="top_p" value="0.95" step="0.05" min="0.05" max="1" style="width:70px"></label>
      <label>seed <input type="number" id="seed" value="0" style="width:70px"></label>
      <label>max tokens <input type="number" id="max_tokens" value="32" min="1" style="width:70px"></label>
      <label title="keep each column's conversation"><input type="checkbox" id="chat" ${info.chat_template ? "" : "disabled"}> chat</label>
      <button class="primary" id="run">Generate</button> <button id="reset">New conversation</button>
    </div>
    <div class="answers" id="answers"></div>`;
  info.servable.slice(0, 4).forEach((n, i) => { $(`#pick-${i}`).value = n; });
  $("#reset").onclick = () => { for (const k in history) delete history[k]; $("#answers").innerHTML = ""; };
  $("#run").onclick = generateAll;
  $("#prompt").addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generateAll(); });
}

async function generateAll() {
  const prompt = $("#prompt").value;
  if (!prompt.trim()) { showError(new Error("Type a prompt first.")); return; }
  const models = [info.base, ...[0, 1, 2, 3].map(i => $(`#pick-${i}`).value).filter(Boolean)];
  const unique = [...new Set(models)];
  const sampled = page().querySelector("input[name=mode]:checked").value === "sample";
  const params = {max_tokens: Number($("#max_tokens").value), temperature: sampled ? Number($("#temperature").value) : 0,
                  stream: true};
  if (sampled) { params.top_p = Number($("#top_p").value); params.seed = Number($("#seed").value); }
  const box = $("#answers");
  box.innerHTML = unique.map(m => `<div class="answer" data-model="${esc(m)}" data-done="0">
    <div class="who">${esc(m)}${m === info.base ? " (base)" : ""}</div><div class="text"></div><div class="meta"></div></div>`).join("");
  $("#run").disabled = true;
  await Promise.all(unique.map(m => stream(m, prompt, params, box.querySelector(`[data-model="${CSS.escape(m)}"]`))));
  $("#run").disabled = false;
}

async function stream(model, prompt, params, card) {
  const text = $(".text", card), meta = $(".meta", card);
  const chat = $("#chat").checked || info.chat_template;
  let url, body;
  if (chat) {
    const messages = $("#chat").checked ? (history[model] = history[model] || []) : [];
    messages.push({role: "user", content: prompt});
    url = "/serve/v1/chat/completions"; body = {model, messages: [...messages], ...params};
  } else {
    url = "/serve/v1/completions"; body = {model, prompt, ...params};
  }
  const started = performance.now();
  let answer = "", finish = null, tokens = 0;
  try {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!r.ok) { const e = await r.json(); throw new Error(e.error?.message || JSON.stringify(e)); }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          const piece = chat ? (c.delta?.content || "") : (c.text || "");
          if (piece) { answer += piece; tokens++; text.textContent = answer; }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
    if ($("#chat").checked) history[model].push({role: "assistant", content: answer});
    meta.textContent = `${finish || "?"} · ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (e) {
    text.innerHTML = `<div class="error">${esc(e.message)}</div>`;
  }
  card.dataset.done = "1";
}

// ------------------------------------------------------------------------------------------------ launch
async function launchView() {
  const form = await api("/api/launch");
  page().innerHTML = `<h2>Launch a training run <span class="muted">written to ${esc(form.runs_dir)}/NAME</span></h2>
    <div id="launch-result"></div>
    <form class="launch" id="launch-form">
      <label>run name <input type="text" name="name" required placeholder="my-run"></label>
      ${form.fields.map(f => `<label>${esc(f.key)} <input type="text" name="${esc(f.key)}"
         placeholder="${esc(f.default === null ? "null" : typeof f.default === "object" ? JSON.stringify(f.default) : f.default)}"></label>`).join("")}
      <label>more settings<textarea name="more" rows="3" placeholder="one KEY=VALUE a line, as lorakit train --set (e.g. optim.warmup_ratio=0.1)"></textarea></label>
      <p class="muted">Empty fields keep the defaults shown. The page writes NAME/launch.yaml (the YAML <code>lorakit train --config</code>
        reads), runs <code>python -m lorakit train --config NAME/launch.yaml</code> and stops it with Ctrl-C (SIGINT).</p>
      <button class="primary" type="submit">Start training</button>
    </form>`;
  $("#launch-form").onsubmit = async e => {
    e.preventDefault();
    const data = new FormData(e.target), settings = {};
    for (const f of form.fields) { const v = data.get(f.key); if (v !== null && v.trim() !== "") settings[f.key] = v.trim(); }
    try {
      const r = await api("/api/launch", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({name: data.get("name"), settings, more: data.get("more")})});
      $("#launch-result").innerHTML = `<p class="ok">Started: <code>${esc(r.command)}</code> —
        <a href="#runs/${encodeURIComponent(r.name)}">watch ${esc(r.name)}</a></p>`;
    } catch (err) {
      $("#launch-result").innerHTML = `<div class="error" id="launch-error">error: ${esc(err.message)}</div>`;
    }
  };
}

// ------------------------------------------------------------------------------------------------ routing
function showError(e) {
  let box = $("#global-error");
  if (!box) { box = document.createElement("div"); box.id = "global-error"; box.className = "error"; page().prepend(box); }
  box.textContent = e.message;
}

async function route() {
  clearView();
  const [view, ...rest] = (location.hash.slice(1) || "runs").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.id === `nav-${view}`));
  try {
    if (view === "runs") await (arg ? runView(arg) : runsView());
    else if (view === "adapters") await (arg ? adapterView(arg) : adaptersView());
    else if (view === "playground") playgroundView();
    else if (view === "launch") await launchView();
    else page().innerHTML = `<p class="error">Unknown page ${esc(view)}: use Runs, Adapters, Playground or Launch.</p>`;
  } catch (e) { showError(e); }
  document.body.dataset.view = view;
}

(async () => {
  info = await api("/api/info");
  $("#base-info").textContent = info.base ? `base: ${info.base}` : "no base model (--model) loaded";
  window.addEventListener("hashchange", route);
  await route();
})();
