"""Steering sweep: add strength * W_dec[feature] at the last function token, the last content token or every position.

For each position policy and strength: the probability of a target token at the next position and the KL divergence
KL(unsteered || steered) of the next-token distribution, plus greedy continuations. Steering goes through the core
exactly as the engine does it: SteeringTable.acquire(spec) -> slot, build_slot_index -> set_slot_index, and
`h + layer.delta(h)` in the residual hook. The core has no "last content token" policy, so that one is an explicit
per-token slot index (slot at one position, 0 elsewhere), still applied by the same table and delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis.data import check_prompt
from functok_vllm.analysis.io import figure, out_dir, save_figure, write_json
from functok_vllm.core import POLICY_CODES, SteeringTable, StepIndex, build_slot_index
from functok_vllm.core import last_function_position as last_fn_position
from functok_vllm.errors import CLIError
from functok_vllm.steering import FeatureEdit, SteeringSpec

POLICIES = ("last_function", "last_content", "all")
DEFAULT_STRENGTHS = (0.0, 10.0, 20.0, 40.0, 80.0, 160.0)  # residual norms are ~50-100 in functok-tiny


@dataclass
class SweepConfig:
    layer: int
    feature: int
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    policies: tuple[str, ...] = POLICIES
    generate: int = 12  # greedy tokens generated unsteered and steered (at continuation_strength)
    continuation_strength: float | None = None  # None: the strength of largest magnitude

    def __post_init__(self):
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise CLIError(f"unknown position policy {bad[0]!r} (choose from {', '.join(POLICIES)})")
        if not self.strengths:
            raise CLIError("give at least one strength")
        if self.generate < 0:
            raise CLIError(f"--generate must be >= 0, got {self.generate}")


def last_content_position(ids: torch.Tensor, fn_mask: torch.Tensor) -> int:
    """Index of the last non-function token of a prompt, -1 if it has none."""
    hits = (~fn_mask[ids.to(fn_mask.device)]).nonzero()
    return int(hits[-1]) if len(hits) else -1


def slot_index(policy: str, ids: torch.Tensor, slot: int, fn_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(tokens,) slot per token of one sequence whose first prompt_len tokens are the prompt."""
    n = len(ids)
    if policy == "last_content":
        idx = torch.zeros(n, dtype=torch.long, device=fn_mask.device)
        p = last_content_position(ids[:prompt_len], fn_mask)
        if p >= 0:
            idx[p] = slot
        return idx
    one = lambda v: torch.tensor([v], dtype=torch.long, device=fn_mask.device)  # noqa: E731
    step = StepIndex(
        input_ids=ids.to(fn_mask.device),
        positions=torch.arange(n, device=fn_mask.device),
        req=torch.zeros(n, dtype=torch.long, device=fn_mask.device),
        slot=one(slot),
        policy=one(POLICY_CODES[policy]),
        prompt_len=one(prompt_len),
        last_fn=one(last_fn_position(ids[:prompt_len], fn_mask)),
    )
    return build_slot_index(step, fn_mask)


def spec_for(layer: int, feature: int, strength: float, policy: str) -> SteeringSpec:
    positions = policy if policy in POLICY_CODES else "content"  # last_content: the explicit index decides, not this
    return SteeringSpec(edits=(FeatureEdit(layer=layer, feature=feature, strength=strength),), positions=positions)


class Steerer:
    """One sequence at a time through the analysis model, steered by the core SteeringTable."""

    def __init__(self, am, layers: list[int]):
        self.am = am
        saes = {layer: am.saes[layer] for layer in layers}
        self.table = SteeringTable(saes, max_slots=64, max_clamps=1, max_tokens=am.max_len, device=am.device)

    def logits(self, ids: torch.Tensor, spec: SteeringSpec | None, policy: str, prompt_len: int) -> torch.Tensor:
        """(tokens,) ids -> (tokens, vocab) logits with `spec` applied where `policy` selects."""
        return self.logits_many(ids, [spec], policy, prompt_len)[0]

    def logits_many(self, ids: torch.Tensor, specs: list, policy: str, prompt_len: int) -> torch.Tensor:
        """The same sequence once per spec, in one batch as the engine batches requests: (n, tokens, vocab)."""
        slots = [self.table.acquire(s) for s in specs]
        try:
            per_row = [slot_index(policy, ids, slot, self.am.fn_mask, prompt_len) for slot in slots]
            self.table.set_slot_index(torch.cat(per_row))  # (n * tokens,) in the hook's flattened order
            fns = {layer: (lambda h, op=op: h + op.delta(h)) for layer, op in self.table.layers.items()}
            return self.am.forward(ids[None].expand(len(specs), -1), fns)
        finally:
            for s in specs:
                self.table.release(s)

    def greedy(self, ids: list[int], n_new: int, spec: SteeringSpec | None, policy: str) -> list[int]:
        """n_new greedy tokens after the prompt (stops at EOS), recomputing the whole sequence each step."""
        seq = list(ids)
        for _ in range(n_new):
            nxt = int(self.logits(torch.tensor(seq), spec, policy, len(ids))[-1].argmax())
            if nxt == self.am.eos_id or len(seq) >= self.am.max_len:
                break
            seq.append(nxt)
        return seq[len(ids) :]


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p || q) from log-probabilities (vocab,)."""
    return float((p_log.exp() * (p_log - q_log)).sum())


def resolve_target(am, layer: int, feature: int, target: str | None) -> int:
    """The target token id: the given single-token string, else the top token of the feature's logit lens."""
    if target is None:
        return int((am.saes[layer].W_dec[feature].to(am.device) @ am.unembed().t()).argmax())
    ids = am.encode(target)
    if len(ids) != 1:
        raise CLIError(f"target {target!r} is {len(ids)} tokens; give a single token (e.g. ' the' with its space)")
    return ids[0]


def sweep(am, prompt: str, cfg: SweepConfig, target: str | None = None) -> dict:
    if cfg.layer not in am.saes:
        have = ", ".join(map(str, sorted(am.saes))) or "none"
        raise CLIError(f"no SAE loaded at layer {cfg.layer} (layers with SAEs: {have})")
    if not 0 <= cfg.feature < am.saes[cfg.layer].d_sae:
        raise CLIError(f"feature {cfg.feature} is outside [0, {am.saes[cfg.layer].d_sae}) at layer {cfg.layer}")
    ids = am.encode(prompt)
    check_prompt(ids, am.max_len)
    x = torch.tensor(ids)
    positions = {"last_function": last_fn_position(x, am.fn_mask), "last_content": last_content_position(x, am.fn_mask)}
    for policy in cfg.policies:
        if positions.get(policy) == -1:
            kind = policy.removeprefix("last_")
            raise CLIError(f"the prompt has no {kind} token, so policy {policy} has nowhere to steer")
    tid = resolve_target(am, cfg.layer, cfg.feature, target)
    st = Steerer(am, [cfg.layer])
    base = st.logits(x, None, "all", len(ids))[-1].log_softmax(-1)  # (vocab,)
    rows = []
    for policy in cfg.policies:
        for s in cfg.strengths:
            logp = st.logits(x, spec_for(cfg.layer, cfg.feature, s, policy), policy, len(ids))[-1].log_softmax(-1)
            top = int(logp.argmax())
            rows.append(
                {
                    "policy": policy,
                    "strength": s,
                    "target_prob": float(logp[tid].exp()),
                    "kl": kl(base, logp),
                    "top_token": am.decode([top]),
                    "top_prob": float(logp[top].exp()),
                }
            )
    strongest = cfg.continuation_strength if cfg.continuation_strength is not None else max(cfg.strengths, key=abs)
    continuations = {"unsteered": am.decode(st.greedy(ids, cfg.generate, None, "all"))}
    for policy in cfg.policies:
        spec = spec_for(cfg.layer, cfg.feature, strongest, policy)
        continuations[policy] = am.decode(st.greedy(ids, cfg.generate, spec, policy))
    return {
        "prompt": prompt,
        "tokens": [am.decode([i]) for i in ids],
        "layer": cfg.layer,
        "feature": cfg.feature,
        "target": am.decode([tid]),
        "target_id": tid,
        "positions": positions | {"all": None},
        "unsteered_target_prob": float(base[tid].exp()),
        "rows": rows,
        "continuation_strength": strongest,
        "continuations": continuations,
    }


def plot(result: dict, path: Path) -> Path:
    fig, axes = figure(2, width=4.0)
    for policy in dict.fromkeys(r["policy"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["policy"] == policy]
        axes[0].plot([r["strength"] for r in rs], [r["target_prob"] for r in rs], marker="o", label=policy)
        axes[1].plot([r["strength"] for r in rs], [r["kl"] for r in rs], marker="o", label=policy)
    axes[0].set_ylabel(f"p({result['target']!r}) at the next position")
    axes[1].set_ylabel("KL(unsteered || steered)")
    for ax in axes:
        ax.set_xlabel(f"strength (layer {result['layer']}, feature {result['feature']})")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(args) -> int:
    from functok_vllm.analysis.model import load_hf

    cfg = SweepConfig(args.layer, args.feature, tuple(args.strengths), generate=args.generate)
    am = load_hf(args.model, args.saes, args.function_tokens, [cfg.layer])
    result = sweep(am, args.prompt, cfg, args.target)
    out = out_dir(args.out)
    paths = [write_json(out / "steer_sweep.json", result), plot(result, out / "steer_sweep.png")]
    for r in result["rows"]:
        print(f"{r['policy']:>13} strength {r['strength']:>7g}: p(target)={r['target_prob']:.3f} KL={r['kl']:.3f}")
    for k, v in result["continuations"].items():
        print(f"{k:>13}: {v!r}")
    print("wrote " + ", ".join(map(str, paths)))
    return 0
