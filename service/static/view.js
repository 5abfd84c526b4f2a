// One job on the page: its status, counters, progress bar and a grid of images that the job's
// events animate (x0 previews while it runs, the final PNGs at the end).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) el.append(child);
  return el;
}

export function base64Bytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function sigmaText(sigma) {
  if (sigma === undefined || sigma === null) return "–";
  return sigma >= 100 ? sigma.toFixed(0) : sigma >= 1 ? sigma.toFixed(3) : sigma.toPrecision(3);
}

const STATUS_TEXT = {
  submitting: "Submitting…",
  queued: "Queued",
  running: "Running",
  succeeded: "Done",
  cancelled: "Cancelled",
  failed: "Failed",
};

// A run: one job's panel. `opts`: {side, title, jobId, seeds, resolution, startedAt (performance.now()
// of the Generate press, or null), onReproduce(run, cell), downloadName(cell)}
export class Run {
  constructor(opts) {
    this.opts = opts;
    this.jobId = opts.jobId;
    this.status = "queued";
    this.cells = [];
    this.nfe = 0;
    this.nfeTotal = 0;
    this.pressedAt = opts.startedAt;
    this.runningAt = null;
    this.firstFrameMs = null;
    this.framesSeen = 0;
    this.abort = new AbortController();
    const scale = Math.max(1, Math.floor(128 / Math.max(1, opts.resolution || 8)));
    const size = (opts.resolution || 8) * scale;
    this.statusEl = h("p", { class: "status", role: "status", "aria-live": "polite" });
    this.bar = h("progress", { max: "1", value: "0", "aria-label": `${opts.side}: network evaluations done` });
    this.counters = h("p", { class: "counters" });
    this.timing = h("p", { class: "timing" });
    this.grid = h("ul", { class: "grid", "aria-label": `${opts.side}: images` });
    opts.seeds.forEach((seed, index) => {
      const img = h("img", { width: size, height: size, alt: `seed ${seed}: waiting for the first frame` });
      const caption = h("p", { class: "caption", text: `seed ${seed}` });
      const tools = h("div", { class: "tools" });
      const li = h("li", { class: "cell", "data-index": index, "data-frames": 0 }, img, caption, tools);
      this.grid.append(li);
      this.cells.push({ li, img, caption, tools, seed, index, frames: 0, history: [], png: null, info: null,
        url: null });
    });
    this.scrub = h("input", { type: "range", id: `scrub-${opts.side}`, min: "0", max: "0", value: "0", step: "1",
      "aria-describedby": `scrub-${opts.side}-value` });
    this.scrubValue = h("output", { id: `scrub-${opts.side}-value`, for: `scrub-${opts.side}` });
    this.scrub.addEventListener("input", () => this.replay(Number(this.scrub.value)));
    this.scrubber = h("div", { class: "scrubber", hidden: true },
      h("label", { for: `scrub-${opts.side}`, text: "Step through the evaluations" }), this.scrub, this.scrubValue);
    this.allButton = h("button", { type: "button", class: "download-all", disabled: true,
      text: "Download all (.zip)" });
    this.el = h("article", { class: "run", "data-side": opts.side, "data-job-id": opts.jobId, "data-status": "queued",
      "aria-labelledby": `run-${opts.side}-title` },
    h("h3", { id: `run-${opts.side}-title`, text: opts.title }),
    h("p", { class: "job-id" }, "job ", h("code", { text: opts.jobId })),
    this.statusEl, this.bar, this.counters, this.grid, this.scrubber, this.timing,
    h("div", { class: "run-actions" }, this.allButton));
    this.setStatus("queued", "waiting for a worker");
  }

  get active() {
    return this.status === "queued" || this.status === "running";
  }

  setStatus(status, detail) {
    this.status = status;
    this.el.dataset.status = status;
    const text = STATUS_TEXT[status] || status;
    this.statusEl.textContent = detail ? `${text}: ${detail}` : text;
  }

  // One event from the job's stream.
  onEvent({ type, data }) {
    if (type === "queued") {
      this.setStatus("queued", data.position === 0 ? "next in the queue" : `position ${data.position} in the queue`);
    } else if (type === "started") {
      this.runningAt = performance.now();
      this.setStatus("running", data.reruns ? `restarted on another worker (${data.reruns})` : "sampling");
    } else if (type === "progress") {
      this.progress(data);
    } else if (type === "image") {
      this.image(data);
    } else if (type === "done") {
      this.finish("succeeded", `${this.cells.length} image${this.cells.length === 1 ? "" : "s"}`);
    } else if (type === "error") {
      this.finish(data.status === "cancelled" ? "cancelled" : "failed", data.message || data.status);
    }
  }

  progress(data) {
    if (this.status !== "running") this.setStatus("running", "sampling");
    if (this.runningAt === null) this.runningAt = performance.now();
    this.nfe = data.nfe;
    this.nfeTotal = data.nfe_total;
    this.bar.max = data.nfe_total;
    this.bar.value = data.nfe;
    this.bar.setAttribute("aria-valuetext", `${data.nfe} of ${data.nfe_total} evaluations`);
    const done = data.images_done ? ` · images done ${data.images_done} / ${this.cells.length}` : "";
    this.counters.textContent = `step ${data.step} / ${data.num_steps} · σ = ${sigmaText(data.sigma)} · ` +
      `NFE ${data.nfe} / ${data.nfe_total}${done}`;
    for (const frame of data.frames || []) {
      const cell = this.cells[frame.index];
      if (!cell || cell.png) continue;
      cell.frames += 1;
      cell.li.dataset.frames = cell.frames;
      const src = `data:image/png;base64,${frame.png_base64}`;
      cell.history.push({ src, step: data.step, numSteps: data.num_steps, sigma: data.sigma, nfe: data.nfe });
      this.showFrame(cell, cell.history[cell.history.length - 1]);
      this.framesSeen += 1;
      if (this.firstFrameMs === null && this.pressedAt !== null) {
        this.firstFrameMs = performance.now() - this.pressedAt;
        this.el.dataset.firstFrameMs = this.firstFrameMs.toFixed(0);
        this.showTiming();
      }
    }
  }

  image(data) {
    const cell = this.cells[data.index];
    if (!cell || !data.png_base64) return;
    cell.png = base64Bytes(data.png_base64);
    cell.info = data;
    cell.url = URL.createObjectURL(new Blob([cell.png], { type: "image/png" }));
    cell.img.src = cell.url;
    const label = data.metadata && data.metadata["edm:class_name"] !== undefined
      ? data.metadata["edm:class_name"] : data.class_label;
    cell.img.alt = `seed ${cell.seed}, class ${label}: final image`;
    cell.caption.textContent = `seed ${cell.seed} · class ${label}`;
    cell.li.dataset.final = "true";
    const name = this.opts.downloadName(cell);
    cell.tools.replaceChildren(
      h("a", { href: cell.url, download: name, class: "button", "aria-label": `Download ${name}`, text: "PNG" }),
      h("button", { type: "button", "aria-label": `Reproduce seed ${cell.seed}`, text: "Reproduce",
        onclick: () => this.opts.onReproduce(this, cell) }));
  }

  finish(status, detail) {
    if (!this.active) return;
    this.endedAt = performance.now();
    this.setStatus(status, detail);
    if (status === "succeeded") {
      this.bar.value = this.bar.max;
      this.allButton.disabled = !this.cells.every((c) => c.png);
    }
    this.showTiming();
    const frames = Math.max(0, ...this.cells.map((c) => c.history.length));
    if (frames > 1) {  // the slider's last position is the final image (or the last frame)
      this.scrub.max = String(frames);
      this.scrub.value = String(frames);
      this.scrubber.hidden = false;
      this.replay(frames);
    }
  }

  showFrame(cell, frame) {
    cell.img.src = frame.src;
    cell.img.alt = `seed ${cell.seed}: denoised estimate at step ${frame.step} of ${frame.numSteps}, ` +
      `sigma ${sigmaText(frame.sigma)}`;
  }

  // Position k of the slider: every image's k-th frame; past the last frame, the final images.
  replay(k) {
    let shown = null;
    for (const cell of this.cells) {
      if (k >= cell.history.length && cell.url) {
        cell.img.src = cell.url;
        cell.img.alt = `seed ${cell.seed}: final image`;
      } else if (cell.history.length) {
        shown = cell.history[Math.min(k, cell.history.length - 1)];
        this.showFrame(cell, shown);
      }
    }
    const text = shown ? `evaluation ${shown.nfe} of ${this.nfeTotal}: step ${shown.step} / ${shown.numSteps}, ` +
      `σ = ${sigmaText(shown.sigma)}` : "final images";
    this.scrubValue.textContent = text;
    this.scrub.setAttribute("aria-valuetext", text);
  }

  // Wall time as this browser saw it; sampling time as the worker measured it (from GET /v1/jobs).
  showTiming(server) {
    const parts = [];
    if (this.nfeTotal && this.endedAt !== undefined) parts.push(`NFE ${this.nfe} / ${this.nfeTotal} per image`);
    if (this.firstFrameMs !== null) parts.push(`first frame ${seconds(this.firstFrameMs)} after Generate`);
    if (this.endedAt !== undefined && this.pressedAt !== null) parts.push(`wall ${seconds(this.endedAt - this.pressedAt)}`);
    if (server && server.sampling_s !== null && server.sampling_s !== undefined) {
      parts.push(`sampling ${seconds(server.sampling_s * 1000)} on the worker`);
    }
    if (server && server.queue_wait_s !== null && server.queue_wait_s !== undefined) {
      parts.push(`queued ${seconds(server.queue_wait_s * 1000)}`);
    }
    this.timing.textContent = parts.join(" · ");
  }

  release() {
    this.abort.abort();
    for (const cell of this.cells) if (cell.url) URL.revokeObjectURL(cell.url);
  }
}
