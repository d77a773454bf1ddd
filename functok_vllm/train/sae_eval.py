"""Measure SAE quality on held-out text: variance explained, L0, dead features, and the loss cost of splicing.

For every `layer_*` SAE directory the model runs twice over the validation split (`corpus.load_split().val`): once
clean, recording the residual stream the SAE reads, and once with that layer's output replaced by the SAE's
reconstruction `decode(encode(h))`. The gap between the two next-token cross-entropies is what the SAE costs the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from functok_vllm.core.sae import SAE, SAELoadError, fraction_variance_explained
from functok_vllm.corpus import load_split
from functok_vllm.engines.hf.hooks import load_model, residual_hooks
from functok_vllm.errors import CLIError

# The bars the shipped SAEs are held to (sae_weights/README.md); a row that misses one is flagged, not hidden.
MIN_FVE = 0.80
L0_RANGE = (10.0, 100.0)
MAX_DEAD_PCT = 10.0


def load_saes(saes_dir: str | Path) -> dict[str, SAE]:
    """{"layer_N": SAE} for every layer_* directory under saes_dir, in layer order."""
    d = Path(saes_dir)
    if not d.is_dir():
        raise CLIError(f"SAE directory {d} does not exist")
    dirs = sorted((p for p in d.glob("layer_*") if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if not dirs:
        raise CLIError(f"SAE directory {d} holds no layer_* SAE directories")
    try:
        return {p.name: SAE.load(p) for p in dirs}
    except SAELoadError as e:
        raise CLIError(str(e)) from None


def heldout_sequences(tok, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first n_tokens of the validation split as (seqs, seq_len) ids, documents separated by EOS."""
    from functok_vllm.train.demo_model import encode_split

    ids = encode_split(tok, load_split().val)  # (tokens,)
    n_seq = min(n_tokens // seq_len, len(ids) // seq_len)
    if n_seq == 0:
        raise CLIError(f"--tokens {n_tokens} is less than one sequence of {seq_len} held-out tokens")
    return ids[: n_seq * seq_len].view(n_seq, seq_len)


def _ce_sum(model, xb: torch.Tensor) -> float:
    logits = model(input_ids=xb).logits[:, :-1]  # (batch, seq_len - 1, vocab)
    return float(F.cross_entropy(logits.flatten(0, 1).float(), xb[:, 1:].flatten(), reduction="sum"))


@torch.no_grad()
def evaluate(
    model_dir: str | Path,
    saes_dir: str | Path,
    n_tokens: int = 49152,
    seq_len: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Quality of every SAE under saes_dir on held-out text; one dict per SAE under "layers"."""
    from tqdm import tqdm

    if not (Path(model_dir) / "config.json").is_file():
        raise CLIError(f"model directory {model_dir} does not exist or has no config.json")
    saes = load_saes(saes_dir)
    model, tok = load_model(model_dir)
    d_model = model.config.hidden_size
    for name, sae in saes.items():
        if sae.d_in != d_model or not 0 <= sae.layer < model.config.num_hidden_layers:
            raise CLIError(
                f"{Path(saes_dir) / name}: d_in {sae.d_in} at layer {sae.layer} does not fit the model "
                f"(hidden size {d_model}, {model.config.num_hidden_layers} layers)"
            )
    x = heldout_sequences(tok, n_tokens, seq_len)  # (seqs, seq_len)
    clean = 0.0
    spliced = dict.fromkeys(saes, 0.0)
    layers = sorted({sae.layer for sae in saes.values()})
    captured = {}  # layer -> clean residual stream of the current batch, (batch * seq_len, d_model)
    resid = {name: [] for name in saes}
    recon = {name: [] for name in saes}
    l0_sum = dict.fromkeys(saes, 0.0)
    fired = {name: torch.zeros(sae.d_sae, dtype=torch.bool) for name, sae in saes.items()}

    def capture(layer):
        def fn(h):
            captured[layer] = h.float().clone()

        return fn

    def splice(sae):
        return lambda h: sae.decode(sae.encode(h.float())).to(h.dtype)

    for i in tqdm(range(0, len(x), batch_size), desc="sae-eval", disable=not progress):
        xb = x[i : i + batch_size]  # (batch, seq_len)
        with residual_hooks(model, {layer: capture(layer) for layer in layers}):
            clean += _ce_sum(model, xb)
        for name, sae in saes.items():
            h = captured[sae.layer]  # (batch * seq_len, d_model)
            resid[name].append(h)
            acts = sae.encode(h)  # (batch * seq_len, d_sae)
            recon[name].append(sae.decode(acts))
            l0_sum[name] += float((acts > 0).sum())
            fired[name] |= (acts > 0).any(0)
            with residual_hooks(model, {sae.layer: splice(sae)}):
                spliced[name] += _ce_sum(model, xb)

    n_pred = x.shape[0] * (seq_len - 1)
    clean_loss = clean / n_pred
    rows = []
    for name, sae in saes.items():
        loss = spliced[name] / n_pred
        rows.append(
            {
                "sae": name,
                "layer": sae.layer,
                "hook_name": sae.cfg.hook_name,
                "d_sae": sae.d_sae,
                "fve": fraction_variance_explained(torch.cat(resid[name]), torch.cat(recon[name])),
                "mean_l0": l0_sum[name] / x.numel(),
                "dead_features": int((~fired[name]).sum()),
                "dead_pct": 100.0 * float((~fired[name]).sum()) / sae.d_sae,
                "ce_clean": clean_loss,
                "ce_spliced": loss,
                "ce_increase": loss - clean_loss,
            }
        )
    return {
        "model": str(model_dir),
        "saes": str(saes_dir),
        "tokens": x.numel(),
        "sequences": x.shape[0],
        "seq_len": seq_len,
        "ce_clean": clean_loss,
        "layers": rows,
    }


def failed_bars(row: dict) -> list[str]:
    """The quality bars a row misses, as short phrases (empty when it meets all of them)."""
    out = []
    if not row["fve"] >= MIN_FVE:
        out.append(f"FVE {row['fve']:.3f} < {MIN_FVE}")
    if not L0_RANGE[0] <= row["mean_l0"] <= L0_RANGE[1]:
        out.append(f"L0 {row['mean_l0']:.1f} outside {L0_RANGE}")
    if not row["dead_pct"] < MAX_DEAD_PCT:
        out.append(f"dead {row['dead_pct']:.1f}% >= {MAX_DEAD_PCT}%")
    if not math.isfinite(row["ce_increase"]):
        out.append("loss increase is not finite")
    return out


def markdown_table(result: dict) -> str:
    lines = [
        "| SAE | hook | d_sae | FVE | mean L0 | dead (% of d_sae) | CE clean | CE with SAE | CE increase |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['sae']} | {r['hook_name']} | {r['d_sae']} | {r['fve']:.3f} | {r['mean_l0']:.1f} | "
            f"{r['dead_features']} ({r['dead_pct']:.1f}%) | {r['ce_clean']:.3f} | {r['ce_spliced']:.3f} | "
            f"{r['ce_increase']:+.3f} |"
        )
    return "\n".join(lines)


def main(args) -> int:
    if args.tokens <= 0:
        raise CLIError(f"--tokens must be positive, got {args.tokens}")
    torch.set_num_threads(2)
    result = evaluate(args.model, args.saes, args.tokens)
    print(f"{result['tokens']:,} held-out tokens ({result['sequences']} sequences of {result['seq_len']})\n")
    print(markdown_table(result))
    for r in result["layers"]:
        if failed_bars(r):
            print(f"{r['sae']} misses a quality bar: {'; '.join(failed_bars(r))}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
