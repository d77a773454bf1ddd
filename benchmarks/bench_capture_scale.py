"""Coverage capture at growing SAE widths on the CPU: peak memory and time measured beside `--plan`'s prediction.

For each width (default 16k, 65k, 262k) a random JumpReLU SAE on functok-tiny's residual stream (d_in 256, layer 1)
is saved in the SAELens format in a temporary directory, its threshold set so that `--l0` features fire per token on
average (the plan's L0 assumption then holds by construction). A child process per width loads the model and the
SAE encoder-only (as `functok analyze coverage` does), resets its peak RSS (`/proc/self/clear_refs`), runs the
capture (`coverage.build_graphs`) over `--tokens` held-out tokens, and reports the capture's time and its peak RSS
above the RSS it started from (what the capture itself held: chunks, counts, edges, windows, the forward). The plan
(`analysis/plan.py`, the same inputs) is printed beside it: the capture rows' memory (an upper bound on the edges:
every firing a new edge, 3x while a merge sorts) and time. `--agreement` instead measures how closely the shipped
SAEs' firing sets in bfloat16 and float16 agree with float32 on held-out text (what `--sae-dtype` trades).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_capture_scale.py [--widths 16384 65536 262144] [--tokens 8192]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_capture_scale.py --agreement [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from functok_vllm.paths import DEMO_MODEL, shipped_function_tokens, shipped_saes

LAYER = 1
SEQ, BATCH = 256, 8
CHUNK_MB = 512  # below the 2 GiB default: the machine is shared; it also makes the 262k run take 2 chunks a batch


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def residuals(n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (tokens,), output of decoder layer LAYER (tokens, d_model)) of held-out text on functok-tiny."""
    from functok_vllm.analysis.data import token_stream
    from functok_vllm.engines.hf.hooks import load_model

    model, tok = load_model(DEMO_MODEL)
    ids = token_stream(lambda t: tok(t, add_special_tokens=False)["input_ids"], -1, None, n_tokens)
    ids = ids[: len(ids) // SEQ * SEQ]
    with torch.no_grad():
        hs = model(input_ids=ids.view(-1, SEQ), output_hidden_states=True).hidden_states[LAYER + 1]
    return ids, hs.reshape(len(ids), -1)


def random_sae(d_sae: int, h: torch.Tensor, l0: float, seed: int = 0):
    """A JumpReLU SAE (d_in = h's width) with random unit encoder columns and one threshold under which `l0`
    features fire per token of h on average."""
    from functok_vllm.core import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    d_in = h.shape[1]
    w = torch.randn(d_in, d_sae, generator=g)
    w /= w.norm(dim=0, keepdim=True)
    b_dec = h.mean(0)
    pre = (h[:256] - b_dec) @ w  # (256, d_sae)
    sample = pre.flatten()[torch.randint(0, pre.numel(), (1 << 22,), generator=g)]
    thr = float(sample.kthvalue(int((1 - l0 / d_sae) * len(sample))).values)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=f"blocks.{LAYER}.hook_resid_post")
    tensors = {"W_enc": w, "b_enc": torch.zeros(d_sae), "W_dec": w.t().contiguous(), "b_dec": b_dec}
    return SAE(cfg, tensors | {"threshold": torch.full((d_sae,), thr)})


def child(sae_dir: str, tokens: int) -> dict:
    """One capture in this process: load (encoders only), reset the peak RSS, capture, report."""
    from functok_vllm.analysis import coverage
    from functok_vllm.analysis.data import token_stream
    from functok_vllm.analysis.model import load_hf

    torch.set_num_threads(2)
    am = load_hf(DEMO_MODEL, sae_dir, shipped_function_tokens(DEMO_MODEL), None, True, torch.float32, CHUNK_MB << 20)
    stream = token_stream(am.encode, am.eos_id, None, tokens)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    t0 = time.perf_counter()
    (g,) = coverage.build_graphs(am, stream, coverage.CoverageConfig(seq_len=SEQ, batch_size=BATCH), False).values()
    seconds = time.perf_counter() - t0
    firings = int(g.feature_count.sum())
    return {
        "seconds": seconds,
        "rss_start": base,
        "capture_peak": status("VmHWM") - base,
        "edges": g.n_edges,
        "positions": int(g.token_count.sum()),
        "l0": firings / max(1, int(g.token_count.sum())),
    }


def planned(d_sae: int, tokens: int, l0: float) -> dict:
    from functok_vllm.analysis.plan import PlanInput, make_plan, model_shape

    p = PlanInput(model_shape(DEMO_MODEL), {LAYER: (256, d_sae, "jumprelu")}, tokens, SEQ, BATCH,
                  chunk_bytes=CHUNK_MB << 20, l0=l0)  # fmt: skip
    rows = [r for r in make_plan(p).rows if r[0].startswith(("capture", "one forward", "model"))]
    cap = [r for r in rows if r[0].startswith("capture")][0]
    return {
        "rows_per_chunk": int(cap[0].split("chunks of ")[1].split()[0]),
        "working_bytes": sum(r[1] + r[2] for r in rows if not r[0].startswith("model")),
        "seconds": sum(r[3] for r in rows),
        "edge_bound": int(tokens * l0),
    }


def sweep(widths: list[int], tokens: int, l0: float) -> list[dict]:
    from tqdm import tqdm

    _, h = residuals(4096)
    out = []
    with tempfile.TemporaryDirectory(prefix="functok-bench-") as tmp:
        for d_sae in tqdm(widths, desc="widths"):
            sae_dir = Path(tmp) / f"w{d_sae}"
            random_sae(d_sae, h, l0).save(sae_dir)
            cmd = [sys.executable, __file__, "--child", str(sae_dir), "--tokens", str(tokens)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            out.append({"d_sae": d_sae, "measured": res, "plan": planned(d_sae, tokens, l0)})
    return out


def agreement(tokens: int) -> list[dict]:
    """Per shipped SAE of functok-tiny: Jaccard of the (position, feature) firing sets of a lower dtype with float32,
    and the share of float32's firings it misses and adds, over held-out tokens."""
    from functok_vllm.core.sae import load_saes

    ids, _ = residuals(tokens)
    from functok_vllm.engines.hf.hooks import load_model

    model, _ = load_model(DEMO_MODEL)
    with torch.no_grad():
        hs = model(input_ids=ids.view(-1, SEQ), output_hidden_states=True).hidden_states
    rows = []
    for layer, sae in load_saes([shipped_saes(DEMO_MODEL)], decoder=False).items():
        h = hs[layer + 1].reshape(len(ids), -1)
        ref = sae.active(h)  # (tokens, d_sae) float32
        for dtype in (torch.bfloat16, torch.float16):
            low = sae.to(dtype=dtype).active(h.to(dtype))
            both, either = int((ref & low).sum()), int((ref | low).sum())
            rows.append({
                "layer": layer, "dtype": str(dtype).removeprefix("torch."), "tokens": len(ids),
                "firings_f32": int(ref.sum()), "jaccard": both / either,
                "missed": int((ref & ~low).sum()) / int(ref.sum()), "added": int((low & ~ref).sum()) / int(ref.sum()),
            })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--l0", type=float, default=64.0, help="planted features firing per token")
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, write_result

    torch.set_num_threads(2)
    if args.agreement:
        rows = agreement(args.tokens)
        for r in rows:
            print(f"L{r['layer']} {r['dtype']:9} jaccard {r['jaccard']:.5f}  missed {r['missed']:.2e}  "
                  f"added {r['added']:.2e} of {r['firings_f32']} float32 firings, {r['tokens']} tokens")  # fmt: skip
        write_result("bench_capture_agreement", {"rows": rows, "machine": machine()})
        return
    rows = sweep(args.widths, args.tokens, args.l0)
    print(f"{'d_sae':>7} {'rows/chunk':>10} {'plan MB':>8} {'meas. MB':>8} {'plan s':>7} {'meas. s':>7} "
          f"{'edges':>8} {'bound':>8} {'L0':>5}")  # fmt: skip
    for r in rows:
        p, m = r["plan"], r["measured"]
        print(f"{r['d_sae']:>7} {p['rows_per_chunk']:>10} {p['working_bytes'] / 1e6:>8.0f} "
              f"{m['capture_peak'] / 1e6:>8.0f} {p['seconds']:>7.1f} {m['seconds']:>7.1f} {m['edges']:>8} "
              f"{p['edge_bound']:>8} {m['l0']:>5.1f}")  # fmt: skip
    write_result(
        "bench_capture_scale", {"tokens": args.tokens, "chunk_mb": CHUNK_MB, "rows": rows, "machine": machine()}
    )


if __name__ == "__main__":
    main()
