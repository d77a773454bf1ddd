"""Data-parallel coverage: the merge of shard graphs on planted captures (exactly one pass over all windows, and
not when a shard is missing or out of order), the window split, and `--data-parallel-size 2` end to end on the demo
model against one process (the same files, byte for byte)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from functok_vllm.analysis.coverage_dp import shard_bounds, shard_stream
from functok_vllm.core import SAE, SAEConfig
from functok_vllm.core.capture import CoverageCapture, EdgeBits
from functok_vllm.errors import CLIError

FUNCTOK = str(Path(sys.executable).parent / "functok")
SEQ, VOCAB, D_IN, D_SAE = 12, 40, 8, 96


def planted_sae(seed: int = 0) -> SAE:
    """A JumpReLU SAE on d_in 8 with random encoder columns and a threshold that lets about a tenth fire."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_IN, D_SAE, generator=g)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu", hook_name="blocks.0.hook_resid_post")
    t = {"W_enc": w, "b_enc": torch.zeros(D_SAE), "W_dec": w.t().contiguous(), "b_dec": torch.zeros(D_IN)}
    return SAE(cfg, t | {"threshold": torch.full((D_SAE,), 3.0)})


def windows(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, SEQ), residuals (n, SEQ, D_IN)): planted windows whose first token is sometimes BOS (0), one row
    a loud sink (norm x 50), and token 1 a separator."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    h = torch.randn(n, SEQ, D_IN, generator=g)
    h[0, 3] *= 50
    return ids, h


def capture(ids: torch.Tensor, h: torch.Tensor, batch: int) -> EdgeBits:
    """One process's graph over the windows, in forwards of `batch` windows (what an engine's capture does)."""
    fn = torch.zeros(VOCAB, dtype=torch.bool)
    fn[:6] = True
    cap = CoverageCapture({0: planted_sae()}, [0], VOCAB, skip_id=1, fn_mask=fn, bos_id=0)
    for s in range(0, len(ids), batch):
        b_ids, b_h = ids[s : s + batch], h[s : s + batch]
        positions = torch.arange(SEQ).repeat(len(b_ids))
        cap.observe(0, b_ids.reshape(-1), b_h.reshape(-1, D_IN), positions)
    return cap.graphs[0]


def same(a: EdgeBits, b: EdgeBits) -> bool:
    sa, sb = a.state(), b.state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_merged_shards_equal_one_pass_and_a_wrong_merge_does_not():
    ids, h = windows(30)
    whole = capture(ids, h, batch=8)
    bounds = shard_bounds(len(ids), 3)  # 0, 10, 20, 30: shards batched differently from the whole run
    parts = [capture(ids[a:b], h[a:b], batch=4) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert whole.n_edges > 500 and whole.n_sinks > 0 and len(whole.win_fn) == 30  # a real graph, sinks left out
    merged = EdgeBits.merge(parts)
    assert same(merged, whole)  # counts, edge keys and firings, window records, sinks: every tensor equal
    assert not same(EdgeBits.merge(parts[:2]), whole)  # a shard missing: the test can fail
    assert not same(EdgeBits.merge(parts[::-1]), whole)  # out of order: the per-window records are another order
    ref = EdgeBits.merge(parts[::-1])
    assert torch.equal(ref.pair_key, whole.pair_key) and torch.equal(ref.pair_n, whole.pair_n)  # edges: order-free


def test_merge_refuses_graphs_of_different_saes():
    with pytest.raises(ValueError, match="different SAEs or tokenizers"):
        EdgeBits.merge([EdgeBits(96, 40), EdgeBits(64, 40)])
    with pytest.raises(ValueError, match="no graphs"):
        EdgeBits.merge([])


@pytest.mark.parametrize("n_tokens,seq,shards", [(3000, 100, 2), (3050, 100, 3), (997, 10, 7), (40, 10, 4)])
def test_shards_cover_every_window_once_in_order(n_tokens, seq, shards):
    stream = torch.arange(n_tokens)
    got = [shard_stream(stream, seq, shards, i) for i in range(shards)]
    assert torch.equal(torch.cat(got), stream)  # every token once, in order
    assert all(len(s) % seq == 0 for s in got[:-1])  # shards start at window boundaries; the tail goes last
    sizes = [len(s) // seq for s in got]
    assert max(sizes) - min(sizes) <= 1


def test_fewer_windows_than_shards_is_refused():
    with pytest.raises(CLIError, match="needs at least 4 windows; the corpus gives 3"):
        shard_bounds(3, 4)


ARGS = ["--max-tokens", "2050", "--seq-len", "100", "--batch-size", "8"]


def coverage(out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [FUNCTOK, "analyze", "coverage", "--out", str(out), *ARGS, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two shards need two cores")
def test_two_shards_write_the_files_one_process_writes(tmp_path):
    """The transformers engine in two processes of one core each: coverage.json and coverage.csv byte-equal to one
    process over the same 20 windows and a 50-token tail (shards of 10 and 10 + tail, so batches of 8 + 2 against
    8 + 8 + 4); the nulls' bootstrap over windows included, since the window records come back in order."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = coverage(one, "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = coverage(two, "--data-parallel-size", "2", "--threads", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("coverage:") >= 2  # two progress bars: two engine processes ran
    for name in ("coverage.json", "coverage.csv"):
        a, b = (one / name).read_bytes(), (two / name).read_bytes()
        assert len(a) > 10_000 and a == b, name


def test_more_shards_than_cores_is_refused_before_starting(tmp_path):
    n = len(os.sched_getaffinity(0)) + 1
    r = coverage(tmp_path, "--data-parallel-size", str(n))
    assert r.returncode == 2, r.stderr
    assert f"{n} shards x 1 ranks need {n} cores" in r.stderr and "Traceback" not in r.stderr


def test_a_failing_shard_fails_the_run_with_its_reason(tmp_path):
    """An SAE whose cfg.json reads fine but whose weights do not: the check here passes, every shard fails loading
    it, and the run ends with exit 2 naming the shard, the shard's own one-line reason above it, no traceback."""
    from functok_vllm.paths import DEMO_SAES

    saes = tmp_path / "saes"
    shutil.copytree(DEMO_SAES, saes)
    (saes / "layer_1" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    r = coverage(tmp_path / "out", "--saes", str(saes), "--data-parallel-size", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "cannot be read as safetensors" in r.stderr and "coverage shard" in r.stderr and "failed" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "coverage.json").exists()
