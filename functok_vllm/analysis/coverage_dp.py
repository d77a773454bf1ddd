"""Data-parallel coverage: the corpus windows cut into N consecutive shards, one engine process each, graphs merged.

`functok analyze coverage --data-parallel-size N` tokenizes the corpus once, here, and writes the token stream to a
scratch directory; it then starts N children (`python -m functok_vllm.analysis.coverage_dp JOB.json`), each running
its own engine (transformers or vLLM, as `--engine` says) over its shard of the windows:

  on GPUs   (vLLM) shard i sees devices [i * tp, (i + 1) * tp) of this process's visible ones (its
            CUDA_VISIBLE_DEVICES), tp being `--tensor-parallel-size`: N x tp GPUs in all
  on a CPU  (either engine) shard i is pinned to its share of this process's cores (sched_setaffinity), vLLM's
            ranks bound within it (VLLM_CPU_OMP_THREADS_BIND), the transformers engine given a thread per core

A child captures `coverage.build_graphs` over its slice of the stream and writes each layer's `EdgeBits.state()`;
this process merges them (`EdgeBits.merge`: counts add, edge sets unite, window records in shard order). Windows are
whole in one shard and each window's edges depend on that window alone (sinks are judged within their window), so
the merged graph is the one a single process builds over the same windows: the same counts, edges and records.
Memory: every child holds the whole model (or its tensor-parallel share) and the SAE encoders; edges go to the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from functok_vllm.core.capture import EdgeBits
from functok_vllm.errors import CLIError

STREAM = "stream.safetensors"


def shard_bounds(n_windows: int, shards: int) -> list[int]:
    """Window indices where shards start, and the end: shards + 1 ascending numbers from 0 to n_windows, consecutive
    shards differing in size by at most one window. CLIError when there are fewer windows than shards."""
    if n_windows < shards:
        raise CLIError(f"--data-parallel-size {shards} needs at least {shards} windows; the corpus gives {n_windows}")
    return [i * n_windows // shards for i in range(shards + 1)]


def shard_stream(stream: torch.Tensor, seq_len: int, shards: int, i: int) -> torch.Tensor:
    """Shard i's slice of the token stream (tokens,): its whole windows of seq_len; the last shard also takes the
    shorter tail window, as `data.sequences` makes it the last."""
    b = shard_bounds(len(stream) // seq_len, shards)
    end = b[i + 1] * seq_len if i + 1 < shards else len(stream)
    return stream[b[i] * seq_len : end]


def placements(shards: int, per_shard: int, gpus: bool) -> list[dict]:
    """What pins each shard: with `gpus`, {"cuda": "2,3"} (its CUDA_VISIBLE_DEVICES), else {"cores": [..]} (its share
    of this process's cores). `per_shard`: GPUs (or at least cores) one shard needs."""
    if gpus:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = seen.split(",") if seen else [str(d) for d in range(torch.cuda.device_count())]
        if len(devices) < shards * per_shard:
            raise CLIError(f"{shards} shards x {per_shard} GPUs need {shards * per_shard} GPUs; {len(devices)} visible")
        return [{"cuda": ",".join(devices[i * per_shard : (i + 1) * per_shard])} for i in range(shards)]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < shards * per_shard:
        need = shards * per_shard
        raise CLIError(f"{shards} shards x {per_shard} ranks need {need} cores; this process has {len(cores)}")
    per = len(cores) // shards
    return [{"cores": cores[i * per : (i + 1) * per]} for i in range(shards)]


def open_tokenizer(args: Namespace):
    """(tokenizer + function-token mask, SAE layers) for this process, which runs no engine: it tokenizes the corpus
    and summarizes the merged graphs. Inputs are checked as the engines check them, before any child starts."""
    from transformers import AutoConfig, AutoTokenizer

    from functok_vllm.analysis.model import check_model_dir, function_token_mask, load_function_tokens, sae_configs
    from functok_vllm.analysis.vllm_model import TokenizerOnly, require_vllm
    from functok_vllm.offline import go_offline

    if args.engine == "vllm":
        require_vllm()
    go_offline()
    model_dir = check_model_dir(args.model)
    fts = load_function_tokens(args.function_tokens)
    layers = list(sae_configs(args.saes, args.layers))
    mc = AutoConfig.from_pretrained(str(model_dir))
    max_len = int(mc.max_position_embeddings) - (args.engine == "vllm")  # vLLM: room for its one sampled token
    if args.seq_len > max_len:
        raise CLIError(f"--seq-len {args.seq_len} is longer than the model's context ({max_len} tokens)")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return TokenizerOnly(tok, function_token_mask(fts, mc.vocab_size)), layers


def build_graphs(args: Namespace, layers: list[int], stream: torch.Tensor, seq_len: int) -> dict[int, EdgeBits]:
    """{layer: EdgeBits} over the stream's windows, captured by `args.data_parallel_size` engine processes, merged."""
    n = args.data_parallel_size
    shard_bounds(len(stream) // seq_len, n)  # refuse before starting anything
    vllm = args.engine == "vllm"  # the transformers analysis engine runs on the CPU
    where = placements(n, args.tensor_parallel_size if vllm else 1, vllm and torch.cuda.is_available())
    scratch = Path(tempfile.mkdtemp(prefix="functok-dp-"))
    procs: list[subprocess.Popen] = []
    try:
        save_file({"stream": stream.contiguous()}, str(scratch / STREAM))
        plain = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        for i, place in enumerate(where):
            job = {"args": plain | {"layers": layers}, "shard": i, "shards": n, "scratch": str(scratch), **place}
            (scratch / f"job_{i}.json").write_text(json.dumps(job))
            env = {**os.environ}
            if "cuda" in place:
                env["CUDA_VISIBLE_DEVICES"] = place["cuda"]
            cmd = [sys.executable, "-m", "functok_vllm.analysis.coverage_dp", str(scratch / f"job_{i}.json")]
            procs.append(subprocess.Popen(cmd, env=env))
        while any(p.poll() is None for p in procs):  # the first failure ends the run (`finally` stops the rest)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            time.sleep(0.5)
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed:
            i, rc = failed[0]
            raise CLIError(f"coverage shard {i} of {n} failed (exit code {rc}); its messages are above")
        parts = [
            {
                layer: EdgeBits.from_state(load_file(str(scratch / f"shard_{i}" / f"layer_{layer}.safetensors")))
                for layer in layers
            }
            for i in range(n)
        ]
        return {layer: EdgeBits.merge([p[layer] for p in parts]) for layer in layers}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def run_shard(job: dict) -> None:
    """A child: pin itself, open its engine, capture its windows, write SCRATCH/shard_i/layer_L.safetensors."""
    from functok_vllm.analysis import coverage

    args, i, n = Namespace(**job["args"]), job["shard"], job["shards"]
    cores = job.get("cores")
    if cores is not None:
        os.sched_setaffinity(0, cores)
        args.threads = len(cores)
        if args.engine == "vllm":
            from functok_vllm.engines.vllm.settings import cpu_binding

            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(cores, args.tensor_parallel_size)
    torch.set_num_threads(args.threads)
    stream = shard_stream(load_file(str(Path(job["scratch"]) / STREAM))["stream"], args.seq_len, n, i)
    cfg = coverage.config_from_args(args)
    am = coverage.open_engine(args, list(args.layers))
    try:
        graphs = coverage.build_graphs(am, stream, cfg, progress=True)
    finally:
        if hasattr(am, "close"):
            am.close()
    out = Path(job["scratch"]) / f"shard_{i}"
    out.mkdir()
    for layer, g in graphs.items():
        save_file(g.state(), str(out / f"layer_{layer}.safetensors"))


if __name__ == "__main__":
    try:
        run_shard(json.loads(Path(sys.argv[1]).read_text()))
    except CLIError as e:
        print(f"functok analyze coverage (shard): error: {e}", file=sys.stderr)
        sys.exit(2)
