// What the page's modules share: the server's steering info and the chosen edits, plus tiny DOM helpers.

export const state = {
  info: null, // GET /v1/steering: layers, function tokens, modes, positions, limits, presets, capabilities
  fnIds: new Set(), // function-token ids
  edits: [], // {layer, feature, mode, strength, label} or {vector, mode: "add", strength}; clamp: strength is the value
  vectors: new Map(), // name -> the library's card of a steering vector (GET /v1/steering/vectors)
  lensTop: new Map(), // "layer:feature" -> the feature's top logit-lens token (from the finder)
};

export const $ = (selector, root = document) => root.querySelector(selector);

// An element with attributes and children (strings become text: model output is never parsed as HTML).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

export function capability(name) {
  return Boolean(state.info && state.info.capabilities && state.info.capabilities[name]);
}

// Show an error (an ApiError, a sentence, or anything else) in a <p class="error">, or hide it with null.
export function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  if (typeof error.describe === "function") node.textContent = error.describe(); // an ApiError
  else if (typeof error === "string") node.textContent = error; // the page's own words
  else node.textContent = `Something went wrong in the page: ${error.message || error}`;
  node.hidden = false;
}

// A token as the page shows it: visible spaces and newlines.
export function showToken(text) {
  return JSON.stringify(text).slice(1, -1).replace(/ /g, "\u2423");
}
