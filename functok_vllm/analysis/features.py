"""Feature dashboards: top-activating contexts from a corpus and the decoder direction's top tokens (logit lens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functok_vllm.analysis.data import check_corpus, n_batches, sequences, token_stream
from functok_vllm.analysis.io import out_dir, write_json
from functok_vllm.core.capture import RunningTopK, encode_chunks
from functok_vllm.errors import CLIError


@dataclass
class FeaturesConfig:
    layer: int
    features: tuple[int, ...] | None = None  # None: the `top` most frequently active features
    top: int = 8
    contexts: int = 5  # top-activating contexts kept per feature
    window: int = 12  # tokens shown left of the activating token (3 to its right)
    lens_tokens: int = 10
    max_tokens: int | None = 32768
    seq_len: int = 256
    batch_size: int = 8

    def __post_init__(self):
        if min(self.top, self.contexts, self.lens_tokens, self.seq_len - 1, self.batch_size) < 1 or self.window < 0:
            raise ValueError("top, contexts, lens_tokens, batch_size must be >= 1, seq_len >= 2, window >= 0")


def _batches(am, stream, cfg: FeaturesConfig, desc: str):
    from tqdm import tqdm

    total = n_batches(stream, cfg.seq_len, cfg.batch_size)
    offset = 0
    for batch in tqdm(sequences(stream, cfg.seq_len, cfg.batch_size), total=total, desc=desc):
        yield offset, batch
        offset += batch.numel()


def activation_frequency(am, stream: torch.Tensor, cfg: FeaturesConfig) -> torch.Tensor:
    """(d_sae,) number of positions (EOS excluded) where each feature of the layer's SAE is active."""
    sae = am.saes[cfg.layer]
    counts = torch.zeros(sae.d_sae, dtype=torch.long)

    for _, batch in _batches(am, stream, cfg, "feature frequency"):
        keep = (batch.reshape(-1) != am.eos_id).to(am.device)

        def fn(h, keep=keep):  # (tokens, d_model)
            for start, active in encode_chunks(sae, h.to(sae.W_enc.dtype), active_only=True):  # (rows, d_sae) bool
                counts.add_((active & keep[start : start + active.shape[0], None]).sum(0).cpu())

        am.forward(batch, {cfg.layer: fn}, logits=False)
    return counts


def top_contexts(am, stream: torch.Tensor, features: list[int], cfg: FeaturesConfig) -> RunningTopK:
    """The top activations of the features over the stream, by global position; reads only their encoder columns."""
    sae = am.saes[cfg.layer]
    feats = torch.tensor(features, dtype=torch.long, device=sae.W_enc.device)
    top = RunningTopK(len(features), cfg.contexts)
    for offset, batch in _batches(am, stream, cfg, "top contexts"):
        keep = (batch.reshape(-1) != am.eos_id).to(am.device)

        def fn(h, keep=keep, offset=offset):  # (tokens, d_model)
            acts = sae.encode_features(h.to(sae.W_enc.dtype), feats)  # (tokens, n)
            top.add((acts * keep[:, None]).cpu(), offset)

        am.forward(batch, {cfg.layer: fn}, logits=False)
    return top


def logit_lens(am, layer: int, features: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) top token ids and scores of each feature's decoder direction read through the unembedding."""
    w = am.saes[layer].W_dec[torch.tensor(features, dtype=torch.long)].to(am.device)  # (n, d_model)
    scores = w @ am.unembed().t()  # (n, vocab)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.indices, top.values


def context_text(am, stream: torch.Tensor, pos: int, window: int) -> str:
    left = stream[max(0, pos - window) : pos].tolist()
    right = stream[pos + 1 : pos + 4].tolist()
    return am.decode(left) + "[[" + am.decode([int(stream[pos])]) + "]]" + am.decode(right)


def describe(am, stream: torch.Tensor, cfg: FeaturesConfig) -> dict:
    sae = am.saes[cfg.layer]
    freq = None
    if cfg.features is None:
        freq = activation_frequency(am, stream, cfg)
        features = freq.topk(min(cfg.top, sae.d_sae)).indices.tolist()
    else:
        features = list(cfg.features)
    for f in features:
        if not 0 <= f < sae.d_sae:
            raise CLIError(f"feature {f} is outside [0, {sae.d_sae}) for the SAE at layer {cfg.layer}")
    top = top_contexts(am, stream, features, cfg)
    lens_ids, lens_scores = logit_lens(am, cfg.layer, features, cfg.lens_tokens)
    n_text = int((stream != am.eos_id).sum())
    out = []
    for i, f in enumerate(features):
        ctx = [
            {"activation": float(v), "position": int(p), "context": context_text(am, stream, int(p), cfg.window)}
            for v, p in zip(top.values[i], top.where[i], strict=True)
            if p >= 0 and v > 0
        ]
        out.append(
            {
                "feature": f,
                "frequency": float(freq[f]) / n_text if freq is not None else None,
                "contexts": ctx,
                "logit_lens": [
                    {"token": am.decode([int(t)]), "id": int(t), "score": float(s)}
                    for t, s in zip(lens_ids[i], lens_scores[i], strict=True)
                ],
            }
        )
    return {"layer": cfg.layer, "tokens": len(stream), "features": out}


def main(args) -> int:
    from functok_vllm.analysis.model import load_hf

    check_corpus(args.corpus)

    cfg = FeaturesConfig(
        args.layer, tuple(args.features) if args.features else None, args.top, max_tokens=args.max_tokens
    )
    am = load_hf(args.model, args.saes, args.function_tokens, [cfg.layer])
    stream = token_stream(am.encode, am.eos_id, args.corpus, cfg.max_tokens)
    result = describe(am, stream, cfg)
    path = write_json(out_dir(args.out) / f"features_L{cfg.layer}.json", result)
    for d in result["features"]:
        lens = " ".join(repr(t["token"]) for t in d["logit_lens"][:6])
        best = d["contexts"][0]["context"] if d["contexts"] else "(never active)"
        print(f"feature {d['feature']}: lens {lens} | top context: {best!r}")
    print(f"wrote {path}")
    return 0
