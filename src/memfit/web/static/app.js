// memfit web page: reads the form, asks /api/estimate, draws what it answers (SVG, no libraries).
"use strict";
(function () {
  const GiB = 2 ** 30;
  const form = document.getElementById("job");
  const $ = (id) => document.getElementById(id);
  const NUM = ["batch_size", "seq_len", "prompt_len", "new_tokens", "gpus"];
  const BOOL = ["gradient_checkpointing"];
  const PALETTE = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5",
                   "#9c6b4e", "#9498a0", "#2f4b7c", "#d45087"];
  let defaults = {};
  let controller = null;
  let seq = 0;
  let lastJob = null;
  let extra = {};  // job fields the form has no control for (from the URL or a plan row), sent as they are
  window.memfitTimings = { loadMs: null, renders: [] };

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const gib = (n) => (n / GiB).toFixed(2);

  function readForm() {
    const job = Object.assign({}, extra);
    for (const el of form.elements) {
      if (!el.name || el.name === "gpu" || el.name === "gpu_memory" || el.name === "config") continue;
      if (BOOL.includes(el.name)) job[el.name] = el.checked;
      else if (NUM.includes(el.name)) { if (el.value !== "") job[el.name] = Number(el.value); }
      else if (el.value !== "") job[el.name] = el.value;
    }
    const body = { job: job };
    const gpu = form.elements.gpu.value, mem = form.elements.gpu_memory.value.trim();
    if (gpu) body.gpu = gpu; else if (mem) body.gpu_memory = mem;
    const cfg = $("f-config").value.trim();
    if (cfg) body.config = cfg;
    return body;
  }

  function fillForm(job, card) {
    extra = {};
    for (const [k, v] of Object.entries(job)) {
      if (!(k in form.elements) && k in defaults && k !== "model" && JSON.stringify(defaults[k]) !== JSON.stringify(v)) extra[k] = v;
    }
    for (const el of form.elements) {
      if (!el.name || !(el.name in job)) continue;
      if (BOOL.includes(el.name)) el.checked = !!job[el.name]; else el.value = job[el.name];
    }
    if (card) { form.elements.gpu.value = card.gpu || ""; form.elements.gpu_memory.value = card.gpu_memory || ""; }
  }

  // The job in the URL: only fields that differ from the library's defaults.
  function toHash(body) {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(body.job)) if (k === "model" || defaults[k] !== v) p.set(k, Array.isArray(v) ? v.join(",") : String(v));
    if (body.gpu) p.set("gpu", body.gpu); if (body.gpu_memory) p.set("gpu_memory", body.gpu_memory);
    return "#" + p.toString();
  }
  function fromHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const job = {}; let card = { gpu: "", gpu_memory: "" }; let any = false;
    for (const [k, v] of p) {
      any = true;
      if (k === "gpu" || k === "gpu_memory") card[k] = v;
      else job[k] = v === "true" ? true : v === "false" ? false : v;
    }
    return any ? { job, card } : null;
  }

  function yaml(body) {
    return Object.entries(body.job).filter(([k, v]) => k === "model" || defaults[k] !== v)
      .map(([k, v]) => `${k}: ${typeof v === "string" && /[:#{}\[\],&*?|<>=!%@`'"]/.test(v) ? JSON.stringify(v) : v}`).join("\n") + "\n";
  }
  function command(body) {
    const q = (s) => /^[\w.\/:@+-]+$/.test(s) ? s : "'" + String(s).replace(/'/g, "'\\''") + "'";
    const parts = ["memfit", "estimate", q(body.job.model)];
    for (const [k, v] of Object.entries(body.job)) {
      if (k === "model" || defaults[k] === v) continue;
      const flag = "--" + k.replace(/_/g, "-");
      if (typeof v === "boolean") parts.push(v ? flag : "--no-" + k.replace(/_/g, "-"));
      else parts.push(flag, q(v));
    }
    if (body.gpu) parts.push("--gpu", q(body.gpu)); else if (body.gpu_memory) parts.push("--gpu-memory", q(body.gpu_memory));
    return parts.join(" ");
  }

  function level(bd) {
    if (bd.gpu_memory_bytes == null) return "none";
    if (!bd.fits) return "red";
    return bd.headroom_bytes >= 0.1 * bd.gpu_memory_bytes ? "green" : "amber";
  }

  function barSvg(bd) {
    const W = 760, H = 46, comps = Object.entries(bd.components).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
    const extra = [["allocator reserve", Math.max(0, bd.peak_reserved_bytes - bd.peak_allocated_bytes)],
                   ["CUDA context", Math.max(0, bd.device_total_bytes - bd.peak_reserved_bytes)]];
    const card = bd.gpu_memory_bytes;
    const scale = W / Math.max(bd.device_total_bytes, card || 0, 1);
    let x = 0, rects = "", legend = "";
    const segs = comps.map(([k, n], i) => [k, n, PALETTE[i % PALETTE.length], "component"])
      .concat(extra.filter(([, n]) => n > 0).map(([k, n], i) => [k, n, i ? "#5b6570" : "#c3c9d0", "overhead"]));
    for (const [k, n, color, kind] of segs) {
      const w = n * scale;
      rects += `<rect data-${kind}="${esc(k)}" data-bytes="${n}" x="${x.toFixed(2)}" y="8" width="${w.toFixed(2)}" height="${H - 16}" fill="${color}"><title>${esc(k)}: ${gib(n)} GiB</title></rect>`;
      legend += `<span><i style="background:${color}"></i>${esc(k)} ${gib(n)}</span>`;
      x += w;
    }
    let cardMark = "";
    if (card) {
      const cx = Math.min(card * scale, W - 1);
      const col = { green: "#11602a", amber: "#b07800", red: "#c01818" }[level(bd)];
      cardMark = `<line id="card-line" data-bytes="${card}" x1="${cx}" x2="${cx}" y1="0" y2="${H}" stroke="${col}" stroke-width="3"/>`
        + `<text x="${Math.max(0, cx - 4)}" y="${H + 12}" text-anchor="end" font-size="11" fill="${col}">card ${gib(card)} GiB</text>`;
    }
    return `<svg id="bar-svg" width="${W}" height="${H + 16}" viewBox="0 0 ${W} ${H + 16}" role="img" aria-label="memory by component">`
      + `<rect x="0" y="8" width="${W}" height="${H - 16}" fill="#eef1f4"/>${rects}${cardMark}</svg><div class="legend">${legend}</div>`;
  }

  function phasesSvg(bd) {
    const ph = Object.entries(bd.phases || {});
    if (!ph.length) return "<p>no phases</p>";
    const W = 760, row = 22, max = Math.max(...ph.map(([, n]) => n), bd.gpu_memory_bytes || 0, 1);
    let out = "";
    ph.forEach(([k, n], i) => {
      const y = i * row, w = (n / max) * (W - 260);
      const peak = k === bd.peak_phase;
      out += `<text x="0" y="${y + 15}" font-size="12">${esc(k)}</text>`
        + `<rect data-phase="${esc(k)}" data-bytes="${n}" x="120" y="${y + 4}" width="${w.toFixed(2)}" height="${row - 8}" fill="${peak ? "#ff725c" : "#97bbf5"}"/>`
        + `<text x="${(126 + w).toFixed(2)}" y="${y + 15}" font-size="12">${gib(n)} GiB${peak ? " (peak)" : ""}</text>`;
    });
    return `<svg id="phases-svg" width="${W}" height="${ph.length * row}" role="img" aria-label="peak by phase">${out}</svg>`;
  }

  function render(bd, t0) {
    const lv = level(bd), v = $("verdict");
    v.className = "verdict " + lv;
    v.dataset.fits = bd.fits == null ? "" : String(bd.fits);
    v.textContent = bd.gpu_memory_bytes == null ? `needs ${gib(bd.device_total_bytes)} GiB per GPU (pick a card for the verdict)`
      : bd.fits ? `FITS on a ${gib(bd.gpu_memory_bytes)} GiB card: headroom ${gib(bd.headroom_bytes)} GiB`
      : `DOES NOT FIT on a ${gib(bd.gpu_memory_bytes)} GiB card: ${gib(-bd.headroom_bytes)} GiB too big`;
    const fig = [["device total", "device-total", bd.device_total_bytes], ["peak allocated", "peak-allocated", bd.peak_allocated_bytes],
                 ["peak reserved", "peak-reserved", bd.peak_reserved_bytes]];
    $("figures").innerHTML = fig.map(([l, id, n]) => `<div><dt>${l}</dt><dd id="${id}" data-bytes="${n}">${gib(n)} GiB</dd></div>`).join("")
      + `<div><dt>peak at</dt><dd id="peak-phase">${esc(bd.peak_phase)}</dd></div>`
      + `<div><dt>parameters</dt><dd id="parameters" data-count="${bd.parameters}">${(bd.parameters / 1e9).toFixed(3)} B</dd></div>`;
    $("bar").innerHTML = barSvg(bd);
    $("phases").innerHTML = phasesSvg(bd);
    const now = performance.now();
    if (window.memfitTimings.firstRenderAt == null) window.memfitTimings.firstRenderAt = now;  // since navigation start
    window.memfitTimings.renders.push(now - t0);
    document.body.dataset.renderSeq = String(++seq);
  }

  function showError(msg) { const e = $("error"); e.hidden = !msg; e.textContent = msg || ""; }

  async function post(url, body, signal) {
    const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal });
    const data = await r.json();
    if (!r.ok) throw new Error(data.detail || ("HTTP " + r.status));
    return data;
  }

  function requestBody() {
    const body = readForm();
    if (typeof body.config === "string") {
      try { body.config = JSON.parse(body.config); } catch (e) { throw new Error("the pasted config.json is not valid JSON"); }
    }
    return body;
  }

  async function update() {
    const t0 = performance.now();
    let body;
    try { body = requestBody(); } catch (e) { showError(e.message); return; }
    if (!body.job.model && !body.config) { showError("name a model"); return; }
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const bd = await post("/api/estimate", body, controller.signal);
      lastJob = body;
      if (!body.config) history.replaceState(null, "", toHash(body));
      showError("");
      render(bd, t0);
    } catch (e) {
      if (e.name === "AbortError") return;
      showError(e.message);
      document.body.dataset.renderSeq = String(++seq);
    }
  }

  async function runPlan() {
    let body;
    try { body = requestBody(); } catch (e) { showError(e.message); return; }
    $("plan").innerHTML = "<p>planning…</p>";
    try {
      const res = await post("/api/plan", Object.assign(body, { top: 10 }));
      const rows = res.candidates.map((c, i) => `<tr data-row="${i}"><td>${i + 1}</td><td>${c.fits ? "fits" : "no"}</td>`
        + `<td>${esc(c.changes.join(", ") || "as is")}</td><td class="num">${gib(c.device_total_bytes)}</td>`
        + `<td class="num">${gib(c.headroom_bytes)}</td><td class="num">${c.gradient_accumulation}</td>`
        + `<td class="num">${Math.round(c.tokens_per_second)}</td></tr>`).join("");
      $("plan").innerHTML = `<h2>Plan on ${esc(res.gpu || gib(res.gpu_memory_bytes) + " GiB")} (${res.timed} timed)</h2>`
        + `<table id="plan-table"><thead><tr><th>#</th><th></th><th>changes</th><th>GiB</th><th>headroom GiB</th><th>accum.</th><th>tokens/s</th></tr></thead><tbody>${rows}</tbody></table>`
        + "<p>click a row to load it into the form</p>";
      $("plan").querySelectorAll("tbody tr").forEach((tr) => tr.addEventListener("click", () => {
        fillForm(res.candidates[Number(tr.dataset.row)].job, null); update();
      }));
    } catch (e) { $("plan").innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  }

  function copy(text) {
    const pre = $("copied"); pre.hidden = false; pre.textContent = text;
    if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).catch(() => {});
  }

  async function init() {
    const t0 = performance.now();
    // A shared URL is estimated at once, alongside the lists the form needs (not after them).
    const shared = fromHash();
    const early = shared && shared.job.model ? post("/api/estimate", Object.assign({ job: shared.job },
      shared.card.gpu ? { gpu: shared.card.gpu } : shared.card.gpu_memory ? { gpu_memory: shared.card.gpu_memory } : {})).catch(() => null) : null;
    const [models, gpus, fieldsList] = await Promise.all(["/api/models", "/api/gpus", "/api/job-fields"].map((u) => fetch(u).then((r) => r.json())));
    $("model-list").innerHTML = models.map((m) => `<option value="${esc(m.name)}">${esc(m.hf_id || "")}</option>`).join("");
    $("f-gpu").innerHTML += gpus.map((g) => `<option value="${esc(g.name)}">${esc(g.name)} (${gib(g.memory_bytes)} GiB)</option>`).join("");
    for (const f of fieldsList) defaults[f.name] = f.default;
    fillForm(defaults, null);
    const fromUrl = fromHash();
    if (fromUrl) fillForm(fromUrl.job, fromUrl.card);
    if (!form.elements.model.value) form.elements.model.value = models.length ? (models.find((m) => m.name === "gpt2") || models[0]).name : "";
    form.addEventListener("input", update);
    form.addEventListener("change", update);
    $("copy-yaml").addEventListener("click", () => lastJob && copy(yaml(lastJob)));
    $("copy-cmd").addEventListener("click", () => lastJob && copy(command(lastJob)));
    $("run-plan").addEventListener("click", runPlan);
    const first = early && await early;
    if (first) { lastJob = readForm(); render(first, t0); } else await update();
    window.memfitTimings.loadMs = performance.now() - t0;
  }
  init().catch((e) => showError(e.message));
})();
