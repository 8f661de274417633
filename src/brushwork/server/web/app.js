// brushwork web UI: plain JS, no build step. Talks only to the native /api/v1.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "api/v1";
const STORE_KEY = "brushwork.settings.v1";
const STYLES_KEY = "brushwork.styles.v1";
const FIELDS = ["prompt", "negative_prompt", "model", "sampler", "scheduler", "steps", "cfg_scale", "cfg_end",
  "width", "height", "batch_size", "seed", "strength", "token_merging_ratio"];
const MODIFIERS = ["highly detailed", "oil painting", "watercolor", "photograph", "digital art",
  "pixel art", "cinematic lighting", "sunset", "pastel colors", "minimalist"];

const state = {
  initImage: null,      // data: URL of the uploaded init image
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

function saveSettings() {
  const values = { fast: $("fast").checked };
  for (const name of FIELDS) values[name] = $(name).value;
  localStorage.setItem(STORE_KEY, JSON.stringify(values));
}

function loadSettings() {
  let values = {};
  try { values = JSON.parse(localStorage.getItem(STORE_KEY) || "{}"); } catch (_) { values = {}; }
  applyModelDefaults();  // first visit: the model's own scale; a saved value wins below
  $("fast").checked = values.fast === true;
  for (const name of FIELDS) {
    if (values[name] === undefined) continue;
    const input = $(name);
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === values[name])) continue;
    input.value = values[name];
  }
  updateOutputs();
}

// a model may recommend its own CFG scale and end (a small or few-step model): the sliders follow the chosen model
function applyModelDefaults() {
  const defaults = (state.modelDefaults || {})[$("model").value] || {};
  $("cfg_scale").value = defaults.cfg_scale ?? 7;
  $("cfg_end").value = defaults.cfg_end ?? 1;
  updateOutputs();
}

function updateOutputs() {
  $("steps-out").textContent = $("steps").value;
  $("cfg-out").textContent = $("cfg_scale").value;
  $("cfg-end-out").textContent = $("cfg_end").value;
  $("strength-out").textContent = $("strength").value;
  const prompt = $("prompt").value.toLowerCase();
  for (const chip of document.querySelectorAll(".chip")) {
    chip.classList.toggle("on", prompt.includes(chip.dataset.text));
  }
}

// ---- choices from the server -----------------------------------------------------------------

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => el("option", { value }, label)));
  if (selected !== undefined && items.some(([v]) => v === selected)) select.value = selected;
}

async function loadChoices() {
  const [models, samplers] = await Promise.all([api("models"), api("samplers")]);
  const current = models.models.find((m) => m.current);
  state.modelDefaults = Object.fromEntries(models.models.map((m) => [m.name, m.defaults || {}]));
  state.modelDefaults[""] = current ? current.defaults || {} : {};
  fillSelect($("model"), [["", current ? `default (${current.name})` : "default"],
    ...models.models.map((m) => [m.name, m.title])]);
  fillSelect($("sampler"), samplers.samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), samplers.schedule_types.map((s) => [s, s]), "Automatic");
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
  $("init-preview").hidden = !dataUrl;
  $("drop-hint").hidden = !!dataUrl;
  $("init-controls").hidden = !dataUrl;
  if (dataUrl) $("init-preview").src = dataUrl; else $("init-preview").removeAttribute("src");
}

function readFile(file) {
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
  reader.onload = () => { showError(""); setInitImage(reader.result); };
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

// ---- generating ------------------------------------------------------------------------------

function buildRequest() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value || null,
    sampler: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: num("steps"),
    cfg_scale: num("cfg_scale"),
    cfg_end: num("cfg_end"),
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
    width: num("width"),
    height: num("height"),
    batch_size: num("batch_size") || 1,
    fast: $("fast").checked,
    token_merging_ratio: Number($("token_merging_ratio").value) || 0,
  };
  if (state.initImage) {
    body.mode = "img2img";
    body.init_image = state.initImage;
    body.strength = num("strength");
  }
  return body;
}

async function generate() {
  showError("");
  saveSettings();
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await api("jobs", { method: "POST", body: JSON.stringify(buildRequest()) });
    follow(job.id);
    refreshQueue();
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
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
  $("details").showModal();
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
  set("batch_size", 1);
  $("fast").checked = Boolean(r.fast);
  const tome = String(r.token_merging_ratio ?? 0);
  $("token_merging_ratio").value = [...$("token_merging_ratio").options].some((o) => o.value === tome) ? tome : "0";
  if (r.model && [...$("model").options].some((o) => o.value === r.model)) $("model").value = r.model;
  updateOutputs();
  saveSettings();
  $("details").close();
  $("prompt").focus();
}

// ---- start -----------------------------------------------------------------------------------

async function main() {
  setupModifiers();
  setupStyles();
  setupUpload();
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
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; saveSettings(); });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) { $("seed").value = state.lastSeed; saveSettings(); }
    else showError("No seed to reuse yet: generate a picture first.");
  });
  $("details-reuse").addEventListener("click", reuseSettings);
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
