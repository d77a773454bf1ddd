// A watched feature (issue 26's readouts): both completions ask for one SAE feature's activation at every position
// ("readout", prompt positions too), shown beside the tokens as a bar (its height: the value over the largest of
// both panels) and on hover, with the pooled mean and max per panel: the unsteered panel is the steered one's null.

import { $, capability, el, state } from "./state.js";

export function initWatch() {
  if (!capability("readout")) return;
  const layer = $("#watch-layer");
  for (const l of state.info.layers) layer.append(el("option", { value: l.layer, text: `layer ${l.layer}` }));
  $("#watch").hidden = false;
  $("#watch-legend").hidden = false;
}

// The request's "readout" (null: nothing watched).
export function watchRequest() {
  if (!capability("readout") || $("#watch-layer").value === "") return null;
  const feature = Number($("#watch-feature").value);
  return { features: [{ layer: Number($("#watch-layer").value), feature }], pool: ["mean", "max"], prompt: true };
}

export function watchName(readout) {
  const f = readout.features[0];
  return `layer ${f.layer} feature ${f.feature}`;
}

// Each panel's token -> value at that token's position (prompt positions on the steered panel's strip, generated
// tokens fed back in the text), bars on one scale, and a pooled line per panel.
export function showWatch(panels, asked) {
  const read = panels.filter((p) => p.readout && p.readout.series && p.readout.series.length);
  const all = read.flatMap((p) => p.readout.series[0].values.map(Math.abs));
  const top = Math.max(1e-12, ...all);
  for (const p of panels) {
    p.watchLine.textContent = "";
    if (!asked || p.root.dataset.state !== "done") continue;
    if (!p.readout) {
      p.watchLine.textContent = `No readout came back for ${watchName(asked)}.`;
      continue;
    }
    const { positions, series } = p.readout;
    const s = series[0];
    const n = positions[0] === 0 ? positions.length - p.tokens.length + 1 : null; // prompt length (prompt: true)
    positions.forEach((pos, k) => {
      const v = s.values[k];
      const gen = pos - n;
      if (gen >= 0 && p.tokens[gen]) mark(p.tokens[gen], p.tokens[gen].span, v, top);
      else if (gen < 0 && p.prompt && p.prompt[pos]) mark(p.prompt[pos], p.strip.querySelector(`[data-prompt="${pos}"]`), v, top);
    });
    p.watchLine.textContent = `Watched ${watchName(asked)} (read after this request's edits): mean ` +
      `${s.pooled.mean.toFixed(3)}, max ${s.pooled.max.toFixed(3)} over ${positions.length} positions ` +
      `(the prompt and every generated token fed back).`;
  }
}

function mark(t, span, v, top) {
  t.watch = v;
  if (!span) return;
  if (span.dataset.watch === undefined) span.dataset.watch = v; // a span of several tokens: its first token's
  const w = Math.max(Number(span.style.getPropertyValue("--w")) || 0, Math.abs(v) / top);
  span.style.setProperty("--w", w.toFixed(3));
  span.classList.add("watched");
}
