// The page's start: read GET /v1/steering (asking for the API key on a 401), then wire the panels and shortcuts.

import { apiKey, request, setApiKey, whenUnauthorized } from "./api.js";
import { initEdits } from "./edits.js";
import { initFinder } from "./finder.js";
import { initRun, runPair } from "./run.js";
import { initSweep, refreshSweep } from "./sweep.js";
import { initWatch } from "./watch.js";
import { $, showError, state } from "./state.js";

let started = false;

function askForKey(error) {
  const form = $("#key-form");
  $("#key-why").textContent = apiKey()
    ? `The server refused the API key you gave (401): ${error.message}`
    : "This server needs an API key: every API call is refused without one (401).";
  form.hidden = false;
  $("#api-key").focus();
}

function describeServer(info) {
  const layers = info.layers.map((l) => `${l.layer}`).join(", ") || "none";
  const widths = [...new Set(info.layers.map((l) => l.d_sae))].join("/");
  const on = Object.entries(info.capabilities || {}).filter(([, v]) => v).map(([k]) => k);
  return `${info.model}: SAEs at layers ${layers} (${widths} features), ${info.function_tokens.count} function ` +
    `tokens, strengths up to ±${info.limits.max_abs_strength}. Optional APIs: ${on.length ? on.join(", ") : "none yet"}.`;
}

async function start() {
  showError($("#page-error"), null);
  try {
    state.info = (await request("/v1/steering")).body;
  } catch (e) {
    $("#server-line").textContent = "Not connected.";
    if (e.status !== 401) showError($("#page-error"), e); // a 401 opens the key form instead
    return;
  }
  started = true;
  state.fnIds = new Set(state.info.function_tokens.ids);
  $("#server-line").textContent = describeServer(state.info);
  const presets = Object.keys(state.info.presets);
  if (presets.length) {
    $("#presets-line").hidden = false;
    $("#presets-line").textContent = `Presets on this server (usable as "steering": "name" in the API): ${presets.join(", ")}.`;
  }
  initEdits(refreshSweep);
  initFinder();
  initRun();
  initWatch();
  initSweep();
  document.body.dataset.ready = "true";
}

whenUnauthorized(askForKey);

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setApiKey($("#api-key").value.trim());
  $("#key-form").hidden = true;
  $("#api-key").value = "";
  if (!started) start();
});

// Ctrl+Enter (Cmd+Enter on a Mac) runs from anywhere on the page.
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && started) {
    ev.preventDefault();
    runPair();
  }
});

start().catch((e) => showError($("#page-error"), e));
