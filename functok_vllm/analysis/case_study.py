"""The paper's case study on a real chat model: minimal-pair questions that differ in one content word, the features
that word activates, which of them the later function tokens (the chat template's included) re-activate, and a steer
at the last function token that changes the answer.

Prompts: "What is the capital of X?" through the model's chat template, for pairs of countries whose names are one
token each and whose capitals the model answers correctly (greedy; checked here, pairs it gets wrong are dropped).
In prompt A (country X) and its twin B (country Y) only the country token differs. At the SAE layer:
- X's features: active at X's position in A and not at Y's position in B (the minimal pair removes the features of
  "a country name here");
- re-activated: X's features active at a later function position of A. Later function positions: function tokens
  (the function-token set) and every token of the chat template after the user's text (`<|im_end|>`, `\\n`,
  `assistant`, ...: the most frequent tokens of chat text, carrying no content), attention sinks left out. Null: the
  same features at the same positions of B, where the country is Y: what the prompt's form alone re-activates;
- steer: each of Y's top features (and the README's known layer-15 feature 1516, "French"), added at one position
  of A, the engine's `last_function` (the question mark) or the template's last token, at strengths in multiples
  of the median residual norm, and as many random directions of the same norms. A flip: the answer names Y's
  capital and not X's. Both answers are printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from functok_vllm.analysis.io import figure, save_figure
from functok_vllm.analysis.md import finding_cells, md_table, tok
from functok_vllm.analysis.reactivation_study import paired
from functok_vllm.analysis.steer_study import add_spec, direction_spec, steered_generate
from functok_vllm.analysis.steer_sweep import Steerer
from functok_vllm.core.sinks import sink_mask

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "England": "London",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "India": "Delhi",
}
PAIRS = (
    ("France", "Germany"),
    ("Japan", "China"),
    ("Russia", "Poland"),
    ("Egypt", "Greece"),
    ("England", "Ireland"),
    ("Austria", "India"),
)
QUESTION = "What is the capital of {}?"
KNOWN = {15: 1516}  # the README's layer-15 "French" feature of the SmolLM2 SAEs
MULTIPLES = (1.0, 2.0, 4.0)  # steer strengths, x the median residual norm (one token's steer needs more than a
# whole prompt's)
ANSWER_TOKENS = 10


@dataclass
class CaseConfig:
    layer: int
    features: int = 3  # Y's top features tried as steers
    show: int = 10  # X's features listed
    seed: int = 0


def chat_ids(am, country: str) -> list[int]:
    text = am.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION.format(country)}], add_generation_prompt=True, tokenize=False
    )
    return am.encode(text)


def hidden(am, ids: list[int], layer: int) -> torch.Tensor:
    """(tokens, d_model) the tensor the layer's SAE reads, from one forward."""
    store = {}
    am.forward(torch.tensor(ids)[None], {layer: lambda h: store.setdefault("h", h.float().cpu())}, logits=False)
    return store["h"]


def answer(am, st: Steerer, ids: list[int], specs=None, position: int = -1) -> list[str]:
    """Greedy answers, one per spec (None: unsteered) steering `position`, cut at the end of the turn."""
    _, cont = steered_generate(st, torch.tensor(ids), specs or [None], ANSWER_TOKENS, position)
    return [am.decode(row.tolist()).split("<|im_end|>")[0].strip() for row in cont]


def later_function_positions(am, ids: list[int], p: int, sinks: torch.Tensor) -> list[int]:
    """Positions after p holding a function token or a chat-template token (after the user's text), not sinks."""
    x = torch.tensor(ids)
    end = next((q for q in range(p, len(ids)) if am.decode([ids[q]]) == "<|im_end|>"), len(ids))
    fn = am.fn_mask.cpu()[x] | (torch.arange(len(ids)) >= end)
    return [q for q in range(p + 1, len(ids)) if bool(fn[q]) and not bool(sinks[q])]


def pair_study(am, st, cfg: CaseConfig, x: str, y: str, norm: float, rng) -> dict | None:
    """Prompt A (x) against its twin B (y); None when the prompts differ in more than one token."""
    a_ids, b_ids = chat_ids(am, x), chat_ids(am, y)
    diff = [i for i, (s, t) in enumerate(zip(a_ids, b_ids, strict=False)) if s != t]
    if len(a_ids) != len(b_ids) or len(diff) != 1:
        return None
    p, sae, layer = diff[0], am.saes[cfg.layer], cfg.layer
    ha, hb = hidden(am, a_ids, layer), hidden(am, b_ids, layer)
    acts_a, acts_b = sae.encode(ha.to(sae.W_enc.dtype)).float(), sae.encode(hb.to(sae.W_enc.dtype)).float()
    mine = (acts_a[p] > 0) & (acts_b[p] <= 0)  # (d_sae,) x's features
    theirs = (acts_b[p] > 0) & (acts_a[p] <= 0)  # y's features
    bos = getattr(am.tokenizer, "bos_token_id", None)
    later = later_function_positions(am, a_ids, p, sink_mask(torch.tensor(a_ids), ha.norm(dim=-1), bos))
    n_mine = max(1, int(mine.sum()))
    re_a = [int(((acts_a[q] > 0) & mine).sum()) for q in later]
    re_b = [int(((acts_b[q] > 0) & mine).sum()) for q in later]
    top = [int(f) for f in torch.where(theirs, acts_b[p], -1.0).argsort(descending=True)[: cfg.features] if theirs[f]]
    cands = top + [KNOWN[layer]] if KNOWN.get(layer) is not None and KNOWN[layer] not in top else top
    w = sae.W_dec.float().norm(dim=1)
    specs, rand, where = [], [], []
    for f in cands:
        for m in MULTIPLES:
            s = m * norm
            specs.append(add_spec(layer, f, s / float(w[f])))
            d = torch.nn.functional.normalize(
                torch.as_tensor(rng.standard_normal(sae.d_in), dtype=torch.float32), dim=0
            )
            rand.append(direction_spec(sae.cfg.hook.canonical().name, layer, f"random-{len(rand)}", s, d))
            where.append((f, m))
    base = answer(am, st, a_ids)[0]
    out = {"x": x, "y": y, "position": p, "answer": base, "twin_answer": answer(am, st, b_ids)[0]}
    order = np.argsort([m for _, m in where], kind="stable")  # weakest steer first
    flipped = rflipped = 0.0
    for name, q in steer_positions(am, a_ids).items():
        steered, randoms = answer(am, st, a_ids, specs, q), answer(am, st, a_ids, rand, q)
        flips = [CAPITALS[y] in s and CAPITALS[x] not in s for s in steered]
        changed = next((i for i in order if steered[i] != base), None)
        first = next((i for i in order if flips[i]), None)
        shown = first if first is not None else changed
        out[name] = {
            "position": q,
            "token": am.decode([a_ids[q]]),
            "flips": int(sum(flips)),
            "changed": int(sum(s != base for s in steered)),
            "random_flips": int(sum(CAPITALS[y] in s and CAPITALS[x] not in s for s in randoms)),
            "random_changed": int(sum(s != base for s in randoms)),
            "tries": len(specs),
            "example": None
            if shown is None
            else {
                "feature": where[shown][0],
                "multiple": where[shown][1],
                "answer": steered[shown],
                "flip": bool(flips[shown]),
            },
        }
        flipped = max(flipped, float(out[name]["flips"] > 0))
        rflipped = max(rflipped, float(out[name]["random_flips"] > 0))
    top_mine = torch.where(mine, acts_a[p], -1.0).argsort(descending=True)[: cfg.show]
    return out | {
        "features": [(int(f), float(acts_a[p, f])) for f in top_mine if mine[f]],
        "n_features": int(mine.sum()),
        "later": [(q, am.decode([a_ids[q]])) for q in later],
        "reactivated": re_a,
        "reactivated_in_twin": re_b,
        "share": float(np.mean(re_a)) / n_mine if later else float("nan"),
        "null_share": float(np.mean(re_b)) / n_mine if later else float("nan"),
        "flipped": flipped,
        "random_flipped": rflipped,
        "acts": (acts_a[:, top_mine], acts_b[:, top_mine]),
    }


def steer_positions(am, ids: list[int]) -> dict[str, int]:
    """Where the case study steers: the engine's `last_function` position (the last token of the function-token
    set, here the question mark) and the prompt's last position (the chat template's last token)."""
    from functok_vllm.core import last_function_position

    return {"last_function": last_function_position(torch.tensor(ids), am.fn_mask.cpu()), "last": len(ids) - 1}


def run(am, cfg: CaseConfig, progress: bool = False) -> dict:
    """The case study over every ordered pair of PAIRS that the model answers correctly."""
    from tqdm import tqdm

    from functok_vllm.analysis.steer_study import median_residual_norm

    if cfg.layer not in am.saes:
        raise ValueError(f"no SAE at layer {cfg.layer}")
    st = Steerer(am, [cfg.layer])
    correct = {}
    for c in sorted({c for pair in PAIRS for c in pair}):
        correct[c] = answer(am, st, chat_ids(am, c))[0]
    ok = [(x, y) for x, y in PAIRS if CAPITALS[x] in correct[x] and CAPITALS[y] in correct[y]]
    ordered = [o for x, y in ok for o in ((x, y), (y, x))]
    if len(ordered) < 2:
        raise ValueError("the model answers fewer than one pair of capital questions correctly")
    texts = [am.decode(chat_ids(am, x)) for x, _ in ordered]
    norm = median_residual_norm(am, texts, cfg.layer)
    rng = np.random.default_rng(cfg.seed)
    cases = [
        pair_study(am, st, cfg, x, y, norm, rng) for x, y in tqdm(ordered, desc="case study", disable=not progress)
    ]
    cases = [c for c in cases if c is not None]
    share, null = np.array([c["share"] for c in cases]), np.array([c["null_share"] for c in cases])
    flips, rflips = np.array([c["flipped"] for c in cases]), np.array([c["random_flipped"] for c in cases])
    what_re = (
        "share of the country word's own features active at later function positions, against the same "
        "features at the same positions of the twin prompt"
    )
    what_st = (
        "share of pairs where a feature of the other country, added at the last position, makes the model "
        "name the other capital, against random directions of the same norms"
    )
    findings = [
        paired(share, null, f"case study re-activation L{cfg.layer}", 0.02, what_re, cfg.seed),
        paired(flips, rflips, f"case study steer L{cfg.layer}", 0.0, what_st, cfg.seed),
    ]
    return {
        "layer": cfg.layer,
        "norm": norm,
        "answers": correct,
        "cases": cases,
        "findings": findings,
        "n_cands": cfg.features,
    }


def example(cases: list[dict]) -> tuple[dict, str] | None:
    """The case and steer position to show: the first flip to the other capital, else the first changed answer."""
    for want_flip in (True, False):
        for c in cases:
            for name in ("last_function", "last"):
                e = c[name]["example"]
                if e is not None and (e["flip"] or not want_flip):
                    return c, name
    return None


def markdown(result: dict, figure_path: str = "figures/case_study.png") -> str:
    """The case-study section: answers, features, re-activation at later function positions, the steer, findings."""
    cases = result["cases"]
    ans = ", ".join(f"{c}: {tok(a)}" for c, a in result["answers"].items())
    rows = []
    for c in cases:
        lf, la = c["last_function"], c["last"]
        rows.append(
            [
                f"{c['x']} / {c['y']}",
                c["n_features"],
                " ".join(map(str, c["reactivated"])),
                " ".join(map(str, c["reactivated_in_twin"])),
                f"{lf['flips']} / {lf['changed']} / {lf['random_flips']} / {lf['random_changed']}",
                f"{la['flips']} / {la['changed']} / {la['random_flips']} / {la['random_changed']}",
            ]
        )
    later = " ".join(tok(t) for _, t in cases[0]["later"])
    tries = cases[0]["last"]["tries"]
    text = (
        f"## Case study: minimal pairs through the chat template\n\nLayer {result['layer']}. Question "
        f"{tok(QUESTION)} through the chat template; greedy answers: {ans}. Pairs the model answers correctly, in "
        f"both orders (X / Y). *X's features*: active at X's token and not at Y's token in the twin prompt. Later "
        f"function positions (sinks left out): {later}. Re-activated: X's features active at each of them (in X's "
        f"prompt; in the twin, the null: the prompt's form alone). Steer: each of Y's {result.get('n_cands', 3)} top "
        f"features (and the known feature {KNOWN.get(result['layer'], 'none')}) at "
        + ", ".join(f"{m:g}x" for m in MULTIPLES)
        + f" the median residual norm {result['norm']:.0f}, {tries} tries per position, against as many random "
        "directions of the same norms; cells: answers naming Y's capital / answers changed, then the same two for the "
        "random directions.\n\n"
        + md_table(
            [
                "X / Y",
                "X's features",
                "re-activated (X's prompt)",
                "in the twin (null)",
                "steer at last_function",
                "steer at last position",
            ],
            rows,
        )
    )
    ex = example(cases)
    if ex is None:
        text += "\nNo steer changed any answer.\n\n"
    else:
        c, name = ex
        e = c[name]["example"]
        what = f"names {CAPITALS[c['y']]}" if e["flip"] else "changes, without naming the other capital"
        text += (
            f"\nExample: {c['x']}'s question, feature {e['feature']} (one of {c['y']}'s) added at {e['multiple']:g}x "
            f"the median norm at position {c[name]['position']} ({tok(c[name]['token'])}, `{name}`): the answer "
            f"{what}.\n\n- unsteered: {tok(c['answer'])}\n- steered: {tok(e['answer'])}\n- the twin ({c['y']}): "
            f"{tok(c['twin_answer'])}\n"
        )
    frows = [[f.name, *finding_cells(f)] for f in result["findings"]]
    return (
        text
        + f"\n![case study]({figure_path})\n\n"
        + md_table(["finding", "statistic", "null", "95% interval", "verdict"], frows)
        + "\n"
    )


def plot(result: dict, path: Path) -> Path:
    """X's top features (rows) over the positions from X's token on, in X's prompt and in the twin."""
    c = result["cases"][0]
    a, b = c["acts"]
    p = c["position"]
    fig, axes = figure(2, width=4.6)
    vmax = float(max(a[p:].max(), 1e-6))
    for ax, acts, title in ((axes[0], a, c["x"]), (axes[1], b, f"{c['y']} (twin)")):
        ax.imshow(acts[p:].T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{title}: {c['x']}'s features", fontsize=8)
        ax.set_xlabel("position from the country token")
        ax.set_ylabel("feature (rank)")
    return save_figure(fig, path)


def to_json(result: dict) -> dict:
    cases = [{k: v for k, v in c.items() if k != "acts"} for c in result["cases"]]
    return {
        **{k: v for k, v in result.items() if k not in ("cases", "findings")},
        "cases": cases,
        "findings": {f.name: f.to_json() for f in result["findings"]},
    }


def main(args) -> int:
    from functok_vllm.analysis.io import out_dir, write_json
    from functok_vllm.analysis.model import load_hf
    from functok_vllm.errors import CLIError

    am = load_hf(args.model, args.saes, args.function_tokens, [args.layer])
    if getattr(am.tokenizer, "chat_template", None) is None:
        raise CLIError(f"{args.model} has no chat template: the case study asks its questions through one")
    try:
        result = run(am, CaseConfig(args.layer), progress=True)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out = out_dir(args.out)
    paths = [write_json(out / "case_study.json", to_json(result)), plot(result, out / "case_study.png")]
    (out / "case_study.md").write_text(markdown(result, "case_study.png"))
    print(markdown(result, "case_study.png"))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
