"""Train the shipped SAEs (BatchTopK, saved as JumpReLU) on functok-tiny's residual stream at three layers."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from functok_vllm.core.sae import SAE, SAEConfig
from functok_vllm.corpus import load_split


@dataclass
class SAETrainConfig:
    layers: tuple = (
        0,
        1,
        2,
    )  # outputs of decoder layers 0/1/2 of 4: depth 1/4, 2/4, 3/4 like the paper's 9/20/31 of 42
    expansion: int = 8  # d_sae = 8 * d_model = 2048
    k: int = 32  # mean active features a token (BatchTopK keeps k * batch activations across the whole batch)
    activation_tokens: int = 1_048_576  # residual vectors collected per layer
    batch_size: int = 4096
    steps: int = 2500  # ~10 passes over the collected activations
    lr: float = 4e-4
    aux_k: int = 256  # dead features revived through the auxiliary loss on the reconstruction error
    aux_coef: float = 1 / 32
    dead_after: int = 200  # steps without firing before a feature counts as dead for the auxiliary loss
    threshold_ema: float = 0.99  # the saved JumpReLU threshold is an EMA of the smallest kept activation
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.k <= 0 or self.expansion < 1 or self.batch_size <= 0:
            raise ValueError("k, expansion and batch_size must be positive")


def decoder_layers(model):
    """The list of decoder layers of a transformers causal LM (Llama and most decoder-only families)."""
    return model.model.layers


@torch.no_grad()
def collect_residuals(model, ids: torch.Tensor, layers, n_tokens: int, seq_len: int, device) -> dict[int, torch.Tensor]:
    """Decoder-layer outputs at `layers` over the first n_tokens of `ids`: {layer: (tokens, d_model)} in fp32."""
    from tqdm import tqdm

    store = {layer: [] for layer in layers}

    def hook(layer):
        def fn(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out  # transformers 5 returns a tensor, 4.x a tuple
            store[layer].append(h.reshape(-1, h.shape[-1]).float())  # (batch*seq, d_model)

        return fn

    handles = [decoder_layers(model)[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        n_seq = min(n_tokens // seq_len, (len(ids) - 1) // seq_len)
        x = ids[: n_seq * seq_len].view(n_seq, seq_len)  # (seqs, seq_len)
        for i in tqdm(range(0, n_seq, 32), desc="collect residuals"):
            model(input_ids=x[i : i + 32].to(device))
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(v) for layer, v in store.items()}


def train_one(acts: torch.Tensor, cfg: SAETrainConfig, layer: int, device) -> tuple[SAE, dict]:
    """BatchTopK training on (tokens, d_in) activations; returns a JumpReLU SAE and training stats."""
    from tqdm import tqdm

    g = torch.Generator(device="cpu").manual_seed(cfg.seed + layer)
    n, d_in = acts.shape
    d_sae = cfg.expansion * d_in
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(device)  # (d_sae, d_in), unit rows
    params = {
        "W_enc": W_dec.t().clone(),
        "b_enc": torch.zeros(d_sae, device=device),
        "W_dec": W_dec,
        "b_dec": acts[:65536].mean(0).to(device),
    }
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae, device=device)
    threshold = None
    total_var = (acts - acts.mean(0)).pow(2).sum(-1).mean().to(device)
    bar = tqdm(range(cfg.steps), desc=f"SAE layer {layer}")
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = acts[idx].to(device)  # (batch, d_in)
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # (batch, d_sae)
        relu = pre.relu()
        flat = relu.flatten()
        top = flat.topk(cfg.k * cfg.batch_size)
        z = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)  # (batch, d_sae)
        x_hat = z @ params["W_dec"] + params["b_dec"]
        err = x - x_hat
        loss = err.pow(2).sum(-1).mean() / total_var
        fired = (z > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = since_fired > cfg.dead_after
        if dead.any():
            aux_pre = torch.where(dead, relu, torch.zeros_like(relu))
            k_aux = min(cfg.aux_k, int(dead.sum()))
            v, i = aux_pre.topk(k_aux, dim=-1)
            e_hat = torch.zeros_like(aux_pre).scatter(-1, i, v) @ params["W_dec"]
            loss = loss + cfg.aux_coef * (err.detach() - e_hat).pow(2).sum(-1).mean() / total_var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
            kept_min = top.values[top.values > 0].min() if (top.values > 0).any() else torch.tensor(0.0, device=device)
            threshold = (
                kept_min if threshold is None else cfg.threshold_ema * threshold + (1 - cfg.threshold_ema) * kept_min
            )
        if step % 100 == 0:
            bar.set_postfix(nmse=f"{loss.item():.4f}", dead=int(dead.sum()), thr=f"{float(threshold):.3f}")
    cfg_sae = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="jumprelu",
        hook_name=f"blocks.{layer}.hook_resid_post",
        extra={
            "metadata": {
                "model_name": "functok-tiny",
                "hook_name": f"blocks.{layer}.hook_resid_post",
                "hf_hook_name": f"model.layers.{layer}",
                "context_size": cfg.seq_len,
                "prepend_bos": False,
            }
        },
    )
    p = {k: v.detach().cpu() for k, v in params.items()}
    sae = SAE(
        cfg_sae,
        {
            "W_enc": p["W_enc"],
            "b_enc": p["b_enc"],
            "W_dec": p["W_dec"],
            "b_dec": p["b_dec"],
            "threshold": torch.full((d_sae,), float(threshold)),
        },
    )
    return sae, {"layer": layer, "final_nmse": float(loss), "threshold": float(threshold)}


def train_saes(model_dir: Path, out_dir: Path, cfg: SAETrainConfig = SAETrainConfig(), device="cpu", threads=2) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functok_vllm.train.demo_model import encode_split

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = encode_split(tok, load_split().train)
    perm = torch.randperm((len(ids) - 1) // cfg.seq_len, generator=torch.Generator().manual_seed(cfg.seed))
    ids = ids[: len(perm) * cfg.seq_len].view(len(perm), cfg.seq_len)[perm].flatten()  # shuffled whole sequences
    t0 = time.time()
    acts = collect_residuals(model, ids, cfg.layers, cfg.activation_tokens, cfg.seq_len, device)
    stats = []
    for layer in cfg.layers:
        sae, s = train_one(acts[layer], cfg, layer, device)
        sae.save(Path(out_dir) / f"layer_{layer}", dtype=torch.float16)
        stats.append(s)
    report = {"config": asdict(cfg), "seconds": time.time() - t0, "device": device, "layers": stats}
    (Path(out_dir) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return stats
