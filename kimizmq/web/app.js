"use strict";
// The coordinator's page: polls GET /health (the JSON `kimi status --json` is
// made from) to draw the pipeline and its figures, and chats through
// POST /v1/chat/completions, streamed, like any OpenAI client.

const POLL_MS = 1000;
const CHART_POINTS = 180; // three minutes of polls
const LIVE_RATE_S = 3; // "tokens/s now" spans this much of the recent past (the server's figures: 30 s)
const KEY_STORAGE = "kimizmq.api_key"; // sessionStorage: the key lives as long as the tab

const $ = (id) => document.getElementById(id);
const page = { history: [], conversation: 0, controller: null, rates: [], samples: [], model: null };

// -- small helpers -----------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function bytes(b) {
  if (typeof b !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) {
    b /= 1024;
    i++;
  }
  return `${b.toFixed(i && b < 10 ? 1 : 0)} ${units[i]}`;
}

const rate = (r) => (typeof r === "number" ? r.toFixed(1) : "–");
const seconds = (s) => (typeof s !== "number" ? "–" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`);
const share = (part, whole) => (whole > 0 && part > 0 ? Math.max(0.5, (100 * part) / whole) : 0);

function bar(parts) {
  const b = el("div", "bar");
  for (const [cls, pct] of parts) {
    const s = el("span", cls);
    s.style.width = `${Math.min(pct, 100)}%`;
    b.append(s);
  }
  return b;
}

function row(label, value) {
  const r = el("div", "row", `${label} `);
  r.append(el("b", null, value));
  return r;
}

// -- the cluster ---------------------------------------------------------------------

// A worker as the page shows it: "recovering" is a worker coming back (up
// again, loading its shard) while the cluster is degraded.
function workerState(w, cluster) {
  if (!w.up && w.state === "unknown") return "unknown"; // never answered yet (the coordinator is starting)
  if (!w.up || w.state === "down") return "down";
  if (cluster === "degraded" && (w.state === "loading" || w.state === "idle")) return "recovering";
  return w.state || "unknown";
}

function clusterState(h) {
  const workers = Object.values(h.workers || {});
  if (h.status === "degraded" && workers.every((w) => w.up && w.state !== "down")) return "recovering";
  return h.status;
}

function setBadge(node, state) {
  node.className = `badge ${state}`;
  node.textContent = state;
}

function coordinatorBox(h) {
  const c = h.coordinator || {};
  const box = el("div", "box coordinator");
  box.dataset.role = "coordinator";
  box.append(el("div", "name", "coordinator"));
  box.append(row("at", c.address || "–"));
  box.append(row("in flight", `${h.requests_in_flight ?? "–"}, queued ${h.queue_depth ?? "–"}`));
  box.append(row("tokens/s", rate(c.tokens_per_s)));
  return box;
}

function workerBox(name, w, cluster) {
  const state = workerState(w, cluster);
  const box = el("div", `box worker ${state}`);
  box.dataset.worker = name;
  box.dataset.state = state;
  const head = el("div", "name", `${name} `);
  const badge = el("span");
  setBadge(badge, state);
  head.append(badge);
  box.append(head);
  box.append(row("at", String(w.address || "–").replace("tcp://", "")));
  const layers = w.layers ? `[${w.layers[0]}, ${w.layers[1]})` : "–";
  const layersRow = row("layers", layers);
  layersRow.classList.add("layers");
  box.append(layersRow);

  const total = w.memory_total_bytes;
  const weights = w.weight_bytes || 0;
  const kv = w.cache_bytes || 0;
  const other = Math.max((w.memory_bytes || 0) - weights - kv, 0);
  box.append(bar([["weights", share(weights, total)], ["kv", share(kv, total)], ["other", share(other, total)]]));
  box.append(row("weights", `${bytes(w.weight_bytes)} · KV ${bytes(w.cache_bytes)}`));
  box.append(row("memory", `${bytes(w.memory_bytes)} of ${bytes(total)}`));

  const p = w.progress || {};
  if ((state === "loading" || state === "recovering") && p.total_bytes) {
    const done = (p.done_bytes || 0) / p.total_bytes;
    box.append(bar([["done", 100 * done]]));
    const speed = p.rate_bytes_s ? ` at ${(p.rate_bytes_s / 1e6).toFixed(0)} MB/s` : "";
    box.append(row("loaded", `${(100 * done).toFixed(0)}% of ${bytes(p.total_bytes)}${speed}`));
  }
  box.append(row("tokens/s", `${rate(w.tokens_per_s)} · requests ${w.requests ?? "–"}`));
  if (w.error) box.append(el("div", "row failure", w.error));
  return box;
}

function drawPipeline(h) {
  const cluster = h.status;
  const flowing = (h.requests_in_flight || 0) > 0;
  const boxes = [coordinatorBox(h)];
  const workers = h.workers || {};
  const order = (h.stages || []).map((s) => s.worker);
  for (const name of Object.keys(workers)) if (!order.includes(name)) order.push(name);
  for (const name of order) {
    boxes.push(el("div", `arrow${flowing ? " flowing" : ""}`));
    boxes.push(workerBox(name, workers[name] || { state: "unknown" }, cluster));
  }
  $("pipeline").replaceChildren(...boxes);
  const ring = el(
    "div",
    "ring",
    "↺ the last stage sends each sampled token to the first stage (the next step) and to the coordinator (to stream)",
  );
  $("pipeline").append(ring);
  const legend = el("div", "legend", "memory:");
  for (const [cls, label] of [["weights", "weights"], ["kv", "KV cache"], ["other", "other"]]) {
    const i = el("i");
    i.style.background = `var(--${cls})`;
    legend.append(i, label);
  }
  $("pipeline").append(legend);
}

function figure(key, label, value) {
  const d = el("div");
  d.dataset.figure = key;
  d.append(el("dt", null, label), el("dd", null, value));
  return d;
}

// Tokens generated per second over the last few seconds, from the counter's
// value at each poll; null until two polls span a second.
function liveRate(h) {
  const now = performance.now() / 1000;
  const count = (h.coordinator || {}).tokens_generated;
  if (typeof count !== "number") return null;
  const last = page.samples[page.samples.length - 1];
  if (last && count < last[1]) page.samples = []; // a restarted coordinator counts from zero
  page.samples.push([now, count]);
  while (page.samples.length > 2 && now - page.samples[1][0] >= LIVE_RATE_S) page.samples.shift();
  const [t0, c0] = page.samples[0];
  return now - t0 >= 1 ? (count - c0) / (now - t0) : null;
}

function drawFigures(h, live) {
  const c = h.coordinator || {};
  const items = [
    figure("in_flight", "requests in flight", String(h.requests_in_flight ?? "–")),
    figure("queued", "requests queued", String(h.queue_depth ?? "–")),
    figure("tokens_now", "tokens/s now", rate(live)),
    figure("tokens_per_s", "tokens/s (last 30 s)", rate(c.tokens_per_s)),
    figure("ttft", "time to first token (mean)", seconds(c.time_to_first_token_mean_s)),
    figure("itl", "between tokens (mean)", seconds(c.inter_token_latency_mean_s)),
    figure("requests_total", "requests served", String(c.requests_total ?? "–")),
    figure("tokens_generated", "tokens generated", String(c.tokens_generated ?? "–")),
  ];
  for (const s of h.stages || []) {
    const w = (h.workers || {})[s.worker] || {};
    items.push(figure(`stage_${s.worker}`, `stage ${s.worker} tokens/s (30 s)`, rate(w.tokens_per_s)));
  }
  // A prefix cache reports its figures under names with "prefix" in them.
  for (const [k, v] of Object.entries({ ...h, ...c })) {
    if (/prefix/i.test(k) && (typeof v === "number" || typeof v === "string")) {
      items.push(figure(k, k.replace(/_/g, " "), typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : String(v)));
    }
  }
  $("figures").replaceChildren(...items);
}

function drawChart() {
  const canvas = $("rate-chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width;
  const h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  const top = Math.max(1, ...page.rates.map((r) => r || 0));
  g.fillStyle = "#6b7385";
  g.font = "11px system-ui, sans-serif";
  g.fillText(`tokens/s generated, last ${Math.round((CHART_POINTS * POLL_MS) / 60000)} min (max ${top.toFixed(1)})`, 6, 13);
  g.strokeStyle = "#3867d6";
  g.lineWidth = 1.5;
  g.beginPath();
  page.rates.forEach((r, i) => {
    const x = (i / (CHART_POINTS - 1)) * (w - 4) + 2;
    const y = h - 4 - ((r || 0) / top) * (h - 22);
    if (i) g.lineTo(x, y);
    else g.moveTo(x, y);
  });
  g.stroke();
}

async function refresh() {
  try {
    const resp = await fetch("/health", { cache: "no-store" });
    const h = await resp.json(); // 503 answers carry the same JSON: loading, degraded, failed
    $("model").textContent = h.model || "";
    setBadge($("cluster-state"), clusterState(h));
    drawPipeline(h);
    page.live = liveRate(h);
    drawFigures(h, page.live);
    $("conn").textContent = `updated ${new Date().toLocaleTimeString()}`;
    return h;
  } catch (e) {
    setBadge($("cluster-state"), "unreachable");
    $("conn").textContent = `the coordinator does not answer (${e.message}); retrying`;
    return null;
  }
}

async function poll() {
  const h = await refresh();
  page.rates.push(h ? page.live : null);
  if (page.rates.length > CHART_POINTS) page.rates.shift();
  drawChart();
  setTimeout(poll, POLL_MS);
}

// -- the API key -----------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-note").textContent = message;
  $("api-key").focus();
}

async function checkKey() {
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
    if (resp.status === 401) {
      const had = sessionStorage.getItem(KEY_STORAGE);
      askForKey(had ? "that key was refused; try again (kept for this tab only)" : "kept for this tab only");
      return;
    }
    const body = await resp.json();
    page.model = body.data && body.data[0] ? body.data[0].id : null;
    $("key-form").hidden = true;
  } catch (e) {
    $("key-note").textContent = `cannot reach the API: ${e.message}`;
  }
}

// -- the chat ----------------------------------------------------------------------------

async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

async function errorText(resp) {
  const text = await resp.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return text || resp.statusText;
  }
}

function scrollDown() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function addMessage(role, text) {
  const root = el("div", `msg ${role}`);
  root.append(el("div", "who", role));
  const content = el("div", "content", text);
  root.append(content);
  $("messages").append(root);
  scrollDown();
  return root;
}

// An assistant's answer as it streams: reasoning, text (Markdown) and tool calls
// each shown as what they are.
class Answer {
  constructor() {
    this.root = addMessage("assistant", "");
    this.reasoningBox = el("details", "reasoning");
    this.reasoningBox.open = true;
    this.reasoningBox.append(el("summary", null, "reasoning"));
    this.reasoningText = el("div");
    this.reasoningBox.append(this.reasoningText);
    this.reasoningBox.hidden = true;
    this.content = this.root.querySelector(".content");
    this.root.insertBefore(this.reasoningBox, this.content);
    this.tools = el("div", "tools");
    this.meta = el("div", "meta");
    this.root.append(this.tools, this.meta);
    this.text = "";
    this.reasoning = "";
    this.toolCalls = [];
    this.chunks = 0;
    this.setState("waiting");
  }

  setState(state) {
    this.root.dataset.state = state;
  }

  add(delta) {
    if (delta.reasoning_content) this.reasoning += delta.reasoning_content;
    if (delta.content) this.text += delta.content;
    for (const tc of delta.tool_calls || []) {
      const i = tc.index ?? this.toolCalls.length;
      const call = (this.toolCalls[i] ||= { id: tc.id, type: tc.type || "function", function: { name: "", arguments: "" } });
      if (tc.id) call.id = tc.id;
      if (tc.function && tc.function.name) call.function.name += tc.function.name;
      if (tc.function && tc.function.arguments) call.function.arguments += tc.function.arguments;
    }
  }

  draw() {
    this.root.dataset.chunks = String(this.chunks);
    this.root.dataset.raw = this.text;
    this.reasoningBox.hidden = !this.reasoning;
    this.reasoningText.textContent = this.reasoning;
    this.content.innerHTML = window.renderMarkdown(this.text);
    this.tools.replaceChildren(
      ...this.toolCalls.filter(Boolean).map((call) => {
        const box = el("div", "tool-call");
        const head = el("div", null, "tool call ");
        head.append(el("span", "fn", call.function.name || "?"));
        box.append(head, el("pre", null, call.function.arguments));
        return box;
      }),
    );
    scrollDown();
  }

  message() {
    const m = { role: "assistant", content: this.text };
    const calls = this.toolCalls.filter(Boolean);
    if (calls.length) m.tool_calls = calls;
    return m;
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// The chat's settings, or an error naming the one that is not valid.
function settings() {
  const out = {};
  for (const [id, name] of [["temperature", "temperature"], ["max-tokens", "max_tokens"]]) {
    const input = $(id);
    if (input.value === "" || !input.validity.valid) {
      throw new Error(`${name.replace("_", " ")} must be a number from ${input.min}${input.max ? ` to ${input.max}` : " up"}`);
    }
    out[name] = Number(input.value);
  }
  return out;
}

async function send(text) {
  let params;
  try {
    params = settings();
  } catch (e) {
    addMessage("error", e.message).dataset.state = "error";
    return;
  }
  const conversation = page.conversation;
  const history = page.history;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = new Answer();
  const body = { messages: history, stream: true, stream_options: { include_usage: true }, ...params };
  if (page.model) body.model = page.model;
  const controller = new AbortController();
  page.controller = controller;
  busy(true);
  const start = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const msg = await errorText(resp);
      if (resp.status === 401) askForKey("the API wants its key (kept for this tab only)");
      throw new Error(`HTTP ${resp.status}: ${msg}`);
    }
    answer.setState("streaming");
    for await (const data of sseData(resp.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        answer.add(choice.delta || {});
        finish = choice.finish_reason || finish;
      }
      answer.chunks++;
      if (first === null && (answer.text || answer.reasoning || answer.toolCalls.length)) first = performance.now();
      answer.draw();
    }
    answer.draw();
    answer.setState("done");
    const secs = (performance.now() - start) / 1000;
    const n = usage ? usage.completion_tokens : null;
    const parts = [n !== null ? `${n} tokens` : null, `${secs.toFixed(2)} s`];
    if (first !== null) parts.push(`first token after ${seconds((first - start) / 1000)}`);
    if (n && secs > 0) parts.push(`${(n / secs).toFixed(1)} tokens/s`);
    if (finish) parts.push(`finish: ${finish}`);
    answer.meta.textContent = parts.filter(Boolean).join(" · ");
    history.push(answer.message());
  } catch (e) {
    if (e.name === "AbortError") {
      answer.draw();
      answer.setState("stopped");
      answer.meta.textContent = "stopped: the server was told to drop the request";
      history.push(answer.message()); // what was written stays in the conversation
    } else {
      answer.setState("error");
      answer.meta.classList.add("failure");
      answer.meta.textContent = e.message;
      history.pop(); // the question goes unanswered: leave it out of the next turn
    }
  } finally {
    if (page.conversation === conversation) {
      page.controller = null;
      busy(false);
    }
    refresh(); // the figures as the request left them, without waiting for the next poll
  }
}

// -- wiring -----------------------------------------------------------------------------------

function main() {
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || page.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  // Aborting the fetch closes the connection; the coordinator then cancels the
  // request on every stage and frees its slot.
  $("stop").addEventListener("click", () => page.controller && page.controller.abort());
  $("clear").addEventListener("click", () => {
    if (page.controller) page.controller.abort();
    page.controller = null;
    busy(false);
    page.conversation++;
    page.history = [];
    $("messages").replaceChildren();
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    checkKey();
  });
  checkKey();
  poll();
}

main();
