// The list of chosen edits (an SAE feature: layer, feature, mode, strength; or a named steering vector: vector, mode,
// strength; either with a strength unit and a condition, condition.js) and the positions: the request's "steering".

import { request } from "./api.js";
import { conditionRow, unitControl, when } from "./condition.js";
import { initPositions, positions } from "./positions.js";
import { $, capability, el, showError, state, showToken } from "./state.js";

const VECTOR_MODES = ["add", "project_out", "cap", "set"]; // clamp and ablate need an SAE feature

let changed = () => {}; // called after any change (main.js re-renders the sweep's edit list)

export function initEdits(onChange) {
  changed = onChange;
  initPositions();
  $("#add-edit").addEventListener("click", () => {
    const first = state.info.layers[0];
    addEdit({ layer: first ? first.layer : 0, feature: 0 });
  });
  if (capability("vectors")) initVectors();
  render();
}

// The library's vectors (GET /v1/steering/vectors), offered as edits when the server has them.
async function initVectors() {
  const note = $("#vectors-note");
  let cards = [];
  try {
    cards = (await request("/v1/steering/vectors")).body.data.filter((v) => v.steerable);
  } catch (e) {
    showError(note, e);
    note.classList.add("error");
    return;
  }
  if (!cards.length) {
    note.textContent = "No steering vectors on this server yet (POST /v1/steering/vectors adds one).";
    note.hidden = false;
    return;
  }
  const select = $("#vector-name");
  for (const v of cards) {
    const layers = v.layers.map((l) => l.layer).join(", ");
    select.append(el("option", { value: v.name, text: `${v.name} (layer${v.layers.length > 1 ? "s" : ""} ${layers})` }));
  }
  state.vectors = new Map(cards.map((v) => [v.name, v]));
  $("#vector-picker").hidden = false;
  $("#add-vector").addEventListener("click", () => addVector(select.value));
}

export function addVector(name, strength = 1) {
  state.edits.push({ vector: name, mode: "add", strength, label: "", unit: "absolute", when: null });
  render();
  const rows = document.querySelectorAll("#edits .strength-number");
  if (rows.length) rows[rows.length - 1].focus();
}

function maxStrength() {
  return state.info.limits.max_abs_strength;
}

export function addEdit({ layer, feature, mode = "add", strength = null, label = "" }) {
  const s = strength === null ? Math.min(100, maxStrength()) : strength;
  state.edits.push({ layer, feature, mode, strength: s, label, unit: "absolute", when: null });
  render();
  // Move focus to the new edit's strength, so a keyboard user can set it at once.
  const rows = document.querySelectorAll("#edits .strength-number");
  if (rows.length) rows[rows.length - 1].focus();
}

// The request's steering object for the current edits (null when there are none), optionally with one edit's
// strength replaced (the sweep). Throws PickerError (positions.js) for a position field the page can name itself.
export function steeringSpec(override = null) {
  if (!state.edits.length) return null;
  const edits = state.edits.map((e, i) => {
    const strength = override && override.index === i ? override.strength : e.strength;
    const out = e.vector ? { vector: e.vector, mode: e.mode } : { layer: e.layer, feature: e.feature, mode: e.mode };
    if (e.mode === "add") out.strength = strength;
    if (e.mode === "add" && e.unit === "token_norm") out.strength_unit = "token_norm";
    if (e.mode === "clamp" || e.mode === "set") out.value = strength;
    if (e.mode === "cap") out.max = strength; // the page caps from above; the API also takes "min"
    if (e.when) out.when = when(e.when);
    return out;
  });
  return { edits, positions: positions() };
}

export function editName(e, i) {
  if (e.vector) {
    const card = state.vectors && state.vectors.get(e.vector);
    const layers = card ? ` at layer${card.layers.length > 1 ? "s" : ""} ${card.layers.map((l) => l.layer).join(", ")}` : "";
    return `#${i + 1}: vector ${e.vector}${layers}`;
  }
  const top = state.lensTop.get(`${e.layer}:${e.feature}`);
  return `#${i + 1}: layer ${e.layer}, feature ${e.feature}${top ? ` (${showToken(top)})` : ""}`;
}

function render() {
  const list = $("#edits");
  list.replaceChildren(...state.edits.map(row));
  $("#edits-empty").hidden = state.edits.length > 0;
  changed();
}

function row(e, i) {
  const id = (name) => `edit-${i}-${name}`;
  const name = el("p", { class: "edit-name", text: editName(e, i) });
  const update = (key, parse) => (ev) => {
    e[key] = parse(ev.target.value);
    if (key === "mode") return render(); // the strength controls depend on the mode
    name.textContent = editName(e, i);
    changed();
  };
  if (e.vector) return vectorRow(e, i, name);
  const layer = el("select", { id: id("layer"), onchange: update("layer", Number) });
  for (const l of state.info.layers) {
    layer.append(el("option", { value: l.layer, text: String(l.layer), selected: l.layer === e.layer }));
  }
  const d_sae = (state.info.layers.find((l) => l.layer === e.layer) || { d_sae: 1 }).d_sae;
  const feature = el("input", {
    id: id("feature"), type: "number", min: 0, max: d_sae - 1, step: 1, value: e.feature, class: "feature-number",
    onchange: update("feature", Number),
  });
  const mode = el("select", { id: id("mode"), onchange: update("mode", String) });
  for (const m of state.info.modes) mode.append(el("option", { value: m, text: m, selected: m === e.mode }));

  const parts = [
    name,
    el("div", { class: "row" },
      el("label", { for: id("layer") }, "Layer "), layer,
      el("label", { for: id("feature") }, "Feature "), feature,
      el("label", { for: id("mode") }, "Mode "), mode,
      e.mode === "add" ? unitControl(e, i, render) : null),
  ];
  if (e.mode !== "ablate" && e.mode !== "project_out") parts.push(strengthRow(e, i));
  parts.push(conditionRow(e, i, changed), removeButton(i));
  return el("li", { class: "edit" }, ...parts);
}

// A vector edit: its name, a mode (added strength times at each of its layers, or strength times each token's norm
// along its direction; or a projection on its direction), a condition, remove.
function vectorRow(e, i, name) {
  const id = `edit-${i}-mode`;
  const mode = el("select", { id, onchange: (ev) => ((e.mode = ev.target.value), render()) });
  for (const m of VECTOR_MODES.filter((v) => state.info.modes.includes(v))) mode.append(el("option", { value: m, text: m, selected: m === e.mode }));
  return el("li", { class: "edit vector-edit", "data-vector": e.vector },
    name,
    el("div", { class: "row" }, el("label", { for: id }, "Mode ", mode), e.mode === "add" ? unitControl(e, i, render) : null),
    e.mode === "project_out" ? null : strengthRow(e, i),
    conditionRow(e, i, changed),
    removeButton(i));
}

// A slider and a number input for the same value; the number input may go past the slider (the server then
// answers with its limit, shown in the page).
function strengthRow(e, i) {
  const id = (name) => `edit-${i}-${name}`;
  const norm = e.mode === "add" && e.unit === "token_norm";
  const m = norm ? Math.min(4, maxStrength()) : maxStrength(); // × token norm: a few units already dominate
  const word = { clamp: "Value", set: "Value", cap: "Max" }[e.mode] || (norm ? "Strength (× token norm)" : "Strength");
  const number = el("input", { id: id("strength"), type: "number", step: "any", value: e.strength, class: "strength-number" });
  const slider = el("input", {
    id: id("slider"), type: "range", min: -m, max: m, step: m / 200, value: e.strength, class: "strength-slider",
  });
  slider.addEventListener("input", () => {
    number.value = slider.value;
    e.strength = Number(slider.value);
    changed();
  });
  number.addEventListener("input", () => {
    e.strength = Number(number.value);
    slider.value = number.value;
    changed();
  });
  return el("div", { class: "row strength" },
    el("label", { for: id("slider"), class: "grow" }, `${word} (slider, ±${m})`, slider),
    el("label", { for: id("strength") }, word, number));
}

function removeButton(i) {
  return el("button", {
    type: "button", text: "Remove", "aria-label": `Remove edit ${i + 1}`,
    onclick: () => {
      state.edits.splice(i, 1);
      render();
    },
  });
}
