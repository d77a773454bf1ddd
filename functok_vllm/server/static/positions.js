// The position picker (the positions select, narrowed by an optional position object: token ids, excludes, windows,
// chat roles) and the page's own computation of which positions a request's `positions` steers.
//
// The computation follows the server's rules (core/batch.py): a request's input positions are its prompt tokens and
// every generated token but the last (the last one is never fed back). A position is steered when the base selector
// selects it, it lies in the region (the union of the windows and roles given; everything when none is), its id is
// in `token_ids` (when given) and not in `exclude_ids`. Role spans come from the chat template the server renders,
// so the page cannot mark a roles selection in the prompt: it says so and shows the server's count.

import { $, el, state } from "./state.js";

const POSITION_HELP = {
  function: "every function-token position, prompt and generated",
  last_function: "only the last function token of the prompt (the paper's method)",
  content: "every position that is not a function token",
  prompt: "every prompt position",
  generated: "every generated position",
  all: "every position",
};

const WINDOWS = [
  ["first_generated", "pos-first-generated", "First k generated"],
  ["last_prompt", "pos-last-prompt", "Last k prompt tokens"],
  ["last_functions", "pos-last-functions", "Last k function tokens"],
];

// A mistake the page itself can name before asking the server (shown in the steered panel in words).
export class PickerError extends Error {}

export function initPositions() {
  const select = $("#positions");
  for (const p of state.info.positions) {
    select.append(el("option", { value: p, text: p.replace("_", " ") }));
  }
  select.value = "function";
  const roles = $("#pos-roles");
  const known = (state.info.position_object && state.info.position_object.roles) || [];
  for (const r of known) {
    roles.append(el("label", {}, el("input", { type: "checkbox", name: "pos-role", value: r }), ` ${r}`));
  }
  roles.append(el("label", {}, el("input", { type: "checkbox", id: "pos-template" }), " template tokens too"));
  for (const input of document.querySelectorAll("#positions, #narrow input, input[name='api-mode']")) {
    input.addEventListener("input", help);
    input.addEventListener("change", help);
  }
  help();
}

function isChat() {
  const checked = document.querySelector('input[name="api-mode"]:checked');
  return Boolean(checked && checked.value === "chat");
}

// "12, 263 198" -> [12, 263, 198]; anything but whole numbers is the page's own error (negatives go to the server).
function idList(id, name) {
  const text = $(`#${id}`).value.trim();
  if (!text) return null;
  return text.split(/[\s,;]+/).filter(Boolean).map((part) => {
    if (!/^-?\d+$/.test(part)) throw new PickerError(`${name}: "${part}" is not a token id (a whole number).`);
    return Number(part);
  });
}

function count(id, name) {
  const text = $(`#${id}`).value.trim();
  if (!text) return null;
  const v = Number(text);
  if (!Number.isInteger(v)) throw new PickerError(`${name}: "${text}" is not a whole number of tokens.`);
  return v; // 0 or less is sent as typed: the server's 400 names the field
}

// The request's `positions`: the select's name, or the object when any narrowing field is filled in.
// Throws PickerError for what the page can name itself.
export function positions() {
  const select = $("#positions").value;
  const out = { select };
  const ids = idList("pos-token-ids", "Only token ids");
  const exclude = idList("pos-exclude-ids", "Exclude token ids");
  if (ids) out.token_ids = ids;
  if (exclude) out.exclude_ids = exclude;
  for (const [field, id, name] of WINDOWS) {
    const v = count(id, name);
    if (v !== null) out[field] = v;
  }
  const roles = [...document.querySelectorAll('input[name="pos-role"]:checked')].map((c) => c.value);
  if (roles.length && isChat()) {
    out.roles = roles;
    if ($("#pos-template").checked) out.template_tokens = true;
  }
  return Object.keys(out).length > 1 ? out : select;
}

// A prompt token picked in the steered panel's strip: its id added to "Only token ids" (or "Exclude token ids").
export function addPositionId(id, exclude = false) {
  const input = $(exclude ? "#pos-exclude-ids" : "#pos-token-ids");
  const have = input.value.split(/[\s,;]+/).filter(Boolean);
  if (!have.includes(String(id))) input.value = [...have, id].join(", ");
  $("#narrow").open = true;
  help();
}

function help() {
  const chat = isChat();
  for (const box of document.querySelectorAll("#pos-roles input")) box.disabled = !chat;
  $("#pos-roles-note").textContent = chat
    ? "Roles: the content of those messages (assistant: also every generated token), without the chat template's own tokens unless ticked."
    : "Roles apply to chat requests only: choose Chat (user message) above to select by role.";
  let words = `Steers ${POSITION_HELP[$("#positions").value] || $("#positions").value}`;
  try {
    const p = positions();
    words += typeof p === "string" ? "." : `, narrowed: sends "positions": ${JSON.stringify(p)}.`;
  } catch (e) {
    words += `. ${e.message}`;
  }
  $("#positions-help").textContent = words;
}

// ---- which positions a `positions` value steers, as the server selects them --------------------------------------

// Would the base selector steer the token `id` at a generated position (prompt selectors never do)?
function baseGenerated(name, id) {
  const fn = state.fnIds.has(id);
  return { function: fn, content: !fn, generated: true, all: true }[name] || false;
}

// (steered?) for each prompt position under the base selector.
function basePrompt(name, ids) {
  let last = -1;
  ids.forEach((id, i) => {
    if (state.fnIds.has(id)) last = i;
  });
  return ids.map((id, i) => {
    const fn = state.fnIds.has(id);
    return { function: fn, last_function: i === last, content: !fn, prompt: true, generated: false, all: true }[name];
  });
}

// The selection of a `positions` value: prompt(ids) -> a boolean per prompt position (null when the page cannot
// know: roles), generated(j, id) -> whether the j-th generated token (0-based, when fed back) is steered.
export function selection(pos) {
  if (typeof pos === "string") {
    return { prompt: (ids) => basePrompt(pos, ids), generated: (j, id) => baseGenerated(pos, id) };
  }
  const name = pos.select || "all";
  const allow = pos.token_ids ? new Set(pos.token_ids) : null;
  const exclude = new Set(pos.exclude_ids || []);
  const idOk = (id) => (!allow || allow.has(id)) && !exclude.has(id);
  const hasRegion = ["first_generated", "last_prompt", "last_functions", "roles"].some((k) => pos[k] !== undefined);
  let genUpto = pos.first_generated || 0;
  if (pos.roles && pos.roles.includes("assistant")) genUpto = Infinity;
  const region = (ids) => {
    const n = ids.length;
    const inside = ids.map((_, i) => pos.last_prompt !== undefined && i >= n - pos.last_prompt);
    if (pos.last_functions !== undefined) {
      const fn = ids.map((id, i) => (state.fnIds.has(id) ? i : -1)).filter((i) => i >= 0);
      for (const i of fn.slice(-pos.last_functions)) inside[i] = true;
    }
    return inside;
  };
  return {
    prompt: (ids) => {
      if (pos.roles) return null; // role spans come from the server's chat template
      const base = basePrompt(name, ids);
      const inside = hasRegion ? region(ids) : null;
      return ids.map((id, i) => base[i] && (!inside || inside[i]) && idOk(id));
    },
    generated: (j, id) => baseGenerated(name, id) && (!hasRegion || j < genUpto) && idOk(id),
  };
}
