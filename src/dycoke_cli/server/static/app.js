// The page of `dycoke serve`: one more client of the same /v1 routes, with the same auth.
// No framework, no build step, nothing fetched from elsewhere (the server's CSP says so).
// The API key lives in this tab's sessionStorage only.

const KEY_SLOT = "dycoke-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  video: null, // {url, label}: the clip the conversation is about
  columns: [], // one per method shown: {method, messages, el}
  busy: false,
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_SLOT);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status line says it */ }
  return new ApiError(response.status, message);
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

function showError(message) {
  $("error").textContent = message || "";
}

// ------------------------------------------------------------------ connecting

async function connect() {
  showError("");
  try {
    const models = await (await api("/v1/models")).json();
    state.model = models.data[0].id;
    $("model").textContent = `model: ${state.model}`;
    $("key-form").hidden = true;
    await listClips();
  } catch (err) {
    if (err.status === 401) {
      $("key-form").hidden = false;
      $("model").textContent = "this server needs an API key";
      if (sessionStorage.getItem(KEY_SLOT)) showError(err.message);
      $("key").focus();
    } else {
      showError(err.message);
    }
  }
}

async function listClips() {
  const clips = await (await api("/v1/clips")).json();
  const select = $("clip");
  select.replaceChildren();
  const none = new Option(clips.data.length ? "(choose a clip)" : "(none listed)", "");
  select.append(none);
  for (const clip of clips.data) select.append(new Option(clip.name, clip.name));
}

function useVideo(video) {
  state.video = video;
  state.columns = [];
  $("columns").replaceChildren();
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    useVideo({ url: reader.result, label: file.name });
    $("clip").value = "";
    $("dropped").textContent = `using ${file.name}`;
  };
  reader.onerror = () => showError(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------ asking

function column(method) {
  const el = $("column").content.firstElementChild.cloneNode(true);
  el.querySelector(".method").textContent = method || "server default";
  $("columns").append(el);
  return { method, messages: [], el };
}

function ensureColumns() {
  const methods = $("side").checked ? ["none", "dycoke"] : [null];
  const same = state.columns.length === methods.length && state.columns.every((c, i) => c.method === methods[i]);
  if (!same) {
    $("columns").replaceChildren();
    state.columns = methods.map(column);
  }
  return state.columns;
}

function userMessage(col, question) {
  if (col.messages.length) return { role: "user", content: question };
  return { role: "user", content: [{ type: "video_url", video_url: { url: state.video.url } }, { type: "text", text: question }] };
}

async function ask(question) {
  for (const col of ensureColumns()) {
    const turn = document.createElement("li");
    turn.innerHTML = '<p class="q"></p><p class="a" aria-live="polite"></p>';
    turn.querySelector(".q").textContent = question;
    col.el.querySelector(".turns").append(turn);
    const messages = [...col.messages, userMessage(col, question)];
    const result = await streamAnswer(col.method, messages, turn.querySelector(".a"));
    col.messages = [...messages, { role: "assistant", content: result.text }];
    const dycoke = result.dycoke || {}; // (a stream always ends with it; an older server might not)
    if (!col.method && dycoke.options) {
      col.el.querySelector(".method").textContent = `${dycoke.options.method} (the server's default)`;
    }
    showStats(col.el, dycoke);
    drawKept(col.el.querySelector(".kept"), dycoke.kept);
  }
}

function request(method, messages) {
  const dycoke = { kept: true };
  if (method) dycoke.method = method;
  return { model: state.model, stream: true, messages, dycoke };
}

async function streamAnswer(method, messages, out) {
  const response = await api("/v1/chat/completions", request(method, messages));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "", dycoke = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const chunk = JSON.parse(event.slice(6));
      if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        out.textContent = text;
        out.dataset.deltas = String(Number(out.dataset.deltas || 0) + 1); // pieces shown as they came
      }
      if (chunk.dycoke) dycoke = chunk.dycoke;
    }
  }
  return { text, dycoke };
}

// ------------------------------------------------------------------ stats and picture

function pct(x) {
  return `${(100 * x).toFixed(1)} %`;
}

function showStats(el, dycoke) {
  const s = dycoke.stats || {};
  const rows = [
    ["session reused", dycoke.reused ? "yes" : "no"],
    ["frames", s.frames],
    ["visual tokens (prefill / decode)", `${s.visual_tokens_prefill} / ${s.visual_tokens_decode} of ${s.visual_tokens}`],
    ["retention", s.overall_retention === undefined ? "" : pct(s.overall_retention)],
    ["time to first token", s.ttft_s === undefined ? "" : `${s.ttft_s.toFixed(3)} s`],
    ["decoding", s.decode_tokens_per_s ? `${s.decode_tokens_per_s.toFixed(1)} tokens/s` : "–"],
    ["refreshes", s.refreshes === undefined ? "–" : s.refreshes],
  ];
  const dl = el.querySelector(".stats");
  dl.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    dd.dataset.stat = name;
    dl.append(dt, dd);
  }
}

function maskBits(hex, n) {
  const bits = [];
  for (const digit of hex) {
    const v = parseInt(digit, 16);
    for (let b = 3; b >= 0; b--) bits.push((v >> b) & 1);
  }
  return bits.slice(0, n);
}

function drawCell(canvas, bits, rows, cols) {
  const px = Math.max(2, Math.floor(96 / Math.max(rows, cols)));
  canvas.width = cols * px;
  canvas.height = rows * px;
  const ctx = canvas.getContext("2d");
  for (let i = 0; i < rows * cols; i++) {
    ctx.fillStyle = bits[i] ? "#f2c14e" : "#2b2d42";
    ctx.fillRect((i % cols) * px, Math.floor(i / cols) * px, px - 1, px - 1);
  }
}

function drawCells(figure, kept) {
  const [rows, cols] = kept.grid;
  const box = figure.querySelector(".cells");
  box.replaceChildren();
  kept.mask.forEach((hex, f) => {
    const bits = maskBits(hex, rows * cols);
    const canvas = document.createElement("canvas");
    canvas.className = "cell";
    canvas.setAttribute("role", "img");
    const count = bits.reduce((a, b) => a + b, 0);
    canvas.setAttribute("aria-label", `frame ${f}: ${count} of ${rows * cols} tokens kept`);
    canvas.dataset.kept = String(count);
    drawCell(canvas, bits, rows, cols);
    box.append(canvas);
  });
}

function perStep(kept) {
  const out = [];
  kept.selections.forEach((sel, i) => {
    const end = i + 1 < kept.selections.length ? kept.selections[i + 1].step : kept.steps;
    for (let s = sel.step; s < end; s++) out.push(sel.counts);
  });
  return out;
}

const LABELS_PX = 64; // below the heatmap: the answer's token at each step, written upwards

function drawTokens(ctx, kept, steps, cw, top) {
  const every = Math.max(1, Math.ceil(steps / 60));
  ctx.fillStyle = "#1d1d1f";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "left";
  for (let s = 0; s < steps; s += every) {
    ctx.save();
    ctx.translate(s * cw + cw / 2 + 4, top);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(kept.tokens[s].trim() || "·", 0, 0);
    ctx.restore();
  }
}

function drawHeat(canvas, kept) {
  const steps = perStep(kept);
  const frames = kept.frames;
  const cw = 600 / Math.max(1, steps.length);
  const ch = Math.max(3, Math.min(16, Math.floor(240 / frames)));
  canvas.width = 600;
  canvas.height = ch * frames + 10 + LABELS_PX;
  const ctx = canvas.getContext("2d");
  const top = Math.max(1, ...steps.flat());
  steps.forEach((counts, s) => counts.forEach((c, f) => {
    const v = c / top;
    ctx.fillStyle = `rgb(${Math.round(40 + 200 * v)}, ${Math.round(50 + 150 * v)}, ${Math.round(90 - 40 * v)})`;
    ctx.fillRect(s * cw, 10 + f * ch, cw, ch);
  }));
  ctx.fillStyle = "#d62828";
  for (const s of kept.refresh_steps) {
    ctx.beginPath();
    ctx.moveTo(s * cw, 0);
    ctx.lineTo(s * cw + cw, 0);
    ctx.lineTo(s * cw + cw / 2, 9);
    ctx.fill();
  }
  drawTokens(ctx, kept, steps.length, cw, canvas.height - 2);
  canvas.setAttribute("aria-label", `${steps.length} decoding steps over ${frames} frames, ${kept.refresh_steps.length} refreshes`);
  canvas.title = kept.tokens.slice(0, steps.length).join("");
}

function drawKept(figure, kept) {
  if (!kept) return;
  drawCells(figure, kept);
  drawHeat(figure.querySelector(".heat"), kept);
}

// ------------------------------------------------------------------ wiring

function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) readFile(file);
}

async function onAsk(event) {
  event.preventDefault();
  if (state.busy) return;
  const question = $("question").value.trim();
  if (!state.video) {
    showError("choose a clip first: pick one from the list, or drop a video file");
    return;
  }
  showError("");
  state.busy = true;
  $("ask").disabled = true;
  try {
    await ask(question);
    $("question").value = "";
  } catch (err) {
    showError(err.message);
    if (err.status === 401) $("key-form").hidden = false;
  } finally {
    state.busy = false;
    $("ask").disabled = false;
    $("question").focus();
  }
}

function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_SLOT, $("key").value);
    $("key").value = "";
    connect();
  });
  $("clip").addEventListener("change", () => {
    const name = $("clip").value;
    useVideo(name ? { url: `file:${encodeURIComponent(name)}`, label: name } : null);
    $("dropped").textContent = "";
  });
  $("file").addEventListener("change", () => $("file").files[0] && readFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  $("ask-form").addEventListener("submit", onAsk);
  $("new").addEventListener("click", () => useVideo(state.video));
  $("side").addEventListener("change", () => useVideo(state.video));
}

wire();
connect();
