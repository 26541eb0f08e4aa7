// The latentloom page: a form that drives the A1111-style API of `latentloom serve` (see serve/API.md).
// Plain browser JavaScript, no build step and no network beyond the server that sent this file.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;          // progress poll period: fast enough for a live bar, light on the server
const MAX_JOB_CARDS = 6;      // finished jobs stay visible a while; their images are in the gallery too
const GALLERY_PAGE = 60;      // tiles rendered before "Show more"

// latentloom recipes name samplers by their function name; the form uses the A1111 names the server lists.
const SAMPLER_TITLES = {
  ddpm: "DDPM", ddim: "DDIM", euler: "Euler", euler_a: "Euler a", heun: "Heun", dpmpp_2m: "DPM++ 2M",
  dpmpp_2m_sde: "DPM++ 2M SDE", unipc: "UniPC", lcm: "LCM", tcd: "TCD",
};

const state = {
  info: null,
  currentModel: null,
  lastSeed: null,
  gallery: [],
  galleryShown: GALLERY_PAGE,
  jobs: [],                   // newest first
};

// ---------------------------------------------------------------- talking to the server

class ApiError extends Error {
  constructor(status, message, kind) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

// FastAPI answers {detail: "text"} or, for validation errors, {detail: [{loc, msg}, ...]}; make either readable.
function describeDetail(detail) {
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((part) => part !== "body").join(".");
      return where ? `${where}: ${d.msg}` : String(d.msg);
    }).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, `Cannot reach the server (${path}): ${err.message}`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? describeDetail(data.detail) : (text || response.statusText);
    throw new ApiError(response.status, `${path}: ${response.status} ${detail}`, data && data.error);
  }
  return data;
}

function showError(message) {
  const box = $("errors");
  const item = document.createElement("div");
  item.className = "error";
  const text = document.createElement("span");
  text.textContent = message;
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.textContent = "Dismiss";
  dismiss.addEventListener("click", () => item.remove());
  item.append(text, dismiss);
  box.prepend(item);
  while (box.children.length > 5) box.lastElementChild.remove();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// crypto.randomUUID exists only in secure contexts; a LAN address over http is not one.
function newTaskId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- server facts and the model

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((value) => new Option(value, value)));
  if (values.includes(selected)) select.value = selected;
}

function applyDefaults(defaults) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("width", defaults.width);
  set("height", defaults.height);
  set("steps", defaults.steps);
  set("cfg_scale", defaults.cfg_scale);
  if (defaults.sampler_name) $("sampler_name").value = defaults.sampler_name;
  followOutputSize();
}

async function loadInfo({ useDefaults }) {
  const info = await api("/latentloom/info");
  state.info = info;
  state.currentModel = info.current_model;
  const models = info.models || [];
  $("model").replaceChildren(...models.map((m) => new Option(m.model_name || m.title, m.title)));
  $("model").value = info.current_model;
  const sampler = $("sampler_name").value || (info.defaults || {}).sampler_name;
  fillSelect($("sampler_name"), info.samplers || [], sampler);
  fillSelect($("scheduler"), info.schedulers || ["Automatic"], $("scheduler").value || "Automatic");
  const limits = info.limits || {};
  if (limits.max_steps) $("steps").max = limits.max_steps;
  if (limits.max_batch) $("batch_size").max = limits.max_batch;
  if (useDefaults) applyDefaults(info.defaults || {});
  $("details-upscale").hidden = !info.upscaler;
}

// The Control map panel exists only where the server offers ControlNets (sd-webui-controlnet's listing routes).
async function loadControlNets() {
  let models = [];
  let modules = ["none"];
  try {
    models = (await api("/controlnet/model_list")).model_list || [];
    if (models.length) modules = (await api("/controlnet/module_list")).module_list || modules;
  } catch (err) {
    models = [];
    // A server without the routes simply has no ControlNets; anything else is worth saying.
    if (err.status !== 404) showError(`Could not list the server's ControlNets: ${err.message}`);
  }
  fillSelect($("control-model"), models, $("control-model").value);
  fillSelect($("control-module"), modules, $("control-module").value || "none");
  $("control-panel").hidden = models.length === 0;
  $("control-fields").disabled = models.length === 0;
}

async function switchModel() {
  const select = $("model");
  const title = select.value;
  select.disabled = true;
  $("model-status").textContent = "Loading model…";
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: title });
    // Each model has its own size and step defaults (the bundled one is 64 px, SD 1.5 is 512 px).
    await loadInfo({ useDefaults: true });
    $("model-status").textContent = "";
  } catch (err) {
    showError(`Could not switch the model: ${err.message}`);
    select.value = state.currentModel;
    $("model-status").textContent = "";
  } finally {
    select.disabled = false;
  }
}

// ---------------------------------------------------------------- the form

function numberField(id, { integer = true } = {}) {
  const input = $(id);
  const value = Number(input.value);
  if (input.value.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    const label = document.querySelector(`label[for="${id}"]`);
    const name = label ? label.textContent.trim() : id;
    throw new Error(`${name}: enter ${integer ? "a whole number" : "a number"} (the field is empty or not a number)`);
  }
  return value;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    seed: numberField("seed"),
    steps: numberField("steps"),
    cfg_scale: numberField("cfg_scale", { integer: false }),
    width: numberField("width"),
    height: numberField("height"),
    batch_size: numberField("batch_size"),
    n_iter: 1,
    scheduler: $("scheduler").value || "Automatic",
  };
  // Without the server's list (info failed) let the server pick its default sampler.
  if ($("sampler_name").value) body.sampler_name = $("sampler_name").value;
  if (mode() === "img2img") {
    if (!maskEditor.input) {
      throw new Error("Image to image: choose an input image first (or send one from the gallery).");
    }
    body.init_images = [maskEditor.input.dataUrl.split(",")[1]];
    body.mask = maskEditor.exportMask();
    body.denoising_strength = numberField("denoising_strength", { integer: false });
    body.inpainting_mask_invert = $("mask-invert").checked ? 1 : 0;
  }
  const unit = controlUnit(body.width, body.height);
  if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
  return body;
}

// One sd-webui-controlnet unit with the painted map, or null when the map is not to be used.
function controlUnit(width, height) {
  if ($("control-fields").disabled || !$("control-use").checked) return null;
  // The map must have the output's size; the canvas follows Width and Height, make sure it has caught up.
  followOutputSize(width, height);
  return {
    enabled: true,
    image: controlMap.exportMap(),
    module: $("control-module").value || "none",
    model: $("control-model").value,
    weight: numberField("control-weight", { integer: false }),
    guidance_start: numberField("control-start", { integer: false }),
    guidance_end: numberField("control-end", { integer: false }),
    control_mode: "Balanced",
  };
}

function setMode(value) {
  $(`mode-${value}`).checked = true;
  $("pane-img2img").hidden = value !== "img2img";
}

function applyRecipe(recipe) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", recipe.prompt);
  $("negative_prompt").value = recipe.negative_prompt || "";
  set("seed", recipe.seed);
  set("steps", recipe.num_inference_steps);
  set("cfg_scale", recipe.guidance_scale);
  set("width", recipe.width);
  set("height", recipe.height);
  followOutputSize();
  // The map itself is not in the recipe (only its hash), so "use" is left as the user set it.
  const net = (recipe.controlnets || [])[0];
  if (net) {
    set("control-weight", net.scale);
    set("control-start", net.start);
    set("control-end", net.end);
  }
  const sampler = SAMPLER_TITLES[recipe.sampler] || recipe.sampler;
  if ([...$("sampler_name").options].some((o) => o.value === sampler)) $("sampler_name").value = sampler;
  if (recipe.karras_sigmas !== undefined && [...$("scheduler").options].some((o) => o.value === "Karras")) {
    $("scheduler").value = recipe.karras_sigmas ? "Karras" : "Automatic";
  }
  if (typeof recipe.strength === "number") {
    $("denoising_strength").value = recipe.strength;
    $("denoising-out").textContent = recipe.strength;
  }
  // Loading a model takes a while, so it is never switched behind the user's back: say so instead.
  const note = recipe.model && recipe.model !== state.currentModel ? `Image was made with ${recipe.model}` : "";
  $("model-status").textContent = note;
}

// ---------------------------------------------------------------- jobs: progress, preview, cancel

function renderJobsEmpty() {
  $("jobs-empty").hidden = state.jobs.length > 0;
}

function addJob(kind, label) {
  const job = { id: newTaskId(), kind, done: false, previewId: -1, started: performance.now() };
  const card = document.createElement("li");
  card.className = "job running";
  card.dataset.task = job.id;
  card.innerHTML = `
    <div class="job-head">
      <strong class="job-title"></strong><button type="button" class="job-cancel">Cancel</button>
    </div>
    <progress class="job-progress" max="1" aria-label="Progress"></progress>
    <div class="job-status" role="status" aria-live="polite">Sending…</div>
    <div class="job-images"><img class="job-preview" alt="Live preview of the image being made" hidden></div>`;
  card.querySelector(".job-title").textContent = `${kind}: ${label}`;
  card.querySelector(".job-cancel").addEventListener("click", () => cancelJob(job));
  job.card = card;
  state.jobs.unshift(job);
  $("jobs").prepend(card);
  // Drop the oldest finished cards; running ones always stay.
  for (const old of state.jobs.slice(MAX_JOB_CARDS)) {
    if (old.done) { old.card.remove(); state.jobs.splice(state.jobs.indexOf(old), 1); }
  }
  renderJobsEmpty();
  return job;
}

function jobStatus(job, text) {
  job.card.querySelector(".job-status").textContent = text;
}

function showProgress(job, p) {
  const bar = job.card.querySelector(".job-progress");
  if (p.queued) {
    bar.removeAttribute("value");  // indeterminate while waiting
    // queue_position counts the jobs ahead (0: next to run)
    const ahead = p.queue_position ?? 0;
    jobStatus(job, `${job.cancelling ? "Cancelling… " : ""}Queued: position ${ahead + 1} in the queue${
      ahead ? ` (${ahead} ahead)` : " (next)"}`);
  } else if (p.active) {
    if (typeof p.progress === "number") bar.value = p.progress;
    const eta = typeof p.eta === "number" && p.eta > 0 ? ` · about ${p.eta.toFixed(1)} s left` : "";
    // The step count when sampling; otherwise the server's own words (loading a model, decoding, ...).
    const words = p.textinfo && !p.textinfo.startsWith("Step") ? p.textinfo : "Starting…";
    const steps = p.sampling_steps ? `Step ${p.sampling_step}/${p.sampling_steps}` : words;
    jobStatus(job, `${job.cancelling ? "Cancelling… " : ""}${steps}${eta}`);
  }
  if (p.live_preview) {
    const img = job.card.querySelector(".job-preview");
    img.src = p.live_preview;
    img.hidden = false;
  }
  if (typeof p.id_live_preview === "number") job.previewId = p.id_live_preview;
}

async function pollProgress(job) {
  while (!job.done) {
    try {
      const p = await api("/internal/progress",
        { id_task: job.id, live_preview: true, id_live_preview: job.previewId });
      if (!job.done) showProgress(job, p);
    } catch (err) {
      if (!job.done) jobStatus(job, `Progress unavailable: ${err.message}`);
    }
    await sleep(POLL_MS);
  }
}

function finishJob(job, response) {
  job.done = true;
  const card = job.card;
  card.classList.remove("running");
  card.querySelector(".job-cancel")?.remove();
  const bar = card.querySelector(".job-progress");
  bar.value = 1;
  let info = {};
  try { info = JSON.parse(response.info || "{}"); } catch { info = {}; }
  const names = (info.latentloom && info.latentloom.names) || [];
  const images = response.images || [];
  const holder = card.querySelector(".job-images");
  holder.replaceChildren();
  images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = `Result ${i + 1}: ${(info.all_prompts || [])[i] || info.prompt || ""}`;
    img.className = "job-result";
    if (names[i]) {
      // The result is also in the gallery: open its details there (recipe, download, reuse).
      const open = document.createElement("button");
      open.type = "button";
      open.className = "thumb";
      open.title = "Show recipe";
      open.append(img);
      open.addEventListener("click", () => openDetailsByName(names[i]));
      holder.append(open);
    } else {
      holder.append(img);
    }
  });
  if (typeof info.seed === "number") {
    state.lastSeed = info.seed;
    $("seed-last").disabled = false;
  }
  const seconds = ((performance.now() - job.started) / 1000).toFixed(1);
  const seeds = (info.all_seeds || []).join(", ");
  const count = `${images.length} image${images.length === 1 ? "" : "s"}`;
  if (job.cancelling) {
    card.classList.add("cancelled");
    jobStatus(job, images.length ? `Cancelled; ${count} finished before it stopped.` : "Cancelled.");
  } else {
    jobStatus(job, images.length ? `Done: ${count} in ${seconds} s${seeds ? ` · seed ${seeds}` : ""}`
      : "Stopped before any image was finished.");
  }
}

function failJob(job, err) {
  job.done = true;
  job.card.classList.remove("running");
  job.card.querySelector(".job-cancel")?.remove();
  if (err.kind === "cancelled") {
    job.card.classList.add("cancelled");
    jobStatus(job, "Cancelled.");
    return;
  }
  job.card.classList.add("failed");
  jobStatus(job, `Failed: ${err.message}`);
  showError(err.message);
}

async function cancelJob(job) {
  job.cancelling = true;
  jobStatus(job, "Cancelling…");
  try {
    const answer = await api("/latentloom/cancel", { id_task: job.id });
    if (answer && answer.cancelled === "not found" && !job.done) {
      job.cancelling = false;  // the job (if it starts after all) runs on: do not call its result cancelled
      jobStatus(job, "Cancel: the server does not know this job (yet); try again in a moment.");
    }
  } catch (err) {
    showError(`Cancel failed: ${err.message}`);
  }
}

async function generate() {
  let body;
  try {
    body = buildRequest();
  } catch (err) {
    showError(err.message);
    return;
  }
  const kind = body.init_images ? (body.mask ? "inpaint" : "img2img") : "txt2img";
  const job = addJob(body.alwayson_scripts ? `${kind} + ControlNet` : kind, body.prompt || "(no prompt)");
  body.force_task_id = job.id;
  pollProgress(job);
  try {
    finishJob(job, await api(`/sdapi/v1/${body.init_images ? "img2img" : "txt2img"}`, body));
  } catch (err) {
    failJob(job, err);
  }
  refreshGallery();
}

async function upscale(name) {
  const job = addJob("upscale", name);
  pollProgress(job);
  try {
    finishJob(job, await api("/latentloom/upscale", { name, id_task: job.id }));
  } catch (err) {
    failJob(job, err);
  }
  refreshGallery();
}

// ---------------------------------------------------------------- gallery and details

function galleryTile(item) {
  const li = document.createElement("li");
  li.className = "tile";
  const recipe = item.recipe || {};
  const open = document.createElement("button");
  open.type = "button";
  open.className = "thumb";
  open.setAttribute("aria-label", `Show recipe of ${item.name}`);
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = recipe.prompt || item.name;
  img.loading = "lazy";
  open.append(img);
  open.addEventListener("click", () => openDetails(item));
  const caption = document.createElement("div");
  caption.className = "tile-caption";
  caption.textContent = recipe.prompt || item.name;
  caption.title = caption.textContent;
  li.append(open, caption);
  if (state.info && state.info.upscaler) {
    const up = document.createElement("button");
    up.type = "button";
    up.className = "small-btn tile-upscale";
    up.textContent = "Upscale";
    up.setAttribute("aria-label", `Upscale ${item.name}`);
    up.addEventListener("click", () => upscale(item.name));
    li.append(up);
  }
  return li;
}

function renderGallery() {
  const list = $("gallery");
  const shown = state.gallery.slice(0, state.galleryShown);
  list.replaceChildren(...shown.map(galleryTile));
  if (state.gallery.length > shown.length) {
    const li = document.createElement("li");
    li.className = "tile more";
    const more = document.createElement("button");
    more.type = "button";
    more.textContent = `Show more (${state.gallery.length - shown.length})`;
    more.addEventListener("click", () => { state.galleryShown += GALLERY_PAGE; renderGallery(); });
    li.append(more);
    list.append(li);
  }
  $("gallery-empty").hidden = state.gallery.length > 0;
}

async function refreshGallery() {
  try {
    state.gallery = await api("/latentloom/gallery");
    renderGallery();
  } catch (err) {
    showError(`Could not load the gallery: ${err.message}`);
  }
}

const RECIPE_ROWS = [
  ["Prompt", (r) => r.prompt], ["Negative prompt", (r) => r.negative_prompt], ["Seed", (r) => r.seed],
  ["Steps", (r) => r.num_inference_steps], ["Sampler", (r) => SAMPLER_TITLES[r.sampler] || r.sampler],
  ["Schedule", (r) => (r.karras_sigmas === undefined ? undefined : r.karras_sigmas ? "Karras" : "Automatic")],
  ["Guidance (CFG)", (r) => r.guidance_scale], ["Size", (r) => (r.width ? `${r.width} × ${r.height}` : undefined)],
  ["Task", (r) => r.task], ["Denoising strength", (r) => r.strength], ["Model", (r) => r.model],
  ["ControlNet", (r) => (r.controlnets || []).map((c) =>
    `${String(c.model).split(/[\\/]/).pop()}, weight ${c.scale}, ${c.start}–${c.end} of the steps`).join("; ")],
  ["Model hash", (r) => r.model_hash], ["Precision", (r) => r.dtype], ["latentloom", (r) => r.latentloom_version],
];

function openDetails(item) {
  const recipe = item.recipe || {};
  state.detailsItem = item;
  $("details-title").textContent = item.name;
  $("details-image").src = item.url;
  $("details-image").alt = recipe.prompt || item.name;
  const download = $("details-download");
  download.href = item.url;  // the file itself, so its PNG text chunks (the recipe) come along
  download.setAttribute("download", item.name);
  const rows = [];
  for (const [label, get] of RECIPE_ROWS) {
    const value = get(recipe);
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    rows.push(dt, dd);
  }
  if (item.created) {
    const dt = document.createElement("dt");
    dt.textContent = "Created";
    const dd = document.createElement("dd");
    dd.textContent = new Date(item.created * 1000).toLocaleString();
    rows.push(dt, dd);
  }
  $("details-recipe").replaceChildren(...rows);
  $("details-json").textContent = JSON.stringify(recipe, null, 2);
  $("details-upscale").hidden = !(state.info && state.info.upscaler);
  $("details").showModal();
}

async function openDetailsByName(name) {
  let item = state.gallery.find((g) => g.name === name);
  if (!item) {
    await refreshGallery();
    item = state.gallery.find((g) => g.name === name);
  }
  if (item) openDetails(item);
  else showError(`${name} is not in the gallery (was the file moved?)`);
}

// ---------------------------------------------------------------- img2img: input image and mask

let maskEditor = null;  // created in wire(), see mask.js

async function loadInitImage(src) {
  const input = await maskEditor.load(src);
  $("canvas-wrap").classList.remove("empty");
  // The output keeps the input's shape at about the model's own pixel count (a photo given to the 64 px
  // bundled model is not made at photo size; a square stays square), in multiples of 8.
  const defaults = (state.info && state.info.defaults) || {};
  const scale = Math.sqrt(((defaults.width || 512) * (defaults.height || 512)) / (input.width * input.height));
  const round8 = (value) => Math.max(8, Math.round((value * scale) / 8) * 8);
  $("width").value = round8(input.width);
  $("height").value = round8(input.height);
  followOutputSize();
}

function loadInitFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => loadInitImage(reader.result).catch((err) => showError(err.message));
  reader.onerror = () => showError(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

// A Paint / Eraser pair of toggle buttons for a painter (the mask's or the control map's).
function wireTools(editor, brushButton, eraserButton) {
  const pick = (tool) => {
    editor.setTool(tool);
    brushButton.setAttribute("aria-pressed", String(tool === "brush"));
    eraserButton.setAttribute("aria-pressed", String(tool === "eraser"));
  };
  brushButton.addEventListener("click", () => pick("brush"));
  eraserButton.addEventListener("click", () => pick("eraser"));
}

function wireBrushSize(range, output) {
  range.addEventListener("input", () => { output.textContent = range.value; });
}

// ---------------------------------------------------------------- the control map

let controlMap = null;  // created in wire(), see controlmap.js

function showControlSize() {
  $("control-size").textContent = `${controlMap.width} × ${controlMap.height}`;
}

// The canvas takes the size in the Width / Height fields whenever they hold one (a half-typed, empty or
// over-the-limit size leaves it as it is: the server says what is wrong with it); the brush grows with it.
function followOutputSize(width = Number($("width").value), height = Number($("height").value)) {
  const maxPixels = ((state.info && state.info.limits) || {}).max_pixels || 4096 * 4096;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 8 || height < 8) return;
  if (width * height > maxPixels) return;
  controlMap.resize(width, height);
  showControlSize();
  const range = $("control-brush-size");
  range.max = Math.max(16, Math.round(Math.max(width, height) / 2));
  $("control-brush-size-out").textContent = range.value;
}

function loadControlFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => controlMap.load(reader.result).catch((err) => showError(err.message));
  reader.onerror = () => showError(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

function sendToImg2img(item) {
  loadInitImage(item.url).then(() => {
    applyRecipe(item.recipe || {});
    setMode("img2img");
    $("prompt").focus();
  }).catch((err) => showError(err.message));
}

// ---------------------------------------------------------------- wiring

function wire() {
  // Images smaller than their box (the bundled model's 64 px) are scaled up without blur; larger ones are
  // scaled down smoothly. Load events do not bubble, so listen in the capture phase.
  document.addEventListener("load", (event) => {
    const img = event.target;
    if (img.tagName === "IMG") img.classList.toggle("pixelated", img.naturalWidth < img.clientWidth);
  }, true);
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => setMode(mode()));
  }
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-last").disabled = true;
  $("seed-last").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("model").addEventListener("change", switchModel);
  $("gallery-refresh").addEventListener("click", refreshGallery);

  $("init-file").addEventListener("change", (event) => loadInitFile(event.target.files[0]));
  const wrap = $("canvas-wrap");
  wrap.addEventListener("dragover", (event) => { event.preventDefault(); wrap.classList.add("drop"); });
  wrap.addEventListener("dragleave", () => wrap.classList.remove("drop"));
  wrap.addEventListener("drop", (event) => {
    event.preventDefault();
    wrap.classList.remove("drop");
    loadInitFile(event.dataTransfer.files[0]);
  });
  wireBrushSize($("brush-size"), $("brush-size-out"));
  $("denoising_strength").addEventListener("input", () => {
    $("denoising-out").textContent = $("denoising_strength").value;
  });
  maskEditor = createMaskEditor({
    imageCanvas: $("image-canvas"), maskCanvas: $("mask-canvas"), brushSize: $("brush-size"),
  });
  wireTools(maskEditor, $("tool-brush"), $("tool-eraser"));
  $("mask-clear").addEventListener("click", () => maskEditor.clear());

  controlMap = createControlMap({ canvas: $("control-canvas"), brushSize: $("control-brush-size"), box: 176 });
  wireTools(controlMap, $("control-tool-brush"), $("control-tool-eraser"));
  wireBrushSize($("control-brush-size"), $("control-brush-size-out"));
  $("control-clear").addEventListener("click", () => controlMap.clear());
  $("control-file").addEventListener("change", (event) => loadControlFile(event.target.files[0]));
  for (const id of ["width", "height"]) $(id).addEventListener("change", () => followOutputSize());

  $("details-use").addEventListener("click", () => {
    applyRecipe(state.detailsItem.recipe || {});
    $("details").close();
    $("prompt").focus();
  });
  $("details-img2img").addEventListener("click", () => {
    sendToImg2img(state.detailsItem);
    $("details").close();
  });
  $("details-upscale").addEventListener("click", () => {
    upscale(state.detailsItem.name);
    $("details").close();
  });
}

async function start() {
  wire();
  try {
    await loadInfo({ useDefaults: true });
  } catch (err) {
    showError(`Could not read the server's settings: ${err.message}`);
  }
  await loadControlNets();
  await refreshGallery();
  document.body.dataset.ready = "1";  // lets tests (and people) know the page has its settings
}

start();
