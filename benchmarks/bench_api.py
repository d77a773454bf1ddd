"""What the generation API's extras cost: throughput with logprobs, prompt scoring and features on vs off, per engine.

One child process per engine holds the engine (in-process: HFEngine, or VLLMEngine compiled) and runs, in turn,
`--requests` concurrent greedy requests of exactly `--tokens` tokens each:

  plain                no extras
  logprobs             logprobs with the top 5 alternatives for every generated token
  prompt logprobs      the same for every prompt token too (what echo + logprobs asks)
  features             the top 8 SAE features at one layer (2) for every generated token, handed over at the end
  features streamed    the same, handed over with every delta (vLLM: one collective_rpc per delta, shared)
  readout 8            a `readout` of 8 chosen SAE features at layer 2 for every generated token, at the end
  readout 8 before     the same read before the request's edits (`edits: "before"`; these requests have none)
  capture 1 layer      the residual at layer 2 at every position (prompt and generated), float16 safetensors at the
                       end; the child also reports the bytes of the answers per position captured

After a warm-up pass the workloads run `--repeats` times interleaved, so a busy spell on a shared machine hits each
alike; the table shows generated tokens per second of the median run and, as the ratio, the median over repeats of
each repeat's time of `plain` over its time of the workload (paired: the two ran seconds apart). `--baseline DIR`
also runs `plain` on the source tree DIR (e.g. `git archive` of the commit before the API), in processes alternating
with this tree's (the baseline first in odd rounds, second in even ones), to measure what a request without extras
pays for them existing; that ratio pairs round with round.
Writes benchmarks/results/bench_api-*.json. `--op` instead times the vLLM worker's feature readout op with no
request asking (what every forward pays at every SAE layer): microseconds per call.

    .venv/bin/python benchmarks/bench_api.py [--engines hf,vllm] [--requests 16] [--tokens 64] [--repeats 5]
        [--baseline DIR] [--rounds 2] [--workloads features,readout 8]
    .venv/bin/python benchmarks/bench_api.py --op
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prompts, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "logprobs", "prompt logprobs", "features", "features streamed", "readout 8", "readout 8 before")
MODES += ("capture 1 layer",)
BYTES = "capture bytes per position"  # not a workload: what `capture 1 layer` answered, per position captured
READ_FEATURES = tuple(range(5, 2048, 256))  # 8 features of the layer-2 SAE, spread over its width


def extras(mode: str) -> dict:
    """GenerateRequest keywords of a workload (none for plain, which a baseline tree without them runs too)."""
    if mode.startswith("readout 8"):
        from functok_vllm.core.readout import Probe
        from functok_vllm.readout_request import ReadoutRequest

        probes = tuple(Probe(2, f, before=mode.endswith("before")) for f in READ_FEATURES)
        return {"readout": ReadoutRequest(probes, tuple({} for _ in probes), prompt=False)}
    if mode == "capture 1 layer":
        from functok_vllm.activation_capture import CaptureRequest

        return {"capture": CaptureRequest((2,), "all", "float16")}
    if mode.startswith("features"):
        from functok_vllm.feature_request import FeatureRequest

        return {"features": FeatureRequest((2,), 8), "stream": mode == "features streamed"}
    return {"plain": {}, "logprobs": {"logprobs": 5}, "prompt logprobs": {"logprobs": 5, "prompt_logprobs": 5}}[mode]


def child(engine: str, modes: list[str], args) -> dict:
    """Runs in a subprocess (its own PYTHONPATH): seconds per run of each mode."""
    import torch

    from functok_vllm.activation_capture import read_capture
    from functok_vllm.engines.base import GenerateRequest, SamplingParams
    from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES

    torch.set_num_threads(2)
    saes = sorted(DEMO_SAES.glob("layer_*"))
    if engine == "hf":
        from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig

        eng = HFEngine(HFEngineConfig(DEMO_MODEL, saes, DEMO_FUNCTION_TOKENS, max_running=args.requests))
    else:
        from functok_vllm.engines.vllm.engine import VLLMEngine, VLLMEngineConfig
        from functok_vllm.engines.vllm.settings import cpu_defaults

        cpu_defaults()
        cfg = VLLMEngineConfig(DEMO_MODEL, saes, DEMO_FUNCTION_TOKENS, max_model_len=256, max_running=args.requests)
        cfg.engine_args = {"enable_prefix_caching": False}  # every run prefills
        eng = VLLMEngine(cfg)
    ps = prompts(args.requests)
    params = SamplingParams(0, max_tokens=args.tokens, ignore_eos=True)
    n = 0
    captured = [0, 0]  # bytes of capture answers, positions they hold

    async def one(ids, mode):
        nonlocal n
        n += 1
        got = 0
        async for d in eng.generate(GenerateRequest(f"b{n}", ids, params, None, **extras(mode))):
            got += len(d.token_ids)
            if d.capture is not None:
                captured[0] += len(d.capture)
                captured[1] += len(read_capture(d.capture)["positions"])
        assert got == args.tokens, got

    async def run(mode) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(ids, mode) for ids in encoded))
        return time.perf_counter() - t0

    async def main():
        await eng.start()
        try:
            for mode in modes:  # warm-up
                await run(mode)
            out = {m: [] for m in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    out[mode].append(await run(mode))
            if captured[1]:
                out[BYTES] = [captured[0] / captured[1]]  # a list, as the timings: runs append
            return out
        finally:
            await eng.shutdown()

    encoded = [eng.encode(p) for p in ps]
    return asyncio.run(main())


def op_cost(calls: int = 20000, repeats: int = 5) -> list[float]:
    """Microseconds per call of `functok::read_features` on (32, 256) tensors while no request asks."""
    import torch

    from functok_vllm.engines.vllm.feature_op import READOUT_KEY, FeatureReadout

    torch.set_num_threads(2)
    FeatureReadout({}, "cpu")  # the worker's readout, with no plan
    h, r, marker = torch.randn(32, 256), torch.randn(32, 256), torch.zeros(1)
    op = torch.ops.functok.read_features
    for _ in range(calls // 10):
        op(h, h, r, marker, 2, READOUT_KEY)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            op(h, h, r, marker, 2, READOUT_KEY)
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def spawn(engine: str, modes: list[str], args, tree: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--child", engine, "--modes", ",".join(modes)]
    cmd += ["--requests", str(args.requests), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"child {engine} ({tree}) failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def paired(base: list[float], other: list[float]) -> float:
    """Median over pairs of base time / other time: the throughput ratio of `other` to `base`."""
    return statistics.median(b / o for b, o in zip(base, other, strict=True))


def table(results: dict, args) -> str:
    tokens = args.requests * args.tokens
    lines = ["| engine | workload | median tok/s | vs plain, paired median |", "|---|---|---:|---:|"]
    for engine, runs in results.items():
        per_mode = runs["this tree"]
        for mode, secs in per_mode.items():
            if mode == BYTES:
                lines.append(f"| {engine} | {BYTES} (blob with its header) | {statistics.median(secs):,.1f} | |")
                continue
            tps = tokens / statistics.median(secs)
            lines.append(f"| {engine} | {mode} | {tps:,.0f} | {paired(per_mode['plain'], secs):.3f} |")
        if "baseline" in runs:
            secs = runs["baseline"]["plain"]
            ratio = paired(per_mode["plain"], secs) if len(secs) == len(per_mode["plain"]) else float("nan")
            lines.append(f"| {engine} | plain, baseline tree | {tokens / statistics.median(secs):,.0f} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--workloads", default=None, help="comma-separated workloads to run (default: all); plain always")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, default=None, help="a source tree to run `plain` on as well")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of this tree and the baseline")
    ap.add_argument("--op", action="store_true", help="time the vLLM readout op with no request asking, then exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--modes", default=",".join(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.op:
        us = op_cost()
        print("functok::read_features, no plan: " + ", ".join(f"{x:.1f}" for x in us) + " us per call")
        write_result("bench_api-op", {"us_per_call": us}, True)
        return
    if args.child:
        print(json.dumps(child(args.child, args.modes.split(","), args)))
        return
    results: dict = {}
    for engine in args.engines.split(","):
        modes = [m for m in MODES if engine == "vllm" or m != "features streamed"]  # the same thing on hf
        if args.workloads:
            modes = ["plain", *(m for m in modes if m != "plain" and m in args.workloads.split(","))]
        runs = results.setdefault(engine, {})
        for r in range(args.rounds):
            order = ["baseline", "this tree"] if r % 2 == 0 else ["this tree", "baseline"]
            for tree in order if args.baseline is not None else ["this tree"]:
                if tree == "baseline":
                    got = spawn(engine, ["plain"], args, args.baseline)
                else:
                    got = spawn(engine, modes, args, ROOT)
                mine = runs.setdefault(tree, {})
                for m in got:
                    mine.setdefault(m, []).extend(got[m])
    print(table(results, args))
    path = write_result("bench_api", {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": results}, True)
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
