"""GPU check of the steer op: correct under CUDA-graph replay with buffers updated in place, and its cost per layer.

Run on a CUDA machine: `python benchmarks/gpu_steer_op.py --out benchmarks/results/gpu_steer_op.json`. The op is the
core's `SteeringLayer`, sized like a Llama-3.1-8B layer (d_model 4096, d_sae 65536); its time is compared with the
same layer's MLP matmuls (4096 -> 2 x 14336 -> 4096), both replayed as CUDA graphs side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from functok_vllm.core import SAE, SAEConfig, SteeringTable
from functok_vllm.steering import SteeringSpec


def random_sae(d_in: int, d_sae: int, layer: int, device, dtype) -> SAE:
    g = torch.Generator(device="cpu").manual_seed(layer)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=f"blocks.{layer}.hook_resid_post")
    sae = SAE(
        cfg,
        {
            "W_enc": W_dec.t().contiguous(),
            "b_enc": torch.zeros(d_sae),
            "W_dec": W_dec,
            "b_dec": torch.zeros(d_in),
            "threshold": torch.full((d_sae,), 0.1),
        },
    )
    return sae.to(device=device, dtype=dtype)


def timed(fn, iters: int) -> float:
    """Seconds per call of fn replayed as a CUDA graph (as vLLM runs decode on GPU: no Python launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def spec(i: int) -> SteeringSpec:
    edits = [
        {"layer": 0, "feature": 100 + i, "strength": 4.0},
        {"layer": 0, "feature": 5000 + i, "mode": "clamp", "value": 1.0},
    ]
    return SteeringSpec.from_dict({"edits": edits})


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, dtype, d, d_sae = "cuda", torch.bfloat16, 4096, 65536
    table = SteeringTable(
        {0: random_sae(d, d_sae, 0, dev, dtype)}, max_slots=64, max_clamps=64, max_tokens=8192, dtype=dtype, device=dev
    )
    op = table.layers[0]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": str(dtype)}

    # 1. CUDA graph: capture once, then change the tables and the slot index in place and replay.
    tokens = 256
    h = torch.randn(tokens, d, device=dev, dtype=dtype)
    slots = [table.acquire(spec(i)) for i in range(4)]
    table.set_slot_index(torch.tensor(slots, device=dev).repeat_interleave(tokens // 4))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(h)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(h)
    checks = []
    for step in range(3):  # new specs, new slot layout, new inputs: all written in place
        for s in range(4):
            table.release(spec(step * 4 + s))
        new = [table.acquire(spec(step * 4 + 4 + s)) for s in range(4)]
        perm = torch.randperm(tokens, device=dev) % 5  # 0 = unsteered, 1..4 = the four specs
        idx = torch.tensor([0, *new], device=dev)[perm]
        table.set_slot_index(idx)
        h.copy_(torch.randn_like(h))
        graph.replay()
        eager = op(h)
        checks.append(float((out - eager).abs().max()))
    results["cuda_graph_replay_max_abs_diff"] = checks
    if max(checks) > 0:  # replay must read the updated buffers: exactly what eager computes from them
        raise SystemExit(f"CUDA-graph replay differs from eager (max |diff| per replay: {checks})")

    # 2. Cost per layer at prefill and decode sizes, K = 1 and 64 distinct specs in the batch.
    W1 = torch.randn(d, 2 * 14336, device=dev, dtype=dtype) / d**0.5
    W2 = torch.randn(14336, d, device=dev, dtype=dtype) / 14336**0.5
    for s in list(table._by_key):
        table.release(SteeringSpec.from_dict(json.loads(s)))
    all_slots = [
        table.acquire(SteeringSpec.from_dict({"edits": [{"layer": 0, "feature": 100 + i, "strength": 4.0}]}))
        for i in range(63)
    ]
    timing = []
    for tokens in (64, 512, 8192):
        x = torch.randn(tokens, d, device=dev, dtype=dtype)
        t_mlp = timed(lambda x=x: (torch.nn.functional.silu(x @ W1[:, :14336]) * (x @ W1[:, 14336:])) @ W2, 200)
        for k in (1, 63):
            table.set_slot_index(torch.tensor(all_slots[:k], device=dev).repeat(tokens // k + 1)[:tokens])
            t_op = timed(lambda x=x: op(x), 200)
            timing.append(
                {
                    "tokens": tokens,
                    "distinct_specs": k,
                    "steer_op_us": t_op * 1e6,
                    "mlp_us": t_mlp * 1e6,
                    "op_over_mlp": t_op / t_mlp,
                }
            )
    results["timing"] = timing
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
