"""Feature dashboards for the whole of each loaded SAE, computed once and cached: logit-lens tokens, top contexts.

For every feature of an SAE: its decoder direction's top tokens through the unembedding (the logit lens of
`analysis.features`) and the corpus positions where it is most active (`RunningTopK` over a full encode, so TopK SAEs
are exact too), plus how often it is active. The corpus is the held-out split of the shared text under a token budget
(`FUNCTOK_FEATURE_TOKENS`, default 16384), so the first computation on the demo model takes seconds.

A table is keyed by the model's files, the SAE's files, the corpus files and the settings; it is kept in memory and
written to `${FUNCTOK_HOME:-~/.cache/functok}/features/` (safetensors), so a restarted server loads it instead of
recomputing. The work runs on the analysis thread (one job at a time, shared with `/v1/analysis/reactivation`),
over `analysis_view`, never on the serving worker. This module holds the playground's only import of the
`analysis` package (`server/analysis.py` has its own, for the reactivation route).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from functok_vllm.analysis import data, features  # the one import of the analysis package (corpus, logit lens)
from functok_vllm.core.capture import RunningTopK, encode_chunks
from functok_vllm.corpus import default_corpus_files

log = logging.getLogger("functok.features")
FORMAT = 1  # bump when the table's layout or meaning changes: old cache files are then ignored
LENS_TOKENS = 10  # logit-lens tokens kept per feature
CONTEXTS = 5  # top-activating contexts kept per feature
LEFT, RIGHT = 12, 4  # tokens of context shown left and right of the activating token
MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt")  # weights, config, tokenizer (not READMEs)
LENS_CHUNK = 1024  # features per logit-lens matmul ((chunk, vocab) floats at a time)


def token_budget() -> int:
    return max(256, int(os.environ.get("FUNCTOK_FEATURE_TOKENS", "16384")))


def cache_root() -> Path:
    home = Path(os.environ.get("FUNCTOK_HOME", Path.home() / ".cache" / "functok"))
    return home / "features"


TENSORS = ("lens_ids", "lens_scores", "ctx_acts", "ctx_pos", "active", "stream")  # what a cache file holds


@dataclass
class FeatureTable:
    """One SAE's dashboards. Rows are features; contexts are global positions in `stream` (-1: none)."""

    layer: int
    lens_ids: torch.Tensor  # (d_sae, LENS_TOKENS) int64, best first
    lens_scores: torch.Tensor  # (d_sae, LENS_TOKENS) float32
    ctx_acts: torch.Tensor  # (d_sae, CONTEXTS) float32, best first
    ctx_pos: torch.Tensor  # (d_sae, CONTEXTS) int64
    active: torch.Tensor  # (d_sae,) int64: corpus positions (EOS excluded) where the feature is active
    stream: torch.Tensor  # (tokens,) int64: the corpus as token ids
    text_tokens: int  # positions of the stream that are not EOS
    lens_text: list[list[str]] = field(default_factory=list)  # lower-cased, stripped lens tokens, for search

    @property
    def d_sae(self) -> int:
        return self.lens_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).contiguous() for n in TENSORS}


@dataclass
class Progress:
    """What the running job is doing, read by the routes (a 202 answer) while the job writes it."""

    stage: str = "starting"
    done: int = 0
    total: int = 1
    layers: tuple[int, ...] = ()

    def fraction(self) -> float:
        return min(self.done / max(self.total, 1), 1.0)


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


class FeatureIndex:
    """Builds, caches and serves the `FeatureTable` of every SAE of an HF engine. Thread-safe: routes call `get`
    from the event loop; the job runs on the analysis thread pool `pool`."""

    def __init__(self, am, engine, pool):
        self.am, self.pool = am, pool
        self.model_name = engine.model_name
        self.model_dir = Path(engine.cfg.model)
        self.dtype = engine.cfg.dtype  # the analysis view shares the engine's weights, in the engine's dtype
        self.tables: dict[int, FeatureTable] = {}
        self.progress = Progress()
        self.job = None  # the Future of the running job, None when idle
        self.error: str | None = None  # why the last job failed (reported once, then a new request retries)
        self.lock = threading.Lock()
        self._vocab: list[str] | None = None

    # ---- used by the routes --------------------------------------------------------------------------------------

    def get(self, layer: int) -> FeatureTable | None:
        """The layer's table, or None after making sure a job that will produce it runs (or ran and failed)."""
        with self.lock:
            if layer in self.tables:
                return self.tables[layer]
            if self.job is None and self.error is None:
                self.progress = Progress(layers=tuple(sorted(self.am.saes)))
                self.job = self.pool.submit(self._run)
            return None

    def take_error(self) -> str | None:
        with self.lock:
            error, self.error = self.error, None
            return error

    def token_text(self, token_id: int) -> str:
        return self.vocab()[token_id]

    def vocab(self) -> list[str]:
        """Every token id decoded on its own (once; contexts and lens tokens are read from it)."""
        if self._vocab is None:
            self._vocab = [self.am.decode([i]) for i in range(self.am.vocab_size)]
        return self._vocab

    # ---- the job (analysis thread) -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._build()
        except Exception as e:  # reported to the next request as a 500; the one after retries
            log.exception("feature dashboards failed")
            with self.lock:
                self.error = f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                self.job = None

    def _build(self) -> None:
        p = self.progress
        p.stage = "hashing the model and SAE files"
        keys = self._keys()
        missing = []
        for layer, key in keys.items():
            table = self._load(layer, key)
            if table is None:
                missing.append(layer)
            else:
                self._publish(table)
        if not missing:
            return
        p.stage = "reading the corpus"
        self.vocab()
        stream = data.token_stream(self.am.encode, self.am.eos_id, None, token_budget())
        cfg = self._config(missing[0])
        p.total = data.n_batches(stream, cfg.seq_len, cfg.batch_size) + len(missing)
        p.stage = f"logit lens of layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
        lens = {}
        for layer in missing:
            lens[layer] = self._lens(layer)
            p.done += 1
        p.stage = f"top contexts over {len(stream)} corpus tokens"
        tops, active = self._contexts(stream, missing, cfg)
        text_tokens = int((stream != self.am.eos_id).sum())
        for layer in missing:
            table = FeatureTable(
                layer, *lens[layer], tops[layer].values.float(), tops[layer].where, active[layer], stream, text_tokens
            )
            self._save(table, keys[layer])
            self._publish(table)
        p.stage = "done"

    def _config(self, layer: int):
        """The analysis settings: corpus windows of 256 tokens (fewer if the served context is shorter)."""
        return features.FeaturesConfig(
            layer, contexts=CONTEXTS, lens_tokens=LENS_TOKENS, seq_len=min(256, self.am.max_len)
        )

    def _lens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        d_sae = self.am.saes[layer].d_sae
        ids, scores = [], []
        for start in range(0, d_sae, LENS_CHUNK):
            feats = list(range(start, min(start + LENS_CHUNK, d_sae)))
            i, s = features.logit_lens(self.am, layer, feats, LENS_TOKENS)
            ids.append(i.cpu())
            scores.append(s.float().cpu())
        return torch.cat(ids).long(), torch.cat(scores)

    def _contexts(self, stream, layers, cfg) -> tuple[dict[int, RunningTopK], dict[int, torch.Tensor]]:
        """One forward per batch of corpus windows, with a capture hook at each layer (a full SAE encode)."""
        am = self.am
        tops = {layer: RunningTopK(am.saes[layer].d_sae, CONTEXTS) for layer in layers}
        active = {layer: torch.zeros(am.saes[layer].d_sae, dtype=torch.long) for layer in layers}
        offset = 0
        for batch in data.sequences(stream, cfg.seq_len, cfg.batch_size):  # (b, seq)
            keep = (batch.reshape(-1) != am.eos_id).to(am.device)

            def make(layer, keep=keep, offset=offset):
                sae = am.saes[layer]

                def fn(h):  # (b * seq, d_model), in stream order
                    for start, acts in encode_chunks(sae, h.to(sae.W_enc.dtype)):  # (rows, d_sae)
                        acts = acts * keep[start : start + acts.shape[0], None]
                        tops[layer].add(acts.float().cpu(), offset + start)
                        active[layer].add_((acts > 0).sum(0).cpu())

                return fn

            am.forward(batch, {layer: make(layer) for layer in layers}, logits=False)
            offset += batch.numel()
            self.progress.done += 1
        return tops, active

    # ---- keys and the disk cache ---------------------------------------------------------------------------------

    def _keys(self) -> dict[int, str]:
        """{layer: cache key}: the model's files (weights, config, tokenizer), the SAE's files, corpus and settings."""
        model = _hash_files([p for p in self.model_dir.iterdir() if p.is_file() and p.suffix in MODEL_FILES])
        corpus = [(f.name, f.stat().st_size) for f in default_corpus_files()]
        settings = [FORMAT, LENS_TOKENS, CONTEXTS, token_budget(), self._config(0).seq_len, self.dtype, corpus]
        keys = {}
        for layer, s in sorted(self.am.saes.items()):
            sae = _hash_files([s.cfg.path / "cfg.json", s.cfg.path / "sae_weights.safetensors"])
            keys[layer] = hashlib.sha256(json.dumps([model, sae, settings]).encode()).hexdigest()[:32]
        return keys

    def _path(self, layer: int, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_name)
        return cache_root() / f"{safe}-layer{layer}-{key}.safetensors"

    def _load(self, layer: int, key: str) -> FeatureTable | None:
        path = self._path(layer, key)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            table = FeatureTable(layer, *(t[n] for n in TENSORS), int((t["stream"] != self.am.eos_id).sum()))
            if table.d_sae != self.am.saes[layer].d_sae:
                raise ValueError(f"{table.d_sae} features, the SAE has {self.am.saes[layer].d_sae}")
        except Exception as e:  # a damaged file is recomputed, not served
            log.warning("ignoring the feature cache %s (%s)", path, e)
            return None
        log.info("feature dashboards of layer %d loaded from %s", layer, path)
        return table

    def _save(self, table: FeatureTable, key: str) -> None:
        path = self._path(table.layer, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(table.tensors(), str(tmp), metadata={"model": self.model_name, "layer": str(table.layer)})
            tmp.replace(path)  # atomic: another server never reads half a file
            log.info("feature dashboards of layer %d written to %s", table.layer, path)
        except OSError as e:  # a read-only home still serves, from memory
            log.warning("could not write the feature cache %s (%s)", path, e)

    def _publish(self, table: FeatureTable) -> None:
        vocab = self.vocab()
        table.lens_text = [[vocab[i].strip().lower() for i in row] for row in table.lens_ids.tolist()]
        with self.lock:
            self.tables[table.layer] = table
