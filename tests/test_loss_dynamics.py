"""Loss split as learning dynamics: the reduction-share verdict on planted per-window losses both ways, the bigram
baseline against hand-computed probabilities, per-window sums against the pooled split, checkpoint step names."""

import math

import numpy as np
import pytest
import torch

from functok_vllm.analysis import loss_dynamics as ld
from functok_vllm.analysis import loss_split
from functok_vllm.analysis.verdict import DOES_NOT_SUPPORT, SUPPORTS

FC = loss_split.GROUPS.index("function->content")


def rows(drop_per_token: list[float], windows: int = 40, seed: int = 0) -> list[dict]:
    """Two checkpoints over the same windows: per window, token counts per group with noise; the second checkpoint's
    loss per token is lower by drop_per_token[g] in group g."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 60, size=(windows, 4)).astype(float)
    loss_a = counts * 5.0 + rng.normal(0, 1, size=(windows, 4))
    loss_b = loss_a - counts * np.array(drop_per_token) + rng.normal(0, 1, size=(windows, 4))
    return [
        {"checkpoint": name, "windows": {"counts": counts.tolist(), "sums": s.tolist()}}
        for name, s in (("a", loss_a), ("b", loss_b))
    ]


def test_reduction_verdict_flips_with_where_the_loss_falls():
    (t,) = ld.transitions(rows([0.1, 1.0, 0.1, 0.1]))  # learning happens on function->content
    assert t["finding"].verdict == SUPPORTS
    assert t["shares"][FC] > t["token_shares"][FC]
    (t,) = ld.transitions(rows([0.5, 0.5, 0.5, 0.5]))  # every token gains the same: the token share exactly
    assert t["finding"].verdict == DOES_NOT_SUPPORT
    assert t["shares"][FC] == pytest.approx(t["token_shares"][FC], abs=0.01)
    (t,) = ld.transitions(rows([0.0, 0.0, 0.0, 0.0], seed=1))  # no learning: no share can be claimed
    assert t["finding"].verdict != SUPPORTS


def test_bigram_probabilities_by_hand():
    docs = [[0, 1, 0, 1], [0, 2]]  # pairs (0,1) x2, (1,0) x1, (0,2) x1
    bg = ld.Bigram(iter(docs), vocab=4, beta=1.0)
    uni = np.array([1 + 3, 1 + 2, 1 + 1, 1 + 0]) / 10  # add-one unigram
    nll = bg.nll(torch.tensor([0, 0, 1, 3]), torch.tensor([1, 3, 0, 0]))
    want = [
        -math.log((2 + uni[1]) / (3 + 1)),  # c(0,1) = 2, c(0) = 3
        -math.log((0 + uni[3]) / (3 + 1)),  # an unseen pair keeps a unigram share
        -math.log((1 + uni[0]) / (1 + 1)),
        -math.log((0 + uni[0]) / (0 + 1)),  # an unseen context: the unigram alone
    ]
    assert nll.tolist() == pytest.approx(want)


def test_row_sums_add_up_to_the_pooled_split():
    fn = torch.tensor([True, True, False, False, False])
    batch = torch.tensor([[0, 2, 1, 3], [4, 0, 0, 2]])
    ce = torch.arange(6, dtype=torch.float32).view(2, 3)
    counts, sums = loss_split.row_sums(ce, batch, fn, skip_id=4)
    c2, s2 = loss_split.group_sums(ce.flatten(), batch[:, :-1].flatten(), batch[:, 1:].flatten(), fn, 4)
    assert counts.sum(0).tolist() == c2.tolist() and sums.sum(0).tolist() == s2.tolist()
    assert counts.tolist() == [[0, 2, 1, 0], [1, 1, 0, 0]]  # window 2: pair (4, 0) touches the skipped id


def test_checkpoint_steps_from_names():
    assert [loss_split.step_of(n) for n in ("step-00140", "step1000", "checkpoint-500", "final")] == [
        140,
        1000,
        500,
        None,
    ]


def test_loss_split_command_over_pythia_style_checkpoints(tmp_path):
    """Any list of checkpoint directories: names like Pythia's `step140` give the steps, and the reduction between
    each consecutive pair comes out with its finding and the bigram row."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from functok_vllm.paths import DEMO_MODEL

    for step in ("00140", "00500"):
        (tmp_path / f"step{int(step)}").symlink_to(DEMO_MODEL / "checkpoints" / f"step-{step}")
    cks = [str(tmp_path / "step140"), str(tmp_path / "step500"), str(DEMO_MODEL)]
    functok = str(Path(sys.executable).parent / "functok")
    cmd = [functok, "analyze", "loss-split", "--checkpoints", *cks, "--max-tokens", "1536", "--seq-len", "128"]
    r = subprocess.run([*cmd, "--threads", "1", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "o" / "loss_split.json").read_text())
    assert [row["step"] for row in rows] == [140, 500, None]
    md = (tmp_path / "o" / "loss_dynamics.md").read_text()
    assert "| step140 -> step500 |" in md and "| bigram baseline |" in md
    assert "loss reduction f->c step140->step500" in r.stdout
