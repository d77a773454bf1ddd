"""Batch capture: many prompts' activations at the steering layers, streamed to disk in safetensors shards.

For probe or SAE training on the serving engine's own forward (the same hook points, kernels and dtype as serving):

    functok capture --prompts prompts.jsonl --out acts/ --layers 1 2 --positions all --dtype float16

Each prompt is one engine request with `max_tokens` 0 and a `capture` (`activation_capture.py`), so the engine
batches them as it batches any requests; `CONCURRENCY` are in flight at once. Rows are appended in prompt order
(whatever order the engine finishes them in), and a shard is written whenever `shard_rows` rows are held, so memory
stays at one shard plus the requests in flight. The directory then holds

- `shard_00000.safetensors`, ...: per layer its canonical hook name (`blocks.1.hook_resid_post`) -> (rows, d_model)
  in `dtype`; `prompt_index`, `positions` and `token_ids` (rows,) int64: which prompt, where in it, which token;
- `manifest.json`: the format, model, layers and hooks, positions, dtype, rows per shard, the prompts' count and
  sha256 (of their token ids), the total rows. It is written last: a directory without it is an unfinished run.

`read_shards(out)` yields each shard's tensors back; `load_layer(out, hook)` concatenates one layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from functok_vllm.activation_capture import CaptureRequest, read_capture
from functok_vllm.engines.base import Engine, GenerateRequest, SamplingParams
from functok_vllm.errors import CLIError

FORMAT = "functok.activation_shards.v1"
CONCURRENCY = 16  # prompts in flight: enough to fill a batch of the engine
MANIFEST = "manifest.json"


def prompts_digest(prompts: list[list[int]]) -> str:
    """sha256 of the prompts' token ids (the provenance the manifest records)."""
    return hashlib.sha256(json.dumps(prompts, separators=(",", ":")).encode()).hexdigest()


class ShardWriter:
    """Rows in prompt order, flushed to `out/shard_NNNNN.safetensors` every `shard_rows` rows."""

    def __init__(self, out: Path, hooks: list[str], shard_rows: int):
        self.out, self.hooks, self.shard_rows = out, hooks, shard_rows
        self.held: list[dict[str, torch.Tensor]] = []  # per prompt: hook -> (rows, d_model), and the index columns
        self.rows = 0
        self.shards: list[dict] = []  # {"file", "rows"} of each written shard

    def add(self, index: int, got: dict[str, torch.Tensor]) -> None:
        n = got["positions"].shape[0]
        part = {h: got[h] for h in self.hooks} | {
            "prompt_index": torch.full((n,), index, dtype=torch.int64),
            "positions": got["positions"],
            "token_ids": got["token_ids"],
        }
        self.held.append(part)
        self.rows += n
        while self.rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        """Write the first `n` held rows as the next shard; keep the rest."""
        joined = {k: torch.cat([p[k] for p in self.held]) for k in self.held[0]}
        shard = {k: v[:n].contiguous() for k, v in joined.items()}
        rest = {k: v[n:] for k, v in joined.items()}
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file(shard, str(self.out / name), metadata={"format": FORMAT})
        self.shards.append({"file": name, "rows": n})
        self.rows -= n
        self.held = [rest] if self.rows else []


async def write_shards(
    engine: Engine,
    prompts: list[list[int]],
    capture: CaptureRequest,
    out: Path,
    shard_rows: int = 65536,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Capture every prompt on `engine` and write the shards and the manifest into `out`; the manifest."""
    if not engine.supports_capture:
        raise CLIError(f"{type(engine).__name__} does not capture activations; use --engine hf")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a re-run into the same directory is unfinished until it ends
    hook_of = {layer: hook for hook, layer in engine.steering_info().hook_layers.items()}
    hooks = [hook_of[layer] for layer in capture.layers]
    writer = ShardWriter(out, hooks, shard_rows)
    sampling = SamplingParams(temperature=0, max_tokens=0)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> dict[str, torch.Tensor]:
        async with gate:
            req = GenerateRequest(f"capture-{uuid.uuid4().hex}", prompts[i], sampling, capture=capture, stream=False)
            last = None
            async for d in engine.generate(req):
                last = d
        if last is None or last.capture is None:
            why = "no answer" if last is None else last.error or last.finish_reason
            raise CLIError(f"prompt {i}: the engine ended it with {why}")
        return read_capture(last.capture)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
        for i, task in enumerate(tasks):  # in prompt order; the engine runs up to CONCURRENCY of them meanwhile
            writer.add(i, await task)
            if progress is not None:
                progress(1)
    finally:
        for task in tasks:
            task.cancel()
    writer.close()
    manifest = {
        "format": FORMAT,
        "model": engine.model_name,
        "layers": list(capture.layers),
        "hooks": hooks,
        "positions": capture.positions,
        "edits": capture.edits,
        "dtype": capture.dtype,
        "prompts": len(prompts),
        "prompts_sha256": prompts_digest(prompts),
        "rows": sum(s["rows"] for s in writer.shards),
        "shard_rows": shard_rows,
        "shards": writer.shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_shards(out: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Each shard's tensors in order (ValueError for a directory without a finished run's manifest)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise ValueError(f"{out}: no {MANIFEST} (not a finished `functok capture` run)")
    for shard in json.loads((out / MANIFEST).read_text())["shards"]:
        yield load_file(str(out / shard["file"]))


def load_layer(out: str | Path, hook: str) -> torch.Tensor:
    """(rows, d_model) of one hook over every shard."""
    return torch.cat([s[hook] for s in read_shards(out)])


def open_engine(args) -> Engine:
    """The engine `functok capture` runs on, from its flags (inputs checked before any model loads)."""
    from functok_vllm.analysis.model import check_model_dir, load_function_tokens, sae_configs
    from functok_vllm.paths import shipped_function_tokens, shipped_saes

    model = check_model_dir(args.model)
    saes_dir = args.saes or shipped_saes(model)
    if saes_dir is None:
        raise CLIError(f"no SAEs shipped for {model.name}: give --saes (capture reads at the SAEs' hook points)")
    saes = [c.path for c in sae_configs(saes_dir).values()]
    fn = Path(args.function_tokens) if args.function_tokens else shipped_function_tokens(model)
    load_function_tokens(fn)
    if args.engine == "vllm":
        from functok_vllm.analysis.vllm_model import require_vllm
        from functok_vllm.engines.vllm.engine import VLLMEngine, VLLMEngineConfig
        from functok_vllm.engines.vllm.settings import cpu_defaults

        require_vllm()
        cpu_defaults()
        return VLLMEngine(VLLMEngineConfig(model, saes, fn))
    from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig

    return HFEngine(HFEngineConfig(model, saes, fn, threads=args.threads, warmup=False))


def main(args) -> int:
    """`functok capture`: the prompts file's activations into args.out (shards + manifest), with a progress bar."""
    from tqdm import tqdm

    from functok_vllm.activation_capture import parse_capture
    from functok_vllm.analysis.data import check_prompt, read_prompts
    from functok_vllm.core.spec import SpecError

    texts = read_prompts(args.prompts)
    engine = open_engine(args)
    info = engine.steering_info()
    layers = args.layers or sorted(info.hook_layers.values())
    given = {"layers": layers, "positions": args.positions, "dtype": args.dtype}
    try:
        capture = parse_capture(given, info, "--layers/--positions")
    except SpecError as e:
        raise CLIError(str(e)) from None
    prompts = [engine.encode(t) for t in texts]
    for i, ids in enumerate(prompts):
        check_prompt(ids, engine.max_model_len, f"{args.prompts}: prompt {i}")

    async def run() -> dict:
        await engine.start()
        try:
            with tqdm(total=len(prompts), desc="capture", unit="prompt") as bar:
                return await write_shards(engine, prompts, capture, Path(args.out), args.shard_rows, bar.update)
        finally:
            await engine.shutdown()

    manifest = asyncio.run(run())
    rows, shards = manifest["rows"], len(manifest["shards"])
    print(f"wrote {rows} rows x {len(manifest['hooks'])} layers in {shards} shards to {args.out}")
    return 0
