"""Train functok-tiny: a byte-level BPE tokenizer and a small Llama on the shared corpora, with checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from functok_vllm.corpus import load_split
from functok_vllm.train.tokenizer import train_tokenizer


@dataclass
class DemoConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4  # head_dim 64: vLLM's CPU attention refuses head_dim 16, accepts 32/64/80/96/112/128
    intermediate_size: int = 768
    seq_len: int = 256
    batch_size: int = 16  # 4,096 tokens a step: beat 8,192 at the same token budget (val 4.91 vs 4.99)
    steps: int = (
        1400  # ~5.7M tokens, ~6 passes over the 0.98M-token train split; ~26 min at 3,700 tok/s on 2 CPU threads
    )
    lr: float = 2e-3
    warmup: int = 60
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    checkpoints: tuple = (
        140,
        500,
    )  # early and middle snapshots for the training-dynamics analysis; the final is the model
    eval_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if any(not 0 < c < self.steps for c in self.checkpoints):
            raise ValueError(f"checkpoints {self.checkpoints} must lie inside (0, steps={self.steps})")


def encode_split(tok, paragraphs: list[str]) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS. (tokens,)"""
    eos = tok.eos_token_id
    ids = []
    for batch_start in range(0, len(paragraphs), 2048):
        for row in tok(paragraphs[batch_start : batch_start + 2048])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(cfg: DemoConfig, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, seq_len: int, device, max_batches: int = 16) -> float:
    model.eval()
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].view(n, seq_len)[: max_batches * 16]  # (seqs, seq_len)
    losses = []
    for i in range(0, len(x), 16):
        xb = x[i : i + 16].to(device)
        losses.append(model(input_ids=xb, labels=xb).loss.item())
    model.train()
    return sum(losses) / len(losses)


def save_model(model, out_dir: Path, tok=None):
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    if tok is not None:
        tok.save_pretrained(out_dir)


def train_demo(out_dir: Path, cfg: DemoConfig = DemoConfig(), device: str = "cpu", threads: int = 2) -> dict:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    split = load_split()
    tok = train_tokenizer(split.train, out_dir, cfg.vocab_size)
    train_ids, val_ids = encode_split(tok, split.train), encode_split(tok, split.val)
    print(f"tokenizer: vocab {len(tok)}; train {len(train_ids):,} tokens, val {len(val_ids):,} tokens")

    model = LlamaForCausalLM(llama_config(cfg, tok)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, device {device}, {threads} threads")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step):
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(cfg.seed)
    history, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="train functok-tiny")
    for step in bar:
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        xb = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts]).to(device)  # (batch, seq_len)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps or done in cfg.checkpoints:
            val = eval_loss(model, val_ids, cfg.seq_len, device)
            history.append({"step": done, "train_loss": loss.item(), "val_loss": val, "seconds": time.time() - t0})
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
        if done in cfg.checkpoints:
            save_model(model, out_dir / "checkpoints" / f"step-{done:05d}")
    secs = time.time() - t0
    save_model(model, out_dir, tok)
    report = {
        "config": asdict(cfg),
        "parameters": n_params,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": secs,
        "device": device,
        "tokens_per_second": cfg.steps * cfg.batch_size * cfg.seq_len / secs,
        "history": history,
        "final_val_loss": history[-1]["val_loss"],
        "torch": torch.__version__,
        "host": os.uname().nodename,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {secs:.0f}s: val loss {report['final_val_loss']:.3f}")
    return report
