// Run: the steered and the unsteered completion stream side by side; steered positions are highlighted.
//
// Which positions were steered is computed in the page from the request's `positions` (positions.js, the server's
// rules). The prompt's ids come from POST /tokenize (the same encoding as the request), the generated ids from
// "return_token_ids"; the total is checked against the server's `steering.steered_positions`. Where the page
// cannot know (a chat roles selection: the role spans come from the server's chat template; a conditional edit:
// the server counts only the selected positions where its condition held) it says so and shows the server's count.

import { request, stream } from "./api.js";
import { steeringSpec } from "./edits.js";
import { PickerError, addPositionId, selection } from "./positions.js";
import { $, capability, el, showError, showToken, state } from "./state.js";
import { showWatch, watchName, watchRequest } from "./watch.js";

let controller = null; // aborts the running pair (Stop)
let watching = null; // the last run's "readout" request (hover names its feature)

export function apiMode() {
  return document.querySelector('input[name="api-mode"]:checked').value;
}

// The endpoint and the prompt part of a request body for the prompt box (completion or chat).
export function promptPart() {
  const text = $("#prompt").value;
  if (apiMode() === "chat") {
    return { path: "/v1/chat/completions", part: { messages: [{ role: "user", content: text }] } };
  }
  return { path: "/v1/completions", part: { prompt: text } };
}

export function sampling() {
  const out = { temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value) };
  const seed = $("#seed").value;
  if (seed !== "") out.seed = Number(seed);
  return out;
}

class Panel {
  constructor(root) {
    this.root = root;
    this.text = $(".text", root);
    this.status = $(".status", root);
    this.error = $(".error", root);
    this.strip = $(".prompt-strip", root);
    this.count = $(".count", root);
    this.watchLine = $(".watch-line", root);
  }

  reset() {
    this.tokens = []; // {id, span, steered, features}, one per generated token id
    this.fed = 0; // tokens before this index have been fed back to the model (and may be steered)
    this.report = null; // the response's "steering" object (last chunk)
    this.readout = null; // the choice's "readout" (its last chunk), when a feature is watched
    this.finish = null;
    this.text.replaceChildren();
    showError(this.error, null);
    if (this.strip) {
      this.strip.hidden = true;
      this.strip.replaceChildren();
    }
    if (this.count) this.count.textContent = "";
  }

  setState(name, words) {
    this.root.dataset.state = name;
    this.status.textContent = words;
  }

  fail(error) {
    this.setState("error", "Failed.");
    showError(this.error, error);
  }

  async run(path, body, signal, policy) {
    this.reset();
    this.policy = policy; // the request's "positions" (a name or an object); null: unsteered
    this.selection = policy ? selection(policy) : null;
    this.setState("running", "Streaming…");
    try {
      await stream(path, body, (chunk) => this.take(chunk), signal);
      this.setState("done", `Done: ${this.tokens.length} tokens (${this.finish || "?"}).`);
      return true;
    } catch (e) {
      if (e.name === "AbortError") this.setState("stopped", "Stopped.");
      else this.fail(e);
      return false;
    }
  }

  take(chunk) {
    if (chunk.steering) this.report = chunk.steering;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return; // the usage chunk
    const text = choice.text !== undefined ? choice.text : (choice.delta && choice.delta.content) || "";
    const ids = choice.token_ids || [];
    if (choice.finish_reason) this.finish = choice.finish_reason;
    if (choice.readout) this.readout = choice.readout;
    if (!text && !ids.length) return; // chat's first chunk carries only the role
    // One span per chunk (one token on this server; text held back for a partial character arrives later).
    const span = el("span", { class: "tok", "data-first": this.tokens.length }, text);
    const features = choice.features || [];
    ids.forEach((id, k) => this.tokens.push({ id, span, steered: false, features: features[k] || null }));
    span.dataset.count = ids.length;
    this.text.append(span);
    this.markFed(this.tokens.length - 1);
  }

  // Tokens [fed, upTo) were inputs of a forward step: highlight those the policy steers.
  markFed(upTo) {
    if (!this.policy) return;
    for (; this.fed < upTo; this.fed++) {
      const t = this.tokens[this.fed];
      if (this.selection.generated(this.fed, t.id)) {
        t.steered = true;
        t.span.classList.add("steered");
      }
    }
  }

  // The prompt strip and the count line of the steered panel, from the prompt's ids.
  showPrompt(tok) {
    const chosen = this.selection.prompt(tok.tokens); // null: the page cannot know (roles)
    this.prompt = tok.tokens.map((id, i) => ({ id, text: tok.token_strs[i], steered: chosen ? chosen[i] : null }));
    this.strip.replaceChildren(
      el("span", { class: "strip-label", text: "Prompt: " }),
      ...this.prompt.map((t, i) =>
        el("span", { class: t.steered ? "tok ptok steered" : "tok ptok", "data-prompt": i, text: t.text })),
    );
    this.strip.hidden = false;
    const generated = this.tokens.filter((t) => t.steered).length;
    const server = this.report ? this.report.steered_positions : null;
    this.count.dataset.server = server === null ? "" : server;
    this.count.textContent = chosen ? this.countLine(chosen, generated, server, tok) :
      this.rolesLine(generated, server) +
        (this.conditional ? " Conditional edits act only at those of them where their condition held." : "");
  }

  countLine(chosen, generated, server, tok) {
    const inPrompt = chosen.filter(Boolean).length;
    const total = inPrompt + generated;
    let line = `Steered positions: ${inPrompt} in the prompt + ${generated} generated = ${total}`;
    if (this.policy === "last_function") {
      const i = chosen.indexOf(true);
      line = i < 0
        ? "The prompt has no function token, so nothing was steered"
        : `The last function token of the prompt, ${showToken(tok.token_strs[i])} (position ${i} of ${chosen.length}), was steered`;
    }
    this.count.dataset.page = total;
    if (server === null) return `${line}; the server reported no count.`;
    if (this.conditional && server <= total) {
      return `${line} selected; the server counted ${server} where an edit acted: conditional edits act only at ` +
        "those of them where their condition held, which the page cannot see.";
    }
    if (server === total) return `${line}; the server counted ${server} too.`;
    return `${line}; the server counted ${server}, so the highlighting here is off by ${server - total}.`;
  }

  // Roles: the prompt's role spans come from the chat template the server renders, which the page does not know.
  rolesLine(generated, server) {
    this.count.dataset.page = "";
    const count = server === null ? "the server reported no count" : `the server counted ${server} in all`;
    return `Steered positions: ${generated} generated are highlighted; the prompt's are not, because chat roles ` +
      `are found in the server's chat template, which the page cannot see: ${count}.`;
  }
}

const panels = {};

export function initRun() {
  panels.steered = new Panel($("#panel-steered"));
  panels.plain = new Panel($("#panel-plain"));
  panels.steered.reset();
  panels.plain.reset();
  $("#run").addEventListener("click", runPair);
  $("#stop").addEventListener("click", () => controller && controller.abort());
  for (const p of Object.values(panels)) initTokenInfo(p);
}

function featureLayers() {
  const layers = new Set(state.edits.filter((e) => !e.vector).map((e) => e.layer));
  return layers.size ? [...layers] : state.info.layers.map((l) => l.layer);
}

export async function runPair() {
  if (controller) return; // one pair at a time
  controller = new AbortController();
  const { signal } = controller;
  $("#run").disabled = true;
  $("#stop").disabled = false;
  const { path, part } = promptPart();
  const base = { model: state.info.model, ...sampling(), ...part, stream: true, return_token_ids: true };
  if (capability("features")) base.features = { layers: featureLayers(), top_k: 5 };
  const watched = watchRequest();
  if (watched) base.readout = watched;
  let spec = null;
  let mistake = null;
  try {
    spec = steeringSpec();
  } catch (e) {
    if (!(e instanceof PickerError)) throw e;
    mistake = e.message;
  }
  const jobs = [panels.plain.run(path, base, signal, null)];
  if (mistake) {
    panels.steered.reset();
    panels.steered.fail(`Not sent: ${mistake}`);
  } else if (spec) {
    panels.steered.conditional = spec.edits.some((e) => e.when);
    const tokenized = request("/tokenize", { ...part, return_token_strs: true }, signal);
    tokenized.catch(() => {}); // read below; never an unhandled rejection
    jobs.push(
      panels.steered.run(path, { ...base, steering: spec }, signal, spec.positions).then(async (ok) => {
        if (!ok) return;
        try {
          panels.steered.showPrompt((await tokenized).body);
        } catch (e) {
          panels.steered.count.textContent = `Could not show the steered prompt positions: ${e.describe ? e.describe() : e}`;
        }
      }),
    );
  } else {
    panels.steered.reset();
    panels.steered.fail("Nothing to steer: add an edit first (find a feature, then Add to edits).");
  }
  await Promise.all(jobs);
  showWatch([panels.steered, panels.plain], watched);
  watching = watched;
  controller = null;
  $("#run").disabled = false;
  $("#stop").disabled = true;
}

// ---- hovering a token: what it is, whether it was steered, its top features (when the API gives them) ----------

function initTokenInfo(panel) {
  const show = (span) => {
    for (const s of panel.root.querySelectorAll(".tok.current")) s.classList.remove("current");
    span.classList.add("current");
    $("#token-info").replaceChildren(...describe(panel, span));
  };
  panel.root.addEventListener("mouseover", (ev) => {
    const span = ev.target.closest(".tok");
    if (span && panel.root.contains(span)) show(span);
  });
  // Keyboard: focus a completion (or the prompt strip), then Left/Right move from token to token.
  for (const area of [panel.text, panel.strip].filter(Boolean)) {
    area.addEventListener("keydown", (ev) => {
      if (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight") return;
      const spans = [...area.querySelectorAll(".tok")];
      if (!spans.length) return;
      const now = spans.findIndex((s) => s.classList.contains("current"));
      const next = Math.max(0, Math.min(spans.length - 1, now + (ev.key === "ArrowRight" ? 1 : -1)));
      show(spans[now < 0 ? 0 : next]);
      ev.preventDefault();
    });
  }
  if (!panel.strip) return;
  // A prompt token's id into the position picker: click or Enter (only these ids), with Shift (exclude it).
  const pick = (span, exclude) => {
    if (span && span.dataset.prompt !== undefined) addPositionId(panel.prompt[Number(span.dataset.prompt)].id, exclude);
  };
  panel.strip.addEventListener("click", (ev) => pick(ev.target.closest(".ptok"), ev.shiftKey));
  panel.strip.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" || ev.ctrlKey || ev.metaKey) return; // Ctrl+Enter still runs
    pick(panel.strip.querySelector(".ptok.current"), ev.shiftKey);
    ev.preventDefault();
    ev.stopPropagation(); // not the page's Ctrl+Enter
  });
}

function describe(panel, span) {
  if (span.dataset.prompt !== undefined) {
    const t = panel.prompt[Number(span.dataset.prompt)];
    const kind = state.fnIds.has(t.id) ? "function token" : "content token";
    return [el("p", { text: `Prompt position ${span.dataset.prompt}: ${showToken(t.text)} (id ${t.id}, ${kind})` +
      ({ true: ", steered.", false: ", not steered.", null: "; whether its role was steered is the server's to say." })[t.steered] }),
    ...watchValue(t)];
  }
  const first = Number(span.dataset.first);
  const out = [];
  for (let k = 0; k < Number(span.dataset.count); k++) {
    const t = panel.tokens[first + k];
    const kind = state.fnIds.has(t.id) ? "function token" : "content token";
    const fed = first + k < panel.fed ? (t.steered ? ", steered" : ", not steered") : ", the last token (never fed back)";
    out.push(el("p", { text: `Generated token ${first + k + 1}: ${showToken(span.textContent)} (id ${t.id}, ${kind}${panel.policy ? fed : ""}).` }));
    out.push(...watchValue(t), ...featureList(t));
  }
  return out;
}

function watchValue(t) {
  if (!watching || t.watch === undefined) return [];
  return [el("p", { class: "watch-value", text: `Watched ${watchName(watching)} at this token: ${t.watch.toFixed(3)}.` })];
}

// The features the server read where this token was predicted (the previous position: for the first token, the
// prompt's last), after the edits there, as "features" of the request returns them.
function featureList(t) {
  if (!capability("features")) {
    return [el("p", { class: "muted", text: "Per-token features are not available on this server: its generation " +
      "API does not return them (GET /v1/steering reports capabilities.features = false)." })];
  }
  if (!t.features) return [el("p", { class: "muted", text: "No features were returned for this token." })];
  const head = el("p", { class: "muted", text: `Top features where it was predicted (position ${t.features.position}):` });
  const rows = Object.entries(t.features.layers).map(([layer, feats]) =>
    el("li", { text: `Layer ${layer}: ` + (feats.length
      ? feats.map(([f, a]) => `#${f} (${Number(a).toFixed(2)})`).join(", ")
      : "none fired") }));
  return [head, el("ul", { class: "features" }, ...rows)];
}
