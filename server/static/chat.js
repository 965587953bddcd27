// The built-in chat page: streams /v1/chat/completions, keeps the conversation in the page.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// A failed response as one readable line: the server's message, and when to retry on 429/503.
async function describeFailure(resp) {
  let message = resp.statusText;
  try {
    const body = await resp.json();
    message = (body.error && (body.error.message || body.error)) || message;
  } catch (_) { /* not JSON: keep the status text */ }
  let text = "Error " + resp.status + ": " + message;
  if (resp.status === 429 || resp.status === 503) {
    const after = resp.headers.get("Retry-After");
    text += resp.status === 429 ? " (server busy" : " (server unavailable";
    text += after ? "; retry in " + after + " s)" : "; retry shortly)";
  } else if (resp.status === 401) {
    text += " (enter the server's API key above)";
    $("apikey").focus();
  }
  return text;
}

async function loadModels() {
  const select = $("model");
  const saved = localStorage.getItem("mlxd.model");
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { showError(await describeFailure(resp)); return; }
    const body = await resp.json();
    select.replaceChildren();
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      select.append(opt);
    }
    if (saved && body.data.some((m) => m.id === saved)) select.value = saved;
    showError("");
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
  }
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "user") {
    div.textContent = text;
  } else {
    div.innerHTML = '<details class="thinking" hidden><summary>Reasoning</summary>' +
      '<div class="reasoning"></div></details><div class="content"></div><div class="meta"></div>';
  }
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render(bubble, answer) {
  const details = bubble.querySelector("details");
  if (answer.reasoning) {
    details.hidden = false;
    details.querySelector(".reasoning").textContent = answer.reasoning;
  }
  bubble.querySelector(".content").innerHTML = renderMarkdown(answer.content);
  bubble.scrollIntoView({ block: "end" });
}

// Reads an SSE body, calling onEvent with each `data:` JSON object until [DONE].
async function readSSE(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// The request body: the conversation, and the sampling settings the user filled in.
function requestBody() {
  const body = { model: $("model").value, messages: state.messages, stream: true };
  const temperature = $("temperature").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  showError("");
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  const answer = { content: "", reasoning: "" };
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let note = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(requestBody()),
    });
    if (!resp.ok) throw new Error(await describeFailure(resp));
    await readSSE(resp.body, (chunk) => {
      if (chunk.error) throw new Error("Error: " + chunk.error.message);
      const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      answer.reasoning += delta.reasoning_content || delta.reasoning || "";
      answer.content += delta.content || "";
      const finish = chunk.choices && chunk.choices[0] && chunk.choices[0].finish_reason;
      if (finish === "length") note = "stopped: token limit reached";
      render(bubble, answer);
    });
  } catch (e) {
    if (e.name === "AbortError") note = "stopped";
    else { note = "failed"; showError(e.message); }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  bubble.querySelector(".meta").textContent = note;
  if (answer.content) state.messages.push({ role: "assistant", content: answer.content });
  else state.messages.pop(); // nothing came back: let the user retry the same turn
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
});
$("model").addEventListener("change", () => localStorage.setItem("mlxd.model", $("model").value));
for (const id of ["temperature", "max-tokens"]) {
  $(id).value = localStorage.getItem("mlxd." + id) || "";
  $(id).addEventListener("change", () => localStorage.setItem("mlxd." + id, $(id).value.trim()));
}
$("apikey").value = sessionStorage.getItem("mlxd.key") || "";
$("apikey").addEventListener("change", () => {
  sessionStorage.setItem("mlxd.key", $("apikey").value.trim());
  loadModels();
});
loadModels();
