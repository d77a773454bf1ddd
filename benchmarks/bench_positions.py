"""Cost of position objects in the per-step slot index: `build_slot_index` with position names only, against every
request carrying a position object (256 allowed ids, 256 excluded ids, three windows), one CPU thread.

    PYTHONPATH=. python benchmarks/bench_positions.py
"""

import time

import torch

from functok_vllm.core.batch import StepIndex, build_slot_index, narrowing, stack_narrowings
from functok_vllm.positions import Positions

torch.manual_seed(0)
torch.set_num_threads(1)
V, B = 49152, 64
fn_mask = torch.zeros(V, dtype=torch.bool)
fn_mask[torch.randint(0, V, (200,))] = True


def main():
    for T, label in ((B, "decode: 64 requests x 1 token"), (4096, "prefill: 4096 tokens over 64 requests")):
        req = torch.arange(T) % B
        ids = torch.randint(0, V, (T,))
        pos = torch.randint(0, 512, (T,))
        per = [
            torch.randint(1, 8, (B + 1,)),
            torch.zeros(B + 1, dtype=torch.long),
            torch.full((B + 1,), 400),
            torch.full((B + 1,), 300),
        ]
        obj = Positions(
            select="all",
            token_ids=tuple(range(256)),
            exclude_ids=tuple(range(300, 556)),
            last_prompt=8,
            first_generated=4,
            last_functions=3,
        )
        nw = stack_narrowings([narrowing(obj, torch.randint(0, V, (400,)), fn_mask) for _ in range(B)] + [None], "cpu")
        for name, n in (("names only", None), ("objects (256 ids, 256 excludes, windows)", nw)):
            step = StepIndex(ids, pos, req, *per, n)
            for _ in range(20):
                build_slot_index(step, fn_mask)
            t0 = time.perf_counter()
            for _ in range(200):
                build_slot_index(step, fn_mask)
            print(f"{label}: {name}: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us/step")


if __name__ == "__main__":
    main()
