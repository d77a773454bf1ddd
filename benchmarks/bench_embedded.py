"""The embedded default against its ceiling: the transformers engine in-process and served, against one static
batched transformers `generate`, on the same prompts, interleaved in one run (issue 27's "fast embedded default").

    .venv/bin/python benchmarks/bench_embedded.py [--prompts 32] [--concurrency 16] [--tokens 64] [--rounds 2]
        [--no-vllm]

Every workload decodes the same chat prompts (`common.prompts`, SmolLM2's chat template), exactly `--tokens` greedy
tokens each (ignore_eos), float32, `--threads` torch threads:

  generate   transformers `generate`, static batches of `--concurrency` prompts (left padding): the ceiling
  engine     `HFEngine` in this process, `--concurrency` requests in flight (no HTTP): the engine's own speed
  served     `functok serve` (the transformers engine) on loopback, `--concurrency` streaming chat requests in flight
             through the official `openai` client: what `make serve` users get
  vllm       `functok serve --engine vllm` (vLLM compiled, the steering extension), the same client and requests
  stock      stock `vllm serve` of the same model (float32, same batch size), the same client and requests

All servers start before the first round and stay up (an idle server takes no CPU). Rounds interleave the workloads
(generate, engine, served, vllm, stock, generate, ...) so that a change of the machine's load hits
all of them; each ratio is taken within a round and the table gives the median over rounds. Writes
benchmarks/results/bench_embedded.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

from functok_vllm.launch import functok_serve, start  # noqa: E402

VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}


def chats(tok, n: int) -> list[str]:
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts(n)
    ]


def static_generate(model, tok, texts: list[str], a) -> float:
    """Output tokens/s of transformers `generate` over static batches of `--concurrency` prompts."""
    import torch

    gen = dict(max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for i in range(0, len(texts), a.concurrency):
            model.generate(**tok(texts[i : i + a.concurrency], return_tensors="pt", padding=True), **gen)
    return len(texts) * a.tokens / (time.perf_counter() - t0)


async def in_process(engine, ids: list[list[int]], a) -> float:
    """Output tokens/s of the engine itself, `--concurrency` requests in flight."""
    from functok_vllm.engines.base import GenerateRequest, SamplingParams

    sem = asyncio.Semaphore(a.concurrency)

    async def one(p: list[int]) -> int:
        async with sem:
            req = GenerateRequest(uuid.uuid4().hex, p, SamplingParams(0, max_tokens=a.tokens, ignore_eos=True))
            return sum([len(d.token_ids) async for d in engine.generate(req)])

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(p) for p in ids)))
    return n / (time.perf_counter() - t0)


async def served(url: str, model_name: str, a) -> float:
    """Output tokens/s over HTTP: streaming chat completions through the `openai` client."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    sem = asyncio.Semaphore(a.concurrency)

    async def one(text: str) -> int:
        async with sem:
            stream = await client.chat.completions.create(
                model=model_name,
                messages=[{"role": "user", "content": text}],
                max_tokens=a.tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            used = 0
            async for chunk in stream:
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            return used

    t0 = time.perf_counter()
    async with client:  # closed inside this event loop (each workload runs its own `asyncio.run`)
        n = sum(await asyncio.gather(*(one(t) for t in prompts(a.prompts))))
    return n / (time.perf_counter() - t0)


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
    from functok_vllm.smollm2 import derive

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-vllm", dest="vllm", action="store_false", help="leave out the two vLLM servers")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = derive()
    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = chats(tok, a.prompts)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    engine = HFEngine(HFEngineConfig(model=model_dir, max_running=a.concurrency, threads=a.threads))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    tmp = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    n = str(a.concurrency)
    commands = {"served": functok_serve("--model", str(model_dir), "--max-running", n, "--threads", str(a.threads))}
    if a.vllm:
        common = ["--max-model-len", "1024"]
        commands["vllm"] = functok_serve("--model", str(model_dir), "--engine", "vllm", "--max-running", n, *common)
        stock = ["--dtype", "float32", "--max-num-seqs", n, *common]
        commands["stock"] = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), *stock]
    names = {"served": model_dir.name, "vllm": model_dir.name, "stock": str(model_dir)}
    servers = {}
    rows: list[dict] = []
    try:
        for k, cmd in commands.items():
            print(f"starting {k}", flush=True)
            servers[k] = start(cmd, tmp / f"{k}.log", os.environ | VLLM_ENV, timeout_s=900)
        warm = argparse.Namespace(**{**vars(a), "prompts": 2, "tokens": 4})
        static_generate(model, tok, texts[:2], warm)
        loop.run_until_complete(in_process(engine, ids[:2], warm))
        for k, srv in servers.items():
            asyncio.run(served(srv.url, names[k], warm))
        for r in range(a.rounds):
            row = {"generate": static_generate(model, tok, texts, a)}
            row["engine"] = loop.run_until_complete(in_process(engine, ids, a))
            for k, srv in servers.items():
                row[k] = asyncio.run(served(srv.url, names[k], a))
            rows.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in row.items()), flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
        loop.run_until_complete(engine.shutdown())
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    ratio = {f"{k}/generate": statistics.median(row[k] / row["generate"] for row in rows) for k in rows[0]}
    ratio.pop("generate/generate")
    path = write_result("bench_embedded", {"config": vars(a), "rounds": rows, "median": med, "ratios": ratio})
    print(f"wrote {path}")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} tok/s |")
    for k, v in ratio.items():
        print(f"| {k} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
