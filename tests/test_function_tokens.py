"""Function tokens: the shipped set covers 40% of held-out text; the counting CLI is exact, and refuses bad input."""

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from functok_vllm.core.function_tokens import FunctionTokens
from functok_vllm.corpus import DEFAULT_CORPUS_DIR, SHARED_DIR, load_split
from functok_vllm.function_token_discovery import function_tokens, load_tokenizer
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL

torch.set_num_threads(1)
GPT2 = SHARED_DIR / "data" / "tokenizers" / "gpt2"
# A corpus whose counts are known by construction: word -> occurrences per document, for the listed documents.
# Every word is one GPT-2 token (" the" and so on; checked below); "Z" opens each document so that no document
# starts with a spaceless variant of a counted word.
PLAN = {
    " the": (40, range(10)),
    " cat": (60, range(5)),
    " sat": (100, range(2)),
    " on": (5, range(10)),
    " mat": (10, range(7, 10)),
    " dog": (20, range(9, 10)),
}
N_DOCS = 10


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "functok_vllm.cli", "function-tokens", *args], capture_output=True, text=True
    )


def write_planned_corpus(path: Path) -> dict[str, tuple[int, int]]:
    """Write PLAN as wrapped paragraphs; return {token: (count, documents containing it)}, "Z" included."""
    rng = random.Random(0)
    paragraphs = []
    for d in range(N_DOCS):
        words = [w for w, (n, docs) in PLAN.items() if d in docs for _ in range(n)]
        rng.shuffle(words)
        paragraphs.append(textwrap.fill("Z" + "".join(words), width=70))
    path.write_text("\n\n".join(paragraphs) + "\n")
    expected = {w: (n * len(docs), len(docs)) for w, (n, docs) in PLAN.items()}
    expected["Z"] = (N_DOCS, N_DOCS)
    return expected


def test_shipped_set_covers_40_percent_of_heldout_text():
    ft = FunctionTokens.load(DEMO_FUNCTION_TOKENS)
    assert ft.meta["skip_heldout"] is True  # chosen without the validation documents, so this is a real test
    assert ft.meta["n_function_tokens"] == len(ft.ids) == len(set(ft.ids))
    tok = load_tokenizer(DEMO_MODEL)
    ids = np.concatenate([e.ids for e in tok.encode_batch(load_split().val)])
    mask = ft.mask(tok.get_vocab_size()).numpy()
    coverage = mask[ids].mean()
    assert len(ids) > 40_000
    assert coverage >= 0.40, f"{len(ft.ids)} function tokens cover {coverage:.1%} of held-out text"


@pytest.mark.parametrize("coverage", [None, 0.9])
def test_cli_finds_the_constructed_answer(tmp_path, coverage):
    tok = load_tokenizer(GPT2)
    assert all(len(tok.encode(w).ids) == 1 for w in [*PLAN, "Z"])
    expected = write_planned_corpus(tmp_path / "planned.txt")
    total = sum(n for n, _ in expected.values())
    want_cov = 0.40 if coverage is None else coverage
    by_count = sorted(expected, key=lambda w: -expected[w][0])
    cum = np.cumsum([expected[w][0] for w in by_count]) / total
    want = set(by_count[: int(np.argmax(cum >= want_cov)) + 1])

    extra = [] if coverage is None else ["--coverage", str(coverage)]
    r = run_cli(
        "--tokenizer", str(GPT2), "--corpus", str(tmp_path / "planned.txt"), "--out", str(tmp_path / "o.json"), *extra
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["total_tokens"] == total and out["documents"] == N_DOCS
    assert {t["token"] for t in out["tokens"]} == want
    shares = [t["cumulative_share"] for t in out["tokens"]]
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] == out["achieved_coverage"] >= want_cov
    assert len(shares) == 1 or shares[-2] < want_cov  # the smallest prefix reaching the coverage
    for t in out["tokens"]:
        count, n_docs = expected[t["token"]]
        assert t["count"] == count
        assert t["share"] == pytest.approx(count / total)
        assert t["doc_fraction"] == pytest.approx(n_docs / N_DOCS)


def test_a_bos_the_tokenizer_adds_is_not_counted(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(GPT2)  # then a Llama-style post-processor: a BOS before every encoded text
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    assert tok.encode("Z the").ids[0] == 50256
    (tmp_path / "bos").mkdir()
    tok.save(str(tmp_path / "bos" / "tokenizer.json"))
    expected = write_planned_corpus(tmp_path / "planned.txt")
    r = run_cli(
        "--tokenizer",
        str(tmp_path / "bos"),
        "--corpus",
        str(tmp_path / "planned.txt"),
        "--out",
        str(tmp_path / "o.json"),
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["total_tokens"] == sum(n for n, _ in expected.values())  # the planned words, no BOS among them
    assert all(t["id"] != 50256 for t in out["tokens"])


def head_of(name: str, tmp: Path, n_bytes: int = 200_000) -> Path:
    """The first ~n_bytes of a shared corpus file, cut at a line end, copied into tmp."""
    head = (DEFAULT_CORPUS_DIR / name).read_bytes()[:n_bytes].decode("utf-8", errors="ignore")
    path = tmp / name
    path.write_text(head[: head.rfind("\n") + 1])
    return path


def test_gpt2_top_tokens_are_function_words(tmp_path):
    # War and Peace keeps each paragraph on one line, so --raw and unwrapping agree on it; shakespeare breaks every
    # verse line, so with --raw "\n" joins the top tokens and unwrapping removes it.
    wp = function_tokens(GPT2, [head_of("war_and_peace.txt", tmp_path)], progress=False)
    assert {",", ".", " the", " and", " of"} <= {t["token"] for t in wp["tokens"]}
    shakespeare = head_of("tiny_shakespeare.txt", tmp_path)
    r = run_cli("--tokenizer", str(GPT2), "--corpus", str(shakespeare), "--raw", "--out", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr
    raw = {t["token"] for t in json.loads((tmp_path / "o.json").read_text())["tokens"]}
    assert {",", ".", " the", " and", " of", "\n"} <= raw
    unwrapped = {t["token"] for t in function_tokens(GPT2, [shakespeare], progress=False)["tokens"]}
    assert {",", ".", " the", " and", " of"} <= unwrapped and "\n" not in unwrapped


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (CLI arguments, a string the one-line error must contain)."""
    text = tmp / "ok.txt"
    text.write_text("Some text here.\n")
    (tmp / "empty.txt").write_text("\n\n   \n")
    (tmp / "broken_tok").mkdir()
    (tmp / "broken_tok" / "tokenizer.json").write_text("{ this is not a tokenizer")
    (tmp / "no_tok").mkdir()
    gpt2 = ["--tokenizer", str(GPT2)]
    return {
        "missing file": ([*gpt2, "--corpus", str(tmp / "absent.txt")], "absent.txt"),
        "empty corpus": ([*gpt2, "--corpus", str(tmp / "empty.txt")], "holds no tokens"),
        "coverage 0": ([*gpt2, "--corpus", str(text), "--coverage", "0"], "--coverage"),
        "coverage 1.5": ([*gpt2, "--corpus", str(text), "--coverage", "1.5"], "--coverage"),
        "tokenizer does not load": (["--tokenizer", str(tmp / "broken_tok"), "--corpus", str(text)], "broken_tok"),
        "no tokenizer files": (["--tokenizer", str(tmp / "no_tok"), "--corpus", str(text)], "no_tok"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing file", "empty corpus", "coverage 0", "coverage 1.5", "tokenizer does not load", "no tokenizer files"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    args, needle = _bad_inputs(tmp_path)[case]
    r = run_cli(*args, "--out", str(tmp_path / "o.json"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    assert errors[0].startswith("functok function-tokens: error:") and needle in errors[0]
    assert not (tmp_path / "o.json").exists()
