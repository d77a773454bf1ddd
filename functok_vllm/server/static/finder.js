// The feature finder: search the SAEs' features by logit-lens token, open a feature's card, add it as an edit.
// While the server computes the dashboards it answers 202 with its progress; the finder polls and shows a bar.

import { request } from "./api.js";
import { addEdit } from "./edits.js";
import { $, el, showError, showToken, state } from "./state.js";

const latest = { search: 0, card: 0 }; // bumped by every new search (card), so a stale poll stops

export function initFinder() {
  const layers = $("#feature-layer");
  for (const l of state.info.layers) layers.append(el("option", { value: l.layer, text: String(l.layer) }));
  $("#finder-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    search();
  });
}

// GET a finder endpoint, polling while it answers 202; resolves to the 200 body, or null if superseded.
async function getReady(path, kind) {
  const mine = ++latest[kind];
  const bar = $("#finder-progress");
  try {
    for (;;) {
      const r = await request(path);
      if (mine !== latest[kind]) return null;
      if (r.status !== 202) return r.body;
      bar.hidden = false;
      $("#finder-bar").value = r.body.progress;
      $("#finder-progress-text").textContent =
        `Computing the feature dashboards once (${r.body.stage}, ${Math.round(100 * r.body.progress)}%)…`;
      const wait = Math.min(Number(r.retryAfter) || 1, 2) * 500; // sooner than asked: loading from disk is quick
      await new Promise((ok) => setTimeout(ok, wait));
      if (mine !== latest[kind]) return null;
    }
  } finally {
    if (mine === latest[kind]) bar.hidden = true;
  }
}

async function search() {
  const q = $("#feature-query").value.trim();
  const list = $("#finder-results");
  const error = $("#finder-error");
  showError(error, null);
  if (!q) {
    showError(error, "Type a token to look for, e.g. a name from the corpus.");
    return;
  }
  const layer = $("#feature-layer").value;
  const params = new URLSearchParams({ q, limit: "20" });
  if (layer) params.set("layer", layer);
  list.replaceChildren(el("li", { class: "muted", text: "Searching…" }));
  try {
    const body = await getReady(`/v1/features/search?${params}`, "search");
    if (!body) return;
    if (!body.data.length) {
      list.replaceChildren(el("li", { class: "muted", text: `No feature has "${q}" among its top logit-lens tokens.` }));
      return;
    }
    list.replaceChildren(...body.data.map(result));
  } catch (e) {
    list.replaceChildren();
    showError(error, e);
  }
}

function result(r) {
  state.lensTop.set(`${r.layer}:${r.feature}`, r.top_tokens[0]);
  const label = `Layer ${r.layer} · feature ${r.feature}`;
  const tokens = r.top_tokens.map((t) => el("span", { class: t === r.match.token ? "chip hit" : "chip", text: showToken(t) }));
  const open = el("button", {
    type: "button", class: "result", "data-layer": r.layer, "data-feature": r.feature,
    "aria-label": `${label}: top tokens ${r.top_tokens.join(", ")}`,
    onclick: () => openCard(r.layer, r.feature),
  }, el("strong", { text: label }), " ", ...tokens);
  return el("li", {}, open);
}

export async function openCard(layer, feature) {
  const card = $("#feature-card");
  const error = $("#finder-error");
  showError(error, null);
  card.hidden = false;
  card.replaceChildren(el("p", { class: "muted", text: `Loading layer ${layer}, feature ${feature}…` }));
  try {
    const f = await getReady(`/v1/features/${layer}/${feature}`, "card");
    if (!f) return;
    card.replaceChildren(...cardContent(f));
    $("#add-feature").focus();
  } catch (e) {
    card.hidden = true;
    showError(error, e);
  }
}

function cardContent(f) {
  const top = f.logit_lens[0] ? f.logit_lens[0].token : "";
  state.lensTop.set(`${f.layer}:${f.feature}`, top);
  const pct = (100 * f.frequency).toFixed(2);
  const lens = f.logit_lens.map((t) =>
    el("li", { class: "chip", title: `token id ${t.id}, score ${t.score.toFixed(3)}` }, showToken(t.token),
      el("small", { text: ` ${t.score.toFixed(2)}` })));
  const contexts = f.contexts.length
    ? f.contexts.map((c) =>
        el("li", {}, el("span", { text: c.left }), el("mark", { text: c.token }), el("span", { text: c.right }),
          el("small", { class: "muted", text: `  ${c.activation.toFixed(2)}` })))
    : [el("li", { class: "muted", text: "Never active in the corpus sample." })];
  const add = el("button", {
    type: "button", id: "add-feature", class: "primary", text: "Add to edits",
    onclick: () => addEdit({ layer: f.layer, feature: f.feature }),
  });
  return [
    el("h3", { text: `Layer ${f.layer}, feature ${f.feature}` }),
    el("p", { class: "muted", text: `Active on ${pct}% of ${f.corpus_tokens} corpus tokens (of ${f.d_sae} features).` }),
    el("h4", { text: "Top logit-lens tokens" }),
    el("ol", { class: "chips" }, ...lens),
    el("h4", { text: "Top-activating contexts (the token where it fires is marked)" }),
    el("ol", { class: "contexts" }, ...contexts),
    add,
  ];
}
