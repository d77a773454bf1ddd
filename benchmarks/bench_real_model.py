"""Serving SmolLM2-135M-Instruct on CPU: both engines unsteered and steered, K distinct specs, against stock vLLM and
plain transformers `generate`, in one run on one machine (so the ratios compare like with like).

    .venv/bin/python benchmarks/bench_real_model.py [--prompts 32] [--concurrency 16] [--tokens 64]

One after the other, each server alone on the machine (a free loopback port, stopped before the next starts):

  hf       `functok serve --engine hf` (the transformers engine, dynamic batching)
  vllm     `functok serve --engine vllm` (vLLM 0.32 compiled, with the steering worker extension)
  stock    `vllm serve` without the plugin's extension (same dtype, context and batch size)

Load: vLLM's own client, `vllm bench serve --backend openai-chat`, `--prompts` random prompts of `--input-len` tokens,
exactly `--tokens` output tokens each (ignore_eos), `--concurrency` requests in flight; `steered` adds one `add` edit
at the middle SAE's layer on every function token (`--extra-body`). K distinct specs (one spec per request,
round-robin, K of them in flight) use a small asyncio client of the official `openai` package, since `vllm bench`
sends one body to all. Baselines in this process: transformers `generate` greedy, one prompt at a time and in static
batches of `--concurrency` (left padding). Output tokens per second everywhere. Writes
benchmarks/results/bench_real_model.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

from functok_vllm.launch import functok_serve, start  # noqa: E402
from functok_vllm.paths import shipped_saes  # noqa: E402

VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}


def steer_spec(layer: int, feature: int) -> dict:
    return {"edits": [{"layer": layer, "feature": feature, "strength": 8.0}], "positions": "function"}


def vllm_bench(url: str, model_name: str, tokenizer: str, a, extra: dict | None, out: Path) -> dict:
    """One `vllm bench serve` run; its result JSON (output_throughput, latencies...)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat"]
    cmd += ["--endpoint", "/v1/chat/completions", "--base-url", url, "--model", model_name, "--tokenizer", tokenizer]
    cmd += ["--dataset-name", "random", "--random-input-len", str(a.input_len), "--random-output-len", str(a.tokens)]
    cmd += ["--num-prompts", str(a.prompts), "--max-concurrency", str(a.concurrency), "--ignore-eos", "--seed", "0"]
    cmd += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name, "--disable-tqdm"]
    if extra:
        cmd += ["--extra-body", json.dumps(extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | VLLM_ENV, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    if res.get("completed") != a.prompts:
        raise RuntimeError(f"vllm bench serve: {res.get('completed')} of {a.prompts} requests completed")
    return {k: res[k] for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "completed", "duration")}


async def k_specs(url: str, model_name: str, a, specs: list[dict]) -> float:
    """Output tokens/s of `--prompts` chat requests, `--concurrency` in flight, request i steered by specs[i % K]."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    sem = asyncio.Semaphore(a.concurrency)
    texts = prompts(a.prompts)

    async def one(i: int) -> int:
        async with sem:
            r = await client.chat.completions.create(
                model=model_name,
                messages=[{"role": "user", "content": texts[i]}],
                max_tokens=a.tokens,
                temperature=0,
                extra_body={"ignore_eos": True, "steering": specs[i % len(specs)]},
            )
            return r.usage.completion_tokens

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(a.prompts)))
    return sum(done) / (time.perf_counter() - t0)


def generate_baselines(model_dir: Path, a) -> dict:
    """Transformers `generate` (greedy, exactly --tokens new tokens): one prompt at a time, and static batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts(a.prompts)
    ]
    gen = dict(max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    out = {}
    with torch.inference_mode():
        model.generate(**tok(chats[:2], return_tensors="pt", padding=True), **gen)  # warm-up
        t0 = time.perf_counter()
        for c in chats[: max(4, a.prompts // 4)]:  # a quarter of the prompts: one at a time is slow
            model.generate(**tok([c], return_tensors="pt"), **gen)
        out["generate_one_by_one"] = max(4, a.prompts // 4) * a.tokens / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, a.prompts, a.concurrency):
            model.generate(**tok(chats[i : i + a.concurrency], return_tensors="pt", padding=True), **gen)
        out["generate_batched"] = a.prompts * a.tokens / (time.perf_counter() - t0)
    return out


def main() -> int:
    from functok_vllm.core.sae import load_saes
    from functok_vllm.smollm2 import derive

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--input-len", type=int, default=64, help="random prompt tokens per request (vllm bench)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--servers", default="hf,vllm,stock")
    a = ap.parse_args()
    model_dir = derive()
    saes = load_saes([shipped_saes(model_dir)], weights=False)
    mid = sorted(saes)[len(saes) // 2]
    one = steer_spec(mid, 100)
    many = {k: [steer_spec(mid, 100 + 37 * i) for i in range(k)] for k in (4, 16)}
    name = model_dir.name
    results: dict = {"config": vars(a), "model": name, "steered_spec": one}
    tmp = Path(tempfile.mkdtemp(prefix="bench-real-"))
    common = ["--model", str(model_dir), "--max-model-len", "1024", "--max-running", str(a.concurrency)]
    stock_args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(a.concurrency)]
    commands = {
        "hf": functok_serve(*common, "--engine", "hf", "--threads", str(a.threads)),
        "vllm": functok_serve(*common, "--engine", "vllm"),
        "stock": [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir), *stock_args],
    }
    for server in a.servers.split(","):
        print(f"[{server}] starting", flush=True)
        srv = start(commands[server], tmp / f"{server}.log", os.environ | VLLM_ENV, timeout_s=900)
        try:
            served = name if server != "stock" else str(model_dir)
            row = {}
            vllm_bench(
                srv.url, served, str(model_dir), argparse.Namespace(**{**vars(a), "prompts": 4}), None, tmp / "w"
            )
            row["unsteered"] = vllm_bench(srv.url, served, str(model_dir), a, None, tmp / f"{server}-u.json")
            if server != "stock":
                row["steered"] = vllm_bench(srv.url, served, str(model_dir), a, {"steering": one}, tmp / f"{server}-s")
                for k, specs in many.items():
                    row[f"K={k}"] = asyncio.run(k_specs(srv.url, served, a, specs))
            results[server] = row
            print(f"[{server}] {json.dumps(row)}", flush=True)
        finally:
            srv.stop()
    results["transformers"] = generate_baselines(model_dir, a)
    path = write_result("bench_real_model", results)
    print(f"wrote {path}")
    print(table(results))
    return 0


def table(r: dict) -> str:
    base = r.get("hf", {}).get("unsteered", {}).get("output_throughput")
    rows = ["| run | output tokens/s | vs hf unsteered |", "|---|---:|---:|"]
    for server in ("hf", "vllm", "stock"):
        for mix, v in r.get(server, {}).items():
            tps = v["output_throughput"] if isinstance(v, dict) else v
            rows.append(
                f"| {server} {mix} | {tps:.1f} | {tps / base:.2f}x |" if base else f"| {server} {mix} | {tps:.1f} |"
            )
    for k, tps in r.get("transformers", {}).items():
        rows.append(f"| transformers {k} | {tps:.1f} | {tps / base:.2f}x |" if base else f"| {k} | {tps:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
