"""`functok analyze coverage --plan`: memory and time a coverage run will need, by arithmetic, before loading anything.

Reads only the model's config.json (hidden size, layers, heads, MLP width, vocabulary, dtype) and each SAE's cfg.json
(d_in, d_sae, architecture), then adds up what the capture holds and does (`core/capture.py`):

  device: model weights; SAE encoders in `--sae-dtype` (both engines load no decoder for capture); one forward's
          activations; one encode chunk (rows x d_sae x `capture.element_bytes`); per-layer counts and window masks
  host:   the sparse edge set, at most (tokens x L0) edges of 16 bytes each (3x that while a merge sorts), and
          2 x d_sae / 8 bytes per window per layer; under tensor parallelism once per rank (each builds the graph)
  time:   matmul FLOPs (forward 2 x decoder params + attention, encoders 2 x d_in x d_sae per token and layer) at the
          device's rate, each encoder read once per chunk at its bandwidth, the per-(token, feature) active test and
          scan, and the per-firing edge bookkeeping; with `--data-parallel-size N` on GPUs, wall-clock over N engines
          at once (each holds what one engine holds, on its own GPUs); on a CPU the shards share its cores

L0 (features firing per token) is not in cfg.json: `--l0` gives it (default 100, Gemma Scope's canonical choice).
The CPU rates were measured on this project's machine; the GPU rates are vendor peaks times an assumed efficiency,
an estimate by arithmetic, not a measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from functok_vllm.errors import CLIError

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    name: str
    matmul: dict[str, float]  # FLOP/s of a large matmul, by dtype
    bandwidth: float  # bytes/s of device memory, for encoder reads
    element_s: float  # seconds per (token, feature) of the active test and its scan (compare + nonzero)
    firing_s: float  # seconds per firing of the edge bookkeeping (unique on the device, merge on the host)
    memory: float  # bytes of device memory
    source: str


# CPU: measured 2026-12-07 on 2 cores of an Intel Xeon with AVX-512 and AMX (torch 2.13, 2 threads): a (2048 x 576)
# @ (576 x 16384) matmul at 56 GFLOP/s in float32 and 187 in bfloat16; `pre > threshold` then `nonzero` over
# (2048, 65536) at 3.5 + 7.2 ns per element; `unique` of the firings' keys at 430 ns per firing.
# GPUs: vendor dense peaks x 0.6 (matmul) and x 0.8 (bandwidth); float32 without TF32 (PyTorch's default); the
# element cost is 4 bytes moved per element at that bandwidth; the firing cost is the host merge, taken as the CPU's.
DEVICES = {
    "cpu": Device(
        "this CPU (2 cores)",
        {"float32": 56e9, "bfloat16": 187e9, "float16": 56e9},
        10e9,
        10.7e-9,
        430e-9,
        0.0,
        "measured on this machine (2 threads)",
    ),
    "a100": Device(
        "NVIDIA A100 80GB",
        {"float32": 0.6 * 19.5e12, "bfloat16": 0.6 * 312e12, "float16": 0.6 * 312e12},
        0.8 * 2.0e12,
        4 / (0.8 * 2.0e12),
        430e-9,
        80e9,
        "estimate by arithmetic from vendor peaks",
    ),
    "h100": Device(
        "NVIDIA H100 SXM 80GB",
        {"float32": 0.6 * 67e12, "bfloat16": 0.6 * 989e12, "float16": 0.6 * 989e12},
        0.8 * 3.35e12,
        4 / (0.8 * 3.35e12),
        430e-9,
        80e9,
        "estimate by arithmetic from vendor peaks",
    ),
    "h200": Device(
        "NVIDIA H200 141GB",
        {"float32": 0.6 * 67e12, "bfloat16": 0.6 * 989e12, "float16": 0.6 * 989e12},
        0.8 * 4.8e12,
        4 / (0.8 * 4.8e12),
        430e-9,
        141e9,
        "estimate by arithmetic from vendor peaks",
    ),
}


@dataclass
class ModelShape:
    """What the plan needs of a model, from its config.json."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab: int
    tied: bool
    dtype: str
    mlp_mats: int = 3  # gated MLPs (Llama, Gemma, Qwen) have 3 matrices, GPT-2 / GPT-NeoX 2

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.d_model * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        """Weights, norms and biases left out: embeddings (+ an untied unembedding) and per layer Q, K, V, O, MLP."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + self.mlp_mats * self.d_model * self.d_mlp
        return self.embedding_params + self.n_layers * per_layer


def model_shape(model_dir: str | Path) -> ModelShape:
    path = Path(model_dir) / "config.json"
    try:
        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        d = int(c.get("hidden_size") or c["n_embd"])
        heads = int(c.get("num_attention_heads") or c["n_head"])
        layers = int(c.get("num_hidden_layers") or c["n_layer"])
        gated = "n_embd" not in c and c.get("model_type") not in ("gpt_neox", "gpt2")
        return ModelShape(
            d_model=d,
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or d // heads),
            d_mlp=int(c.get("intermediate_size") or c.get("n_inner") or 4 * d),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", True)),
            dtype=str(c.get("torch_dtype") or c.get("dtype") or "float32"),
            mlp_mats=3 if gated else 2,
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CLIError(f"{path}: cannot read the model's shape ({type(e).__name__}: {e})") from None


@dataclass
class PlanInput:
    model: ModelShape
    saes: dict[int, tuple[int, int, str]]  # {layer: (d_in, d_sae, architecture)}
    tokens: int
    seq_len: int
    batch_size: int
    engine: str = "transformers"  # the transformers analysis runs the model in float32 on the CPU
    model_dtype: str = "float32"  # vLLM's model dtype (`--model-dtype`; "auto": the config's)
    device: str = "cpu"
    sae_dtype: str = "float32"
    chunk_bytes: int = 2 << 30
    l0: float = 100.0
    tensor_parallel: int = 1  # vLLM: the model sharded over this many GPUs; every rank holds every SAE and graph
    data_parallel: int = 1  # engine processes over disjoint windows, each on its own tensor_parallel GPUs


@dataclass
class Plan:
    rows: list[tuple[str, float, float, float]] = field(default_factory=list)  # (what, device B, host B, seconds)

    def add(self, what: str, device: float = 0.0, host: float = 0.0, seconds: float = 0.0) -> None:
        self.rows.append((what, device, host, seconds))

    @property
    def device_bytes(self) -> float:
        return sum(r[1] for r in self.rows)

    @property
    def host_bytes(self) -> float:
        return sum(r[2] for r in self.rows)

    @property
    def seconds(self) -> float:
        return sum(r[3] for r in self.rows)


def element_bytes(itemsize: int, architecture: str) -> int:
    """As `core.capture.element_bytes(active_only=True)`, from a dtype size instead of a loaded SAE."""
    per = itemsize + 2
    return 2 * per if architecture == "gated" else per


def make_plan(p: PlanInput) -> Plan:
    dev = DEVICES[p.device]
    m = p.model
    model_dtype = "float32" if p.engine == "transformers" else p.model_dtype
    model_dtype = m.dtype if model_dtype == "auto" else model_dtype
    sae_dtype = p.sae_dtype
    msize, ssize = DTYPE_BYTES[model_dtype], DTYPE_BYTES[sae_dtype]
    rows_fwd = p.seq_len * p.batch_size  # tokens of one forward
    n_windows = math.ceil(p.tokens / p.seq_len)
    plan = Plan()
    # a capture forward multiplies by every decoder weight; the embedding is a lookup and logits are kept for one row
    fwd_flops = (
        2 * (m.params - m.embedding_params) * p.tokens + 2 * m.n_layers * p.tokens * p.seq_len * m.n_heads * m.head_dim
    )
    tp = p.tensor_parallel
    dp = p.data_parallel if p.device != "cpu" else 1  # wall-clock divisor: on a CPU the shards share the cores
    shard = f", 1/{tp} per GPU" if tp > 1 else ""
    plan.add(
        f"model: {m.params / 1e9:.3f}B params in {model_dtype}{shard}",
        m.params * msize / tp,
        0,
        fwd_flops / dev.matmul[model_dtype] / tp / dp,
    )
    act = rows_fwd * (6 * m.d_model + 2 * m.d_mlp) * msize + p.batch_size * m.n_heads * p.seq_len**2 * msize
    plan.add(f"one forward's activations ({p.batch_size} x {p.seq_len} tokens)", act)
    for layer, (d_in, d_sae, arch) in p.saes.items():
        mats = 2 if arch == "gated" else 1
        enc = mats * d_in * d_sae * ssize + 3 * d_sae * ssize + d_in * ssize
        rows = min(rows_fwd, max(1, p.chunk_bytes // (d_sae * element_bytes(ssize, arch))))
        chunk = rows * d_sae * element_bytes(ssize, arch)
        n_chunks = math.ceil(p.tokens / rows)
        t_mm = n_chunks * max(
            2 * mats * rows * d_in * d_sae / dev.matmul[sae_dtype], mats * d_in * d_sae * ssize / dev.bandwidth
        )
        t_elem = p.tokens * d_sae * mats * dev.element_s
        firings = p.tokens * p.l0
        small = 8 * (m.vocab + d_sae) + 2 * p.batch_size * d_sae  # counts + one batch's window masks
        windows = n_windows * 2 * math.ceil(d_sae / 8)
        edges = 16 * min(firings, m.vocab * d_sae)
        plan.add(f"SAE L{layer} weights: d_sae {d_sae}, {sae_dtype}, encoder only", enc)
        what = f"capture L{layer}: chunks of {rows} rows, edges, windows"
        plan.add(what, chunk + small, tp * (3 * edges + windows), (t_mm + t_elem + firings * dev.firing_s) / dp)
    return plan


def fmt_bytes(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.01 * GB else f"{b / 1e6:.1f} MB"


def fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def render(p: PlanInput, plan: Plan) -> str:
    dev = DEVICES[p.device]
    per_gpu = p.tensor_parallel > 1 or (p.data_parallel > 1 and p.device != "cpu")
    lines = [
        f"plan: coverage of {p.tokens:,} tokens (windows of {p.seq_len}, {p.batch_size} a batch) on the {p.engine} "
        f"engine, {dev.name} ({dev.source}); L0 {p.l0:g} firings per token assumed",
        f"  {'':58} {'per GPU' if per_gpu else 'device':>10} {'host':>10} {'time':>9}",
    ]
    for what, d, h, s in plan.rows:
        lines.append(f"  {what:58} {fmt_bytes(d):>10} {fmt_bytes(h):>10} {fmt_time(s):>9}")
    total = (fmt_bytes(plan.device_bytes), fmt_bytes(plan.host_bytes), fmt_time(plan.seconds))
    lines.append(f"  {'total':58} {total[0]:>10} {total[1]:>10} {total[2]:>9}")
    lines.append("  host edges: at most tokens x L0 distinct (token, feature) pairs, 16 B each, 3x while a merge sorts")
    if dev.memory and plan.device_bytes > dev.memory:
        lines.append(f"  does NOT fit: {fmt_bytes(plan.device_bytes)} > {fmt_bytes(dev.memory)} of device memory")
    if p.data_parallel > 1:
        gpus = f"{p.data_parallel} x {p.tensor_parallel} GPUs, the memory above on each engine's"
        where = gpus if p.device != "cpu" else "the CPU's cores shared: no faster by arithmetic"
        lines.append(f"  data parallel: {p.data_parallel} engine processes over disjoint windows ({where}); times are")
        lines.append("  wall-clock with all running at once; the host memory is all shards' edges together")
    if p.engine == "vllm":
        lines.append("  vLLM also reserves --gpu-memory-utilization of the GPU for its KV cache (0.9 by default)")
    if p.engine == "transformers" and p.device != "cpu":
        lines.append("  note: the transformers analysis engine runs on the CPU; a GPU run means --engine vllm")
    return "\n".join(lines)


def plan_from_args(args) -> tuple[PlanInput, Plan]:
    """The plan for `functok analyze coverage` arguments; reads config.json and cfg.json files, no weights."""
    from functok_vllm.analysis.model import sae_configs

    if args.max_tokens is None:
        raise CLIError("--plan needs --max-tokens (the token budget it plans for)")
    cfgs = sae_configs(args.saes, args.layers)
    p = PlanInput(
        model=model_shape(args.model),
        saes={layer: (c.d_in, c.d_sae, c.architecture) for layer, c in cfgs.items()},
        tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        engine=getattr(args, "engine", "transformers"),
        device=args.plan_device,
        sae_dtype=args.sae_dtype,
        model_dtype=getattr(args, "model_dtype", "float32"),
        chunk_bytes=int(args.chunk_mb * (1 << 20)),
        l0=args.l0,
        tensor_parallel=getattr(args, "tensor_parallel_size", 1),
        data_parallel=getattr(args, "data_parallel_size", 1),
    )
    return p, make_plan(p)
