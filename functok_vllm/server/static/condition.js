// Per-edit controls beyond layer, feature and strength: the strength's unit for an add (absolute, or × the token's
// own norm: "strength_unit": "token_norm") and an optional condition ("when": act only at tokens where a feature of
// the edit's layer, or a vector's projection, is above or below a threshold, read before this request's edits).

import { el, state } from "./state.js";

// The API's "when" object of a page condition {kind, feature, vector, side, value}.
export function when(c) {
  const out = c.kind === "vector" ? { vector: c.vector } : { feature: c.feature };
  out[c.side] = c.value;
  return out;
}

// The unit select of an add edit (feature or vector); a change re-renders the edit (the slider's range follows).
export function unitControl(e, i, rerender) {
  const id = `edit-${i}-unit`;
  const select = el("select", {
    id,
    onchange: (ev) => {
      e.unit = ev.target.value;
      if (e.unit === "token_norm" && Math.abs(e.strength) > 4) e.strength = 0.5; // a few norms already dominate
      rerender();
    },
  });
  for (const [value, text] of [["absolute", "absolute"], ["token_norm", "× token norm"]]) {
    select.append(el("option", { value, text, selected: (e.unit || "absolute") === value }));
  }
  return el("label", { for: id }, "Unit ", select);
}

// "Only where feature [F] of this layer is [above/below] [x]": the edit's condition, or none.
export function conditionRow(e, i, changed) {
  const id = (name) => `edit-${i}-when-${name}`;
  const box = el("div", { class: "row condition" });
  const draw = () => box.replaceChildren(...controls());
  const set = (key, parse) => (ev) => {
    e.when[key] = parse(ev.target.value);
    changed();
  };
  const controls = () => {
    const kind = el("select", {
      id: id("kind"),
      onchange: (ev) => {
        const k = ev.target.value;
        const vector = state.vectors.size ? [...state.vectors.keys()][0] : null;
        e.when = k ? { kind: k, feature: 0, vector, side: "above", value: 0, ...(e.when || {}), kind: k } : null;
        draw();
        changed();
      },
    });
    const where = e.vector ? "of the vector's layer" : "of this layer";
    kind.append(el("option", { value: "", text: "always", selected: !e.when }));
    kind.append(el("option", { value: "feature", text: `where a feature ${where} is`, selected: e.when && e.when.kind === "feature" }));
    if (state.vectors.size) {
      kind.append(el("option", { value: "vector", text: "where a vector's projection is", selected: e.when && e.when.kind === "vector" }));
    }
    const out = [el("label", { for: id("kind") }, "Acts ", kind)];
    if (!e.when) return out;
    if (e.when.kind === "vector") {
      const vec = el("select", { id: id("vector"), onchange: set("vector", String) });
      for (const name of state.vectors.keys()) vec.append(el("option", { value: name, text: name, selected: name === e.when.vector }));
      out.push(el("label", { for: id("vector") }, "Vector ", vec));
    } else {
      out.push(el("label", { for: id("feature") }, "Feature ",
        el("input", { id: id("feature"), type: "number", min: 0, step: 1, value: e.when.feature, class: "feature-number",
          onchange: set("feature", Number) })));
    }
    const side = el("select", { id: id("side"), onchange: set("side", String) });
    for (const s of ["above", "below"]) side.append(el("option", { value: s, text: s, selected: e.when.side === s }));
    out.push(el("label", { for: id("side") }, "Is ", side));
    out.push(el("label", { for: id("value") }, "Threshold ",
      el("input", { id: id("value"), type: "number", step: "any", value: e.when.value, oninput: set("value", Number) })));
    return out;
  };
  draw();
  return box;
}
