// specd's web chat: streams /v1/chat/completions (the OpenAI API this server speaks) and shows
// each round's accepted draft text apart from the verifier's token, with live figures.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let model = null;
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  model = body.data[0].id;
  $("model").textContent = model;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (text) div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setFigure(name, value) { $("fig-" + name).textContent = value; }

function resetFigures() {
  for (const name of ["tokens", "rounds", "accepted", "target"]) setFigure(name, "0");
  for (const name of ["acceptance", "per-round", "ttft", "rate"]) setFigure(name, "–");
}

// Server-sent events from a fetch body: yields each `data:` payload as text.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

class Turn {
  constructor(div) {
    this.div = div;
    this.text = "";
    this.started = performance.now();
    this.first = null;
    this.rounds = 0; this.accepted = 0; this.target = 0;
  }
  addSpans(spans, figures) {
    if (this.first === null) {
      this.first = performance.now() - this.started;
      setFigure("ttft", this.first.toFixed(0) + " ms");
    }
    for (const [text, source] of spans) {
      const span = document.createElement("span");
      span.className = source;
      span.textContent = text;
      this.div.appendChild(span);
      this.text += text;
    }
    if (figures.target) { this.rounds = figures.round; }
    this.accepted += figures.accepted || 0;
    this.target += figures.target || 0;
    const tokens = this.accepted + this.target;
    setFigure("tokens", tokens);
    setFigure("rounds", this.rounds);
    setFigure("accepted", this.accepted);
    setFigure("target", this.target);
    if (this.rounds) setFigure("per-round", (tokens / this.rounds).toFixed(2));
    const seconds = (performance.now() - this.started) / 1000;
    setFigure("rate", (tokens / seconds).toFixed(1));
    this.div.scrollIntoView({ block: "end" });
  }
  finish(f) {
    setFigure("tokens", f.tokens);
    setFigure("rounds", f.rounds);
    setFigure("acceptance", f.acceptance_rate === null ? "–" : (100 * f.acceptance_rate).toFixed(1) + "%");
    setFigure("per-round", Number(f.tokens_per_round).toFixed(2));
    setFigure("rate", Number(f.tokens_per_s).toFixed(1));
    const figs = document.createElement("span");
    figs.className = "figs";
    const acceptance = f.acceptance_rate === null ? "n/a" : (100 * f.acceptance_rate).toFixed(1) + "%";
    figs.textContent = `${f.tokens} tokens, ${f.rounds} target passes, acceptance ${acceptance}, ` +
      `${Number(f.tokens_per_round).toFixed(2)} tokens/round, ${Number(f.tokens_per_s).toFixed(1)} tok/s`;
    this.div.appendChild(figs);
    this.div.scrollIntoView({ block: "end" });  // the figures line too, not left under the input box
  }
}

async function send(prompt) {
  busy = true;
  $("send").disabled = true;
  resetFigures();
  setFigure("status", "streaming");
  history.push({ role: "user", content: prompt });
  bubble("user", prompt);
  const turn = new Turn(bubble("assistant", ""));
  try {
    if (!model) await loadModel();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({
        model, messages: history, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && chunk.specd && chunk.specd.spans) turn.addSpans(chunk.specd.spans, chunk.specd);
      if (choice && choice.finish_reason) turn.finish(chunk.specd);
    }
    history.push({ role: "assistant", content: turn.text });
    setFigure("status", "done");
  } catch (error) {
    history.pop();
    turn.div.remove();
    bubble("error", String(error.message || error));
    setFigure("status", "error");
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (busy || !prompt.trim()) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("messages").textContent = "";
  resetFigures();
  setFigure("status", "idle");
});
$("api-key").value = localStorage.getItem("specd-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("specd-api-key", $("api-key").value);
  model = null;
  loadModel().catch((error) => bubble("error", String(error.message || error)));
});
loadModel().catch((error) => bubble("error", String(error.message || error)));
