"""`functok analyze coverage` and `loss-split` on vLLM against the transformers engine. Coverage (capture mode of the
steering worker extension): the same corpus windows give the same graph, so the same numbers in the JSON and the CSV
(up to a float tie at a threshold, see TOL). Loss split (vLLM's prompt logprobs): the same groups and losses. The vLLM
runs are skipped, with the reason, only where `vllm_status()` says vLLM cannot run; the argument checks need no vLLM."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import vllm_in_process

from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.paths import DEMO_MODEL

FUNCTOK = str(Path(sys.executable).parent / "functok")
NO_VLLM = None if vllm_status().ok else vllm_status().line()
# 3,000 held-out tokens in 100-token windows: 30 windows, 4 transformers batches of 8 (the last one short), none of
# which is how vLLM's scheduler batches them; document separators fall inside windows.
# The engines' float32 kernels differ (vLLM's fused norms and CPU attention), so a pre-activation that sits exactly
# on a JumpReLU threshold can land on either side: at 16,384 tokens one edge of 172,664 differed at layer 1 for that
# reason (the transformers pre-activation equalled the threshold). On these 3,000 tokens every number is equal on
# cpu2; the tolerance only keeps such a tie from failing the test on another CPU.
TOL = 1e-3
ARGS = ["--max-tokens", "3000", "--seq-len", "100", "--batch-size", "8", "--threads", "2"]


def coverage(engine: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [FUNCTOK, "analyze", "coverage", "--engine", engine, "--out", str(out), *ARGS, *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # the CLI finds the CPU platform itself
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def hf_coverage(tmp_path_factory) -> Path:
    hf = tmp_path_factory.mktemp("hf")
    r = coverage("transformers", hf)
    assert r.returncode == 0, r.stderr[-3000:]
    return hf


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vllm_coverage_equals_transformers_coverage(tmp_path, hf_coverage, tp):
    """At tensor-parallel 1 and 2 (two CPU ranks, one core each; rank 0 writes the tables): the same tables as the
    transformers engine, hence as each other."""
    if tp > len(os.sched_getaffinity(0)):
        pytest.skip(f"tensor-parallel {tp} needs {tp} cores; this process has {len(os.sched_getaffinity(0))}")
    hf, vl = hf_coverage, tmp_path / "vllm"
    r = coverage("vllm", vl, "--tensor-parallel-size", str(tp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "coverage (vLLM)" in r.stderr  # the capture ran on vLLM, with its progress bar
    assert f"tensor_parallel_size={tp}" in r.stdout + r.stderr  # vLLM's config line (its log goes to stdout)

    a, b = json.loads((hf / "coverage.json").read_text()), json.loads((vl / "coverage.json").read_text())
    assert a["tokens"] == b["tokens"] > 2900  # text tokens (document separators add no edges and are not counted)
    assert set(a["layers"]) == set(b["layers"]) == {"0", "1", "2"}
    for layer, s in a["layers"].items():
        assert s["edges"] > 10_000 and 0 < s["feature_nodes"] <= s["d_sae"]  # a real graph, not an empty one
        for key, value in s.items():  # node and edge counts, reach, degrees, coverage shares
            assert b["layers"][layer][key] == pytest.approx(value, rel=TOL, abs=TOL), (layer, key)
    ta, tb = _table(hf), _table(vl)  # every rank, with degree and cumulative coverage at each layer
    assert [r[:5] for r in ta] == [r[:5] for r in tb]  # rank, id, token, count, is_function: no float in them
    for ra, rb in zip(ta, tb, strict=True):
        assert [float(x) for x in rb[5:]] == pytest.approx([float(x) for x in ra[5:]], rel=TOL, abs=TOL), ra[:3]
    assert sum(ra != rb for ra, rb in zip(ta, tb, strict=True)) <= len(ta) // 100  # (on cpu2: none differ)


def _table(out: Path) -> list[list[str]]:
    rows = list(csv.reader((out / "coverage.csv").open()))
    assert rows[0][:5] == ["rank", "id", "token", "count", "is_function"]
    return rows[1:]


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))
def test_vllm_loss_split_equals_transformers_loss_split(tmp_path):
    ck = DEMO_MODEL / "checkpoints" / "step-00140"  # a training checkpoint: no tokenizer of its own
    args = ["--checkpoints", str(ck), "--max-tokens", "3000", "--seq-len", "100", "--threads", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    got = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / engine
        cmd = [FUNCTOK, "analyze", "loss-split", "--engine", engine, "--out", str(out), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        (got[engine],) = json.loads((out / "loss_split.json").read_text())
    a, b = got["transformers"]["groups"], got["vllm"]["groups"]
    assert a["all"]["tokens"] > 2500 and 3 < a["all"]["mean_loss"] < 9  # an early checkpoint: a high, real loss
    for group, stats in a.items():
        assert b[group]["tokens"] == stats["tokens"], group  # the same pairs, grouped the same way
        for key in ("mean_loss", "loss_share", "token_share"):
            if key in stats:
                assert b[group][key] == pytest.approx(stats[key], rel=1e-4), (group, key)


@pytest.mark.vllm
@pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))
def test_capture_engine_holds_encoders_only_and_refuses_steering():
    """The engine coverage starts is capture-only: its worker holds the layer-1 JumpReLU SAE's encoder alone in the
    asked dtype, measured on the worker (W_enc, b_enc, threshold, b_dec in bfloat16, against W_enc + W_dec + ... in
    float32 for a steering worker, 4x more), and a request that asks to steer or read features is refused, not run
    unsteered; a plain one still runs."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from functok_vllm.analysis.vllm_model import load_vllm
    from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_SAES

    with vllm_in_process(True):  # as `functok analyze` runs it at one rank
        am = load_vllm(DEMO_MODEL, DEMO_SAES, DEMO_FUNCTION_TOKENS, [1], sae_dtype="bfloat16")
    try:
        d_in, d_sae = am.saes[1].d_in, am.saes[1].d_sae
        assert am.sae_bytes() == 2 * (d_in * d_sae + 2 * d_sae + d_in)  # no (d_sae, d_in) decoder, 2 bytes each
        ids = am.tokenizer.encode("The cat sat on the mat because")
        asks = {
            "steering": {"edits": [{"layer": 1, "feature": 3, "strength": 8.0}], "positions": "all"},
            "functok_features": {"layers": [1], "top_k": 4},
        }
        for key, value in asks.items():
            params = SamplingParams(max_tokens=2, temperature=0.0, extra_args={key: value})
            with pytest.raises(VLLMValidationError, match=f"capture only .* cannot serve vllm_xargs.{key}"):
                am.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        (out,) = am.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 2
    finally:
        am.close()


def test_vllm_engine_refuses_a_layer_without_an_sae_before_starting(tmp_path):
    cmd = [FUNCTOK, "analyze", "coverage", "--engine", "vllm", "--layers", "3", "--out", str(tmp_path), *ARGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    if NO_VLLM is None:
        assert "no SAE for layer 3" in r.stderr
    else:
        assert "vLLM not usable here" in r.stderr


def test_an_unknown_engine_is_refused(tmp_path):
    r = subprocess.run(
        [FUNCTOK, "analyze", "coverage", "--engine", "tensorrt", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "invalid choice: 'tensorrt'" in r.stderr
