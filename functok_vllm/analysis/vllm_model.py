"""The analysis model on the vLLM engine: coverage runs as capture mode of the steering worker extension.

`functok analyze coverage --engine vllm` builds a `vllm.LLM` (eager, prefix caching off; at one rank its engine
core and worker run in the CLI's process, `settings.offline_in_process`) with the worker extension
in capture-only mode (the workers load encoder-only SAEs in `--sae-dtype` and refuse steering), starts a capture
session on every worker, sends each corpus window as a prompt with `max_tokens=1` (so each window token is forwarded
exactly once, in whatever batches vLLM's scheduler makes), and reads back the graphs the workers wrote. The SAEs stay
on the workers; this process reads only their cfg.json. `functok analyze loss-split --engine vllm` reads next-token
losses from vLLM's prompt logprobs (no hooks, no SAEs). Reactivation, features and the steer sweep need per-position
activations and logits in this process and run on the transformers engine only.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from functok_vllm.analysis.model import TokenizerMixin, function_token_mask
from functok_vllm.core import FunctionTokens, SAELoadError
from functok_vllm.core.capture import EdgeBits
from functok_vllm.errors import CLIError

WINDOW_CHUNK = 1024  # windows handed to LLM.generate at a time (the progress bar moves per chunk)


def require_vllm() -> None:
    """CLIError with one line when vLLM cannot run here (`engines.vllm.available`, which never imports its kernels
    in this process: a kernel library the CPU cannot execute would kill it)."""
    from functok_vllm.engines.vllm.available import vllm_status

    status = vllm_status()
    if not status.ok:
        raise CLIError(f"--engine vllm: {status.line()}; use --engine transformers")


class VLLMAnalysisModel(TokenizerMixin):
    """A model on vLLM with its SAEs (metadata here, weights on the workers) and function-token mask."""

    def __init__(
        self,
        model_dir: Path,
        sae_dirs: list[Path],
        function_tokens: Path,
        tokenizer_dir: Path | None = None,  # training checkpoints hold no tokenizer: the final model's is used
        dtype: str = "float32",
        engine_args: dict | None = None,
        tensor_parallel_size: int = 1,  # ranks of vLLM's tensor parallelism (capture: rank 0 writes the tables)
        sae_dtype: str | None = None,  # the workers' encoder dtype (None: the model's, `dtype`)
    ):
        from transformers import AutoConfig, AutoTokenizer

        from functok_vllm.engines.vllm.settings import CONFIG_KEY, EXTENSION, cpu_defaults, from_additional_config

        cpu_defaults(tensor_parallel_size)
        from vllm import LLM

        tokenizer_dir = tokenizer_dir or model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        mc = AutoConfig.from_pretrained(str(model_dir))
        self.vocab_size = mc.vocab_size
        self.max_len = int(mc.max_position_embeddings) - 1  # room for the one sampled token vLLM insists on
        self.fn_mask = function_token_mask(FunctionTokens.load(function_tokens), self.vocab_size)
        self.saes, extension = {}, {}
        if sae_dirs:
            raw = {"saes": [str(p) for p in sae_dirs], "function_tokens": str(function_tokens), "capture_only": True}
            raw |= {"sae_dtype": sae_dtype} if sae_dtype is not None else {}
            try:
                steer_cfg = from_additional_config({CONFIG_KEY: raw}, str(model_dir))
            except (ValueError, SAELoadError) as e:
                raise CLIError(str(e)) from None
            self.saes = steer_cfg.sae_configs  # {layer: SAEConfig}: d_sae, d_in, architecture (weights on workers)
            extension = {"worker_extension_cls": EXTENSION, "additional_config": {CONFIG_KEY: raw}}
        for layer, meta in self.saes.items():
            if not 0 <= layer < mc.num_hidden_layers:
                raise CLIError(f"the SAE for layer {layer} does not fit a model with {mc.num_hidden_layers} layers")
            if meta.d_in != mc.hidden_size:
                raise CLIError(f"{meta.path}: d_in {meta.d_in} does not match the model's hidden size {mc.hidden_size}")
        args = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir),
            dtype=dtype,
            enforce_eager=True,  # capture hooks run only where the model runs as Python modules
            enable_prefix_caching=False,  # a cached prefix is not forwarded again: its edges and losses would be missed
            max_model_len=int(mc.max_position_embeddings),
            seed=0,
            tensor_parallel_size=tensor_parallel_size,
            **({"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}),
            **extension,
        )
        self.llm = LLM(**(args | (engine_args or {})))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the graphs land; the capture itself runs on the workers' devices

    def capture_edges(
        self, batches, layers: list[int], total: int | None = None, progress: bool = True, exclude_sinks: bool = True
    ):
        """{layer: EdgeBits} over batches (b, seq) of token windows, each window one prompt (prefill only); attention
        sinks left out as on the transformers engine (`core.sinks`), unless `exclude_sinks` is False."""
        from tqdm import tqdm
        from vllm import SamplingParams

        windows = [row.tolist() for batch in batches for row in batch]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        tmp = Path(tempfile.mkdtemp(prefix="functok-capture-"))
        try:
            fn_ids = self.fn_mask.nonzero().flatten().tolist()
            begin = (list(layers), self.eos_id, self.bos_id, fn_ids, exclude_sinks)
            self.llm.collective_rpc("functok_capture_begin", args=begin)
            try:
                with tqdm(total=len(windows), desc="coverage (vLLM)", unit="window", disable=not progress) as bar:
                    for s in range(0, len(windows), WINDOW_CHUNK):
                        chunk = windows[s : s + WINDOW_CHUNK]
                        self.llm.generate([{"prompt_token_ids": w} for w in chunk], params, use_tqdm=False)
                        bar.update(len(chunk))
            finally:
                self.llm.collective_rpc("functok_capture_save", args=(str(tmp),))
            from safetensors.torch import load_file

            return {layer: EdgeBits.from_state(load_file(str(tmp / f"layer_{layer}.safetensors"))) for layer in layers}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def sae_bytes(self) -> int:
        """Bytes of SAE tensors the workers hold, all ranks together (`functok_sae_bytes`, measured on them)."""
        return sum(sum(per.values()) for per in self.llm.collective_rpc("functok_sae_bytes"))

    def token_losses(self, batches, total: int | None = None, progress: bool = True, desc: str = "loss (vLLM)"):
        """(window (1, seq), next-token cross-entropy (1, seq - 1)) for every window of the batches, from vLLM's prompt
        logprobs: position t's loss is -log p(token t+1 | tokens <= t), read from the full distribution (raw logprobs,
        before any sampling setting), in windows of vLLM's own batching."""
        from tqdm import tqdm
        from vllm import SamplingParams

        windows = [row for batch in batches for row in batch]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with tqdm(total=len(windows), desc=desc, unit="window", disable=not progress) as bar:
            for s in range(0, len(windows), WINDOW_CHUNK):
                chunk = windows[s : s + WINDOW_CHUNK]
                outs = self.llm.generate([{"prompt_token_ids": w.tolist()} for w in chunk], params, use_tqdm=False)
                for w, out in zip(chunk, outs, strict=True):
                    nxt = w[1:].tolist()
                    lp = [-pl[t].logprob for pl, t in zip(out.prompt_logprobs[1:], nxt, strict=True)]
                    yield w[None], torch.tensor(lp, dtype=torch.float32)[None]  # (1, seq), (1, seq - 1)
                bar.update(len(chunk))

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def load_vllm(
    model_dir: str | Path,
    saes_dir: str | Path,
    function_tokens: str | Path,
    layers: list[int] | None = None,
    tensor_parallel_size: int = 1,
    sae_dtype: str | None = None,
    dtype: str = "float32",
) -> VLLMAnalysisModel:
    """Check every input first (cheap, as `load_hf` does), then start a capture-only vLLM running the model in
    `dtype` ("auto": its config's) with the encoders of the SAEs of `layers` (default: all) in `sae_dtype`."""
    from functok_vllm.analysis.model import check_model_dir, load_function_tokens, sae_configs

    require_vllm()
    model_dir = check_model_dir(model_dir)
    load_function_tokens(function_tokens)
    saes = [c.path for c in sae_configs(saes_dir, layers).values()]
    tp = tensor_parallel_size
    fts = Path(function_tokens)
    return VLLMAnalysisModel(model_dir, saes, fts, dtype=dtype, tensor_parallel_size=tp, sae_dtype=sae_dtype)


@dataclass
class TokenizerOnly(TokenizerMixin):
    """What the loss split needs in this process when the models run in vLLM: the tokenizer and function tokens."""

    tokenizer: object
    fn_mask: torch.Tensor  # (vocab,) bool

    @property
    def vocab_size(self) -> int:
        return self.fn_mask.shape[0]


def open_vllm(model_dir: str | Path, function_tokens: str | Path, tensor_parallel_size: int = 1):
    """For `loss-split --engine vllm`: (tokenizer + function-token mask, a function that starts a checkpoint on vLLM,
    without SAEs, using the final model's tokenizer). Inputs are checked first, as `load_vllm` does."""
    from transformers import AutoConfig, AutoTokenizer

    from functok_vllm.analysis.model import check_model_dir, load_function_tokens

    require_vllm()
    model_dir = check_model_dir(model_dir)
    fts = load_function_tokens(function_tokens)
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    base = TokenizerOnly(AutoTokenizer.from_pretrained(str(model_dir)), function_token_mask(fts, vocab))

    def open_model(path: Path) -> VLLMAnalysisModel:
        fts, tp = Path(function_tokens), tensor_parallel_size
        return VLLMAnalysisModel(Path(path), [], fts, tokenizer_dir=model_dir, tensor_parallel_size=tp)

    return base, open_model
