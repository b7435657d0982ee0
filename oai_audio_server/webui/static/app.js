// The built-in web page of oai-audio-server. Plain JavaScript, no build step, no library.
// It uses only the server's public API, so it doubles as a worked example:
//   GET  /health                     readiness (503 while the model loads)
//   GET  /v1/models                  the served model names
//   POST /v1/chat/completions        stream: true, read as server-sent events via fetch
//   POST /v1/audio/transcriptions    multipart/form-data, like OpenAI's Whisper API
//   POST /v1/audio/translations
//   GET  /v1/realtime                WebSocket (OpenAI's Realtime API): the Live captions
// The API key, when the server has one, goes in the Authorization header only (on the
// WebSocket, which cannot carry headers, in the "openai-insecure-api-key." subprotocol).
"use strict";

// The page lives at <server>/ui/, so the API root is one level up (works behind a proxy
// that mounts the server under a prefix too).
const API_ROOT = new URL("../", location.href);
const KEY_STORAGE = "oai-audio-server.api-key";

const $ = (id) => document.getElementById(id);

function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), API_ROOT).href;
}

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";  // storage disabled (private mode with strict settings)
  }
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// ---------------------------------------------------------------------------------------
// Errors: the server answers every failure with {"error": {"message", "type", "code"}}.

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, message, Number.isFinite(retry) ? retry : null);
}

function describeError(error) {
  if (!(error instanceof ApiError)) {
    return `Could not reach the server: ${error.message || error}`;
  }
  const prefix = {
    400: "The request was refused",
    401: "API key rejected (set it under “API key” at the top)",
    404: "Not found",
    408: "The request took too long",
    413: "Too large for this server",
    429: "The server is busy",
    503: "The model is not ready",
  }[error.status] || `Error ${error.status}`;
  return `${prefix}: ${error.message}`;
}

// Shows an error in `box`. A 429 or 503 with Retry-After gets a countdown and a Retry
// button that calls `retry` (when given).
function showError(box, error, retry) {
  box.replaceChildren();
  box.hidden = false;
  const text = document.createElement("span");
  text.textContent = describeError(error);
  box.append(text);
  if (!retry || !(error instanceof ApiError) || error.retryAfter === null) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "quiet";
  let left = error.retryAfter;
  const tick = () => {
    button.disabled = left > 0;
    button.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
    left -= 1;
  };
  tick();
  const timer = setInterval(() => {
    if (!box.contains(button)) clearInterval(timer);
    else if (left < 0) clearInterval(timer);
    else tick();
  }, 1000);
  button.addEventListener("click", () => {
    clearInterval(timer);
    hideError(box);
    retry();
  });
  box.append(" ", button);
}

function hideError(box) {
  box.hidden = true;
  box.replaceChildren();
}

// ---------------------------------------------------------------------------------------
// Server state: readiness from /health, model names from /v1/models.

const state = { ready: false, models: [] };

async function checkHealth() {
  const badge = $("health");
  let delay = 3000;
  try {
    const response = await fetch(apiUrl("/health"), { headers: authHeaders(), cache: "no-store" });
    if (response.ok) {
      badge.textContent = "model ready";
      badge.dataset.state = "ready";
      if (!state.ready) {
        state.ready = true;
        loadModels();
      }
      delay = 15000;
    } else {
      const error = await errorFrom(response);
      state.ready = false;
      const failed = /failed to load/.test(error.message);
      badge.textContent = response.status !== 503 ? `health: ${response.status}`
        : failed ? "model failed to load" : "model loading…";
      badge.title = error.message;
      badge.dataset.state = failed ? "down" : "loading";
    }
  } catch {
    state.ready = false;
    badge.textContent = "server unreachable";
    badge.dataset.state = "down";
  }
  updateButtons();
  setTimeout(checkHealth, delay);
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch(apiUrl("/v1/models"), { headers: authHeaders() });
    if (!response.ok) throw await errorFrom(response);
    const body = await response.json();
    state.models = body.data.map((card) => card.id);
  } catch (error) {
    showError($("chat-error"), error);
    return;
  }
  const previous = select.value;
  select.replaceChildren(
    ...state.models.map((id) => new Option(id, id, false, id === previous)),
  );
}

function model() {
  return $("model").value || state.models[0] || "qwen-audio-chat";
}

// ---------------------------------------------------------------------------------------
// Audio helpers: recording with MediaRecorder, reading files, format names.

// What the server should call this audio: a file extension or a container name.
function audioFormat(name, mimeType) {
  const extension = (name || "").toLowerCase().match(/\.([a-z0-9]{1,8})$/);
  if (extension) return extension[1];
  const type = (mimeType || "").split(";")[0].trim().toLowerCase();
  const known = {
    "audio/webm": "webm", "video/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "m4a",
    "video/mp4": "mp4", "audio/mpeg": "mp3", "audio/wav": "wav", "audio/x-wav": "wav",
    "audio/wave": "wav", "audio/flac": "flac", "audio/x-flac": "flac", "audio/aac": "aac",
  };
  return known[type] || "wav";
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// One recorder at a time. `button` toggles it; `onAudio(blob, name)` gets the result.
// Browsers record webm/opus (Chrome, Firefox) or mp4/aac (Safari); the server takes both.
let activeRecording = null;

function preferredRecordingType() {
  const candidates = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4"];
  return candidates.find((type) => window.MediaRecorder && MediaRecorder.isTypeSupported(type)) || "";
}

async function toggleRecording(button, onAudio, errorBox) {
  if (activeRecording) {
    const wasMine = activeRecording.button === button;
    activeRecording.recorder.stop();
    if (wasMine) return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError(errorBox, new Error("this browser cannot record here (recording needs https or localhost)"));
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(errorBox, new Error(`no microphone: ${error.message || error.name}`));
    return;
  }
  const mimeType = preferredRecordingType();
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : {});
  const chunks = [];
  const started = Date.now();
  const timer = setInterval(() => {
    button.textContent = `Stop recording (${Math.round((Date.now() - started) / 1000)} s)`;
  }, 500);
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size > 0) chunks.push(event.data);
  });
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((track) => track.stop());
    clearInterval(timer);
    activeRecording = null;
    button.classList.remove("recording");
    button.textContent = "Record";
    const type = recorder.mimeType || mimeType || "audio/webm";
    const blob = new Blob(chunks, { type });
    if (blob.size > 0) {
      const stamp = new Date().toISOString().slice(11, 19).replaceAll(":", "");
      onAudio(blob, `recording-${stamp}.${audioFormat("", type)}`);
    }
  });
  recorder.start(250);  // small timeslices: nothing is lost if the page stops it early
  activeRecording = { recorder, button };
  button.classList.add("recording");
  button.textContent = "Stop recording (0 s)";
}

function audioPlayer(blob) {
  const player = document.createElement("audio");
  player.controls = true;
  player.preload = "metadata";
  player.src = URL.createObjectURL(blob);
  return player;
}

function enableDrop(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    onFiles([...event.dataTransfer.files]);
  });
}

// ---------------------------------------------------------------------------------------
// Server-sent events over fetch: yields each `data:` payload until [DONE].

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;  // a comment or keep-alive
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Chat view.

const chat = {
  history: [],       // OpenAI messages of earlier turns, audio included (base64)
  attachments: [],   // {blob, name} waiting in the composer
  controller: null,  // AbortController of the reply being streamed
  epoch: 0,          // bumped by Clear: a reply of a cleared conversation is dropped
};

function updateButtons() {
  const busy = chat.controller !== null;
  $("send").disabled = busy || !state.ready;
  $("send").title = state.ready ? "" : "waiting for the model to load";
  $("stop").hidden = !busy;
  $("t-run").disabled = transcription.controller !== null || !state.ready;
  $("t-stop").hidden = transcription.controller === null;
}

function addAttachment(blob, name) {
  chat.attachments.push({ blob, name });
  renderAttachments();
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren(
    ...chat.attachments.map((item, index) => {
      const row = document.createElement("li");
      const label = document.createElement("span");
      label.className = "file-name";
      label.textContent = item.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "quiet small";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => {
        chat.attachments.splice(index, 1);
        renderAttachments();
      });
      row.append(audioPlayer(item.blob), label, remove);
      return row;
    }),
  );
}

function addBubble(role) {
  $("empty-hint").hidden = true;
  const bubble = document.createElement("article");
  bubble.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  bubble.append(who);
  $("messages").append(bubble);
  return bubble;
}

function copyText(text, button) {
  const done = () => {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1200);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => copyFallback(text, done));
  } else {
    copyFallback(text, done);
  }
}

function copyFallback(text, done) {
  // Plain http on a LAN address has no Clipboard API; a selected textarea still copies.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  try {
    document.execCommand("copy");
    done();
  } finally {
    area.remove();
  }
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

async function sendTurn() {
  if (chat.controller) return;
  const errorBox = $("chat-error");
  hideError(errorBox);
  const text = $("prompt").value.trim();
  const attachments = chat.attachments;
  if (!text && attachments.length === 0) return;
  const controller = new AbortController();
  const epoch = chat.epoch;
  chat.controller = controller;  // from here on Send is disabled: no double sends
  updateButtons();

  // The user's turn in OpenAI's shape: audio parts first, then the question.
  let content;
  try {
    if (attachments.length === 0) {
      content = text;
    } else {
      content = [];
      for (const item of attachments) {
        const data = await blobToBase64(item.blob);
        const format = audioFormat(item.name, item.blob.type);
        content.push({ type: "input_audio", input_audio: { data, format } });
      }
      if (text) content.push({ type: "text", text });
    }
  } catch (error) {
    chat.controller = null;
    updateButtons();
    showError(errorBox, new Error(`could not read the audio: ${error.message || error}`));
    return;
  }
  if (epoch !== chat.epoch) {  // cleared while the audio was being read
    chat.controller = null;
    updateButtons();
    return;
  }
  const userMessage = { role: "user", content };
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history, userMessage);

  const userBubble = addBubble("user");
  for (const item of attachments) userBubble.append(audioPlayer(item.blob));
  if (text) {
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    userBubble.append(body);
  }
  $("prompt").value = "";
  chat.attachments = [];
  renderAttachments();

  const reply = addBubble("assistant");
  reply.classList.add("streaming");
  const replyText = document.createElement("div");
  replyText.className = "text";
  reply.append(replyText);
  scrollToEnd();

  let answer = "";
  let note = "";
  try {
    const temperature = Number.parseFloat($("temperature").value);
    const maxTokens = Number.parseInt($("max-tokens").value, 10);
    const request = {
      model: model(),
      messages,
      stream: true,
      ...(Number.isFinite(temperature) ? { temperature } : {}),
      ...(Number.isFinite(maxTokens) ? { max_tokens: maxTokens } : {}),
    };
    const response = await fetch(apiUrl("/v1/chat/completions"), {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    for await (const event of sseData(response)) {
      if (event.error) throw new ApiError(500, event.error.message, null);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        replyText.textContent = answer;
        scrollToEnd();
      }
      if (choice.finish_reason === "length") note = "stopped at the max tokens limit";
    }
  } catch (error) {
    if (error.name === "AbortError") {
      // Aborting closes the connection; the server notices and frees the model's row.
      note = "stopped";
    } else {
      // The turn failed: take it back, so the composer holds it again for a retry.
      userBubble.remove();
      reply.remove();
      $("prompt").value = text;
      chat.attachments = attachments;
      renderAttachments();
      chat.controller = null;
      updateButtons();
      showError(errorBox, error, () => sendTurn());
      if (chat.history.length === 0 && $("messages").querySelectorAll(".message").length === 0) {
        $("empty-hint").hidden = false;
      }
      return;
    }
  } finally {
    reply.classList.remove("streaming");
  }
  chat.controller = null;
  updateButtons();
  if (epoch !== chat.epoch) return;  // cleared while streaming
  chat.history.push(userMessage, { role: "assistant", content: answer });
  finishReply(reply, answer, note);
}

function finishReply(reply, answer, note) {
  const tools = document.createElement("div");
  tools.className = "tools";
  if (note) {
    const label = document.createElement("span");
    label.className = "note";
    label.textContent = note;
    tools.append(label);
  }
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "quiet small copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(answer, copy));
  tools.append(copy);
  reply.append(tools);
  reply.dataset.done = "true";
}

function clearConversation() {
  chat.epoch += 1;
  if (chat.controller) chat.controller.abort();
  chat.history = [];
  chat.attachments = [];
  renderAttachments();
  for (const player of $("messages").querySelectorAll("audio")) URL.revokeObjectURL(player.src);
  $("messages").querySelectorAll(".message").forEach((node) => node.remove());
  $("empty-hint").hidden = false;
  hideError($("chat-error"));
}

// ---------------------------------------------------------------------------------------
// Transcription view.

const transcription = { audio: null, controller: null, downloadUrl: null };

function setTranscriptionAudio(blob, name) {
  transcription.audio = { blob, name };
  $("t-file-name").textContent = name;
  $("t-player").replaceChildren(audioPlayer(blob));
}

// "00:00:01,500 --> 00:00:03,000" (srt) or "00:01.500 --> 00:03.000" (vtt) to seconds.
function cueTime(stamp) {
  const parts = stamp.trim().replace(",", ".").split(":").map(Number);
  return parts.reduce((total, part) => total * 60 + part, 0);
}

function parseCues(text) {
  const cues = [];
  for (const block of text.replace(/\r/g, "").split(/\n\n+/)) {
    const lines = block.split("\n");
    const timing = lines.findIndex((line) => line.includes("-->"));
    if (timing === -1) continue;
    const [start, end] = lines[timing].split("-->");
    cues.push({
      start: cueTime(start),
      end: cueTime(end.trim().split(/\s+/)[0]),
      text: lines.slice(timing + 1).join("\n"),
    });
  }
  return cues;
}

function clock(seconds) {
  const whole = Math.floor(seconds);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = (seconds % 60).toFixed(2).padStart(5, "0");
  return `${h ? `${h}:` : ""}${String(m).padStart(2, "0")}:${s}`;
}

async function runTranscription() {
  const errorBox = $("transcribe-error");
  hideError(errorBox);
  if (!transcription.audio) {
    showError(errorBox, new Error("choose, drop or record an audio file first"));
    return;
  }
  const task = document.querySelector("input[name=task]:checked").value;
  const format = $("t-format").value;
  const form = new FormData();
  form.append("file", transcription.audio.blob, transcription.audio.name);
  form.append("model", model());
  form.append("response_format", format);
  const language = $("t-language").value.trim();
  if (language && task === "transcriptions") form.append("language", language);

  const controller = new AbortController();
  transcription.controller = controller;
  updateButtons();
  $("t-run").textContent = "Working…";
  try {
    // No Content-Type header: the browser writes the multipart boundary itself.
    const response = await fetch(apiUrl(`/v1/audio/${task}`), {
      method: "POST",
      headers: authHeaders(),
      body: form,
      signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    const body = await response.text();
    showTranscription(body, format, task, response.headers.get("Content-Type") || "text/plain");
  } catch (error) {
    if (error.name !== "AbortError") showError(errorBox, error, () => runTranscription());
  } finally {
    transcription.controller = null;
    $("t-run").textContent = "Run";
    updateButtons();
  }
}

function showTranscription(body, format, task, mediaType) {
  let segments = [];
  let text = body;
  if (format === "json" || format === "verbose_json") {
    const parsed = JSON.parse(body);
    text = parsed.text || "";
    segments = parsed.segments || [];
  } else if (format === "srt" || format === "vtt") {
    segments = parseCues(body);
    text = segments.map((cue) => cue.text).join(" ");
  }
  const table = $("t-segments");
  const rows = segments.map((segment) => {
    const row = document.createElement("tr");
    for (const value of [clock(segment.start), clock(segment.end), segment.text.trim()]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
  table.hidden = rows.length === 0;
  $("t-raw").textContent = body;
  $("t-result-title").textContent =
    `${task === "translations" ? "Translation" : "Transcription"} (${format}, ${segments.length} segment${segments.length === 1 ? "" : "s"})`;

  const extension = { verbose_json: "json", json: "json", text: "txt" }[format] || format;
  const base = (transcription.audio.name || "audio").replace(/\.[^.]*$/, "");
  if (transcription.downloadUrl) URL.revokeObjectURL(transcription.downloadUrl);
  transcription.downloadUrl = URL.createObjectURL(new Blob([body], { type: mediaType }));
  const link = $("t-download");
  link.href = transcription.downloadUrl;
  link.download = `${base}.${extension}`;
  link.textContent = `Download .${extension}`;
  $("t-copy").onclick = () => copyText(text, $("t-copy"));
  $("t-result").hidden = false;
}

// ---------------------------------------------------------------------------------------
// Live: microphone -> 24 kHz 16-bit PCM -> /v1/realtime transcription session -> captions.
// The server's VAD ends each turn at a pause; Stop commits the turn still being heard.

const LIVE_RATE = 24000;
const live = {
  socket: null, audio: null, stream: null, speaking: false, lines: new Map(),
  stopping: false, flushed: false,
};
const LIVE_FINISH_MS = 30000;  // Stop waits at most this long for the last lines

function realtimeUrl() {
  const url = new URL("v1/realtime", API_ROOT);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("intent", "transcription");
  return url.href;
}

function pcm16Base64(samples, fromRate) {
  // Linear interpolation to 24 kHz where the browser would not open a 24 kHz context.
  const length = Math.floor((samples.length * LIVE_RATE) / fromRate);
  const bytes = new Uint8Array(length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < length; i += 1) {
    const position = (i * fromRate) / LIVE_RATE;
    const left = Math.floor(position);
    const right = Math.min(left + 1, samples.length - 1);
    const value = samples[left] + (samples[right] - samples[left]) * (position - left);
    view.setInt16(2 * i, Math.max(-1, Math.min(1, value)) * 32767, true);
  }
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function captionLine(itemId) {
  let line = live.lines.get(itemId);
  if (!line) {
    line = document.createElement("p");
    line.className = "pending";
    line.dataset.item = itemId;
    $("live-captions").append(line);
    live.lines.set(itemId, line);
  }
  return line;
}

function onLiveEvent(event) {
  if (event.type === "input_audio_buffer.speech_started") {
    live.speaking = true;
    captionLine(event.item_id).textContent = "…";
  } else if (event.type === "input_audio_buffer.speech_stopped") {
    live.speaking = false;
  } else if (event.type === "conversation.item.input_audio_transcription.delta") {
    const line = captionLine(event.item_id);
    line.textContent = (line.textContent === "…" ? "" : line.textContent) + event.delta;
  } else if (event.type === "conversation.item.input_audio_transcription.completed") {
    const line = captionLine(event.item_id);
    line.textContent = event.transcript;
    line.className = "";
    line.dataset.done = "true";
  } else if (event.type === "input_audio_buffer.committed") {
    captionLine(event.item_id).dataset.committed = "true";  // its transcript will come
  } else if (event.type === "input_audio_buffer.cleared" && live.stopping) {
    // Stop's last event is answered: every line the server will write has begun.
    live.flushed = true;
    for (const [id, line] of live.lines) {
      if (!line.dataset.committed) {
        line.remove();  // speech that was never committed
        live.lines.delete(id);
      }
    }
  } else if (event.type === "conversation.item.input_audio_transcription.failed"
             || event.type === "error") {
    const late = live.stopping && event.error.code === "input_audio_buffer_commit_empty";
    if (!late) showError($("live-error"), new Error(event.error.message));  // else: VAD ended it
    const line = event.item_id && live.lines.get(event.item_id);
    if (line) line.dataset.done = "failed";
  }
  closeWhenWritten();
}

function closeWhenWritten() {
  // After Stop, the socket closes once every line heard is written.
  if (!live.stopping || !live.flushed || !live.socket) return;
  if ([...live.lines.values()].every((line) => line.dataset.done)) live.socket.close(1000);
}

function stopMicrophone() {
  if (live.audio) live.audio.context.close();
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  live.audio = null;
  live.stream = null;
}

function liveStopped(status) {
  stopMicrophone();
  live.socket = null;
  $("live-toggle").textContent = "Start";
  $("live-toggle").classList.remove("recording");
  $("live-status").textContent = status;
}

async function startLive() {
  hideError($("live-error"));
  if (!navigator.mediaDevices || !window.AudioContext) {
    showError($("live-error"), new Error("this browser cannot record here (it needs https or localhost)"));
    return;
  }
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError($("live-error"), new Error(`no microphone: ${error.message || error.name}`));
    return;
  }
  const key = apiKey();
  const socket = new WebSocket(realtimeUrl(),
    key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"]);
  live.socket = socket;
  live.lines = new Map();
  live.speaking = false;
  live.stopping = false;
  live.flushed = false;
  $("live-toggle").textContent = "Stop";
  $("live-toggle").classList.add("recording");
  $("live-status").textContent = "connecting…";
  socket.addEventListener("message", (message) => onLiveEvent(JSON.parse(message.data)));
  socket.addEventListener("close", (event) => {
    if (live.socket === socket) liveStopped(event.code === 1000 ? "stopped" : `closed (${event.code})`);
  });
  socket.addEventListener("open", () => {
    socket.send(JSON.stringify({
      type: "session.update",
      session: {
        type: "transcription",
        audio: { input: {
          format: { type: "audio/pcm", rate: LIVE_RATE },
          transcription: { model: model() },
          turn_detection: { type: "server_vad", silence_duration_ms: 600 },
        } },
      },
    }));
    const context = new AudioContext({ sampleRate: LIVE_RATE });
    const source = context.createMediaStreamSource(live.stream);
    // ScriptProcessor: no worklet file to load; its ~170 ms blocks are fine for captions.
    const processor = context.createScriptProcessor(4096, 1, 1);
    processor.addEventListener("audioprocess", (block) => {
      if (socket.readyState !== WebSocket.OPEN) return;
      const audio = pcm16Base64(block.inputBuffer.getChannelData(0), context.sampleRate);
      socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio }));
    });
    source.connect(processor);
    processor.connect(context.destination);
    live.audio = { context, processor };
    $("live-status").textContent = "listening…";
  });
}

function stopLive() {
  const socket = live.socket;
  stopMicrophone();
  if (!socket || socket.readyState !== WebSocket.OPEN || live.stopping) {
    if (socket) socket.close(1000);
    liveStopped("stopped");
    return;
  }
  live.stopping = true;
  // The turn still being heard is committed; the clear after it is answered once the
  // server has taken in everything sent before it.
  if (live.speaking) socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
  socket.send(JSON.stringify({ type: "input_audio_buffer.clear" }));
  live.speaking = false;
  $("live-status").textContent = "finishing the last line…";
  setTimeout(() => socket.readyState === WebSocket.OPEN && socket.close(1000), LIVE_FINISH_MS);
}

// ---------------------------------------------------------------------------------------
// Wiring.

function showView(name) {
  for (const view of ["chat", "transcribe", "live"]) {
    const active = view === name;
    $(`view-${view}`).hidden = !active;
    $(`tab-${view}`).setAttribute("aria-selected", String(active));
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function init() {
  $("tab-chat").addEventListener("click", () => showView("chat"));
  $("tab-transcribe").addEventListener("click", () => showView("transcribe"));
  $("tab-live").addEventListener("click", () => showView("live"));
  const views = { "#transcribe": "transcribe", "#live": "live" };
  showView(views[location.hash] || "chat");

  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    try {
      localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    } catch {
      // storage disabled: the key cannot be kept
    }
    $("key-panel").open = false;
    hideError($("chat-error"));
    hideError($("transcribe-error"));
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    try {
      localStorage.removeItem(KEY_STORAGE);
    } catch {
      // nothing stored
    }
    $("api-key").value = "";
  });

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendTurn();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!$("send").disabled) sendTurn();
    }
  });
  $("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("clear").addEventListener("click", clearConversation);
  $("record").addEventListener("click", (event) =>
    toggleRecording(event.currentTarget, addAttachment, $("chat-error")));
  $("chat-file").addEventListener("change", (event) => {
    for (const file of event.target.files) addAttachment(file, file.name);
    event.target.value = "";
  });
  enableDrop($("composer"), (files) => files.forEach((file) => addAttachment(file, file.name)));

  $("transcribe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runTranscription();
  });
  $("t-stop").addEventListener("click", () =>
    transcription.controller && transcription.controller.abort());
  $("t-record").addEventListener("click", (event) =>
    toggleRecording(event.currentTarget, setTranscriptionAudio, $("transcribe-error")));
  $("t-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setTranscriptionAudio(file, file.name);
    event.target.value = "";  // choosing the same file again still counts
  });
  enableDrop($("transcribe-form"), (files) => {
    if (files[0]) setTranscriptionAudio(files[0], files[0].name);
  });

  $("live-toggle").addEventListener("click", () => (live.socket ? stopLive() : startLive()));

  updateButtons();
  checkHealth();
}

init();
