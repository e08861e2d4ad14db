// The chat page of `colossus serve`: talks to this server's own /v1 API, streams replies over SSE,
// keeps the conversation (and the API key, system prompt and sampling settings) in localStorage.
// Model output is only ever put on the page as text (textContent), never parsed as HTML.
"use strict";

const STORE = {
  history: "colossus.chat.history",
  apiKey: "colossus.chat.apiKey",
  settings: "colossus.chat.settings",
};

const $ = (id) => document.getElementById(id);
const el = {};
let history = []; // [{role: "user" | "assistant", content, note?}]; the system prompt is added per request
let modelName = null;
let controller = null; // the AbortController of the reply being streamed, if any

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or disabled: the page still works, it just forgets on reload
  }
}

function saveHistory() {
  store(STORE.history, history);
}

function saveSettings() {
  store(STORE.settings, {
    system: el.system.value,
    temperature: el.temperature.value,
    maxTokens: el.maxTokens.value,
  });
}

function authHeaders() {
  const key = el.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = false;
}

function hideError() {
  el.error.textContent = "";
  el.error.hidden = true;
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) message += "\nEnter the server's API key in the API key field.";
  return message;
}

function renderMessage(message) {
  const box = document.createElement("div");
  box.className = `message ${message.role}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.content;
  box.append(text);
  if (message.note) setNote(box, message.note);
  el.messages.append(box);
  el.messages.scrollTop = el.messages.scrollHeight;
  return box;
}

function setNote(box, note) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = note;
  box.append(span);
}

function renderAll() {
  el.messages.replaceChildren();
  for (const message of history) renderMessage(message);
}

function setStreaming(on) {
  el.send.disabled = on;
  el.stop.disabled = !on;
  el.prompt.disabled = on;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) {
      modelName = null;
      el.model.textContent = "model: ?";
      showError(await apiError(response));
      return null;
    }
    const body = await response.json();
    modelName = body.data[0].id;
    el.model.textContent = `model: ${modelName}`;
    hideError();
    return modelName;
  } catch (exc) {
    showError(`Cannot reach the server: ${exc.message}`);
    return null;
  }
}

// The JSON payloads of an SSE response, and the string "[DONE]" for OpenAI's end marker.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function requestBody() {
  const messages = [];
  const system = el.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const { role, content } of history) messages.push({ role, content });
  const body = {
    model: modelName,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(el.temperature.value),
  };
  const maxTokens = el.maxTokens.value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

function showStats(tokens, estimated, firstAt, lastAt, startedAt) {
  if (firstAt === null) {
    el.stats.textContent = "last reply: no tokens";
    return;
  }
  const decodeSeconds = (lastAt - firstAt) / 1000;
  const rate = tokens > 1 && decodeSeconds > 0 ? ((tokens - 1) / decodeSeconds).toFixed(1) : "–";
  const ttft = ((firstAt - startedAt) / 1000).toFixed(2);
  el.stats.textContent = `last reply: ${estimated ? "~" : ""}${tokens} tokens, ${rate} tokens/s, first token ${ttft} s`;
}

async function send(text) {
  hideError();
  if (!modelName && !(await loadModel())) return; // the error is on the page; the text stays in the box
  const conversation = history; // "New chat" during the reply replaces it: then this reply is dropped
  const user = { role: "user", content: text };
  history.push(user);
  const userBox = renderMessage(user);
  el.prompt.value = "";
  const reply = { role: "assistant", content: "" };
  const body = requestBody();
  const replyBox = renderMessage(reply);
  const replyText = replyBox.querySelector(".text");
  replyBox.classList.add("streaming");
  setStreaming(true);
  controller = new AbortController();
  const startedAt = performance.now();
  let usageTokens = null;
  let chunks = 0;
  let firstAt = null;
  let lastAt = null;
  let finished = false;
  let stopped = false;
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      failure = await apiError(response);
    } else {
      for await (const event of sseEvents(response)) {
        if (event === "[DONE]") {
          finished = true;
          break;
        }
        if (event.error) {
          failure = `Server error: ${event.error.message}`;
          break;
        }
        if (event.usage) usageTokens = event.usage.completion_tokens;
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          lastAt = performance.now();
          if (firstAt === null) firstAt = lastAt;
          chunks += 1;
          reply.content += delta.content;
          replyText.textContent = reply.content;
          el.messages.scrollTop = el.messages.scrollHeight;
        }
      }
      if (!finished && !failure) failure = "The reply stream ended before the server finished it.";
    }
  } catch (exc) {
    if (exc.name === "AbortError") stopped = true;
    else failure = `The request failed: ${exc.message}`;
  } finally {
    controller = null;
    replyBox.classList.remove("streaming");
    setStreaming(false);
  }
  if (history !== conversation) return;
  if (reply.content === "" && (stopped || failure)) {
    // Nothing came back: take the turn back, so the conversation stays as it was and can be retried.
    history.pop();
    userBox.remove();
    replyBox.remove();
    el.prompt.value = text;
  } else {
    if (stopped) reply.note = "stopped";
    else if (failure) reply.note = "incomplete";
    if (reply.note) setNote(replyBox, reply.note);
    history.push(reply);
    saveHistory();
    showStats(usageTokens ?? chunks, usageTokens === null, firstAt, lastAt, startedAt);
  }
  if (failure) showError(failure);
  el.prompt.focus();
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  saveHistory();
  renderAll();
  el.stats.textContent = "";
  hideError();
  el.prompt.focus();
}

function init() {
  for (const [name, id] of Object.entries({
    model: "model",
    stats: "stats",
    newChat: "new-chat",
    apiKey: "api-key",
    system: "system-prompt",
    temperature: "temperature",
    temperatureValue: "temperature-value",
    maxTokens: "max-tokens",
    messages: "messages",
    error: "error",
    composer: "composer",
    prompt: "prompt",
    send: "send",
    stop: "stop",
  })) {
    el[name] = $(id);
  }
  const settings = load(STORE.settings, {});
  if (typeof settings.system === "string") el.system.value = settings.system;
  if (settings.temperature !== undefined) el.temperature.value = settings.temperature;
  if (settings.maxTokens !== undefined) el.maxTokens.value = settings.maxTokens;
  el.temperatureValue.textContent = el.temperature.value;
  el.apiKey.value = load(STORE.apiKey, "");
  const saved = load(STORE.history, []);
  history = Array.isArray(saved) ? saved.filter((m) => m && typeof m.content === "string") : [];
  renderAll();

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = el.prompt.value.trim();
    if (text && !controller) send(text);
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      el.composer.requestSubmit();
    }
  });
  el.stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });
  el.newChat.addEventListener("click", newChat);
  el.apiKey.addEventListener("change", () => {
    const key = el.apiKey.value.trim();
    store(STORE.apiKey, key || null);
    loadModel();
  });
  el.temperature.addEventListener("input", () => {
    el.temperatureValue.textContent = el.temperature.value;
    saveSettings();
  });
  el.system.addEventListener("input", saveSettings);
  el.maxTokens.addEventListener("input", saveSettings);
  loadModel();
  el.prompt.focus();
}

document.addEventListener("DOMContentLoaded", init);
