"""Discover function tokens: count token occurrences over a corpus, keep the top tokens covering a share of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from functok_vllm.corpus import is_heldout, iter_documents
from functok_vllm.errors import CLIError


def load_tokenizer(tokenizer_dir: str | Path):
    """A `tokenizers.Tokenizer` from a HF directory (tokenizer.json) or a GPT-2 style vocab.json + merges.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    d = Path(tokenizer_dir)
    try:
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(d / "tokenizer.json"))
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        raise CLIError(f"tokenizer directory {d} does not load: {e}") from None
    raise CLIError(f"tokenizer directory {d} has neither tokenizer.json nor vocab.json + merges.txt")


def count_tokens(
    tok,
    files: list[Path],
    unwrap: bool = True,
    skip_heldout: bool = False,
    batch_docs: int = 512,
    progress: bool = True,
) -> dict:
    """Occurrence counts and document frequencies per token id, streamed in batches of documents."""
    from tqdm import tqdm

    vocab = tok.get_vocab_size()
    counts = np.zeros(vocab, dtype=np.int64)
    doc_freq = np.zeros(vocab, dtype=np.int64)
    n_docs, t0 = 0, time.time()
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="count tokens", disable=not progress)

    def flush(docs):
        nonlocal n_docs
        for enc in tok.encode_batch(docs, add_special_tokens=False):  # a BOS per document is not corpus text
            ids = np.asarray(enc.ids, dtype=np.int64)
            counts[:] += np.bincount(ids, minlength=vocab)[:vocab]
            doc_freq[np.unique(ids)] += 1
        n_docs += len(docs)
        bar.update(sum(len(d.encode()) for d in docs))

    for f in files:
        docs = []
        for i, doc in enumerate(iter_documents(f, unwrap)):
            if skip_heldout and is_heldout(i):
                continue
            docs.append(doc)
            if len(docs) == batch_docs:
                flush(docs)
                docs = []
        if docs:
            flush(docs)
    bar.close()
    secs = max(time.time() - t0, 1e-9)
    return {
        "counts": counts,
        "doc_freq": doc_freq,
        "documents": n_docs,
        "seconds": secs,
        "tokens_per_second": float(counts.sum()) / secs,
    }


def select_function_tokens(counts: np.ndarray, coverage: float) -> np.ndarray:
    """Ids of the smallest most-frequent prefix whose cumulative share of occurrences reaches `coverage`."""
    order = np.argsort(-counts, kind="stable")
    cum = np.cumsum(counts[order]) / counts.sum()
    n = int(np.searchsorted(cum, coverage - 1e-12) + 1)
    return order[:n]


def function_tokens(
    tokenizer_dir,
    corpus: list[str | Path],
    coverage: float = 0.40,
    unwrap: bool = True,
    skip_heldout: bool = False,
    progress: bool = True,
) -> dict:
    if not 0 < coverage <= 1:
        raise CLIError(f"--coverage must be in (0, 1], got {coverage}")
    files = [Path(c) for c in corpus]
    for f in files:
        if not f.is_file():
            raise CLIError(f"corpus file {f} does not exist")
    tok = load_tokenizer(tokenizer_dir)
    c = count_tokens(tok, files, unwrap, skip_heldout, progress=progress)
    total = int(c["counts"].sum())
    if total == 0:
        raise CLIError(f"the corpus ({', '.join(map(str, files))}) holds no tokens")
    ids = select_function_tokens(c["counts"], coverage)
    cum = np.cumsum(c["counts"][ids]) / total
    tokens = [
        {
            "rank": r + 1,
            "id": int(i),
            "token": tok.decode([int(i)]),
            "count": int(c["counts"][i]),
            "share": float(c["counts"][i] / total),
            "cumulative_share": float(cum[r]),
            "doc_fraction": float(c["doc_freq"][i] / c["documents"]),
        }
        for r, i in enumerate(ids)
    ]
    return {
        "tokenizer": str(tokenizer_dir),
        "corpus": [str(f) for f in files],
        "coverage": coverage,
        "unwrap": unwrap,
        "skip_heldout": skip_heldout,
        "total_tokens": total,
        "documents": c["documents"],
        "vocab_size": tok.get_vocab_size(),
        "distinct_tokens_seen": int((c["counts"] > 0).sum()),
        "n_function_tokens": len(tokens),
        "achieved_coverage": float(cum[-1]),
        "tokens_per_second": c["tokens_per_second"],
        "tokens": tokens,
    }


def main(args) -> int:
    result = function_tokens(
        args.tokenizer, args.corpus, args.coverage, unwrap=not args.raw, skip_heldout=args.skip_heldout
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    shown = " ".join(repr(t["token"]) for t in result["tokens"][:20])
    print(
        f"{result['n_function_tokens']} function tokens cover {result['achieved_coverage']:.1%} of "
        f"{result['total_tokens']:,} tokens ({result['tokens_per_second']:,.0f} tokens/s); top: {shown}"
    )
    print(f"wrote {out}")
    return 0
