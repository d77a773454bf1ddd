"""`functok capture`: many prompts' activations written to disk in shards on the transformers engine equal an
independent plain transformers forward (`output_hidden_states`, no hooks of ours), row for row in prompt order across
shard boundaries; `--positions function` keeps exactly the function-token rows; bad inputs exit 2 naming them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import eager_model
from transformers import AutoTokenizer

from functok_vllm.analysis.activation_shards import MANIFEST, load_layer, prompts_digest, read_shards
from functok_vllm.paths import DEMO_MODEL

FUNCTOK = str(Path(sys.executable).parent / "functok")
PROMPTS = [
    "The king said to his son",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The cat sat on the mat, and the dog",
    'She said, "I will go to the market in the morning, and then',
    "It",
]


def capture(tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cmd = [FUNCTOK, "capture", "--prompts", str(path), "--out", str(tmp / "out"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference():
    """Token ids of each prompt and its resid_post at layers 1 and 2 from a plain eager forward."""
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    model = eager_model(DEMO_MODEL)
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p)
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # (layers + 1) x (1, n, d)
            out.append((ids, {1: hs[2][0], 2: hs[3][0]}))  # hidden_states[L + 1]: decoder layer L's output
    return out


def test_shards_equal_a_plain_forward_row_for_row(tmp_path, reference):
    r = capture(tmp_path, "--layers", "1", "2", "--shard-rows", "7")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    m = json.loads((out / MANIFEST).read_text())
    total = sum(len(ids) for ids, _ in reference)
    assert m["rows"] == total and m["prompts"] == len(PROMPTS)
    assert m["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert m["prompts_sha256"] == prompts_digest([ids for ids, _ in reference])
    assert [s["rows"] for s in m["shards"]] == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    shards = list(read_shards(out))
    index = torch.cat([s["prompt_index"] for s in shards])
    positions = torch.cat([s["positions"] for s in shards])
    token_ids = torch.cat([s["token_ids"] for s in shards])
    want_index = torch.cat([torch.full((len(ids),), i) for i, (ids, _) in enumerate(reference)])
    assert torch.equal(index, want_index)  # prompt order, whatever order the engine finished them in
    assert torch.equal(positions, torch.cat([torch.arange(len(ids)) for ids, _ in reference]))
    assert torch.equal(token_ids, torch.tensor([t for ids, _ in reference for t in ids]))
    for layer, hook in ((1, "blocks.1.hook_resid_post"), (2, "blocks.2.hook_resid_post")):
        got = load_layer(out, hook)
        want = torch.cat([acts[layer] for _, acts in reference])
        assert got.shape == want.shape == (total, 256)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_function_positions_and_half_precision(tmp_path, reference, demo_function_tokens):
    r = capture(tmp_path, "--layers", "2", "--positions", "function", "--dtype", "float16")
    assert r.returncode == 0, r.stderr[-3000:]
    fn = set(demo_function_tokens.ids)
    want_pos = [p for ids, _ in reference for p, t in enumerate(ids) if t in fn]
    shard = torch.cat([s["positions"] for s in read_shards(tmp_path / "out")])
    assert shard.tolist() == want_pos and len(want_pos) > 5
    got = load_layer(tmp_path / "out", "blocks.2.hook_resid_post")
    assert got.dtype == torch.float16
    want = torch.cat([acts[2][[p for p, t in enumerate(ids) if t in fn]] for ids, acts in reference])
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--layers", "9"], "layer 9 has no hook here"),
        (["--shard-rows", "0"], "--shard-rows"),
        (["--positions", "middle"], "--positions"),
    ],
)
def test_bad_input_exits_2_naming_it(tmp_path, flags, says):
    r = capture(tmp_path, *flags)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / MANIFEST).exists()
