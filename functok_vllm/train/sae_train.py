"""Train SAEs on the residual stream of any Hugging Face causal LM: BatchTopK training, saved as JumpReLU (SAELens).

The shipped SAEs come from PRESETS: `functok train-saes --model DIR` picks the preset named like the model directory
(functok-tiny, SmolLM2-135M-Instruct) and any flag overrides it. An unknown model gets the default recipe at depths
1/4, 1/2 and 3/4.

Steps: encode the training split (documents separated by EOS) into whole windows of `seq_len`, shuffle the windows,
run the model over them and keep the outputs of the chosen decoder layers (the forward stops after the deepest one:
no later layers, no LM head), then train one SAE per layer on those vectors.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from functok_vllm.core.sae import SAE, SAEConfig
from functok_vllm.corpus import load_split
from functok_vllm.engines.placement import decoder_layers


@dataclass(frozen=True)
class SAETrainConfig:
    layers: tuple = (0, 1, 2)  # decoder layers whose output (blocks.L.hook_resid_post) gets an SAE; tiny: 1/4..3/4
    expansion: int = 8  # d_sae = expansion * d_model (functok-tiny: 2048)
    k: int = 32  # mean active features a token (BatchTopK keeps k * batch activations across the whole batch)
    activation_tokens: int = 1_048_576  # residual vectors collected per layer (capped by the training split)
    batch_size: int = 4096
    steps: int = 2500  # ~10 passes over the collected activations
    lr: float = 4e-4
    aux_k: int = 256  # dead features revived through the auxiliary loss on the reconstruction error
    aux_coef: float = 1 / 32
    dead_after: int = 200  # steps without firing before a feature counts as dead for the auxiliary loss
    threshold_ema: float = 0.99  # the saved JumpReLU threshold is an EMA of the smallest kept activation
    seq_len: int = 256
    seed: int = 0
    # Positions at the start of every window left out of training (0: every token). Blind to where a sink really is:
    # SmolLM2 sometimes puts it at position 1; massive_ratio finds sinks by norm instead (sae_weights/README.md).
    skip_first: int = 0
    # BatchTopK candidates per token: 0 is the exact top-k over the flattened batch; n > 0 first keeps each token's n
    # largest pre-activations (3x faster top-k on CPU), exact unless a token needs more than n of the batch's slots
    # (rows that reach the cap are counted in the training report as rows_at_cap).
    row_cap: int = 0
    # Tokens with a norm above massive_ratio x the layer's median norm are "massive activations" (attention sinks,
    # 70-140x the median at position 0 of SmolLM2's middle layers). 0: trained like any token. > 0: they get one
    # fixed sink feature and no trained feature reads their direction (train_one).
    massive_ratio: float = 0.0
    store_dtype: str = "float32"  # collected activations; float16 halves the memory of a 1M-token run
    fwd_batch: int = 32  # windows per forward pass while collecting

    def __post_init__(self):
        if self.k <= 0 or self.expansion < 1 or self.batch_size <= 0 or self.steps <= 0:
            raise ValueError("k, expansion, batch_size and steps must be positive")
        if not 0 <= self.skip_first < self.seq_len:
            raise ValueError(f"skip_first must be in [0, seq_len), got {self.skip_first}")
        if self.row_cap and self.row_cap < self.k:
            raise ValueError(f"row_cap must be 0 or >= k, got {self.row_cap}")


PRESETS = {
    "functok-tiny": SAETrainConfig(),
    # 30 layers: outputs of layers 7/15/22 (depth 1/4, 1/2, 3/4). Sized for ~2 hours on the shared 2-core machine,
    # where other jobs cut the idle speed (~800 tokens/s through 23 layers and 0.7 s a step idle; ~300 tokens/s and
    # ~1.1-1.9 s a step under load): 1,536 windows, 1,200 steps (12.5 passes); the run took 1 h 31 min. k = 48: a
    # 300-step k = 32 pilot explained 0.71 of layer 15's held-out variance, short of the 0.80 bar.
    "SmolLM2-135M-Instruct": SAETrainConfig(
        layers=(7, 15, 22),
        k=48,
        activation_tokens=393_216,
        steps=1200,
        row_cap=192,
        massive_ratio=20.0,  # sinks >= 22x the median at layers 15/22, every other token <= 15x (training report)
        store_dtype="float16",  # 3 layers x 393k x 576 in fp16 = 1.4 GB
        fwd_batch=8,  # 8 windows a forward ran faster than 16 or 32 on 2 threads
    ),
}


def default_layers(n_layers: int) -> tuple:
    """Outputs at depth 1/4, 1/2, 3/4: the layer after which that fraction of the stack has run."""
    return tuple(sorted({max(0, round(n_layers * f) - 1) for f in (0.25, 0.5, 0.75)}))


def config_for(model_name: str, n_layers: int, **overrides) -> SAETrainConfig:
    """The preset of a shipped model, else the default recipe at default_layers; non-None overrides replace fields."""
    base = PRESETS.get(model_name) or SAETrainConfig(layers=default_layers(n_layers))
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if max(cfg.layers) >= n_layers:
        raise ValueError(f"layers {list(cfg.layers)}: {model_name} has decoder layers 0-{n_layers - 1}")
    return cfg


class _StopForward(Exception):
    """Raised by the hook on the deepest layer needed: the rest of the model never runs."""


@torch.no_grad()
def collect_residuals(model, seqs: torch.Tensor, cfg: SAETrainConfig, device="cpu", progress=True) -> dict:
    """Decoder-layer outputs at cfg.layers for (n_seq, seq_len) windows, minus the first cfg.skip_first positions of
    each window: {layer: (n_seq * (seq_len - skip_first), d_model)} in cfg.store_dtype."""
    from tqdm import tqdm

    n_seq, seq_len = seqs.shape
    d_model = model.config.hidden_size
    keep = seq_len - cfg.skip_first
    dtype = getattr(torch, cfg.store_dtype)
    store = {layer: torch.empty(n_seq * keep, d_model, dtype=dtype) for layer in cfg.layers}  # preallocated
    deepest = max(cfg.layers)
    at = [0]  # first row of the current batch in every store

    def hook(layer):
        def fn(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out  # (batch, seq_len, d_model); 4.x returns a tuple
            h = h[:, cfg.skip_first :].reshape(-1, d_model)  # (batch * keep, d_model)
            if not torch.isfinite(h).all() or h.abs().max() > torch.finfo(dtype).max:
                raise ValueError(f"layer {layer}: activations do not fit {cfg.store_dtype}")
            store[layer][at[0] : at[0] + len(h)] = h.to(dtype)
            if layer == deepest:
                raise _StopForward

        return fn

    layers = decoder_layers(model)
    handles = [layers[layer].register_forward_hook(hook(layer)) for layer in cfg.layers]
    try:
        for i in tqdm(range(0, n_seq, cfg.fwd_batch), desc="collect residuals", unit="batch", disable=not progress):
            xb = seqs[i : i + cfg.fwd_batch]  # (batch, seq_len)
            try:
                model(input_ids=xb.to(device), use_cache=False)
            except _StopForward:
                pass
            at[0] += xb.shape[0] * keep
    finally:
        for h in handles:
            h.remove()
    return store


class _SelectedPre(torch.autograd.Function):
    """pre[rows, cols] of pre = xin @ W_enc + b_enc, where pre was computed without autograd. The backward touches
    only the selected entries (sparse matmuls), not the dense (batch, d_sae) gradient: the same gradient as dense
    autograd through top-k, ~2x less time a step on CPU."""

    @staticmethod
    def forward(ctx, xin, W_enc, b_enc, pre, rows, cols):
        ctx.save_for_backward(xin, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        xin, W_enc, rows, cols = ctx.saved_tensors
        (n, d_sae), idx = (xin.shape[0], W_enc.shape[1]), torch.stack([rows, cols])
        G = _sparse(idx, g, (n, d_sae), is_coalesced=True)  # (batch, d_sae), indices sorted row-major
        Gt = _sparse(idx.flip(0), g, (d_sae, n))
        d_xin = torch.sparse.mm(G, W_enc.t().contiguous())  # (batch, d_in); 5x slower on the strided view
        d_W_enc = torch.sparse.mm(Gt, xin).t()  # (d_in, d_sae)
        d_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return d_xin, d_W_enc, d_b_enc, None, None, None


def _sparse(indices, values, size, is_coalesced=False):
    return torch.sparse_coo_tensor(indices, values, size, is_coalesced=is_coalesced, check_invariants=False)


def batch_topk(pre: torch.Tensor, k: int, row_cap: int) -> tuple:
    """(rows, cols) of the k * batch largest positive entries of pre (batch, d_sae), sorted row-major."""
    n, d_sae = pre.shape
    if row_cap:
        cand_v, cand_i = pre.topk(row_cap, dim=-1, sorted=False)  # (batch, row_cap)
        v, j = cand_v.flatten().topk(k * n, sorted=False)
        flat = (j // row_cap) * d_sae + cand_i.flatten()[j]
    else:
        v, flat = pre.flatten().topk(k * n, sorted=False)
    flat = flat[v > 0].sort().values
    return flat // d_sae, flat % d_sae


def find_massive(acts: torch.Tensor, ratio: float, chunk: int = 65536) -> tuple:
    """Tokens whose norm exceeds ratio x the median norm (ratio 0: none): (mask (tokens,), median norm, norms)."""
    norms = torch.cat([c.float().norm(dim=-1) for c in acts.split(chunk)])  # (tokens,)
    median = float(norms.median())
    return (norms > ratio * median if ratio else torch.zeros_like(norms, dtype=torch.bool)), median, norms


def activation_stats(acts: torch.Tensor, rows: torch.Tensor, chunk: int = 65536) -> tuple:
    """Mean (d_in,) and total variance (mean squared distance to the mean) of acts[rows], in fp64 chunks."""
    parts = rows.split(chunk)
    mean = sum(acts[r].double().sum(0) for r in parts) / len(rows)
    var = sum((acts[r].double() - mean).pow(2).sum() for r in parts) / len(rows)
    return mean.float(), var.float()


def train_one(acts: torch.Tensor, cfg: SAETrainConfig, layer: int, model_name: str, device="cpu", progress=True):
    """BatchTopK training on (tokens, d_in) activations; returns a JumpReLU SAE and training stats.

    With cfg.massive_ratio, tokens whose norm exceeds that multiple of the median (attention sinks) define a direction
    u (their mean). The last feature is a fixed "sink" feature: encoder and decoder u, threshold massive_ratio x the
    median norm, so it fires on them alone and carries their huge component along u. The trained encoders are kept
    orthogonal to u (no trained feature reads it), so what they see of a sink token is its ordinary-sized remainder,
    and they learn that remainder with the sink feature in place, like any other token.
    """
    from tqdm import tqdm

    g = torch.Generator(device="cpu").manual_seed(cfg.seed + layer)
    n, d_in = acts.shape
    massive, median, norms = find_massive(acts, cfg.massive_ratio)
    ordinary = (~massive).nonzero().squeeze(1)  # (n_ordinary,)
    u, sink_thr = None, cfg.massive_ratio * median
    if massive.any():
        m = acts[massive].float().mean(0)
        u = (m / m.norm()).to(device)  # (d_in,) the massive direction
    d_sae = cfg.expansion * d_in
    d_train = d_sae - (u is not None)  # the sink feature takes the last slot
    W_dec = torch.randn(d_train, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(device)  # (d_train, d_in), unit rows
    _, total_var = activation_stats(acts, ordinary)  # NMSE relative to the ordinary tokens' variance
    params = {
        "W_enc": _orthogonal(W_dec.t().clone(), u),  # (d_in, d_train)
        "b_enc": torch.zeros(d_train, device=device),
        "W_dec": W_dec,
        "b_dec": acts[ordinary[:65536]].float().mean(0).to(device),
    }
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_train, device=device)
    threshold, at_cap = None, 0
    total_var = total_var.to(device)
    bar = tqdm(range(cfg.steps), desc=f"SAE layer {layer}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = acts[idx].to(device, torch.float32)  # (batch, d_in)
        xin = x - params["b_dec"]
        sink = 0.0
        if u is not None:  # the fixed sink feature's part of the reconstruction, (batch, d_in)
            a = xin @ u  # (batch,)
            sink = (a * (a > sink_thr))[:, None] * u
        with torch.no_grad():
            pre = torch.addmm(params["b_enc"], xin, params["W_enc"]).relu_()  # (batch, d_train)
            rows, cols = batch_topk(pre, cfg.k, cfg.row_cap)  # (nnz,) each
            if cfg.row_cap:
                at_cap += int((torch.bincount(rows, minlength=cfg.batch_size) >= cfg.row_cap).sum())
        vals = _SelectedPre.apply(xin, params["W_enc"], params["b_enc"], pre, rows, cols)  # (nnz,)
        z = _sparse(torch.stack([rows, cols]), vals, (cfg.batch_size, d_train), is_coalesced=True)  # (batch, d_train)
        x_hat = torch.sparse.mm(z, params["W_dec"]) + params["b_dec"] + sink  # (batch, d_in)
        err = x - x_hat
        nmse = err.pow(2).sum(-1).mean() / total_var
        loss = nmse
        fired = torch.bincount(cols, minlength=d_train) > 0
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = (since_fired > cfg.dead_after).nonzero().squeeze(1)  # (n_dead,)
        if len(dead):  # AuxK: the dead features' top pre-activations reconstruct the error (dense on dead columns)
            aux_pre = torch.addmm(params["b_enc"][dead], xin, params["W_enc"][:, dead]).relu()  # (batch, n_dead)
            v, i = aux_pre.topk(min(cfg.aux_k, len(dead)), dim=-1)
            e_hat = torch.zeros_like(aux_pre).scatter(-1, i, v) @ params["W_dec"][dead]  # (batch, d_in)
            loss = loss + cfg.aux_coef * (err.detach() - e_hat).pow(2).sum(-1).mean() / total_var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
            params["W_enc"].copy_(_orthogonal(params["W_enc"], u))
            kept_min = vals.min() if len(vals) else torch.tensor(0.0, device=device)
            ema = cfg.threshold_ema
            threshold = kept_min if threshold is None else ema * threshold + (1 - ema) * kept_min
        if step % 100 == 0 or step == cfg.steps - 1:
            bar.set_postfix(nmse=f"{nmse.item():.4f}", dead=len(dead), thr=f"{float(threshold):.3f}")
    p = {k: v.detach().cpu() for k, v in params.items()}
    thr = torch.full((d_train,), float(threshold))
    hook = f"blocks.{layer}.hook_resid_post"
    meta = {"model_name": model_name, "hook_name": hook, "hf_hook_name": f"model.layers.{layer}"}
    meta |= {"context_size": cfg.seq_len, "prepend_bos": False}
    stats = {"layer": layer, "final_nmse": nmse.item(), "threshold": float(threshold), "dead_at_end": len(dead)}
    stats |= {"median_norm": median, "max_norm": float(norms.max()), "massive_tokens": int(massive.sum())}
    if cfg.row_cap:
        stats["rows_at_cap"] = at_cap
    if u is not None:  # append the sink feature: fires only where (x - b_dec) . u > massive_ratio * median norm
        u = u.cpu()
        p["W_enc"], p["W_dec"] = torch.cat([p["W_enc"], u[:, None]], 1), torch.cat([p["W_dec"], u[None]])
        p["b_enc"] = torch.cat([p["b_enc"], torch.zeros(1)])
        thr = torch.cat([thr, torch.tensor([sink_thr])])
        meta["functok_sink_feature"] = d_sae - 1
        pos = (massive.nonzero().squeeze(1) % (cfg.seq_len - cfg.skip_first) + cfg.skip_first).bincount()
        stats |= {"sink_feature": d_sae - 1, "sink_threshold": sink_thr}
        stats |= {"max_other_norm": float(norms[ordinary].max()), "min_massive_norm": float(norms[massive].min())}
        stats["massive_positions"] = {str(i): int(c) for i, c in enumerate(pos.tolist()) if c}
    cfg_sae = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=hook, extra={"metadata": meta})
    return SAE(
        cfg_sae, {"W_enc": p["W_enc"], "b_enc": p["b_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"], "threshold": thr}
    ), stats


def _orthogonal(W_enc: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """W_enc (d_in, d) with every column's component along the unit vector u removed (u None: unchanged)."""
    return W_enc if u is None else W_enc - u[:, None] * (u @ W_enc)[None, :]


def training_windows(tok, cfg: SAETrainConfig) -> torch.Tensor:
    """The training split as whole windows of seq_len, shuffled: (n_seq, seq_len), capped at activation_tokens."""
    from functok_vllm.train.demo_model import encode_split

    ids = encode_split(tok, load_split().train)  # (tokens,), documents separated by EOS
    perm = torch.randperm((len(ids) - 1) // cfg.seq_len, generator=torch.Generator().manual_seed(cfg.seed))
    seqs = ids[: len(perm) * cfg.seq_len].view(len(perm), cfg.seq_len)[perm]
    return seqs[: max(1, cfg.activation_tokens // cfg.seq_len)]


def train_saes(model_dir, out_dir, cfg: SAETrainConfig, device="cpu", threads=2, progress=True) -> list:
    """Train one SAE per cfg.layers (from `config_for`, which checks them) on model_dir's residual stream and save
    them under out_dir/layer_{L}/."""
    from functok_vllm.engines.hf.hooks import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(model_dir, device=device)
    model_name = Path(model.name_or_path).name
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    seqs = training_windows(tok, cfg)
    acts = collect_residuals(model, seqs, cfg, device, progress)
    t_collect = time.time() - t0
    del model
    stats = []
    for layer in cfg.layers:
        t1 = time.time()
        sae, s = train_one(acts.pop(layer), cfg, layer, model_name, device, progress)
        sae.save(Path(out_dir) / f"layer_{layer}", dtype=torch.float16)
        stats.append({**s, "seconds": round(time.time() - t1, 1)})
    report = {
        "model_name": model_name,
        "config": asdict(cfg),
        "tokens": int(seqs.numel()),
        "trained_tokens": int(seqs.shape[0] * (cfg.seq_len - cfg.skip_first)),
        "collect_seconds": round(t_collect, 1),
        "seconds": round(time.time() - t0, 1),
        "device": str(device),
        "threads": threads,
        "layers": stats,
    }
    (Path(out_dir) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return stats
