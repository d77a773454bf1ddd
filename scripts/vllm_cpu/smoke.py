#!/usr/bin/env python3
"""Smoke test for the CPU build of vLLM made by scripts/build_vllm_cpu.sh.

Creates a tiny random Llama (hidden 128, 2 layers, 2 heads of head_dim 64,
vocab 512) with a 512-word WordLevel tokenizer in a temporary directory,
generates 8 greedy tokens for 2 prompts with vLLM (eager mode, then
compiled mode) and with transformers, and checks the tokens are identical. Needs functok-vllm installed (its vLLM
plugin carries the CPU slot-mapping fix).

Usage: python scripts/vllm_cpu/smoke.py [--modes eager,compiled]
Exit status 0 iff every requested mode matches transformers.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# vLLM 0.32.0's no-Triton CPU fallback of the slot-mapping kernel needs a runtime fix in every process that builds a
# model runner. The functok plugin (entry point vllm.general_plugins -> functok_vllm.engines.vllm.plugin:register,
# live once functok-vllm is installed) applies it; see functok_vllm/engines/vllm/cpu_fix.py.

PROMPTS = ["w10 w20 w30 w40", "w7 w300 w12"]
MAX_TOKENS = 8
VOCAB = 512


def make_model(path: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(path)

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        # Larger than the default 0.02 so that greedy argmax margins are
        # comfortably above float noise.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)


def hf_greedy(path: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(
                x,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=3,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def vllm_greedy(path: str, enforce_eager: bool):
    import gc
    import time

    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(
        model=path,
        dtype="float32",
        enforce_eager=enforce_eager,
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
    )
    t1 = time.time()
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    t2 = time.time()
    prompt_ids = [list(o.prompt_token_ids) for o in outs]
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    texts = [o.outputs[0].text for o in outs]
    del llm
    gc.collect()
    return prompt_ids, tokens, texts, t1 - t0, t2 - t1


def main() -> int:
    import argparse
    import tempfile
    import time

    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--model-dir", default=None)
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]

    import torch
    import vllm

    print(f"[smoke] vllm {vllm.__version__} from {os.path.dirname(vllm.__file__)}")
    print(f"[smoke] torch {torch.__version__}, threads {torch.get_num_threads()}")
    from vllm.platforms import current_platform

    print(f"[smoke] platform: {type(current_platform).__name__}")
    import vllm._C  # noqa: F401  (the CPU extension)

    print(f"[smoke] vllm._C: {vllm._C.__file__}")

    tmp = tempfile.TemporaryDirectory(prefix="functok-vllm-smoke-")
    path = args.model_dir or tmp.name
    make_model(path)
    print(f"[smoke] tiny llama saved to {path}")

    ok = True
    hf_tokens = None
    for mode in modes:
        eager = mode == "eager"
        t0 = time.time()
        prompt_ids, tokens, texts, t_init, t_gen = vllm_greedy(path, eager)
        print(f"[smoke] vllm {mode}: init {t_init:.1f}s, generate {t_gen:.2f}s, total {time.time() - t0:.1f}s")
        if hf_tokens is None:
            hf_tokens = hf_greedy(path, prompt_ids)
        for p, ids, v, h, txt in zip(PROMPTS, prompt_ids, tokens, hf_tokens, texts, strict=False):
            same = v == h
            ok &= same
            print(f"[smoke]   {mode} prompt {p!r} ids={ids}")
            print(f"[smoke]     vllm: {v} {txt!r}")
            print(f"[smoke]     hf:   {h} {'MATCH' if same else 'MISMATCH'}")
    print(f"[smoke] RESULT: {'PASS' if ok else 'FAIL'}")
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
