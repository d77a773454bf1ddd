"""The vLLM worker's SAE memory for capture: a steering engine (whole SAEs in the model's dtype) against the
capture-only engine `functok analyze coverage --engine vllm` starts (encoders only, in `--sae-dtype`).

A random JumpReLU SAE of `--width` features on functok-tiny's layer 1 (`bench_capture_scale.random_sae`) is saved in
a temporary directory; for each setting one engine is started on the demo model in float32 (as the analysis starts
it), and two things are read: the bytes of the SAE tensors the worker holds (`functok_sae_bytes`, counted on the
worker, each storage once) and the resident memory of the largest child process, vLLM's worker, which holds the model
and the SAEs (psutil, after start-up; it includes the model, vLLM's KV cache and the libraries, the same in each).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_vllm_capture_memory.py [--width 262144]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.bench_capture_scale import random_sae, residuals
from functok_vllm.paths import DEMO_MODEL, shipped_function_tokens

OUT = Path(__file__).parent / "results" / "bench_vllm_capture_memory.json"
SETTINGS = [  # (name, additional_config.functok beyond saes and function_tokens)
    ("steering engine (whole SAE, model dtype float32)", {}),
    ("capture-only, float32 encoder", {"capture_only": True, "sae_dtype": "float32"}),
    ("capture-only, bfloat16 encoder", {"capture_only": True, "sae_dtype": "bfloat16"}),
]


def engine_rss() -> int:
    """Resident bytes of the largest child process (vLLM's worker: the model, the SAEs, the KV cache)."""
    return max(c.memory_info().rss for c in psutil.Process().children(recursive=True))


def measure(sae_dir: Path, extra: dict) -> dict:
    from functok_vllm.analysis.vllm_model import VLLMAnalysisModel

    fts = shipped_function_tokens(DEMO_MODEL)
    raw = {"saes": [str(sae_dir)], "function_tokens": str(fts)} | extra
    t0 = time.perf_counter()
    am = VLLMAnalysisModel(DEMO_MODEL, [sae_dir], fts, engine_args={"additional_config": {"functok": raw}})
    try:
        return {"sae_bytes": am.sae_bytes(), "engine_rss": engine_rss(), "start_s": time.perf_counter() - t0}
    finally:
        am.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=262144, help="d_sae of the planted SAE")
    args = ap.parse_args()
    _, h = residuals(2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="functok-bench-") as tmp:
        sae_dir = Path(tmp) / "wide"
        random_sae(args.width, h, 100.0).save(sae_dir)
        for name, extra in SETTINGS:
            rows.append({"setting": name, "d_sae": args.width, "d_in": h.shape[1], **measure(sae_dir, extra)})
            print(json.dumps(rows[-1]))
    base = rows[0]
    print(f"\n| setting (d_sae {args.width}, d_in {h.shape[1]}) | SAE bytes on the worker | engine-core RSS |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['sae_bytes'] / 1e6:.1f} MB ({r['sae_bytes'] / base['sae_bytes']:.2f}x) "
            f"| {r['engine_rss'] / 1e6:.0f} MB ({(r['engine_rss'] - base['engine_rss']) / 1e6:+.0f} MB) |"
        )
    OUT.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
