// The strength sweep: one edit at several strengths, the text per strength, and p(target token) when the server
// returns logprobs. When GET /v1/steering says the API takes a list of specs (capabilities.spec_lists), one request
// whose "steering" is that list (one choice per spec, decoded in one batch); otherwise one request per strength.

import { request } from "./api.js";
import { editName, steeringSpec } from "./edits.js";
import { apiMode, promptPart, sampling } from "./run.js";
import { $, capability, el, showError, showToken, state } from "./state.js";

const SVG = "http://www.w3.org/2000/svg";

export function initSweep() {
  $("#sweep-run").addEventListener("click", runSweep);
  refreshSweep();
}

// Called whenever the edits change: the edit choices, the default strengths and target.
export function refreshSweep() {
  const select = $("#sweep-edit");
  const before = select.value;
  select.replaceChildren(...state.edits.map((e, i) => el("option", { value: i, text: editName(e, i) })));
  if (before && Number(before) < state.edits.length) select.value = before;
  const e = state.edits[Number(select.value) || 0];
  $("#sweep-strengths").placeholder = e ? defaultStrengths(e).join(", ") : "0, 25, 50, 100, 200";
  const top = e && state.lensTop.get(`${e.layer}:${e.feature}`);
  $("#sweep-target").placeholder = top ? showToken(top) : "the feature's top logit-lens token";
  $("#sweep-note").textContent = capability("logprobs")
    ? "p(target) is the probability of the target as the first generated token (shown when it is among the 20 most likely)."
    : "This server does not return logprobs yet (capabilities.logprobs = false): the sweep shows the text per strength.";
}

function defaultStrengths(e) {
  const m = state.info.limits.max_abs_strength;
  const s = Math.abs(e.strength) || Math.min(100, m);
  const sign = e.strength < 0 ? -1 : 1;
  return [...new Set([0, s / 4, s / 2, s, 2 * s].map((v) => sign * Math.min(v, m)))];
}

function strengths(e) {
  const text = $("#sweep-strengths").value.trim();
  if (!text) return defaultStrengths(e);
  const list = text.split(/[\s,;]+/).filter(Boolean).map(Number);
  if (list.some((v) => !Number.isFinite(v))) throw new Error(`"${text}" is not a list of numbers`);
  return list;
}

function target(e) {
  const typed = $("#sweep-target").value;
  return typed || state.lensTop.get(`${e.layer}:${e.feature}`) || "";
}

// p(target) at the first generated position, from either API's logprobs (null: not among the top logprobs).
function pTarget(choice, want) {
  const lp = choice.logprobs;
  if (!lp || !want) return null;
  let top = [];
  if (lp.content && lp.content[0]) top = lp.content[0].top_logprobs.map((t) => [t.token, t.logprob]); // chat
  else if (lp.top_logprobs && lp.top_logprobs[0]) top = Object.entries(lp.top_logprobs[0]); // completions
  const hit = top.find(([t]) => t === want) || top.find(([t]) => t.trim() === want.trim());
  return hit ? Math.exp(hit[1]) : null;
}

function text(choice) {
  return choice.text !== undefined ? choice.text : choice.message.content;
}

async function runSweep() {
  const error = $("#sweep-error");
  showError(error, null);
  const index = Number($("#sweep-edit").value);
  const e = state.edits[index];
  if (!e) return showError(error, "Add an edit first: the sweep varies one edit's strength.");
  if (e.mode === "ablate" || e.mode === "project_out") {
    return showError(error, `A ${e.mode} edit has no strength to sweep; choose an add, clamp, cap or set edit.`);
  }
  let list, specs;
  try {
    list = strengths(e);
    specs = list.map((strength) => steeringSpec({ index, strength }));
  } catch (err) {
    return showError(error, err.message); // a strength list or a position field the page names itself
  }
  const { path, part } = promptPart();
  const base = { model: state.info.model, ...sampling(), ...part };
  // The most alternatives the API gives (20): p(target) is known when the target is among them.
  if (capability("logprobs")) Object.assign(base, apiMode() === "chat" ? { logprobs: true, top_logprobs: 20 } : { logprobs: 20 });
  const button = $("#sweep-run");
  button.disabled = true;
  $("#sweep-table").hidden = true;
  $("#sweep-chart").replaceChildren(el("p", { class: "muted", text: `Running ${list.length} strengths…` }));
  let results; // [{choice} or {error}] in the order of `list`
  try {
    if (capability("spec_lists")) {
      try {
        const r = await request(path, { ...base, steering: specs });
        results = list.map((_, i) => ({ choice: r.body.choices.find((c) => c.index === i) }));
      } catch (err) {
        results = list.map(() => ({ error: err }));
      }
    } else {
      results = await Promise.all(
        specs.map((steering) =>
          request(path, { ...base, steering }).then((r) => ({ choice: r.body.choices[0] }), (err) => ({ error: err }))),
      );
    }
  } finally {
    button.disabled = false;
  }
  show(list, results, target(e));
}

function show(list, results, want) {
  const rows = list.map((s, i) => {
    const r = results[i];
    const p = r.choice ? pTarget(r.choice, want) : null;
    const cell = r.choice
      ? el("td", { class: "sweep-text", text: text(r.choice) })
      : el("td", { class: "error", text: r.error.describe ? r.error.describe() : String(r.error) });
    return { s, p, row: el("tr", {}, el("th", { scope: "row", text: String(s) }), el("td", { text: p === null ? "–" : p.toFixed(3) }), cell) };
  });
  $("#sweep-table tbody").replaceChildren(...rows.map((r) => r.row));
  $("#sweep-table").classList.toggle("no-p", !capability("logprobs")); // no logprobs: no p(target) column
  $("#sweep-table").hidden = false;
  const points = rows.filter((r) => r.p !== null);
  $("#sweep-chart").replaceChildren(points.length ? chart(points, want) : el("span"));
}

// A small line chart of p(target) against strength.
function chart(points, want) {
  const W = 320, H = 160, pad = 32;
  const xs = points.map((p) => p.s);
  const lo = Math.min(...xs), hi = Math.max(...xs);
  const x = (v) => pad + ((v - lo) / (hi - lo || 1)) * (W - 2 * pad);
  const y = (p) => H - pad + -p * (H - 2 * pad);
  const svg = document.createElementNS(SVG, "svg");
  const add = (tag, attrs, words) => {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (words) n.textContent = words;
    svg.append(n);
  };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `p(${want}) by strength: ` + points.map((p) => `${p.s}: ${p.p.toFixed(3)}`).join(", "));
  add("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, class: "axis" });
  add("line", { x1: pad, y1: pad, x2: pad, y2: H - pad, class: "axis" });
  add("text", { x: 2, y: pad + 4, class: "label" }, "1");
  add("text", { x: 2, y: H - pad + 4, class: "label" }, "0");
  add("text", { x: W / 2, y: H - 6, class: "label", "text-anchor": "middle" }, `strength (${lo} to ${hi})`);
  add("polyline", { points: points.map((p) => `${x(p.s)},${y(p.p)}`).join(" "), class: "curve" });
  for (const p of points) add("circle", { cx: x(p.s), cy: y(p.p), r: 3, class: "dot" });
  return svg;
}
