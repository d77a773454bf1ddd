"""The narrow model interface the analysis runs on, and its transformers implementation (load_model + residual_hooks).

An engine gives the analysis four things: token ids of a text, logits of token sequences while running given
residual functions at given decoder layers (capture: return None; steer: return the new residual), the SAEs by layer
with the function-token mask, and the unembedding the logit lens reads; and the coverage graph of token windows
(`capture_edges`) and next-token losses (`token_losses`), which the vLLM engine also provides
(`analysis/vllm_model.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from functok_vllm.core import SAE, FunctionTokens, SAELoadError
from functok_vllm.core.capture import CHUNK_BYTES, CoverageCapture, EdgeBits
from functok_vllm.core.sae import SAEConfig
from functok_vllm.core.sae import load_saes as core_load_saes
from functok_vllm.engines.hf.hooks import check_hook_points, load_model
from functok_vllm.engines.placement import ResidualFn, decoder_layers, residual_hooks
from functok_vllm.errors import CLIError


class AnalysisModel(Protocol):
    saes: dict[int, SAE]
    fn_mask: torch.Tensor  # (vocab,) bool
    vocab_size: int
    max_len: int
    eos_id: int  # -1: none
    device: torch.device

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def forward(self, ids: torch.Tensor, fns: dict[int, ResidualFn] | None = None, logits: bool = True): ...

    def unembed(self) -> torch.Tensor: ...

    def capture_edges(
        self, batches, layers: list[int], total: int | None, progress: bool, exclude_sinks: bool = True
    ) -> dict[int, EdgeBits]: ...

    def token_losses(self, batches, total: int | None, progress: bool, desc: str): ...


class TokenizerMixin:
    """encode/decode/eos_id over `self.tokenizer` (a transformers tokenizer), shared by the analysis models."""

    tokenizer: object

    @property
    def eos_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return -1 if eos is None else int(eos)

    @property
    def bos_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return -1 if bos is None else int(bos)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


@dataclass
class HFAnalysisModel(TokenizerMixin):
    """A transformers causal LM with its tokenizer, SAEs by layer and function-token mask."""

    model: torch.nn.Module
    tokenizer: object
    saes: dict[int, SAE] = field(default_factory=dict)
    fn_mask: torch.Tensor | None = None  # (vocab,) bool
    function_tokens: FunctionTokens | None = None
    chunk_bytes: int = CHUNK_BYTES  # capture's encode chunks, see core.capture.CHUNK_BYTES

    def __post_init__(self):
        if self.fn_mask is None:
            self.fn_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self.fn_mask.shape != (self.vocab_size,):
            raise ValueError(f"fn_mask has shape {tuple(self.fn_mask.shape)}, the model's vocab is {self.vocab_size}")
        d_model = self.unembed().shape[1]
        for layer, sae in self.saes.items():
            if sae.d_in != d_model:
                raise CLIError(f"the SAE at layer {layer} reads d_in={sae.d_in}, the model's hidden size is {d_model}")

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, fns: dict[int, ResidualFn] | None = None, logits: bool = True):
        """(batch, seq) ids -> (batch, seq, vocab) float32 logits (None with logits=False), running `fns` at layers."""
        points = {layer: sae.cfg.hook for layer, sae in self.saes.items()}  # each SAE's own hook point
        with residual_hooks(self.model, fns or {}, points):
            out = self.model(input_ids=ids.to(self.device), **({} if logits else {"logits_to_keep": 1}))
        return out.logits.float() if logits else None

    def capture_edges(
        self, batches, layers: list[int], total: int | None = None, progress: bool = True, exclude_sinks: bool = True
    ):
        """{layer: EdgeBits} over batches (b, seq) of token windows: one forward a batch, capture hooks at `layers`;
        attention sinks (`core.sinks`) left out unless `exclude_sinks` is False."""
        from tqdm import tqdm

        cap = CoverageCapture(
            self.saes,
            layers,
            self.vocab_size,
            self.eos_id,
            self.device,
            self.fn_mask,
            self.bos_id,
            exclude_sinks,
            chunk_bytes=self.chunk_bytes,
        )
        for batch in tqdm(batches, total=total, desc="coverage", disable=not progress):  # (b, seq)
            self.forward(batch, cap.fns(batch), logits=False)  # hooks see (b * seq, d_model)
        return cap.graphs

    def token_losses(self, batches, total: int | None = None, progress: bool = True, desc: str = "loss"):
        """(batch (b, seq), next-token cross-entropy (b, seq - 1)) for each batch: one forward a batch."""
        import torch.nn.functional as F
        from tqdm import tqdm

        for batch in tqdm(batches, total=total, desc=desc, disable=not progress):  # (b, seq)
            logits = self.forward(batch)  # (b, seq, vocab)
            tgt = batch[:, 1:].flatten().to(logits.device)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt, reduction="none")  # (b * (seq - 1),)
            yield batch, ce.view(batch.shape[0], -1).cpu()

    def unembed(self) -> torch.Tensor:
        """(vocab, d_model) effective unembedding: W_U with the final norm's weight folded in as a diagonal scale."""
        w = self.model.get_output_embeddings().weight.detach().float()
        norm = getattr(getattr(self.model, "model", None), "norm", None)
        g = getattr(norm, "weight", None)
        return w * g.detach().float()[None, :] if g is not None else w


def sae_configs(saes_dir: str | Path, layers: list[int] | None = None) -> dict[int, SAEConfig]:
    """{layer: SAEConfig} for `layers` (default: every layer found) of the SAE directories under `saes_dir` (or of
    one SAE directory), from their cfg.json files through the one loader; CLIError names what is missing or wrong."""
    try:
        found = core_load_saes([saes_dir], weights=False)
    except SAELoadError as e:
        raise CLIError(str(e)) from None
    want = sorted(found) if layers is None else layers
    missing = [layer for layer in want if layer not in found]
    if missing:
        have = ", ".join(map(str, sorted(found)))
        raise CLIError(f"no SAE for layer {missing[0]} in {saes_dir} (layers with SAEs: {have})")
    return {layer: found[layer] for layer in want}


def load_saes(
    saes_dir: str | Path, layers: list[int] | None = None, decoder: bool = True, dtype=torch.float32
) -> dict[int, SAE]:
    """{layer: SAE}, weights loaded (`decoder=False`: encoders only, for capture), for `sae_configs(saes_dir,
    layers)`."""
    try:
        return core_load_saes([c.path for c in sae_configs(saes_dir, layers).values()], dtype=dtype, decoder=decoder)
    except SAELoadError as e:
        raise CLIError(str(e)) from None


def load_function_tokens(path: str | Path) -> FunctionTokens:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"function-token file {p} does not exist")
    try:
        return FunctionTokens.load(p)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CLIError(f"function-token file {p} is not a `functok function-tokens` JSON ({e})") from None


def function_token_mask(fts: FunctionTokens, vocab_size: int) -> torch.Tensor:
    """(vocab,) bool; CLIError if the set was made with another tokenizer (ids outside the vocabulary)."""
    try:
        return fts.mask(vocab_size)
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CLIError(f"model directory {p} does not exist or has no config.json")
    return p


def load_hf(
    model_dir: str | Path,
    saes_dir: str | Path | None,
    function_tokens: str | Path,
    layers: list[int] | None = None,
    encoder_only: bool = False,
    sae_dtype=torch.float32,
    chunk_bytes: int = CHUNK_BYTES,
) -> HFAnalysisModel:
    """Check every input first (cheap), then load: the analysis model on the transformers engine, in float32, with
    its SAEs in `sae_dtype` (encoders only with `encoder_only`: capture reads no decoder)."""
    model_dir = check_model_dir(model_dir)
    fts = load_function_tokens(function_tokens)
    saes = load_saes(saes_dir, layers, not encoder_only, sae_dtype) if saes_dir is not None else {}
    model, tok = load_model(model_dir)
    n_layers = len(decoder_layers(model))
    for layer in saes:
        if not 0 <= layer < n_layers:
            raise CLIError(f"the SAE for layer {layer} does not fit a model with {n_layers} decoder layers")
    try:
        check_hook_points(model, [sae.cfg.hook for sae in saes.values()])
    except ValueError as e:
        raise CLIError(str(e)) from None
    mask = function_token_mask(fts, model.get_output_embeddings().weight.shape[0])
    return HFAnalysisModel(model, tok, saes, mask, fts, chunk_bytes)


def load_checkpoint(path: str | Path) -> torch.nn.Module:
    """A training checkpoint (config + weights, no tokenizer) as a float32 eval-mode model."""
    from functok_vllm.offline import go_offline

    go_offline()
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
