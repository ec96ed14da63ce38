// ichedge monitoring page: weekly use, flag rates, drift (PSI), out-of-distribution inputs and
// readers' agreement, from GET /api/monitor.
"use strict";

const isNum = (x) => typeof x === "number" && isFinite(x);
const count = (x) => (isNum(x) ? String(x) : "–");
const pct = (x, digits = 1) => (isNum(x) ? (100 * x).toFixed(digits) + "%" : "–");
const fixed = (x, digits = 3) => (isNum(x) ? x.toFixed(digits) : "–");

function interval(m) {  // {value, low, high, n} -> "0.92 [0.80–0.97] n=25"
  if (!m || !isNum(m.value)) return m && isNum(m.n) ? `– (n=${m.n})` : "–";
  const range = isNum(m.low) && isNum(m.high) ? ` [${m.low.toFixed(2)}–${m.high.toFixed(2)}]` : "";
  return `${m.value.toFixed(2)}${range}` + (isNum(m.n) ? ` n=${m.n}` : "");
}

function render(body) {
  const rows = $("monitor-table").querySelector("tbody");
  rows.replaceChildren();
  for (const w of body.weeks || []) {
    const tr = document.createElement("tr");
    if (w.drift) {
      tr.className = "drift";
      tr.title = `PSI ${fixed(w.psi)} is over the drift threshold ${fixed(body.drift_threshold, 2)}`;
    }
    const cells = [
      [w.week, ""], [count(w.requests), "num"], [count(w.studies), "num"], [count(w.slices), "num"],
      [pct(w.refused_rate), "num"], [pct(w.flag_rate_slices), "num"], [pct(w.flag_rate_studies), "num"], [fixed(w.psi), "num"],
      [pct(w.ood_rate), "num"], [count(w.feedback), "num"], [pct(w.agreement), "num"],
      [interval(w.sensitivity), ""], [interval(w.specificity), ""],
    ];
    for (const [value, cls] of cells) tr.append(text("td", value, cls));
    rows.append(tr);
  }
  if (!rows.children.length) {
    const tr = document.createElement("tr");
    const td = text("td", "no requests recorded yet");
    td.colSpan = 13;
    tr.append(td);
    rows.append(tr);
  }
  const warnings = $("monitor-warnings");
  warnings.replaceChildren();
  for (const w of body.warnings || []) warnings.append(text("li", w));
  if (!warnings.children.length) warnings.append(text("li", "none", "empty"));
  $("monitor-note").textContent = isNum(body.drift_threshold)
    ? `(a week drifts when its PSI exceeds ${body.drift_threshold})` : "";
  const models = (body.models || []).map((m) => `${m.name} (${m.id})`);
  $("monitor-models").textContent = models.length ? "models: " + models.join(", ") : "no model recorded";
}

async function load() {
  $("status").textContent = "loading…";
  let r;
  try {
    r = await fetch("/api/monitor", { headers: authHeaders() });
  } catch (e) {
    $("status").textContent = "error: the service did not answer (" + e + ")";
    return;
  }
  if (r.status === 401) {
    $("monitor-models").textContent = "sign in with an access token";
    askForToken("this service needs an access token");
    return;
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try {
      const d = (await r.json()).detail;
      if (typeof d === "string") message = d;
      else if (d && d.message) message = d.message;
    } catch (e) { /* not JSON */ }
    $("status").textContent = "error: " + message;
    return;
  }
  render(await r.json());
  $("status").textContent = "updated " + new Date().toLocaleString();
}

$("token-box").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("ichedge-token", $("token").value.trim());
  $("token").value = "";
  $("token-box").hidden = true;
  load();
});
load();
