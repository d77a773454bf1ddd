"""Capture mode on the vLLM worker: temporary layer hooks feed the core's `CoverageCapture`, saved to files at the end.

The offline analysis (`analysis/vllm_model.py`) drives it over RPC:

    llm.collective_rpc("functok_capture_begin", args=(layers, skip_id, bos_id, fn_ids, exclude_sinks))
    llm.generate(windows, SamplingParams(max_tokens=1))      # prefill only: every window token is forwarded once
    llm.collective_rpc("functok_capture_save", args=(out_dir,))  # out_dir/layer_{L}.safetensors, EdgeBits.state()

Hooks run only where the model runs as Python modules, so capture needs `enforce_eager=True` (no torch.compile, no
CUDA graphs); it is refused otherwise. Tensor parallel: the residual stream leaving a layer is replicated, so every
rank builds the same graph and only TP rank 0 writes it. Pipeline parallel: each rank captures and writes the layers it
holds. Memory: on the device one encode chunk and fixed-size counts per layer; the edge sets in host memory (sparse).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from functok_vllm.core.capture import CoverageCapture
from functok_vllm.engines import placement
from functok_vllm.engines.vllm import compat

log = logging.getLogger("functok.vllm")


class RunnerCapture:
    """A capture session on one model runner: hooks at the chosen SAEs' hook points, removed by `close`."""

    def __init__(
        self, runner, layers: list[int], skip_id: int, bos_id: int = -1, fn_ids=(), exclude_sinks: bool = True
    ):
        if not compat.is_eager(runner):
            raise RuntimeError("functok capture needs an eager model (start vLLM with enforce_eager=True)")
        held = runner.functok_capture_saes  # a capture-only engine's encoder-only SAEs, else the steering table's
        if held is None:
            ops = runner.functok.table.layers.items() if runner.functok is not None else []
            held = {k: op.sae for k, op in ops if op.sae is not None}
        missing = [layer for layer in layers if layer not in held]
        if missing:
            raise ValueError(f"no SAE on this worker for layers {missing} (SAE layers here: {sorted(held)})")
        saes = {layer: held[layer] for layer in layers}
        vocab = runner.model_config.get_vocab_size()
        fn_mask = torch.zeros(vocab, dtype=torch.bool)
        fn_mask[list(fn_ids)] = True
        self.capture = CoverageCapture(saes, layers, vocab, skip_id, runner.device, fn_mask, bos_id, exclude_sinks)
        self.ids: torch.Tensor | None = None  # (tokens,) ids of the forward running now, set by the runner
        self.positions: torch.Tensor | None = None  # (tokens,) their positions in their sequences, set with ids
        mods = placement.decoder_layers(runner.get_model())
        self.handles = [
            h
            for layer in layers
            for h in placement.attach(mods, saes[layer].cfg.hook, placement.flat(self._observer(layer)), pairs=True)
        ]

    def _observer(self, layer: int):
        def observe(h):  # (padded tokens, d_model) at the SAE's hook point, after any steering there
            if self.ids is not None:  # else a forward the runner did not announce (warm-up, dummy run): not corpus
                self.capture.observe(layer, self.ids, h[: self.ids.shape[0]], self.positions)

        return observe

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def save(self, out_dir: str | Path, write: bool) -> list[str]:
        """Remove the hooks and write each layer's graph as out_dir/layer_{L}.safetensors (if `write`)."""
        self.close()
        if not write:
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for layer, graph in self.capture.graphs.items():
            path = out / f"layer_{layer}.safetensors"
            save_file(graph.state(), str(path))
            paths.append(str(path))
        log.info("functok capture: wrote %s", ", ".join(paths))
        return paths
