"""Corpus reading shared by training, function-token discovery and analysis: documents, unwrapping, hold-out."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHARED_DIR = Path(os.environ.get("FUNCTOK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DEFAULT_CORPUS_DIR = SHARED_DIR / "data" / "corpus"
# Every 20th document is validation text, never trained on. Interleaved rather than the tail of each file: the
# tail of War and Peace is an essay on history, so a tail hold-out measures a change of genre, not generalisation.
HOLDOUT_EVERY = 20


def default_corpus_files() -> list[Path]:
    return sorted(DEFAULT_CORPUS_DIR.glob("*.txt"))


def is_heldout(doc_index: int) -> bool:
    return doc_index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def iter_documents(path: str | Path, unwrap: bool = True) -> Iterator[str]:
    """Stream documents (blank-line separated paragraphs) without reading the whole file. With `unwrap`, hard line
    breaks inside a paragraph become spaces: tiny_shakespeare breaks every verse line (33 characters on average), which
    makes `\\n` its most frequent token for no linguistic reason. Without it, lines keep their `\\n`."""
    buf: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                buf.append(line.strip() if unwrap else line)
            elif buf:
                yield " ".join(buf) if unwrap else "".join(buf)
                buf = []
    if buf:
        yield " ".join(buf) if unwrap else "".join(buf)


@dataclass
class Split:
    train: list[str]
    val: list[str]


def load_split(files: list[Path] | None = None) -> Split:
    """Documents of the files, every HOLDOUT_EVERY-th of each file kept for validation."""
    train, val = [], []
    for f in files or default_corpus_files():
        for i, doc in enumerate(iter_documents(f)):
            (val if is_heldout(i) else train).append(doc)
    return Split(train, val)
