// ichedge triage page: uploads to /api/studies, reads a study slice by slice in a viewer, takes the
// reader's feedback (/api/feedback), shows the study's history (/api/history/{id}) and a session worklist.
"use strict";

const worklist = [];  // studies uploaded in this session: {data, meta, slices, byHash, feedback}
const PRESETS = [["brain", "Brain"], ["subdural", "Subdural"], ["bone", "Bone"]];
const NO_RECORD = "this service keeps no record (started without a database): feedback is off";

// What the viewer shows: the open study, the slice (position in series order), the window, the overlay.
const view = { entry: null, k: 0, preset: "brain", heatmap: false, marking: false, sending: false, wheel: 0 };

const num = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–");

function when(t) {  // ISO text or epoch seconds/milliseconds, shown in the reader's locale
  if (t === null || t === undefined) return "–";
  const d = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  return isNaN(d.getTime()) ? String(t) : d.toLocaleString();
}

const label = (m) => (m && typeof m === "object" ? (m.name || m.id || JSON.stringify(m)) : String(m ?? "–"));

async function detailOf(r) {  // the message of an error answer: {detail: text | [{msg}] | {message}}
  try {
    const d = (await r.json()).detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((x) => x.msg).join("; ");
    if (d && d.message) return d.message;
  } catch (e) { /* not JSON */ }
  return `${r.status} ${r.statusText}`;
}

async function loadModel() {
  try {
    const r = await fetch("/api/model", { headers: authHeaders() });
    if (r.status === 401) {
      $("model-info").textContent = "sign in with an access token";
      askForToken("this service needs an access token");
      return;
    }
    const m = await r.json();
    $("model-info").textContent =
      `${m.model.name} · ${m.model.kind} · id ${m.model.id} · slice threshold ${m.decision.slice_threshold.toFixed(3)}`;
    const c = await (await fetch("/api/credit")).json();
    $("credit").textContent = "Data credit: " + c.data;
  } catch (e) {
    $("model-info").textContent = "model information unavailable";
  }
}

// ---------------------------------------------------------------- worklist

function renderWorklist() {
  const body = $("worklist").querySelector("tbody");
  body.replaceChildren();
  worklist.sort((a, b) => (b.data.flagged - a.data.flagged) || (b.data.score - a.data.score));
  worklist.forEach((entry, i) => {
    const s = entry.data;
    const tr = document.createElement("tr");
    if (s.flagged) tr.className = "flagged";
    if (s.outside_slices) tr.classList.add("outside");
    if (entry === view.entry) tr.classList.add("open");
    tr.tabIndex = 0;
    tr.title = "open this study in the viewer";
    tr.append(text("td", String(i + 1)), text("td", s.study), text("td", String(s.slices)),
              text("td", num(s.score)), text("td", s.decision));
    tr.addEventListener("click", () => openStudy(entry, true));
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openStudy(entry, true); }
    });
    body.append(tr);
  });
}

// ---------------------------------------------------------------- upload

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  // Images of one upload form one study, named after it (DICOM series are named by the server).
  form.append("study", files.length > 1 ? `${files[0].name} +${files.length - 1}` : files[0].name);
  $("status").textContent = `scoring ${files.length} file(s)…`;
  $("errors").replaceChildren();  // errors shown are those of this upload
  $("notes").replaceChildren();
  $("notes").hidden = true;
  const started = performance.now();
  let r, body;
  try {
    r = await fetch("/api/studies?heatmap=true&views=true", { method: "POST", body: form, headers: authHeaders() });
  } catch (e) {
    $("status").textContent = "error: the service did not answer (" + e + ")";
    return;
  }
  const isJson = (r.headers.get("content-type") || "").includes("application/json");
  body = isJson ? await r.json() : { detail: `${r.status} ${r.statusText}` };
  if (r.status === 401) {
    askForToken("this service needs an access token: enter it, then upload again");
    return;
  }
  if (!r.ok) {
    const d = body.detail;
    const message = typeof d === "string" ? d : Array.isArray(d) ? d.map((x) => x.msg).join("; ") : d.message;
    $("status").textContent = "error: " + message;
    showErrors((d && d.errors) || []);
    return;
  }
  const meta = { model: body.model, slice_threshold: body.slice_threshold, study_threshold: body.study_threshold,
                 study_aggregate: body.study_aggregate, recorded: body.recorded !== false };
  const added = body.studies.map((study) => addStudy(study, meta));
  renderWorklist();
  showErrors(body.errors || []);
  for (const note of body.notes || []) $("notes").append(text("li", note));
  $("notes").hidden = $("notes").children.length === 0;
  $("status").textContent = `done in ${Math.round(performance.now() - started)} ms`;
  // The most urgent study of this upload opens in the viewer.
  added.sort((a, b) => (b.data.flagged - a.data.flagged) || (b.data.score - a.data.score));
  if (added.length) openStudy(added[0], true);
}

function addStudy(study, meta) {
  // Series order: by index (position in the series), the file name breaking ties.
  const slices = [...study.ranking].sort((a, b) =>
    ((a.index ?? Infinity) - (b.index ?? Infinity)) || String(a.file).localeCompare(String(b.file)));
  const byHash = new Map(slices.filter((s) => s.slice_hash).map((s) => [s.slice_hash, s]));
  const entry = { data: study, meta, slices, byHash, feedback: new Map(), history: null, historySeq: 0 };
  worklist.push(entry);
  return entry;
}

function showErrors(errors) {
  const list = $("errors");
  for (const e of errors) list.append(text("li", e.error));
  $("errors-box").hidden = list.children.length === 0;
}

// ---------------------------------------------------------------- viewer

function openStudy(entry, focus) {
  view.entry = entry;
  view.marking = false;
  view.wheel = 0;
  // Open at the most suspicious slice; the score strip shows where it lies in the series.
  const top = entry.data.ranking && entry.data.ranking[0];
  view.k = Math.max(0, top ? entry.slices.indexOf(top) : 0);
  $("viewer").hidden = false;
  const s = entry.data;
  $("viewer-study").textContent = s.study;
  $("viewer-study").classList.toggle("flagged", !!s.flagged);
  const outside = s.outside_slices ? ` · ${s.outside_slices} slice(s) outside the validated inputs` : "";
  $("viewer-summary").textContent =
    `${s.slices} slices · study score ${num(s.score)} (threshold ${num(entry.meta.study_threshold)}, ` +
    `${entry.meta.study_aggregate || "aggregate"}) · ${s.decision}${outside}`;
  $("viewer-summary").classList.toggle("flagged", !!s.flagged);
  $("feedback-status").textContent = canGiveFeedback(entry) ? "" : NO_RECORD;
  buildStrip(entry);
  renderWorklist();
  render();
  loadHistory(entry);
  if (focus) $("viewer").focus();
}

function buildStrip(entry) {
  const strip = $("score-strip");
  strip.replaceChildren();
  const n = entry.slices.length;
  entry.slices.forEach((s, k) => {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.tabIndex = -1;  // the viewer's keys move through slices; the bars are for the mouse
    bar.className = "bar" + (s.flagged ? " flagged" : "") + (s.outside ? " outside" : "");
    bar.dataset.index = String(k);
    bar.title = `slice ${k + 1} / ${n} · ${s.file} · probability ${num(s.probability)}` +
                (s.flagged ? " · flagged" : "") + (s.outside ? " · outside validated inputs" : "");
    bar.setAttribute("aria-label", bar.title);
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.height = `${Math.max(0, Math.min(1, s.probability || 0)) * 100}%`;
    bar.append(fill);
    bar.addEventListener("click", () => go(k));
    strip.append(bar);
  });
  const t = entry.slices.length ? entry.slices[0].threshold ?? entry.meta.slice_threshold : entry.meta.slice_threshold;
  const line = $("strip-threshold");
  line.hidden = typeof t !== "number";
  if (typeof t === "number") {
    line.style.bottom = `${Math.max(0, Math.min(1, t)) * 100}%`;
    line.title = `slice threshold ${num(t)}`;
  }
}

function go(k) {
  const e = view.entry;
  if (!e || !e.slices.length) return;
  const next = Math.max(0, Math.min(e.slices.length - 1, k));
  if (next === view.k) return;
  view.k = next;
  render();
}

function currentSlice() {
  return view.entry ? view.entry.slices[view.k] : null;
}

function availablePresets(s) {
  const views = (s && s.views) || {};
  return PRESETS.filter(([key]) => typeof views[key] === "string");
}

// What the image shows: {src, kind: "heatmap" | preset key | null}
function shown(s) {
  const presets = availablePresets(s);
  if (view.heatmap && s.heatmap) return { src: s.heatmap, kind: "heatmap" };
  if (presets.length) {
    const key = presets.some(([p]) => p === view.preset) ? view.preset : presets[0][0];
    return { src: s.views[key], kind: key };
  }
  if (s.heatmap) return { src: s.heatmap, kind: "heatmap" };  // no windowed view came back
  return { src: null, kind: null };
}

function render() {
  const e = view.entry, s = currentSlice();
  if (!e || !s) return;
  const n = e.slices.length;
  $("slice-counter").textContent = `slice ${view.k + 1} / ${n}`;

  // Window presets the slice has (PNG/JPEG: brain only).
  const presets = availablePresets(s);
  const box = $("presets");
  const keys = presets.map(([p]) => p).join(",");
  if (box.dataset.keys !== keys) {
    box.replaceChildren();
    presets.forEach(([key, name], i) => {
      const b = text("button", name, "preset");
      b.type = "button";
      b.dataset.preset = key;
      b.title = `${name} window (key ${i + 1})`;
      b.addEventListener("click", () => setPreset(key));
      box.append(b);
    });
    box.dataset.keys = keys;
  }
  const pic = shown(s);
  for (const b of box.querySelectorAll("button")) {
    const on = pic.kind === b.dataset.preset;
    b.classList.toggle("active", on);
    b.setAttribute("aria-pressed", String(on));
  }
  const toggle = $("heatmap-toggle");
  toggle.disabled = !s.heatmap;
  toggle.classList.toggle("active", pic.kind === "heatmap");
  toggle.setAttribute("aria-pressed", String(pic.kind === "heatmap"));

  const img = $("slice-image");
  if (pic.src) {
    if (img.getAttribute("src") !== pic.src) img.src = pic.src;
    img.hidden = false;
    $("no-image").hidden = true;
  } else {
    img.removeAttribute("src");
    img.hidden = true;
    $("no-image").hidden = false;
  }
  const what = pic.kind === "heatmap" ? "Grad-CAM heatmap over the model input"
    : pic.kind ? `${PRESETS.find(([p]) => p === pic.kind)[1]} window` : "no image";
  img.alt = `${s.file}: ${what}`;
  img.setAttribute("aria-label", `CT slice ${view.k + 1} of ${n}, ${s.file}, ${what}, probability ${num(s.probability)}`);

  // Score strip: the current slice.
  for (const bar of $("score-strip").children) {
    const on = Number(bar.dataset.index) === view.k;
    bar.classList.toggle("current", on);
    if (on) bar.setAttribute("aria-current", "true"); else bar.removeAttribute("aria-current");
  }

  // The slice's result.
  $("slice-file").textContent = s.file;
  $("slice-probability").textContent = `probability ${num(s.probability)}` +
    (typeof s.threshold === "number" ? ` (threshold ${num(s.threshold)})` : "");
  $("slice-decision").textContent = s.decision;
  $("slice-info").classList.toggle("flagged", !!s.flagged);
  $("slice-info").classList.toggle("outside", !!s.outside);
  const ood = $("slice-ood");
  ood.hidden = !s.outside;
  ood.textContent = s.outside
    ? `outside the model's validated inputs: input OOD score ${num(s.ood_score, 2)} (1 = boundary); read it yourself`
    : "";

  renderMarks();
  renderControls();
}

function setPreset(key) {
  view.preset = key;
  view.heatmap = false;
  render();
}

function toggleHeatmap() {
  const s = currentSlice();
  if (!s || !s.heatmap) return;
  view.heatmap = !view.heatmap;
  if (view.heatmap) view.marking = false;  // marks are placed on the windowed image, not the model input
  render();
}

// Marks: reader feedback with a point on this slice (this session's and the history's), drawn over
// the windowed image; the heatmap shows the cropped model input, whose geometry differs.
function renderMarks() {
  const layer = $("marks");
  layer.replaceChildren();
  const e = view.entry, s = currentSlice();
  if (!e || !s || shown(s).kind === "heatmap" || $("slice-image").hidden) return;
  for (const f of e.feedback.values()) {
    if (!f.point || !s.slice_hash || f.slice !== s.slice_hash) continue;
    const m = document.createElement("span");
    m.className = "mark";
    m.style.left = `${Math.max(0, Math.min(1, f.point.x)) * 100}%`;
    m.style.top = `${Math.max(0, Math.min(1, f.point.y)) * 100}%`;
    m.title = [f.subtype || "bleed", f.reader, when(f.time)].filter(Boolean).join(" · ");
    if (f.subtype) m.append(text("span", f.subtype, "mark-label"));
    layer.append(m);
  }
}

// ---------------------------------------------------------------- feedback

function canGiveFeedback(entry) {
  return !!entry && entry.data.prediction !== null && entry.data.prediction !== undefined && entry.meta.recorded;
}

function renderControls() {
  const e = view.entry, s = currentSlice();
  const ok = canGiveFeedback(e) && !view.sending;
  const sliceOk = ok && !!(s && s.slice_hash);
  $("study-confirm").disabled = !ok;
  $("study-reject").disabled = !ok;
  $("slice-confirm").disabled = !sliceOk;
  $("slice-reject").disabled = !sliceOk;
  $("subtype").disabled = !canGiveFeedback(e);
  if (!sliceOk && !view.sending) view.marking = false;
  const mark = $("mark-bleed");
  mark.disabled = !sliceOk;
  mark.classList.toggle("active", view.marking);
  mark.setAttribute("aria-pressed", String(view.marking));
  mark.textContent = view.marking ? "Marking: click the bleed" : "Mark bleed";
  $("image-frame").classList.toggle("marking", view.marking);
}

function toggleMarking() {
  const s = currentSlice();
  if (!canGiveFeedback(view.entry) || !s || !s.slice_hash) return;
  view.marking = !view.marking;
  if (view.marking) {
    view.heatmap = false;
    $("feedback-status").textContent = "click the bleed on the image (Esc stops marking)";
  }
  render();
}

async function sendFeedback(fields, done) {
  const e = view.entry;
  if (!canGiveFeedback(e) || view.sending) return;
  view.sending = true;
  renderControls();
  $("feedback-status").textContent = "sending feedback…";
  try {
    let r;
    try {
      r = await fetch("/api/feedback", {
        method: "POST",
        headers: { ...authHeaders(), "Content-Type": "application/json" },
        body: JSON.stringify({ prediction: e.data.prediction, ...fields }),
      });
    } catch (err) {
      $("feedback-status").textContent = "feedback not recorded: the service did not answer (" + err + ")";
      return;
    }
    if (r.status === 401) {
      $("feedback-status").textContent = "feedback not recorded: this service needs an access token";
      askForToken("this service needs an access token: enter it, then give the feedback again");
      return;
    }
    if (!r.ok) {
      $("feedback-status").textContent = "feedback not recorded: " + (await detailOf(r));
      return;
    }
    const fb = (await r.json()).feedback;
    if (fb && fb.id !== undefined) e.feedback.set(fb.id, fb);
    $("feedback-status").textContent = "feedback recorded: " + done;
  } finally {
    view.sending = false;
    if (view.entry === e) render();
  }
  loadHistory(e);
}

function verdict(kind, value) {
  const s = currentSlice();
  if (kind === "study") {
    sendFeedback({ slice: null, verdict: value, subtype: null, point: null },
                 `study decision ${value === "confirm" ? "confirmed" : "rejected"}`);
  } else if (s && s.slice_hash) {
    sendFeedback({ slice: s.slice_hash, verdict: value, subtype: null, point: null },
                 `slice ${view.k + 1} ${value === "confirm" ? "confirmed" : "rejected"}`);
  }
}

function markAt(event) {
  const s = currentSlice();
  if (!view.marking || !s || !s.slice_hash) return;
  const rect = $("slice-image").getBoundingClientRect();
  if (!rect.width || !rect.height) return;
  const x = Math.max(0, Math.min(1, (event.clientX - rect.left) / rect.width));
  const y = Math.max(0, Math.min(1, (event.clientY - rect.top) / rect.height));
  const subtype = $("subtype").value || null;
  // A point means "there is a bleed here": the server derives the verdict from the model's flag.
  sendFeedback({ slice: s.slice_hash, subtype, point: { x: Number(x.toFixed(4)), y: Number(y.toFixed(4)) } },
               `${subtype || "bleed"} marked on slice ${view.k + 1}`);
}

// ---------------------------------------------------------------- history

async function loadHistory(entry) {
  const seq = ++entry.historySeq;
  const status = $("history-status");
  if (!canGiveFeedback(entry)) {
    $("history-predictions").replaceChildren();
    $("history-feedback").replaceChildren();
    status.textContent = "this service keeps no record (started without a database)";
    return;
  }
  status.textContent = "loading history…";
  let r;
  try {
    r = await fetch("/api/history/" + encodeURIComponent(entry.data.id), { headers: authHeaders() });
  } catch (err) {
    if (view.entry === entry && seq === entry.historySeq) status.textContent = "history unavailable: the service did not answer";
    return;
  }
  if (view.entry !== entry || seq !== entry.historySeq) return;  // another study opened, or a newer request
  if (r.status === 401) {
    status.textContent = "history needs an access token";
    askForToken("this service needs an access token");
    return;
  }
  if (!r.ok) {
    status.textContent = "history unavailable: " + (await detailOf(r));
    return;
  }
  const body = await r.json();
  if (view.entry !== entry || seq !== entry.historySeq) return;
  entry.history = body;
  for (const f of body.feedback || []) entry.feedback.set(f.id, f);
  status.textContent = "";
  renderHistory(entry);
  renderMarks();
}

function sliceLabel(entry, hash) {
  if (hash === null || hash === undefined) return { text: "study", k: -1 };
  const s = entry.byHash.get(hash);
  if (!s) return { text: `slice ${String(hash).slice(0, 8)}`, k: -1 };
  const k = entry.slices.indexOf(s);
  return { text: `slice ${k + 1} (${s.file})`, k };
}

function renderHistory(entry) {
  const preds = $("history-predictions"), fbs = $("history-feedback");
  preds.replaceChildren();
  fbs.replaceChildren();
  const h = entry.history || { predictions: [], feedback: [] };
  for (const p of h.predictions || []) {
    const li = text("li", `${when(p.time)} · ${label(p.model)} · score ${num(p.score)}` +
                          (typeof p.study_threshold === "number" ? ` (threshold ${num(p.study_threshold)})` : "") +
                          ` · ${p.flagged ? "flagged" : "not flagged"}` +
                          (p.id === entry.data.prediction ? " · this upload" : ""), "prediction-entry");
    if (p.flagged) li.classList.add("flagged");
    preds.append(li);
  }
  if (!preds.children.length) preds.append(text("li", "none", "empty"));
  for (const f of h.feedback || []) {
    const where = sliceLabel(entry, f.slice);
    const parts = [when(f.time), f.reader || "reader", where.text, f.verdict || "–"];
    if (f.hemorrhage !== null && f.hemorrhage !== undefined) parts.push(f.hemorrhage ? "bleed" : "no bleed");
    if (f.subtype) parts.push(f.subtype);
    if (f.point) parts.push(`at (${num(f.point.x, 2)}, ${num(f.point.y, 2)})`);
    const li = text("li", parts.join(" · "), "feedback-entry");
    if (where.k >= 0) {
      const b = text("button", "show", "link");
      b.type = "button";
      b.setAttribute("aria-label", `show ${where.text}`);
      b.addEventListener("click", () => { view.heatmap = false; go(where.k); render(); $("viewer").focus(); });
      li.append(" ", b);
    }
    fbs.append(li);
  }
  if (!fbs.children.length) fbs.append(text("li", "none yet", "empty"));
}

// ---------------------------------------------------------------- events

const viewer = $("viewer");
viewer.addEventListener("keydown", (e) => {
  if (!view.entry || e.altKey || e.ctrlKey || e.metaKey) return;
  if (e.target instanceof HTMLSelectElement || e.target instanceof HTMLInputElement) return;
  const n = view.entry.slices.length, page = Math.max(1, Math.round(n / 10));
  const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page };
  if (e.key in moves) go(view.k + moves[e.key]);
  else if (e.key === "Home") go(0);
  else if (e.key === "End") go(n - 1);
  else if (e.key === "h" || e.key === "H") toggleHeatmap();
  else if (e.key === "m" || e.key === "M") toggleMarking();
  else if (e.key === "Escape" && view.marking) { view.marking = false; $("feedback-status").textContent = ""; render(); }
  else if (["1", "2", "3"].includes(e.key)) {
    const p = availablePresets(currentSlice())[Number(e.key) - 1];
    if (!p) return;
    setPreset(p[0]);
  } else return;
  e.preventDefault();
});

function onWheel(e) {
  if (!view.entry) return;
  e.preventDefault();
  // Pixel deltas (touchpads) add up to a step; line and page deltas step at once.
  view.wheel += e.deltaMode === 0 ? e.deltaY : e.deltaY * 50;
  const steps = Math.trunc(view.wheel / 50);
  if (steps) {
    view.wheel -= steps * 50;
    go(view.k + steps);
  }
}
$("image-frame").addEventListener("wheel", onWheel, { passive: false });
$("strip-frame").addEventListener("wheel", onWheel, { passive: false });
$("slice-image").addEventListener("click", markAt);
$("heatmap-toggle").addEventListener("click", toggleHeatmap);
$("mark-bleed").addEventListener("click", toggleMarking);
$("study-confirm").addEventListener("click", () => verdict("study", "confirm"));
$("study-reject").addEventListener("click", () => verdict("study", "reject"));
$("slice-confirm").addEventListener("click", () => verdict("slice", "confirm"));
$("slice-reject").addEventListener("click", () => verdict("slice", "reject"));

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  upload([...e.dataTransfer.files]);
});
$("files").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
$("token-box").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("ichedge-token", $("token").value.trim());
  $("token").value = "";
  $("token-box").hidden = true;
  loadModel();
  if (view.entry) loadHistory(view.entry);
});
loadModel();
