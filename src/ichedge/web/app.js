// ichedge triage page: uploads to /api/studies, shows a card per slice and a session worklist.
"use strict";

const worklist = [];  // studies uploaded in this session
const $ = (id) => document.getElementById(id);

// A service that listens beyond this machine asks for a bearer token (ichedge token create);
// it is kept for this tab only.
function authHeaders() {
  const token = sessionStorage.getItem("ichedge-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function askForToken(message) {
  $("token-box").hidden = false;
  $("status").textContent = message;
  $("token").focus();
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return el;
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

function renderWorklist() {
  const body = $("worklist").querySelector("tbody");
  body.replaceChildren();
  worklist.sort((a, b) => (b.flagged - a.flagged) || (b.score - a.score));
  worklist.forEach((s, i) => {
    const tr = document.createElement("tr");
    if (s.flagged) tr.className = "flagged";
    if (s.outside_slices) tr.classList.add("outside");
    tr.append(text("td", String(i + 1)), text("td", s.study), text("td", String(s.slices)),
              text("td", s.score.toFixed(3)), text("td", s.decision));
    body.append(tr);
  });
}

function card(slice) {
  const div = document.createElement("div");
  div.className = "card" + (slice.flagged ? " flagged" : "");
  div.dataset.file = slice.file;
  if (slice.heatmap) {
    const img = document.createElement("img");
    img.src = slice.heatmap;
    img.alt = "Grad-CAM heatmap over " + slice.file;
    div.append(img);
  }
  div.append(text("p", slice.file, "file"));
  div.append(text("p", `probability ${slice.probability.toFixed(3)}`, "probability"));
  div.append(text("p", slice.decision, "decision"));
  if (slice.outside) {
    div.classList.add("outside");
    div.append(text("p", `input OOD score ${slice.ood_score.toFixed(2)} (1 = boundary)`, "ood"));
  }
  return div;
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  // Images of one upload form one study, named after it (DICOM series are named by the server).
  form.append("study", files.length > 1 ? `${files[0].name} +${files.length - 1}` : files[0].name);
  $("status").textContent = `scoring ${files.length} file(s)…`;
  $("errors").replaceChildren();  // errors shown are those of this upload
  const started = performance.now();
  let r, body;
  try {
    r = await fetch("/api/studies", { method: "POST", body: form, headers: authHeaders() });
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
  const results = $("results");
  for (const study of body.studies) {
    worklist.push(study);
    for (const s of study.ranking) results.prepend(card(s));
  }
  renderWorklist();
  showErrors(body.errors);
  $("status").textContent = `done in ${Math.round(performance.now() - started)} ms`;
}

function showErrors(errors) {
  const list = $("errors");
  for (const e of errors) list.append(text("li", e.error));
  $("errors-box").hidden = list.children.length === 0;
}

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
});
loadModel();
