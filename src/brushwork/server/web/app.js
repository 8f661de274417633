// brushwork web UI: plain JS, no build step. Talks to the native /api/v1 (and reads the hires fix's upscaler
// names from /sdapi/v1, which the native API does not list).
"use strict";

const $ = (id) => document.getElementById(id);
const API = "api/v1";
const STORE_KEY = "brushwork.settings.v1";
const STYLES_KEY = "brushwork.styles.v1";
const FIELDS = ["prompt", "negative_prompt", "model", "sampler", "scheduler", "steps", "cfg_scale", "cfg_end",
  "width", "height", "batch_size", "seed", "strength", "token_merging_ratio", "emphasis",
  "hires_upscaler", "hires_scale", "hires_steps", "hires_strength", "hires_checkpoint", "hires_sampler",
  "hires_scheduler", "hires_prompt", "hires_negative_prompt", "refiner", "refiner_switch_at",
  "mask_blur", "inpainting_fill", "inpaint_full_res_padding", "brush_size"];
const CHECKS = ["fast", "enable_hr", "enable_refiner", "inpaint_full_res"];  // checkboxes and radios saved with the settings
// the partner of each saved radio, checked when the saved one is not
const RADIO_PARTNER = { inpaint_full_res: "inpaint_area_whole", inpainting_mask_invert: "mask_mode_masked" };
// the hires fix's upscalers (request.py HIRES_UPSCALERS), used when /sdapi/v1 cannot be read
const FALLBACK_UPSCALERS = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
  "Latent (nearest)", "Latent (nearest-exact)", "Lanczos", "Nearest"];
// the families of depth models (models/families.py: a 5-channel UNet, 4 latent + the depth): img2img on one is
// depth2img
const DEPTH_FAMILIES = ["sd2-depth"];
const OUTPAINT_MASK_BLUR = 8;  // as `brushwork outpaint` (engine/tasks/outpaint.py)
const OUTPAINT_MAX_BORDER = 2048;
const CONTROLNET_UNITS = 3;  // A1111's ControlNet extension shows three units ("Multi-ControlNet") by default
const MODIFIERS = ["highly detailed", "oil painting", "watercolor", "photograph", "digital art",
  "pixel art", "cinematic lighting", "sunset", "pastel colors", "minimalist"];

const state = {
  initImage: null,      // data: URL of the uploaded init image
  depthMap: null,       // data: URL of the uploaded depth map (depth models), its file's bytes as they were
  modelFamilies: {},    // model name -> family (GET /api/v1/models), "" = the default model's
  modelSizes: {},       // model name -> [width, height] it draws at (GET /api/v1/models native_size), or null
  sizeByUser: false,    // width / height typed or read back from a picture: a model change leaves them
  depthShown: null,     // whether the panel is in its depth model layout now
  tool: "brush",        // the mask tool: "brush" or "eraser"
  lastSeed: null,       // the seed of the last finished image
  pending: [],          // job ids to follow, in order (one EventSource at a time: browsers allow few connections)
  current: null,        // the job id followed now
  galleryOffset: 0,
  details: null,        // the image shown in the details dialog
};

// ---- small helpers ---------------------------------------------------------------------------

async function api(path, options = {}) {
  const res = await fetch(`${API}/${path}`, {
    headers: { "Content-Type": "application/json" }, ...options,
  });
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const detail = body && (body.detail || body.errors);
    throw new Error(typeof detail === "string" ? detail : `the server answered ${res.status}`);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- settings in localStorage ----------------------------------------------------------------

function setChecked(id, on) {
  if (on) $(id).checked = true;
  else if (RADIO_PARTNER[id]) $(RADIO_PARTNER[id]).checked = true;
  else $(id).checked = false;
}

function saveSettings() {
  const values = {};
  for (const name of CHECKS) values[name] = $(name).checked;
  for (const name of FIELDS) values[name] = $(name).value;
  values.size_by_user = state.sizeByUser;
  localStorage.setItem(STORE_KEY, JSON.stringify(values));
}

function loadSettings() {
  let values = {};
  try { values = JSON.parse(localStorage.getItem(STORE_KEY) || "{}"); } catch (_) { values = {}; }
  applyModelDefaults();  // first visit: the model's own scale; a saved value wins below
  for (const name of CHECKS) setChecked(name, values[name] === true);
  for (const name of FIELDS) {
    if (values[name] === undefined) continue;
    const input = $(name);
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === values[name])) continue;
    input.value = values[name];
  }
  // (settings saved before the size followed the model: a saved size was the user's)
  state.sizeByUser = values.size_by_user ?? Boolean(values.width || values.height);
  if (!state.sizeByUser) applyNativeSize();
  updateOutputs();
}

// a model may recommend its own CFG scale and end, steps, sampler and schedule (a small or few-step model: SD-Turbo
// 1 step, CFG 1, SGM Uniform; an LCM model the LCM sampler): the fields follow the chosen model
function applyModelDefaults() {
  const defaults = (state.modelDefaults || {})[$("model").value] || {};
  $("cfg_scale").value = defaults.cfg_scale ?? 7;
  $("cfg_end").value = defaults.cfg_end ?? 1;
  $("steps").value = defaults.steps ?? 20;
  for (const [name, fallback] of [["sampler", "Euler a"], ["scheduler", "Automatic"]]) {
    const value = defaults[name] ?? fallback;
    if ([...$(name).options].some((o) => o.value === value)) $(name).value = value;
  }
  if (!state.sizeByUser) applyNativeSize();
  updateOutputs();
}

// the size the model draws at (SDXL 1024x1024, SD 2.x 768-v 768x768, a few-step model its own), as Forge and Easy
// Diffusion set it; empty (auto: the server's choice) where the list does not say
function applyNativeSize() {
  const size = (state.modelSizes || {})[$("model").value];
  $("width").value = size ? size[0] : "";
  $("height").value = size ? size[1] : "";
}

// a size typed by the user stays over model changes; both fields emptied: the size follows the model again
function sizeTyped() {
  state.sizeByUser = $("width").value !== "" || $("height").value !== "";
}

function updateOutputs() {
  $("steps-out").textContent = $("steps").value;
  $("cfg-out").textContent = $("cfg_scale").value;
  $("cfg-end-out").textContent = $("cfg_end").value;
  $("strength-out").textContent = $("strength").value;
  $("brush-size-out").textContent = `${$("brush_size").value} px`;
  $("mask-blur-out").textContent = $("mask_blur").value;
  $("padding-out").textContent = $("inpaint_full_res_padding").value;
  $("padding-field").hidden = !$("inpaint_full_res").checked;
  $("hires-scale-out").textContent = `${Number($("hires_scale").value).toFixed(2)}x`;
  $("hires-steps-out").textContent = $("hires_steps").value === "0" ? "same as steps" : $("hires_steps").value;
  $("hires-strength-out").textContent = $("hires_strength").value;
  $("refiner-switch-out").textContent = Number($("refiner_switch_at").value).toFixed(2);
  updateHires();
  updateRefiner();
  updateOutpaintSize();
  updateDepth();
  const prompt = $("prompt").value.toLowerCase();
  for (let i = 0; i < CONTROLNET_UNITS; i += 1) {
    for (const name of ["weight", "start", "end"]) cn(i, `${name}-out`).textContent = cn(i, name).value;
  }
  if (state.loras) updateLoraChips();
  for (const chip of document.querySelectorAll(".chip[data-text]")) {
    chip.classList.toggle("on", prompt.includes(chip.dataset.text));
  }
}

// ---- choices from the server -----------------------------------------------------------------

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => el("option", { value }, label)));
  if (selected !== undefined && items.some(([v]) => v === selected)) select.value = selected;
}

async function loadChoices() {
  // (all fetched first, then filled at once: the saved settings are applied right after)
  const [models, samplers, [upscalers, imageUpscalers]] = await Promise.all([api("models"), api("samplers"),
    hiresUpscalers()]);
  const current = models.models.find((m) => m.current);
  state.modelDefaults = Object.fromEntries(models.models.map((m) => [m.name, m.defaults || {}]));
  state.modelDefaults[""] = current ? current.defaults || {} : {};
  state.modelFamilies = Object.fromEntries(models.models.map((m) => [m.name, m.family]));
  state.modelFamilies[""] = current ? current.family : null;
  state.modelSizes = Object.fromEntries(models.models.map((m) => [m.name, m.native_size || null]));
  state.modelSizes[""] = current ? current.native_size || null : null;
  fillSelect($("model"), [["", current ? `default (${current.name})` : "default"],
    ...models.models.map((m) => [m.name, m.title])]);
  fillSelect($("sampler"), samplers.samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), samplers.schedule_types.map((s) => [s, s]), "Automatic");
  fillSelect($("hires_upscaler"), upscalers.map((name) => [name, name]), "Latent");
  // the hires fix's second pass and the refiner: the library's models, as the model picker lists them; "" = the
  // same as the first pass (not sent)
  const library = models.models.map((m) => [m.name, m.title]);
  fillSelect($("hires_checkpoint"), [["", "Use same checkpoint"], ...library]);
  fillSelect($("hires_sampler"), [["", "Use same sampler"], ...samplers.samplers.map((s) => [s.name, s.name])]);
  fillSelect($("hires_scheduler"), [["", "Use same scheduler"], ...samplers.schedule_types.map((s) => [s, s])]);
  const refiner = models.models.find((m) => m.family === "sdxl-refiner");
  fillSelect($("refiner"), library.length ? library : [["", "no models in the library"]],
    refiner ? refiner.name : undefined);
  fillSelect($("upscale-upscaler"), imageUpscalers.map((name) => [name, name]),
    imageUpscalers.find((name) => !["Lanczos", "Nearest"].includes(name)) || "Lanczos");
}

// [the hires fix's upscalers: the latent modes, then the picture upscalers; the picture upscalers alone (for the
// Upscale action)]: Lanczos, Nearest, then the library's upscaler models (engine/upscalers.py), "None" left out
async function hiresUpscalers() {
  try {
    const get = async (path) => {
      const res = await fetch(`sdapi/v1/${path}`);
      if (!res.ok) throw new Error(`the server answered ${res.status}`);
      return res.json();
    };
    const [latent, listed] = await Promise.all([get("latent-upscale-modes"), get("upscalers")]);
    const pictures = listed.filter((u) => u.name !== "None").map((u) => u.name);
    const names = [...latent.map((m) => m.name), ...pictures];
    return names.length ? [names, pictures] : [FALLBACK_UPSCALERS, ["Lanczos", "Nearest"]];
  } catch (_) {
    return [FALLBACK_UPSCALERS, ["Lanczos", "Nearest"]];
  }
}

// ---- hires fix -------------------------------------------------------------------------------

const floor8 = (v) => Math.max(8, v - (v % 8));

function updateHires() {
  const on = $("enable_hr").checked;
  const txt2img = !state.initImage;
  $("enable_hr").disabled = !txt2img;
  $("enable_hr").setAttribute("aria-expanded", String(on && txt2img));
  $("hires-panel").hidden = !on || !txt2img;
  $("hires-note").textContent = txt2img
    ? "Text to image: make the picture, upscale it, then denoise it again."
    : "Text to image only: remove the init image to use it.";
  $("hires-note").hidden = txt2img && on;
  const w = Number($("width").value), h = Number($("height").value), scale = Number($("hires_scale").value);
  $("hires-size").textContent = w && h
    ? `${w}x${h} → ${floor8(Math.floor(w * scale))}x${floor8(Math.floor(h * scale))}`
    : `the model's size x ${scale.toFixed(2)}`;
}

// ---- refiner ---------------------------------------------------------------------------------

// A1111's Refiner: another model (SDXL's refiner, or an SDXL checkpoint) runs the steps after "Switch at"
function updateRefiner() {
  const on = $("enable_refiner").checked;
  $("enable_refiner").setAttribute("aria-expanded", String(on));
  $("refiner-panel").hidden = !on;
  $("refiner-note").hidden = on;
}

// ---- prompt modifiers and saved styles -------------------------------------------------------

function setupModifiers() {
  const box = $("modifiers");
  for (const text of MODIFIERS) {
    box.append(el("button", {
      type: "button", class: "chip", "data-text": text, title: `add "${text}" to the prompt`,
      onclick: () => toggleModifier(text),
    }, text));
  }
}

function toggleModifier(text) {
  const prompt = $("prompt");
  const parts = prompt.value.split(",").map((p) => p.trim()).filter(Boolean);
  const i = parts.findIndex((p) => p.toLowerCase() === text);
  if (i >= 0) parts.splice(i, 1); else parts.push(text);
  prompt.value = parts.join(", ");
  updateOutputs();
  saveSettings();
}

function readStyles() {
  try { return JSON.parse(localStorage.getItem(STYLES_KEY) || "[]"); } catch (_) { return []; }
}

function renderStyles() {
  const styles = readStyles();
  fillSelect($("style-select"), styles.length ? styles.map((s, i) => [String(i), s.name])
    : [["", "no saved styles yet"]]);
}

function setupStyles() {
  renderStyles();
  $("style-save").addEventListener("click", () => {
    const name = $("style-name").value.trim();
    if (!name) { showError("Give the style a name first."); return; }
    const styles = readStyles().filter((s) => s.name !== name);
    styles.push({ name, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value });
    localStorage.setItem(STYLES_KEY, JSON.stringify(styles));
    $("style-name").value = "";
    showError("");
    renderStyles();
  });
  $("style-apply").addEventListener("click", () => {
    const style = readStyles()[Number($("style-select").value)];
    if (!style) return;
    // a style adds its text to what is already there, like A1111's styles
    const join = (a, b) => [a.trim(), b.trim()].filter(Boolean).join(", ");
    $("prompt").value = join($("prompt").value, style.prompt);
    $("negative_prompt").value = join($("negative_prompt").value, style.negative_prompt);
    updateOutputs();
    saveSettings();
  });
  $("style-delete").addEventListener("click", () => {
    const styles = readStyles();
    styles.splice(Number($("style-select").value), 1);
    localStorage.setItem(STYLES_KEY, JSON.stringify(styles));
    renderStyles();
  });
}

// ---- img2img upload --------------------------------------------------------------------------

function setInitImage(dataUrl) {
  state.initImage = dataUrl;
  const preview = $("init-preview");
  preview.hidden = !dataUrl;
  $("mask-editor").hidden = !dataUrl;
  $("inpaint-box").hidden = !dataUrl;
  $("outpaint-box").hidden = !dataUrl;
  $("init-controls").hidden = !dataUrl;
  $("dropzone").classList.toggle("compact", !!dataUrl);
  $("drop-hint").textContent = dataUrl ? "Drop another image here, or click to replace it"
    : "Drop an image here, or click to choose one";
  if (dataUrl) {
    preview.onload = () => { if (preview.src === dataUrl) resetMask(); };
    preview.src = dataUrl;
  } else {
    preview.removeAttribute("src");
    resetMask();
  }
  updateOutputs();
}
function readFile(file, use = setInitImage) {
  if (!file) return;
  if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
    showError(`"${file.name}" is not a PNG, JPEG or WEBP image.`);
    return;
  }
  const limit = window.brushworkLimits ? window.brushworkLimits.max_upload_bytes : 20 * 1024 * 1024;
  if (file.size > limit) {
    showError(`"${file.name}" is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limit / 1048576).toFixed(0)} MB.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => { showError(""); use(reader.result, file); };
  reader.readAsDataURL(file);
}

function setupUpload() {
  const zone = $("dropzone");
  const input = $("init-file");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => readFile(input.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => { e.preventDefault(); readFile(e.dataTransfer.files[0]); });
  $("init-clear").addEventListener("click", () => { input.value = ""; setInitImage(null); });
}

// ---- depth to image ---------------------------------------------------------------------------
// With a depth model chosen, the init image runs depth2img: the model keeps its depth (its own estimate, or the depth
// map given here). The mask tools, inpaint and outpaint need another model: they are put away meanwhile.

function isDepthModel() {
  return DEPTH_FAMILIES.includes((state.modelFamilies || {})[$("model").value]);
}

function updateDepth() {
  const depth = isDepthModel();
  $("depth-box").hidden = !depth;
  $("depth-note").textContent = state.initImage
    ? "Depth model: Generate keeps the init image's depth (depth to image)."
    : "Depth model: it needs an init image (drop one above), whose depth it keeps.";
  $("depth-preview").hidden = !state.depthMap;
  $("depth-clear").hidden = !state.depthMap;
  $("inpaint-box").hidden = $("outpaint-box").hidden = !state.initImage || depth;
  if (depth === state.depthShown) return;
  state.depthShown = depth;
  $("img2img-legend").textContent = depth ? "Depth to image: an init image, and its depth map (optional)"
    : "Image to image, inpaint, outpaint (optional)";
  $("mask-stage").classList.toggle("depth", depth);
  document.querySelector("#mask-editor .mask-tools").hidden = depth;
  updateMaskStatus();
}

function setDepthMap(dataUrl, file = null) {
  state.depthMap = dataUrl;
  const preview = $("depth-preview");
  const status = $("depth-status");
  if (dataUrl) {
    preview.onload = () => {
      if (preview.src !== dataUrl) return;
      const size = `${preview.naturalWidth}x${preview.naturalHeight}`;
      status.textContent = `${file ? `${file.name}, ` : ""}${size}: used instead of the model's estimate (white = near).`;
    };
    preview.src = dataUrl;
  } else {
    preview.removeAttribute("src");
    status.textContent = "Optional: without a depth map the model estimates the init image's depth.";
  }
  updateDepth();
}

function setupDepth() {
  const input = $("depth-file");
  $("depth-choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => readFile(input.files[0], setDepthMap));
  $("depth-clear").addEventListener("click", () => { input.value = ""; setDepthMap(null); });
}

// ---- the inpaint mask ------------------------------------------------------------------------
// The mask canvas has the init image's natural size and lies over its preview (CSS scales both alike). What is
// painted has alpha 255 (shown semi-transparent by CSS); the PNG sent is white where painted, black elsewhere.

function maskContext() {
  return $("mask-canvas").getContext("2d", { willReadFrequently: true });
}

// the canvas sized to the init image (which clears it); the stage takes the image's aspect ratio
function resetMask() {
  const canvas = $("mask-canvas");
  const preview = $("init-preview");
  const w = state.initImage ? preview.naturalWidth || 8 : 8, h = state.initImage ? preview.naturalHeight || 8 : 8;
  canvas.width = w;
  canvas.height = h;
  const stage = $("mask-stage");
  stage.style.setProperty("--w", String(w));
  stage.style.setProperty("--h", String(h));
  stage.classList.toggle("pixelated", Math.max(w, h) < 256);  // small pictures: show the pixels, not a blur
  updateMaskStatus();
  updateOutpaintSize();
}

// true when some pixel of the mask is painted (then the job is an inpaint)
function maskPainted() {
  const canvas = $("mask-canvas");
  if (!state.initImage || canvas.width < 1) return false;
  const data = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
  return false;
}

function updateMaskStatus() {
  if (!state.initImage || isDepthModel()) { $("mask-status").textContent = ""; return; }
  $("mask-status").textContent = maskPainted()
    ? "Mask painted: Generate inpaints it (white = repaint)."
    : "Paint over the image to inpaint a part of it; with no mask, Generate runs image to image.";
}

// the mask as a PNG data: URL at the init image's natural size: white = repaint, black = keep
function maskPng() {
  const canvas = $("mask-canvas");
  const { width: w, height: h } = canvas;
  const painted = maskContext().getImageData(0, 0, w, h);
  const out = new ImageData(w, h);
  for (let i = 0; i < painted.data.length; i += 4) {
    const v = painted.data[i + 3];
    out.data[i] = v; out.data[i + 1] = v; out.data[i + 2] = v; out.data[i + 3] = 255;
  }
  const flat = Object.assign(document.createElement("canvas"), { width: w, height: h });
  flat.getContext("2d").putImageData(out, 0, 0);
  return flat.toDataURL("image/png");
}

function invertMask() {
  const canvas = $("mask-canvas");
  const ctx = maskContext();
  const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const d = image.data;
  for (let i = 0; i < d.length; i += 4) {
    d[i] = 255; d[i + 1] = 255; d[i + 2] = 255; d[i + 3] = 255 - d[i + 3];
  }
  ctx.putImageData(image, 0, 0);
  updateMaskStatus();
}

function clearMask() {
  const canvas = $("mask-canvas");
  maskContext().clearRect(0, 0, canvas.width, canvas.height);
  updateMaskStatus();
}

function setTool(tool) {
  state.tool = tool;
  $("mask-brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("mask-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  $("mask-stage").classList.toggle("erasing", tool === "eraser");
}

function setupMask() {
  const canvas = $("mask-canvas");
  const cursor = $("brush-cursor");
  let last = null;  // the stroke's last point, in image pixels; null = not drawing
  let pointerId = null;

  const toImage = (e) => {
    const rect = canvas.getBoundingClientRect();
    return { x: ((e.clientX - rect.left) * canvas.width) / rect.width,
      y: ((e.clientY - rect.top) * canvas.height) / rect.height };
  };
  const showCursor = (e) => {
    const rect = canvas.getBoundingClientRect();
    const side = (Number($("brush_size").value) * rect.width) / canvas.width;
    cursor.style.width = cursor.style.height = `${side}px`;
    cursor.style.left = `${e.clientX - rect.left}px`;
    cursor.style.top = `${e.clientY - rect.top}px`;
    cursor.hidden = e.pointerType === "touch";
  };
  // one segment of the stroke: a round-capped line, so a fast drag (few events far apart) leaves no gaps
  const segment = (from, to) => {
    const ctx = maskContext();
    ctx.save();
    ctx.globalCompositeOperation = state.tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush_size").value);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
    ctx.restore();
  };
  const end = (e) => {
    if (e.pointerId !== pointerId) return;
    last = null;
    pointerId = null;
    if (canvas.hasPointerCapture(e.pointerId)) canvas.releasePointerCapture(e.pointerId);
    updateMaskStatus();
  };

  canvas.addEventListener("pointerdown", (e) => {
    if (pointerId !== null || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    pointerId = e.pointerId;
    canvas.setPointerCapture(e.pointerId);
    last = toImage(e);
    segment(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    showCursor(e);
    if (e.pointerId !== pointerId || last === null) return;
    const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const point = toImage(ev);
      segment(last, point);
      last = point;
    }
  });
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerleave", () => { cursor.hidden = true; });
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());

  $("mask-brush").addEventListener("click", () => setTool("brush"));
  $("mask-eraser").addEventListener("click", () => setTool("eraser"));
  $("mask-invert").addEventListener("click", invertMask);
  $("mask-clear").addEventListener("click", clearMask);
  // keyboard: B brush, E eraser, [ and ] the brush size, while the focus is in the mask tools
  $("mask-editor").addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const size = $("brush_size");
    const step = Math.max(1, Math.round(Number(size.value) / 8));
    if (e.key === "b" || e.key === "B") setTool("brush");
    else if (e.key === "e" || e.key === "E") setTool("eraser");
    else if (e.key === "[") size.value = Math.max(1, Number(size.value) - step);
    else if (e.key === "]") size.value = Math.min(Number(size.max), Number(size.value) + step);
    else return;
    e.preventDefault();
    updateOutputs();
    saveSettings();
  });
}

// ---- outpaint --------------------------------------------------------------------------------

const SIDES = ["left", "right", "top", "bottom"];

// the borders asked for, right and bottom grown so the canvas is a multiple of 8 (as engine/tasks/outpaint.py)
function outpaintBorders() {
  const preview = $("init-preview");
  const w = preview.naturalWidth, h = preview.naturalHeight;
  const b = {};
  for (const side of SIDES) {
    const raw = $(`outpaint_${side}`).value.trim();
    const value = raw === "" ? 0 : Number(raw);
    if (!Number.isInteger(value) || value < 0 || value > OUTPAINT_MAX_BORDER) {
      throw new Error(`Outpaint ${side} must be a whole number of pixels from 0 to ${OUTPAINT_MAX_BORDER}.`);
    }
    b[side] = value;
  }
  const mod8 = (v) => ((v % 8) + 8) % 8;
  b.right += mod8(-(w + b.left + b.right));
  b.bottom += mod8(-(h + b.top + b.bottom));
  return { ...b, w, h, width: w + b.left + b.right, height: h + b.top + b.bottom };
}

function updateOutpaintSize() {
  const preview = $("init-preview");
  if (!state.initImage || !preview.naturalWidth) { $("outpaint-size").textContent = ""; return; }
  try {
    const b = outpaintBorders();
    const any = SIDES.some((side) => Number($(`outpaint_${side}`).value) > 0);
    $("outpaint-size").textContent = any ? `${b.w}x${b.h} → ${b.width}x${b.height}` : `${b.w}x${b.h}: choose a border`;
  } catch (err) {
    $("outpaint-size").textContent = err.message;
  }
}

// the grown canvas (its new border the picture's edge pixels stretched out) and its mask (white on the border)
async function outpaintImages() {
  const preview = $("init-preview");
  if (preview.decode) await preview.decode();
  const b = outpaintBorders();
  if (!SIDES.some((side) => Number($(`outpaint_${side}`).value) > 0)) {
    throw new Error("Choose a border to outpaint: left, right, top and/or bottom pixels.");
  }
  const { w, h, width, height } = b;
  const source = Object.assign(document.createElement("canvas"), { width: w, height: h });
  const sctx = source.getContext("2d");
  sctx.drawImage(preview, 0, 0);
  const src = new Uint32Array(sctx.getImageData(0, 0, w, h).data.buffer);
  const grown = new ImageData(width, height);
  const mask = new ImageData(width, height);
  const dst = new Uint32Array(grown.data.buffer);
  const m = new Uint32Array(mask.data.buffer);
  const WHITE = 0xffffffff, BLACK = new Uint32Array(new Uint8ClampedArray([0, 0, 0, 255]).buffer)[0];
  for (let y = 0; y < height; y++) {
    const sy = Math.min(h - 1, Math.max(0, y - b.top));
    const inY = y >= b.top && y < b.top + h;
    for (let x = 0; x < width; x++) {
      const sx = Math.min(w - 1, Math.max(0, x - b.left));
      dst[y * width + x] = src[sy * w + sx];
      m[y * width + x] = inY && x >= b.left && x < b.left + w ? BLACK : WHITE;
    }
  }
  const toPng = (image) => {
    const c = Object.assign(document.createElement("canvas"), { width, height });
    c.getContext("2d").putImageData(image, 0, 0);
    return c.toDataURL("image/png");
  };
  return { init: toPng(grown), mask: toPng(mask), width, height };
}

function setupOutpaint() {
  for (const button of document.querySelectorAll("#outpaint-box [data-side]")) {
    button.addEventListener("click", () => {
      const sides = button.dataset.side === "all" ? SIDES : [button.dataset.side];
      for (const side of sides) {
        const input = $(`outpaint_${side}`);
        input.value = Math.min(OUTPAINT_MAX_BORDER, (Number(input.value) || 0) + 64);
      }
      updateOutpaintSize();
    });
  }
  $("outpaint-reset").addEventListener("click", () => {
    for (const side of SIDES) $(`outpaint_${side}`).value = 0;
    updateOutpaintSize();
  });
  $("outpaint-run").addEventListener("click", () => generate("outpaint"));
}

// ---- LoRAs and embeddings --------------------------------------------------------------------
// /sdapi/v1/loras (A1111's Lora extension route) and /sdapi/v1/embeddings: a click on a LoRA inserts
// <lora:name:strength> at the prompt's cursor, or removes its tag when the prompt has it (as A1111's cards toggle);
// a click on an embedding inserts its name.

async function sdapi(path, options = {}) {
  const res = await fetch(`sdapi/v1/${path}`, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const detail = body && (body.detail || body.error);
    throw new Error(typeof detail === "string" ? detail : `the server answered ${res.status}`);
  }
  return body;
}

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

// the <lora:...> tags in the prompt naming this LoRA (by its name or alias)
function loraTagPattern(lora) {
  const names = [lora.name, lora.alias].filter(Boolean).map(escapeRegExp).join("|");
  return new RegExp(`<lora:(?:${names})(?::[^>]*)?>`, "g");
}

function insertAtCursor(text) {
  const prompt = $("prompt");
  const start = prompt.selectionStart ?? prompt.value.length;
  const end = prompt.selectionEnd ?? start;
  const before = prompt.value.slice(0, start), after = prompt.value.slice(end);
  const pad = (before && !/[\s,(]$/.test(before) ? " " : "");
  const padAfter = (after && !/^[\s,)]/.test(after) ? " " : "");
  prompt.value = before + pad + text + padAfter + after;
  const cursor = (before + pad + text).length;
  prompt.setSelectionRange(cursor, cursor);
}

function toggleLora(lora) {
  const prompt = $("prompt");
  const pattern = loraTagPattern(lora);
  if (pattern.test(prompt.value)) {
    prompt.value = prompt.value.replace(loraTagPattern(lora), "").replace(/[ \t]{2,}/g, " ")
      .replace(/\s+,/g, ",").replace(/,\s*,/g, ",").trim().replace(/^,\s*|,$/g, "");
  } else {
    const strength = Number($("lora-strength").value);
    insertAtCursor(`<lora:${lora.name}:${Number.isFinite(strength) ? strength : 1}>`);
  }
  updateOutputs();
  saveSettings();
}

function updateLoraChips() {
  const prompt = $("prompt").value;
  for (const chip of document.querySelectorAll("#lora-list .lora-chip")) {
    const lora = state.loras[Number(chip.dataset.index)];
    if (lora) chip.classList.toggle("on", loraTagPattern(lora).test(prompt));
  }
}

function renderLoras() {
  const filter = $("lora-filter").value.trim().toLowerCase();
  const items = state.loras.map((lora, i) => [lora, i])
    .filter(([lora]) => !filter || `${lora.name} ${lora.alias || ""}`.toLowerCase().includes(filter));
  $("lora-list").replaceChildren(...(items.length ? items.map(([lora, i]) => el("button", {
    type: "button", class: "chip lora-chip", "data-index": String(i), "data-name": lora.name,
    title: `${lora.alias && lora.alias !== lora.name ? `alias "${lora.alias}" · ` : ""}${lora.path}`,
    onclick: () => toggleLora(lora),
  }, lora.name)) : [el("span", { class: "hint" },
    state.loras.length ? "No LoRA matches." : "No LoRAs in the library's lora/ folder.")]));
  updateLoraChips();
}

async function loadLoras(refresh = false) {
  const status = $("lora-status");
  try {
    if (refresh) {
      status.textContent = "reading the lora/ folder…";
      await sdapi("refresh-loras", { method: "POST" });
    }
    const [loras, embeddings] = await Promise.all([sdapi("loras"), sdapi("embeddings").catch(() => ({ loaded: {} }))]);
    state.loras = Array.isArray(loras) ? loras : [];
    status.textContent = refresh ? `${state.loras.length} LoRA(s)` : "";
    renderLoras();
    const names = Object.keys((embeddings && embeddings.loaded) || {}).sort();
    $("embedding-list").replaceChildren(...(names.length ? names.map((name) => el("button", {
      type: "button", class: "chip embedding-chip", "data-name": name, title: `add "${name}" to the prompt`,
      onclick: () => { insertAtCursor(name); updateOutputs(); saveSettings(); },
    }, name)) : [el("span", { class: "hint" }, "No embeddings for this model.")]));
  } catch (err) {
    status.textContent = `Cannot list the LoRAs: ${err.message}`;
  }
}

function setupLoras() {
  state.loras = [];
  $("lora-refresh").addEventListener("click", () => loadLoras(true));
  $("lora-filter").addEventListener("input", renderLoras);
  for (const id of ["lora-filter", "lora-strength"]) {  // Enter there is not "generate"
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) e.preventDefault(); });
  }
  $("lora-box").addEventListener("toggle", () => { if ($("lora-box").open) loadLoras(); });
  loadLoras();
}

// ---- ControlNet ------------------------------------------------------------------------------
// The units of A1111's ControlNet extension, one tab each: its preprocessors (/controlnet/module_list), the library's
// ControlNets (/controlnet/model_list), a preview of the preprocessed map (/controlnet/detect); Generate sends the
// enabled units in the job's "controlnet" list, and the maps they used (the result's extras.controlnet_maps) are shown
// under the result.

const cn = (unit, name) => $(`cn-${name}-${unit}`);

async function loadControlNet() {
  try {
    const get = async (path) => {
      const res = await fetch(`controlnet/${path}`);
      if (!res.ok) throw new Error(`the server answered ${res.status}`);
      return res.json();
    };
    const [modules, models] = await Promise.all([get("module_list"), get("model_list")]);
    const detail = modules.module_detail || {};
    for (let i = 0; i < CONTROLNET_UNITS; i += 1) {
      fillSelect(cn(i, "module"), modules.module_list.map((name) => [name,
        detail[name] && detail[name].model_free === false ? `${name} (needs annotator weights)` : name]),
      cn(i, "module").value || "none");
      fillSelect(cn(i, "model"), models.model_list.length ? models.model_list.map((m) => [m, m])
        : [["", "no ControlNets in the library's controlnet/ folder"]], cn(i, "model").value);
    }
  } catch (err) {
    cn(0, "status").textContent = `Cannot list ControlNet's choices: ${err.message}`;
  }
}

function setControlImage(unit, dataUrl) {
  state.controlImages[unit] = dataUrl;
  const preview = cn(unit, "image-preview");
  preview.hidden = !dataUrl;
  cn(unit, "clear").hidden = !dataUrl;
  cn(unit, "map").hidden = true;
  cn(unit, "map").removeAttribute("src");
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
  cn(unit, "image-note").textContent = dataUrl ? "" : "No image: img2img follows the init image.";
  if (dataUrl) cn(unit, "enabled").checked = true;
  updateControlTabs();
}

async function controlNetPreview(unit) {
  const image = state.controlImages[unit] || state.initImage;
  const status = cn(unit, "status");
  if (!image) { status.textContent = "Choose a control image first."; return; }
  const button = cn(unit, "preview");
  button.disabled = true;
  status.textContent = "preprocessing…";
  try {
    const res = await fetch("controlnet/detect", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ controlnet_module: cn(unit, "module").value, controlnet_input_images: [image] }),
    });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new Error((body && body.detail) || `the server answered ${res.status}`);
    cn(unit, "map").src = `data:image/png;base64,${body.images[0]}`;
    cn(unit, "map").hidden = false;
    status.textContent = `${cn(unit, "module").value} map`;
  } catch (err) {
    status.textContent = `Cannot preview: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

// the job's "controlnet" list: the enabled units, in order
function controlNetUnits() {
  const units = [];
  for (let i = 0; i < CONTROLNET_UNITS; i += 1) {
    if (!cn(i, "enabled").checked) continue;
    if (!cn(i, "model").value) {
      throw new Error(`ControlNet unit ${i} is on but the library has no ControlNet model to use.`);
    }
    if (!state.controlImages[i] && !state.initImage) {
      throw new Error(`ControlNet unit ${i} is on but has no picture: choose a control image (or an init image).`);
    }
    units.push({
      model: cn(i, "model").value,
      image: state.controlImages[i] || null,  // null: the init image
      module: cn(i, "module").value || "none",
      weight: Number(cn(i, "weight").value),
      guidance_start: Number(cn(i, "start").value),
      guidance_end: Number(cn(i, "end").value),
      control_mode: cn(i, "control-mode").value,
    });
  }
  return units;
}

function showControlMaps(maps) {
  const box = $("cn-used");
  box.hidden = !(maps && maps.length);
  box.replaceChildren(...(maps || []).map((url, i) => el("figure", {},
    el("img", { src: url, alt: `ControlNet unit ${i} map` }), el("figcaption", {}, `ControlNet ${i} map`))));
}

function showControlTab(unit) {
  for (let i = 0; i < CONTROLNET_UNITS; i += 1) {
    cn(i, "tab").setAttribute("aria-selected", String(i === unit));
    cn(i, "tab").tabIndex = i === unit ? 0 : -1;
    cn(i, "unit").hidden = i !== unit;
  }
}

// a tab says whether its unit is on
function updateControlTabs() {
  for (let i = 0; i < CONTROLNET_UNITS; i += 1) cn(i, "tab").classList.toggle("on", cn(i, "enabled").checked);
}

function setupControlNet() {
  state.controlImages = Array(CONTROLNET_UNITS).fill(null);
  const template = $("cn-unit-template").content;
  for (let i = 0; i < CONTROLNET_UNITS; i += 1) {
    const unit = template.firstElementChild.cloneNode(true);
    for (const node of [unit, ...unit.querySelectorAll("[data-cn]")]) node.id = `cn-${node.dataset.cn}-${i}`;
    unit.setAttribute("aria-labelledby", `cn-tab-${i}`);
    $("cn-units").append(unit);
    $("cn-tabs").append(el("button", {
      type: "button", role: "tab", id: `cn-tab-${i}`, "aria-controls": unit.id, onclick: () => showControlTab(i),
    }, `Unit ${i}`));
    const input = cn(i, "file");
    cn(i, "choose").addEventListener("click", () => input.click());
    input.addEventListener("change", () => readFile(input.files[0], (url) => setControlImage(i, url)));
    cn(i, "clear").addEventListener("click", () => { input.value = ""; setControlImage(i, null); });
    cn(i, "preview").addEventListener("click", () => controlNetPreview(i));
    cn(i, "enabled").addEventListener("change", updateControlTabs);
  }
  // arrow keys move between the tabs, as the ARIA tabs pattern has it
  $("cn-tabs").addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    const current = [...$("cn-tabs").children].findIndex((tab) => tab.getAttribute("aria-selected") === "true");
    if (!step || current < 0) return;
    const next = (current + step + CONTROLNET_UNITS) % CONTROLNET_UNITS;
    showControlTab(next);
    cn(next, "tab").focus();
  });
  showControlTab(0);
  updateControlTabs();
  $("controlnet-box").addEventListener("toggle", () => { if ($("controlnet-box").open) loadControlNet(); });
  loadControlNet();
}

// ---- generating ------------------------------------------------------------------------------

// the job body for /api/v1/jobs: txt2img (with the hires fix when on), img2img, inpaint (a painted mask), or
// outpaint (kind "outpaint": an inpaint of the grown canvas's new border)
async function buildRequest(kind = "generate") {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  // a size that only follows the model is its text to image size: image to image keeps the init image's (null)
  const ownSize = state.sizeByUser || !state.initImage;
  const body = {
    mode: "txt2img",
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value || null,
    sampler: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: num("steps"),
    cfg_scale: num("cfg_scale"),
    cfg_end: num("cfg_end"),
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
    width: ownSize ? num("width") : null,
    height: ownSize ? num("height") : null,
    batch_size: num("batch_size") || 1,
    fast: $("fast").checked,
    token_merging_ratio: Number($("token_merging_ratio").value) || 0,
    emphasis: $("emphasis").value,
  };
  const units = controlNetUnits();
  if (units.length) body.controlnet = units;
  // the refiner's fields only when it is on: a request without it stays as it was
  if ($("enable_refiner").checked) {
    if (!$("refiner").value) throw new Error("The refiner is on but the library has no model to use as one.");
    body.refiner = $("refiner").value;
    body.refiner_switch_at = num("refiner_switch_at");
  }
  if (kind === "outpaint") {
    if (!state.initImage) throw new Error("Outpaint needs an init image: drop one above first.");
    const grown = await outpaintImages();
    // as `brushwork outpaint`: the canvas's own size, the border started from its surroundings ("fill")
    const fill = $("inpainting_fill").value;
    return Object.assign(body, {
      mode: "inpaint", init_image: grown.init, mask_image: grown.mask, width: null, height: null,
      strength: num("strength"), mask_blur: OUTPAINT_MASK_BLUR,
      inpainting_fill: fill === "original" ? "fill" : fill, inpaint_full_res: false, inpainting_mask_invert: false,
    });
  }
  if (isDepthModel() && !state.initImage) {
    throw new Error("This is a depth model: it needs an init image (drop one above), or choose another model.");
  }
  if (state.initImage) {
    body.mode = "img2img";
    body.init_image = state.initImage;
    body.strength = num("strength");
    if (isDepthModel()) {  // the model keeps the picture's depth: its estimate, or the depth map given
      body.mode = "depth2img";
      if (state.depthMap) body.depth_map = state.depthMap;
    } else if (maskPainted()) {
      Object.assign(body, {
        mode: "inpaint",
        mask_image: maskPng(),
        mask_blur: num("mask_blur") ?? 4,
        inpainting_fill: $("inpainting_fill").value,
        inpaint_full_res: $("inpaint_full_res").checked,
        inpaint_full_res_padding: num("inpaint_full_res_padding") ?? 32,
        inpainting_mask_invert: $("inpainting_mask_invert").checked,
      });
    }
  } else if ($("enable_hr").checked) {
    Object.assign(body, {
      hires_scale: num("hires_scale"),
      hires_upscaler: $("hires_upscaler").value,
      hires_steps: num("hires_steps") || 0,
      hires_strength: num("hires_strength"),
    });
    // "Use same ..." and an empty prompt are not sent: the first pass's
    for (const name of ["hires_checkpoint", "hires_sampler", "hires_scheduler"]) {
      if ($(name).value) body[name] = $(name).value;
    }
    for (const name of ["hires_prompt", "hires_negative_prompt"]) {
      if ($(name).value.trim()) body[name] = $(name).value;
    }
  }
  return body;
}

async function generate(kind = "generate") {
  showError("");
  saveSettings();
  const buttons = [$("generate"), $("outpaint-run")];
  for (const button of buttons) button.disabled = true;
  try {
    const job = await api("jobs", { method: "POST", body: JSON.stringify(await buildRequest(kind)) });
    follow(job.id);
    refreshQueue();
  } catch (err) {
    showError(err.message);
  } finally {
    for (const button of buttons) button.disabled = false;
  }
}

function setProgress(fraction, text, failed = false) {
  const pct = Math.round(fraction * 100);
  $("progress-wrap").hidden = false;
  $("progress-text").classList.toggle("failed", failed);
  $("bar").style.width = `${pct}%`;
  $("progressbar").setAttribute("aria-valuenow", String(pct));
  $("progress-text").textContent = text;
}

function follow(jobId) {
  if (jobId === state.current || state.pending.includes(jobId)) return;
  state.pending.push(jobId);
  if (state.current === null) followNext();
}

function followNext() {
  const jobId = state.pending.shift();
  state.current = jobId === undefined ? null : jobId;
  if (state.current === null) return;
  const source = new EventSource(`${API}/jobs/${jobId}/events`);
  const close = () => { source.close(); state.current = null; refreshQueue(); followNext(); };
  source.addEventListener("queued", (e) => {
    const { position } = JSON.parse(e.data);
    setProgress(0, position > 1 ? `queued: ${position - 1} job(s) ahead` : "starting…");
  });
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    const eta = p.eta > 0 ? ` · about ${Math.ceil(p.eta)} s left` : "";
    const batch = p.batches > 1 ? ` · batch ${p.batch + 1}/${p.batches}` : "";
    setProgress(p.fraction, `step ${p.step}/${p.total}${batch}${eta}`);
    if (p.preview) {
      $("live-preview").src = p.preview;
      $("live-preview").hidden = false;
      $("stage-empty").hidden = true;
    }
  });
  source.addEventListener("done", (e) => {
    const { job } = JSON.parse(e.data);
    setProgress(1, `done in ${(job.finished - job.started).toFixed(1)} s`);
    showResults(job);
    close();
    refreshGallery();
  });
  source.addEventListener("error", (e) => {
    if (e.data) {
      const { error } = JSON.parse(e.data);
      showError(error || "the job failed");
      setProgress(0, `failed: ${error || "unknown error"}`, true);
      $("live-preview").hidden = true;
      close();
    } else if (source.readyState === EventSource.CLOSED) {
      close();
    }
    // otherwise the connection dropped: EventSource reconnects by itself
  });
  source.addEventListener("cancelled", () => {
    setProgress(0, "cancelled");
    $("live-preview").hidden = true;
    close();
  });
}

function showResults(job) {
  const notes = (job.result && job.result.notes) || [];
  $("notes").textContent = notes.join("\n");
  $("notes").hidden = !notes.length;
  $("live-preview").hidden = true;
  $("stage-empty").hidden = true;
  const images = (job.result && job.result.images) || [];
  $("results").replaceChildren(...images.map((img) => el("img", {
    src: img.url, alt: job.request.prompt,
    // small pictures are shown at a comfortable size, large ones fit the panel
    style: `width: ${Math.min(512, Math.max(256, img.width))}px`,
    title: `seed ${img.seed}`, onclick: () => openDetails(img.id),
  })));
  if (images.length) state.lastSeed = images[0].seed;
  // depth2img: the depth map it used (the model's estimate or the one given, at the latent size), beside them
  const depthMap = job.result && job.result.extras && job.result.extras.depth_map;
  $("depth-used").hidden = !depthMap;
  if (depthMap) $("depth-used-img").src = depthMap;
  else $("depth-used-img").removeAttribute("src");
  showControlMaps(job.result && job.result.extras && job.result.extras.controlnet_maps);
}

// ---- queue -----------------------------------------------------------------------------------

async function refreshQueue() {
  let data;
  try {
    const [running, queued] = await Promise.all([api("jobs?status=running"), api("jobs?status=queued&limit=100")]);
    data = [...running.jobs, ...queued.jobs.reverse()];
    const c = queued.counts;
    $("server-status").textContent = `${c.running} running · ${c.queued} queued · ${c.done} done`;
  } catch (err) {
    $("server-status").textContent = "server unreachable";
    return;
  }
  const list = $("queue");
  if (!data.length) { list.replaceChildren(el("li", { class: "empty" }, "Nothing queued.")); return; }
  list.replaceChildren(...data.map((job) => el("li", { "data-job": job.id },
    el("span", { class: `q-status ${job.status}` },
      job.status === "running" ? `${Math.round((job.progress || 0) * 100)}%` : `#${job.position}`),
    el("span", { class: "q-prompt", title: job.request.prompt }, job.request.prompt || "(no prompt)"),
    el("button", { type: "button", class: "quiet", title: "Cancel this job",
      onclick: () => cancelJob(job.id) }, "Cancel"))));
}

async function cancelJob(id) {
  try { await api(`jobs/${id}/cancel`, { method: "POST" }); } catch (err) { showError(err.message); }
  refreshQueue();
}

// ---- gallery ---------------------------------------------------------------------------------

const PAGE = 30;

async function refreshGallery(append = false) {
  if (!append) state.galleryOffset = 0;
  const q = encodeURIComponent($("gallery-search").value.trim());
  let data;
  try {
    data = await api(`images?q=${q}&limit=${PAGE}&offset=${state.galleryOffset}`);
  } catch (err) { showError(err.message); return; }
  const items = data.images.map((img) => el("figure", { onclick: () => openDetails(img.id), title: img.prompt },
    el("img", { src: img.thumb_url, alt: img.prompt, loading: "lazy" }),
    el("figcaption", {}, img.prompt || "(no prompt)")));
  const gallery = $("gallery");
  if (append) gallery.append(...items);
  else gallery.replaceChildren(...(items.length ? items : [el("p", { class: "empty" },
    q ? "No pictures match that search." : "No pictures yet.")]));
  state.galleryOffset += data.images.length;
  $("gallery-more").hidden = data.images.length < PAGE;
}

async function openDetails(id) {
  let meta;
  try { meta = await api(`images/${id}/meta`); } catch (err) { showError(err.message); return; }
  state.details = meta;
  $("details-img").src = meta.url;
  $("details-img").alt = meta.prompt;
  $("details-text").textContent = meta.infotext || meta.prompt;
  $("details-download").href = `${meta.url}?download=true`;
  $("details-download").setAttribute("download", meta.file.split("/").pop());
  $("upscale-status").textContent = "";
  $("details").showModal();
}

// the picture of the details dialog as a data: URL
async function detailsDataUrl() {
  const res = await fetch(state.details.url);
  if (!res.ok) throw new Error(`the server answered ${res.status}`);
  const blob = await res.blob();
  return new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(blob);
  });
}

// the details dialog's picture upscaled (A1111's extras: /sdapi/v1/extra-single-image); the dialog then shows the
// result, and Download and "Use as init image" take it
async function detailsUpscale() {
  const meta = state.details;
  if (!meta) return;
  const upscaler = $("upscale-upscaler").value;
  const scale = Number($("upscale-scale").value) || 2;
  const button = $("details-upscale");
  button.disabled = true;
  $("upscale-status").textContent = `upscaling with ${upscaler}…`;
  try {
    const res = await fetch("sdapi/v1/extra-single-image", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: await detailsDataUrl(), upscaler_1: upscaler, upscaling_resize: scale }),
    });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new Error((body && body.detail) || `the server answered ${res.status}`);
    const url = `data:image/png;base64,${body.image}`;
    const img = $("details-img");
    await new Promise((ok) => { img.onload = ok; img.onerror = ok; img.src = url; });
    state.details = { ...meta, url };
    $("details-download").href = url;
    $("details-download").setAttribute("download", meta.file.split("/").pop().replace(/(\.\w+)?$/, `-x${scale}.png`));
    $("upscale-status").textContent = `${img.naturalWidth}x${img.naturalHeight}, ${upscaler} ${scale}x`;
  } catch (err) {
    $("upscale-status").textContent = `Cannot upscale: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

// the picture shown in the details dialog becomes the init image (to inpaint or outpaint it further)
async function detailsToInit() {
  const meta = state.details;
  if (!meta) return;
  try {
    setInitImage(await detailsDataUrl());
    $("details").close();
    $("dropzone").scrollIntoView({ block: "nearest" });
  } catch (err) {
    showError(`Cannot load that picture: ${err.message}`);
  }
}

function reuseSettings() {
  const meta = state.details;
  if (!meta) return;
  const r = meta.request || {};
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", r.prompt ?? meta.prompt);
  set("negative_prompt", r.negative_prompt ?? meta.negative_prompt);
  set("sampler", r.sampler);
  set("scheduler", r.scheduler);
  set("steps", r.steps);
  set("cfg_scale", r.cfg_scale);
  set("cfg_end", r.cfg_end ?? 1);  // (older history rows have none: CFG ran on every step)
  set("seed", meta.seed);
  set("width", meta.width || r.width);
  set("height", meta.height || r.height);
  if (meta.width || r.width) state.sizeByUser = true;  // the picture's size: a model change leaves it
  set("batch_size", 1);
  $("fast").checked = Boolean(r.fast);
  const tome = String(r.token_merging_ratio ?? 0);
  $("token_merging_ratio").value = [...$("token_merging_ratio").options].some((o) => o.value === tome) ? tome : "0";
  if (r.model && [...$("model").options].some((o) => o.value === r.model)) $("model").value = r.model;
  set("emphasis", r.emphasis || "Original");
  const hires = r.mode === "txt2img" && ((r.hires_scale && r.hires_scale !== 1) || r.hires_resize_x || r.hires_resize_y);
  $("enable_hr").checked = Boolean(hires);
  if (hires) {
    // the first pass's size: the picture is the hires size
    $("width").value = r.width ?? "";
    $("height").value = r.height ?? "";
    if (r.hires_scale) set("hires_scale", r.hires_scale);
    if ([...$("hires_upscaler").options].some((o) => o.value === r.hires_upscaler)) set("hires_upscaler", r.hires_upscaler);
    set("hires_steps", r.hires_steps);
    set("hires_strength", r.hires_strength);
    for (const name of ["hires_checkpoint", "hires_sampler", "hires_scheduler"]) {
      $(name).value = [...$(name).options].some((o) => o.value === r[name]) ? r[name] : "";
    }
    $("hires_prompt").value = r.hires_prompt || "";
    $("hires_negative_prompt").value = r.hires_negative_prompt || "";
  }
  const refiner = Boolean(r.refiner) && [...$("refiner").options].some((o) => o.value === r.refiner);
  $("enable_refiner").checked = refiner;
  if (refiner) {
    $("refiner").value = r.refiner;
    set("refiner_switch_at", r.refiner_switch_at);
  }
  if (r.mode === "inpaint") {
    set("mask_blur", r.mask_blur);
    if ([...$("inpainting_fill").options].some((o) => o.value === r.inpainting_fill)) set("inpainting_fill", r.inpainting_fill);
    setChecked("inpaint_full_res", Boolean(r.inpaint_full_res));
    setChecked("inpainting_mask_invert", Boolean(r.inpainting_mask_invert));
    set("inpaint_full_res_padding", r.inpaint_full_res_padding);
  }
  updateOutputs();
  saveSettings();
  $("details").close();
  $("prompt").focus();
}

// ---- start -----------------------------------------------------------------------------------

async function main() {
  setupControlNet();  // (first: updateOutputs reads its units)
  setupModifiers();
  setupStyles();
  setupUpload();
  setupMask();
  setupDepth();
  setupOutpaint();
  setupLoras();
  try { await loadChoices(); } catch (err) { showError(`Cannot reach the server: ${err.message}`); }
  loadSettings();
  try { window.brushworkLimits = (await api("status")).limits; } catch (_) { /* defaults apply */ }

  $("gen-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); generate(); }
  });
  $("gen-form").addEventListener("input", () => { updateOutputs(); saveSettings(); });
  $("gen-form").addEventListener("change", saveSettings);
  $("model").addEventListener("change", () => { applyModelDefaults(); saveSettings(); });
  for (const id of ["width", "height"]) $(id).addEventListener("input", sizeTyped);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; saveSettings(); });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) { $("seed").value = state.lastSeed; saveSettings(); }
    else showError("No seed to reuse yet: generate a picture first.");
  });
  $("details-reuse").addEventListener("click", reuseSettings);
  $("details-to-init").addEventListener("click", detailsToInit);
  $("details-upscale").addEventListener("click", detailsUpscale);
  $("enable_hr").addEventListener("change", updateOutputs);
  $("enable_refiner").addEventListener("change", updateOutputs);
  let searchTimer = null;
  $("gallery-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => refreshGallery(), 250);
  });
  $("gallery-more").addEventListener("click", () => refreshGallery(true));

  refreshGallery();
  await refreshQueue();
  // follow jobs that are already running or queued (e.g. after a page reload)
  for (const item of document.querySelectorAll("#queue li[data-job]")) follow(item.dataset.job);
  setInterval(refreshQueue, 2000);
}

main();
