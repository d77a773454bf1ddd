"""Analysis inputs: a corpus as one token stream under a budget, cut into sequences; prompt files (JSONL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from functok_vllm.corpus import default_corpus_files, is_heldout, iter_documents
from functok_vllm.errors import CLIError


def _round_robin(gens: list[Iterator[str]]) -> Iterator[str]:
    while gens:
        for g in list(gens):
            doc = next(g, None)
            if doc is None:
                gens.remove(g)
            else:
                yield doc


def _heldout(path: Path) -> Iterator[str]:
    return (doc for i, doc in enumerate(iter_documents(path)) if is_heldout(i))


def check_corpus(files: list[str | Path] | None) -> None:
    """Fail before any model is loaded when a named corpus file is missing."""
    for f in files or []:
        if not Path(f).is_file():
            raise CLIError(f"corpus file {f} does not exist")


def corpus_documents(files: list[str | Path] | None) -> Iterator[str]:
    """Documents of the given files, or the held-out documents of the shared corpus when no files are given; files
    alternate document by document, so a token budget samples every file."""
    if files:
        check_corpus(files)
        paths = [Path(f) for f in files]
        return _round_robin([iter_documents(p) for p in paths])
    paths = default_corpus_files()
    if not paths:
        raise CLIError("no corpus given (--corpus) and the shared corpus (../shared/data/corpus/*.txt) is missing")
    return _round_robin([_heldout(p) for p in paths])


def token_stream(encode, eos_id: int, files: list[str | Path] | None, max_tokens: int | None) -> torch.Tensor:
    """(tokens,) ids of the corpus documents, each followed by EOS, cut at max_tokens (None: the whole corpus)."""
    if max_tokens is not None and max_tokens < 2:
        raise CLIError(f"--max-tokens must be at least 2, got {max_tokens}")
    ids: list[int] = []
    for doc in corpus_documents(files):
        ids.extend(encode(doc))
        if eos_id >= 0:
            ids.append(eos_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len([i for i in ids if i != eos_id]) == 0:
        where = ", ".join(map(str, files)) if files else "the held-out split of the shared corpus"
        raise CLIError(f"the corpus ({where}) holds no tokens")
    return torch.tensor(ids, dtype=torch.long)


def sequences(stream: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches (batch, seq_len) of consecutive windows of the stream; a shorter tail comes last as (1, rest)."""
    n = len(stream) // seq_len
    full = stream[: n * seq_len].view(n, seq_len)
    for i in range(0, n, batch_size):
        yield full[i : i + batch_size]
    if len(stream) > n * seq_len:
        yield stream[n * seq_len :][None, :]


def n_batches(stream: torch.Tensor, seq_len: int, batch_size: int) -> int:
    n = len(stream) // seq_len
    return -(-n // batch_size) + (len(stream) > n * seq_len)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a JSONL file, one object per line with a "prompt" or "text" string."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"prompt file {p} does not exist")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{p}:{n}: not valid JSON ({e})") from None
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text:
            raise CLIError(f'{p}:{n}: needs a non-empty "prompt" or "text" string')
        prompts.append(text)
    if not prompts:
        raise CLIError(f"prompt file {p} holds no prompts")
    return prompts


def check_prompt(ids: list[int], max_len: int, what: str = "prompt") -> None:
    if not ids:
        raise CLIError(f"{what} is empty after tokenization")
    if len(ids) > max_len:
        raise CLIError(f"{what} has {len(ids)} tokens, longer than the model's context of {max_len}")
