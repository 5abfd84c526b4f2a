// The playground: settings form, presets, jobs (one, or two to compare), reproduce, history, API key.

import { ApiError, apiKey, getJSON, postJSON, watchJob } from "./api.js";
import { Run, h } from "./view.js";
import { zipBlob } from "./zip.js";

const $ = (id) => document.getElementById(id);

// The sampler settings of the reference's generate.py, with its names and defaults ("" = the
// server's default: per discretization for sigma_min / sigma_max, infinity for S_max, the EDM
// sampler when solver, discretization, schedule and scaling are all empty).
const SAMPLER_FIELDS = [
  { name: "num_steps", value: "18", min: "2", step: "1", hint: "Noise levels N; NFE = 2N − 1 with Heun, N with Euler." },
  { name: "sigma_min", value: "", min: "0", hint: "Lowest noise level; empty: the discretization's default." },
  { name: "sigma_max", value: "", min: "0", hint: "Highest noise level; empty: the discretization's default." },
  { name: "rho", value: "7", min: "0", hint: "Time step exponent of the EDM discretization." },
  { name: "S_churn", value: "0", min: "0", hint: "Stochasticity strength (0: deterministic)." },
  { name: "S_min", value: "0", min: "0", hint: "Churn only at noise levels ≥ S_min." },
  { name: "S_max", value: "", min: "0", hint: "Churn only at noise levels ≤ S_max; empty: infinity." },
  { name: "S_noise", value: "1", min: "0", hint: "Noise inflation of the churn." },
  { name: "solver", options: ["euler", "heun"], hint: "ODE solver; empty: Heun (the EDM sampler)." },
  { name: "discretization", options: ["vp", "ve", "iddpm", "edm"], hint: "Time steps {t_i}; empty: edm." },
  { name: "schedule", options: ["vp", "ve", "linear"], hint: "Noise schedule σ(t); empty: linear." },
  { name: "scaling", options: ["vp", "none"], hint: "Signal scaling s(t); empty: none." },
];
const NUMERIC = new Set(SAMPLER_FIELDS.filter((f) => !f.options).map((f) => f.name));
const DEFAULTS = Object.fromEntries(SAMPLER_FIELDS.map((f) => [f.name, f.value || ""]));

// The paper's configurations. Table 1 columns at 35 NFE, the EDM sampler's budget at 18 steps.
const PRESETS = {
  edm: { label: "EDM deterministic (Heun, 18 steps, 35 NFE)", values: { num_steps: "18" } },
  "edm-stochastic": {
    label: "EDM stochastic, ImageNet-64 settings (256 steps)",
    values: { num_steps: "256", S_churn: "40", S_min: "0.05", S_max: "50", S_noise: "1.003" },
  },
  "euler-edm": {
    label: "Euler on EDM time steps (35 steps, 35 NFE)",
    values: { num_steps: "35", solver: "euler", discretization: "edm", schedule: "linear", scaling: "none" },
  },
  vp: {
    label: "Table 1 VP (Euler, 35 steps)",
    values: { num_steps: "35", solver: "euler", discretization: "vp", schedule: "vp", scaling: "vp" },
  },
  ve: {
    label: "Table 1 VE (Euler, 35 steps)",
    values: { num_steps: "35", solver: "euler", discretization: "ve", schedule: "ve", scaling: "none" },
  },
  iddpm: {
    label: "Table 1 iDDPM + DDIM (Euler, 35 steps)",
    values: { num_steps: "35", solver: "euler", discretization: "iddpm", schedule: "linear", scaling: "none" },
  },
};
const SHARED_FIELDS = new Set(["model", "class_label", "seeds", "preview_every"]);
const HISTORY_KEY = "edm-serve.history";
const HISTORY_MAX = 25;

const state = { models: [], runs: [] };

// -- the form ---------------------------------------------------------------------------------------

function samplerFieldset(side) {
  const title = side === "a" ? "Sampler A" : "Sampler B";
  const preset = h("select", { id: `${side}-preset`, "aria-describedby": `${side}-preset-hint` },
    ...Object.entries(PRESETS).map(([key, p]) => h("option", { value: key, text: p.label })),
    h("option", { value: "custom", text: "Custom" }));
  preset.addEventListener("change", () => applyPreset(side, preset.value));
  const fields = SAMPLER_FIELDS.map((f) => {
    const id = `${side}-${f.name}`;
    const described = `${id}-hint ${id}-error`;
    const input = f.options
      ? h("select", { id, name: f.name, "aria-describedby": described },
        h("option", { value: "", text: "(default)" }), ...f.options.map((o) => h("option", { value: o, text: o })))
      : h("input", { id, name: f.name, type: "number", step: f.step || "any", min: f.min, value: f.value,
        inputmode: "decimal", "aria-describedby": described });
    for (const type of ["input", "change"]) {
      input.addEventListener(type, () => {
        preset.value = matchingPreset(side);
        summarize(side);
      });
    }
    return h("div", { class: "field" }, h("label", { for: id, text: f.name }), input,
      h("p", { id: `${id}-hint`, class: "hint", text: f.hint }), h("p", { id: `${id}-error`, class: "error" }));
  });
  return h("fieldset", { class: "group sampler", id: `${side}-sampler`, "data-side": side },
    h("legend", { text: title }),
    h("div", { class: "field" }, h("label", { for: `${side}-preset`, text: "Preset" }), preset,
      h("p", { id: `${side}-preset-hint`, class: "hint", text: "Fills the settings below; editing one makes it Custom." })),
    h("p", { id: `${side}-summary`, class: "summary", "aria-live": "polite" }),
    h("details", { class: "more", id: `${side}-details` }, h("summary", { text: "All sampler settings" }),
      h("div", { class: "fields" }, ...fields)));
}

// One line under the preset: solver, time steps, N and the network evaluations per image.
function summarize(side) {
  const v = samplerValues(side);
  const steps = Number(v.num_steps);
  const euler = v.solver === "euler";
  const nfe = Number.isInteger(steps) && steps >= 2 ? (euler ? steps : 2 * steps - 1) : "?";
  const churn = Number(v.S_churn) > 0 ? `, stochastic (S_churn ${v.S_churn})` : ", deterministic";
  $(`${side}-summary`).textContent = `${euler ? "Euler" : "Heun"}, ${v.discretization || "edm"} time steps, ` +
    `N = ${v.num_steps}${churn}: ${nfe} network evaluations per image.`;
}

function applyPreset(side, key) {
  const preset = PRESETS[key];
  if (!preset) return;
  for (const f of SAMPLER_FIELDS) $(`${side}-${f.name}`).value = preset.values[f.name] ?? DEFAULTS[f.name];
  $(`${side}-preset`).value = key;
  summarize(side);
}

function samplerValues(side) {
  return Object.fromEntries(SAMPLER_FIELDS.map((f) => [f.name, $(`${side}-${f.name}`).value.trim()]));
}

function matchingPreset(side) {
  const values = samplerValues(side);
  for (const [key, preset] of Object.entries(PRESETS)) {
    const wanted = { ...DEFAULTS, ...preset.values };
    if (SAMPLER_FIELDS.every((f) => sameValue(values[f.name], wanted[f.name]))) return key;
  }
  return "custom";
}

function sameValue(a, b) {
  if (a === b) return true;
  return a !== "" && b !== "" && Number(a) === Number(b);
}

function presetLabel(side) {
  const key = $(`${side}-preset`).value;
  if (PRESETS[key]) return PRESETS[key].label;
  const v = samplerValues(side);
  return `Custom: ${v.solver || "heun"}, ${v.discretization || "edm"} steps, ${v.num_steps} steps` +
    (Number(v.S_churn) > 0 ? `, S_churn ${v.S_churn}` : "");
}

// "1,5,9" / "0-7" / "0-3,10" -> [numbers]; throws Error with a message for the seeds field.
function parseSeeds(text) {
  const seeds = [];
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const range = /^(\d+)\s*-\s*(\d+)$/.exec(part);
    if (range) {
      const [lo, hi] = [Number(range[1]), Number(range[2])];
      if (hi < lo) throw new Error(`the range ${part} runs backwards`);
      if (hi - lo >= 10000) throw new Error(`the range ${part} is too long`);
      for (let s = lo; s <= hi; s++) seeds.push(s);
    } else if (/^\d+$/.test(part)) {
      seeds.push(Number(part));
    } else {
      throw new Error(`"${part}" is neither a seed nor a range like 0-7`);
    }
  }
  if (!seeds.length) throw new Error("give at least one seed, e.g. 0-3");
  return seeds;
}

function formatSeeds(seeds) {
  const parts = [];
  for (let i = 0; i < seeds.length;) {
    let j = i;
    while (j + 1 < seeds.length && seeds[j + 1] === seeds[j] + 1) j++;
    parts.push(j > i ? `${seeds[i]}-${seeds[j]}` : `${seeds[i]}`);
    i = j + 1;
  }
  return parts.join(",");
}

function clearErrors() {
  for (const el of document.querySelectorAll("#generate-form .error")) el.textContent = "";
  for (const el of document.querySelectorAll("#generate-form [aria-invalid]")) el.removeAttribute("aria-invalid");
}

function fieldError(id, message) {
  const input = $(id);
  const error = $(`${id}-error`);
  if (!input || !error) return false;
  error.textContent = message;
  input.setAttribute("aria-invalid", "true");
  const details = input.closest("details");
  if (details) details.open = true;
  return true;
}

// A refused request: its message next to the field it names (sampler fields on the side that sent it).
function showProblem(error, side) {
  if (error.status === 401) {
    showAuth(error.message);
    return;
  }
  const raw = error.field || "";
  let name = raw.split(/[.[]/)[0];
  if (name === "count" || name === "start") name = "seeds";
  const id = SHARED_FIELDS.has(name) ? name : `${side}-${name}`;
  const where = side === "b" ? "Sampler B: " : "";
  if (raw && fieldError(id, error.message)) {
    $("form-error").textContent = `${where}the server refused the request (${error.status}): ${error.message}`;
    $(id).focus();
  } else {
    $("form-error").textContent = `${where}${error.status ? `HTTP ${error.status}: ` : ""}${error.message}`;
  }
}

// The request bodies: [A] or [A, B]; null after showing what is wrong.
function readForm() {
  clearErrors();
  let ok = true;
  const shared = { model: $("model").value || undefined };
  const label = $("class_label").disabled ? "" : $("class_label").value.trim();
  if (label) shared.class_label = /^\d+$/.test(label) ? Number(label) : label;
  try {
    shared.seeds = parseSeeds($("seeds").value);
  } catch (error) {
    ok = fieldError("seeds", error.message) && false;
  }
  const every = $("preview_every").value.trim();
  if (!/^\d+$/.test(every)) ok = fieldError("preview_every", "a whole number ≥ 0") && false;
  const sides = $("compare").checked ? ["a", "b"] : ["a"];
  const bodies = sides.map((side) => {
    const body = { ...shared };
    for (const [name, value] of Object.entries(samplerValues(side))) {
      if (value === "" || sameValue(value, DEFAULTS[name])) continue;
      if (NUMERIC.has(name)) {
        const number = Number(value);
        if (!Number.isFinite(number)) {
          ok = fieldError(`${side}-${name}`, "not a number") && false;
          continue;
        }
        body[name] = number;
      } else {
        body[name] = value;
      }
    }
    return body;
  });
  if (!ok) {
    $("form-error").textContent = "Please correct the highlighted fields.";
    return null;
  }
  return { bodies, sides, previewEvery: Number(every) };
}

// -- models -----------------------------------------------------------------------------------------

async function loadModels() {
  let answer;
  try {
    answer = await getJSON("/v1/models");
  } catch (error) {
    if (error.status === 401) showAuth(apiKey.get() ? error.message : "");
    else $("model-error").textContent = `Could not list the models: ${error.message}`;
    return false;
  }
  state.models = answer.models;
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...answer.models.map((m) => h("option", { value: m.name, text: m.name + (m.default ? " (default)" : "") })));
  select.value = answer.models.some((m) => m.name === previous) ? previous : (answer.default || "");
  showCard();
  return true;
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value) || null;
}

function showCard() {
  const model = currentModel();
  const dl = $("model-card");
  dl.replaceChildren();
  const names = $("class-names");
  names.replaceChildren();
  if (!model) return;
  const card = model.card;
  if (!card) {
    dl.append(h("dt", { text: "Card" }), h("dd", { text: "not yet published (a worker has not loaded this checkpoint)" }));
    return;
  }
  const rows = [
    ["Architecture", `${card.architecture} · ${card.preconditioner}`],
    ["Resolution", `${card.img_resolution} × ${card.img_resolution} × ${card.img_channels}`],
    ["Classes", card.label_dim ? `${card.label_dim}${card.class_names ? ` (${card.class_names.slice(0, 4).join(", ")}${card.label_dim > 4 ? ", …" : ""})` : ""}` : "unconditional"],
    ["Parameters", card.parameters ? Number(card.parameters).toLocaleString("en") : "–"],
    ["Format", model.format],
  ];
  for (const [term, value] of rows) dl.append(h("dt", { text: term }), h("dd", { text: value }));
  (card.class_names || []).forEach((name, index) => names.append(h("option", { value: name, text: `${index}` })));
  $("class_label").disabled = !card.label_dim;
}

// -- auth -------------------------------------------------------------------------------------------

function showAuth(message) {
  $("auth").hidden = false;
  $("auth-error").textContent = message || "";
  if (message) $("auth-key").setAttribute("aria-invalid", "true");
  $("auth-key").focus();
}

function showKeyState() {
  const where = apiKey.where();
  $("key-state").hidden = !where;
  $("key-where").textContent = where;
}

async function useKey(event) {
  event.preventDefault();
  const key = $("auth-key").value.trim();
  if (!key) {
    $("auth-error").textContent = "Enter a key.";
    return;
  }
  apiKey.set(key, $("auth-remember").checked);
  try {
    await getJSON("/v1/models");
  } catch (error) {
    apiKey.forget();
    $("auth-error").textContent = error.status ? `${error.status}: ${error.message}` : error.message;
    $("auth-key").setAttribute("aria-invalid", "true");
    showKeyState();
    return;
  }
  $("auth-key").value = "";
  $("auth-key").removeAttribute("aria-invalid");
  $("auth-error").textContent = "";
  $("auth").hidden = true;
  showKeyState();
  await loadModels();
  $("generate").focus();
}

// -- runs -------------------------------------------------------------------------------------------

function resetRuns(count) {
  for (const run of state.runs) run.release();
  state.runs = [];
  $("runs").replaceChildren();
  $("runs").classList.toggle("compare", count > 1);
  $("results-empty").hidden = true;
  $("reproduce").hidden = true;
}

function updateButtons() {
  const active = state.runs.some((run) => run.active);
  $("cancel").disabled = !active;
  $("generate").setAttribute("aria-busy", active ? "true" : "false");
}

function downloadName(run, cell) {
  return `${run.opts.model}-${run.opts.side}-${String(cell.seed).padStart(6, "0")}.png`;
}

function addRun({ side, title, job, body, pressedAt }) {
  const model = state.models.find((m) => m.name === job.model);
  const run = new Run({
    side, title, jobId: job.id, seeds: job.seeds, startedAt: pressedAt,
    resolution: model && model.card ? model.card.img_resolution : 8,
    onReproduce: showReproduce, downloadName: (cell) => downloadName(run, cell),
  });
  run.opts.model = job.model;
  run.body = body;
  run.allButton.addEventListener("click", () => downloadAll(run));
  state.runs.push(run);
  $("runs").append(run.el);
  follow(run);
  return run;
}

async function follow(run) {
  updateButtons();
  try {
    await watchJob(run.jobId, (event) => run.onEvent(event), run.abort.signal);
  } catch (error) {
    run.finish("failed", error.status === 404 ? "this job is not on the server (expired, or another key's)" : error.message);
    if (error.status === 401) showAuth(error.message);
  }
  updateButtons();
  if (run.abort.signal.aborted) return; // replaced by newer runs
  try {
    const view = await getJSON(`/v1/jobs/${encodeURIComponent(run.jobId)}`);
    if (view.status === "cancelled" || view.status === "failed") run.finish(view.status, view.error || view.status);
    run.showTiming(view.timings);
  } catch {
    run.showTiming();
  }
  saveHistoryStatus(run);
}

async function generate(event) {
  event.preventDefault();
  const form = readForm();
  if (!form) return;
  const pressedAt = performance.now();
  const jobs = [];
  for (let k = 0; k < form.bodies.length; k++) {
    const side = form.sides[k];
    try {
      jobs.push(await postJSON(`/ui/jobs?preview_every=${form.previewEvery}`, form.bodies[k]));
    } catch (error) {
      for (const job of jobs) cancelJob(job.id);
      showProblem(error, side);
      return;
    }
  }
  // the new jobs replace what the page showed: jobs still running there are cancelled
  for (const run of state.runs) if (run.active) cancelJob(run.jobId);
  resetRuns(jobs.length);
  const entry = { at: Date.now(), model: jobs[0].model, runs: [] };
  jobs.forEach((job, k) => {
    const side = form.sides[k];
    const title = `${form.sides.length > 1 ? `${side.toUpperCase()}: ` : ""}${presetLabel(side)}`;
    addRun({ side, title, job, body: form.bodies[k], pressedAt });
    entry.runs.push({ side, title, job_id: job.id, body: form.bodies[k], preset: $(`${side}-preset`).value });
  });
  addHistory(entry);
}

async function cancelJob(jobId) {
  try {
    await postJSON(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`);
  } catch (error) {
    if (error.status === 401) showAuth(error.message);
    else if (error.status !== 409) $("form-error").textContent = `Cancel: ${error.message}`;
  }
}

async function cancelAll() {
  const active = state.runs.filter((run) => run.active);
  for (const run of active) run.setStatus(run.status, "cancelling…");
  await Promise.all(active.map((run) => cancelJob(run.jobId)));
}

async function downloadAll(run) {
  const files = run.cells.filter((c) => c.png).map((c) => ({ name: downloadName(run, c), bytes: c.png }));
  const url = URL.createObjectURL(zipBlob(files));
  const link = h("a", { href: url, download: `${run.opts.model}-${run.jobId}.zip` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// -- reproduce --------------------------------------------------------------------------------------

function quote(text) {
  return `'${String(text).replace(/'/g, "'\\''")}'`;
}

function checkpointPath(model) {
  if (!model) return "CHECKPOINT";
  if (model.name === "edm-digits-8x8-cond") return "model/bundled/edm-digits-8x8-cond.json";
  if (model.format === "nvlabs-pickle") return `/path/to/${model.name}.pkl`;
  const file = model.card && model.card.weights_file ? model.card.weights_file.replace(/\.safetensors$/, ".json") : `${model.name}.json`;
  return `/path/to/${file}`;
}

const CLI_FLAGS = { num_steps: "--steps", discretization: "--disc" };
const DTYPES = { float32: "fp32", float16: "fp16", bfloat16: "bf16" };

// The request settings an image's PNG metadata records (edm:num_steps, ...), defaults left out.
function settingsFromMetadata(meta) {
  const out = {};
  for (const f of SAMPLER_FIELDS) {
    const value = meta[`edm:${f.name}`];
    if (value === undefined || value === "none" || value === "inf" || sameValue(value, DEFAULTS[f.name])) continue;
    out[f.name] = NUMERIC.has(f.name) ? Number(value) : value;
  }
  return out;
}

function showReproduce(run, cell) {
  const meta = (cell.info && cell.info.metadata) || {};
  // a job opened by id: its settings and class come from the image itself
  const body = run.body.seeds && !run.opened ? { ...run.body, seeds: [cell.seed] }
    : { model: run.opts.model, seeds: [cell.seed], class_label: cell.info ? cell.info.class_label : undefined,
      ...settingsFromMetadata(meta) };
  const auth = apiKey.get() ? ` -H "Authorization: Bearer $EDM_API_KEY"` : "";
  const file = `${String(cell.seed).padStart(6, "0")}.png`;
  $("reproduce-curl").textContent = `curl -s ${location.origin}/v1/generate -H 'Content-Type: application/json'` +
    ` -H 'Accept: image/png'${auth} \\\n  -d ${quote(JSON.stringify(body))} -o ${file}`;
  const model = state.models.find((m) => m.name === run.opts.model);
  const args = [`edm-serve sample --model ${checkpointPath(model)} --seeds ${cell.seed}`];
  if (body.class_label !== undefined && body.class_label !== null && cell.info) args.push(`--class ${cell.info.class_label}`);
  for (const f of SAMPLER_FIELDS) {
    if (body[f.name] !== undefined) args.push(`${CLI_FLAGS[f.name] || `--${f.name}`} ${body[f.name]}`);
  }
  const device = meta["edm:device_type"] || "cpu";
  args.push(`--device ${device}`);
  if (meta["edm:dtype"]) args.push(`--dtype ${DTYPES[meta["edm:dtype"]] || meta["edm:dtype"]}`);
  // the forward passes' row counts, when the worker recorded them (images on CUDA depend on them)
  const passSizes = meta["edm:pass_sizes"];
  if (passSizes) args.push(`--pass-sizes ${quote(passSizes)}`);
  const chunk = meta["edm:chunk"];
  if (!passSizes && chunk && chunk !== "none" && chunk !== "None") args.push(`--chunk ${chunk}`);
  args.push("--outdir out");
  $("reproduce-cli").textContent = args.join(" ");
  $("reproduce-what").textContent = `Seed ${cell.seed}, class ${cell.info ? cell.info.class_label : "?"}, model ` +
    `${run.opts.model}, job ${run.jobId}.`;
  $("reproduce-note").textContent = `edm-serve sample writes out/${file} with the same pixels on the same ` +
    `device type (${device}); give --model the checkpoint that the server loads for ${run.opts.model}` +
    (model && model.card && model.card.weights_sha256 ? ` (weights sha256 ${model.card.weights_sha256.slice(0, 16)}…)` : "") + ".";
  $("reproduce").hidden = false;
  $("reproduce").focus();
}

async function copyFrom(id, button) {
  try {
    await navigator.clipboard.writeText($(id).textContent);
    button.textContent = "Copied";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($(id));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
}

// -- history ----------------------------------------------------------------------------------------

function loadHistory() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function storeHistory(list) {
  localStorage.setItem(HISTORY_KEY, JSON.stringify(list.slice(0, HISTORY_MAX)));
  renderHistory();
}

function addHistory(entry) {
  storeHistory([entry, ...loadHistory()]);
}

function saveHistoryStatus(run) {
  const list = loadHistory();
  for (const entry of list) {
    for (const r of entry.runs) if (r.job_id === run.jobId) r.status = run.status;
  }
  storeHistory(list);
}

function describeEntry(entry) {
  const body = entry.runs[0].body;
  const when = new Date(entry.at).toLocaleString();
  const seeds = body.seeds ? `seeds ${formatSeeds(body.seeds)}` : "random seed";
  const label = body.class_label !== undefined ? `class ${body.class_label}` : "random class";
  const runs = entry.runs.map((r) => `${r.title}${r.status ? ` (${r.status})` : ""}`).join(" vs ");
  return `${when} · ${entry.model} · ${seeds} · ${label} · ${runs}`;
}

function renderHistory() {
  const list = loadHistory();
  $("history-list").replaceChildren(...list.map((entry, index) => h("li", {},
    h("span", { text: describeEntry(entry) }), " ",
    h("button", { type: "button", "aria-label": `Show history entry ${index + 1}`, text: "Show",
      onclick: () => showEntry(entry) }), " ",
    h("button", { type: "button", "aria-label": `Use the settings of history entry ${index + 1}`, text: "Use settings",
      onclick: () => useSettings(entry) }))));
  $("history-clear").disabled = !list.length;
}

function useSettings(entry) {
  const first = entry.runs[0].body;
  if (state.models.some((m) => m.name === first.model)) $("model").value = first.model;
  showCard();
  $("class_label").value = first.class_label ?? "";
  $("seeds").value = first.seeds ? formatSeeds(first.seeds) : "";
  $("compare").checked = entry.runs.length > 1;
  toggleCompare();
  for (const r of entry.runs) {
    for (const f of SAMPLER_FIELDS) $(`${r.side}-${f.name}`).value = r.body[f.name] ?? DEFAULTS[f.name];
    $(`${r.side}-preset`).value = matchingPreset(r.side);
    summarize(r.side);
  }
  $("seeds").focus();
}

async function showEntry(entry) {
  const jobs = [];
  for (const r of entry.runs) {
    try {
      jobs.push({ r, job: await getJSON(`/v1/jobs/${encodeURIComponent(r.job_id)}`) });
    } catch (error) {
      if (error.status === 401) showAuth(error.message);
      $("job_id-error").textContent = `${r.title}: ${error.message}`;
      return;
    }
  }
  resetRuns(jobs.length);
  for (const { r, job } of jobs) addRun({ side: r.side, title: r.title, job, body: r.body, pressedAt: null });
  $("results").scrollIntoView();
}

async function openJob(event) {
  event.preventDefault();
  $("job_id-error").textContent = "";
  $("job_id").removeAttribute("aria-invalid");
  const id = $("job_id").value.trim();
  if (!id) {
    fieldError("job_id", "enter a job id");
    return;
  }
  let job;
  try {
    job = await getJSON(`/v1/jobs/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status === 401) showAuth(error.message);
    fieldError("job_id", error.status ? `${error.status}: ${error.message}` : error.message);
    return;
  }
  resetRuns(1);
  const body = { model: job.model, seeds: job.seeds };
  addRun({ side: "a", title: `Job ${job.id}`, job, body, pressedAt: null }).opened = true;
}

// -- start ------------------------------------------------------------------------------------------

function toggleCompare() {
  const on = $("compare").checked;
  $("b-sampler").hidden = !on;
  $("samplers").classList.toggle("compare", on);
}

function randomSeeds() {
  let count = 1;
  try {
    count = parseSeeds($("seeds").value).length;
  } catch {
    count = 4;
  }
  const seeds = new Uint32Array(Math.min(count, 64));
  crypto.getRandomValues(seeds);
  $("seeds").value = Array.from(seeds).join(",");
}

function start() {
  $("samplers").append(samplerFieldset("a"), samplerFieldset("b"));
  applyPreset("a", "edm");
  applyPreset("b", "euler-edm");
  toggleCompare();
  $("compare").addEventListener("change", toggleCompare);
  $("model").addEventListener("change", showCard);
  $("random-seeds").addEventListener("click", randomSeeds);
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancelAll);
  $("auth-form").addEventListener("submit", useKey);
  $("key-forget").addEventListener("click", () => {
    apiKey.forget();
    showKeyState();
    loadModels();
  });
  $("open-form").addEventListener("submit", openJob);
  $("history-clear").addEventListener("click", () => storeHistory([]));
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copyFrom(button.dataset.copy, button));
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("cancel").disabled) cancelAll();
  });
  showKeyState();
  renderHistory();
  loadModels().then(() => { document.body.dataset.ready = "true"; });
}

window.addEventListener("unhandledrejection", (event) => {
  const error = event.reason;
  $("form-error").textContent = error instanceof ApiError ? error.message : `Unexpected error: ${error}`;
});

start();
