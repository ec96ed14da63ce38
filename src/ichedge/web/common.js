// What the triage and monitoring pages share: element lookup, the bearer token, text nodes.
"use strict";

const $ = (id) => document.getElementById(id);

// A service that listens beyond this machine asks for a bearer token (ichedge token create);
// it is kept for this tab only, and both pages use it.
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
