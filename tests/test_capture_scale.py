"""The analysis at the paper's scale: `--plan` from config files alone (its figures by hand arithmetic), and SAEs
loaded encoder-only for capture (the same firing sets as the full SAE, no decoder held)."""

import json

import pytest
import torch

from functok_vllm.analysis.plan import DEVICES, PlanInput, make_plan, model_shape
from functok_vllm.cli import main as cli_main
from functok_vllm.core.sae import SAE, sae_dirs
from functok_vllm.paths import DEMO_MODEL, shipped_saes

GEMMA_2_9B = {  # google/gemma-2-9b config.json, the fields the plan reads
    "model_type": "gemma2",
    "hidden_size": 3584,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "intermediate_size": 14336,
    "vocab_size": 256000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
D_SAE = 1 << 20


@pytest.fixture()
def paper_scale(tmp_path):
    """A Gemma-2-9B model directory and three 1M-wide SAE directories holding config files and no weights at all."""
    model = tmp_path / "gemma-2-9b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(GEMMA_2_9B))
    for layer in (9, 20, 31):
        d = tmp_path / "saes" / f"layer_{layer}"
        d.mkdir(parents=True)
        cfg = {"d_in": 3584, "d_sae": D_SAE, "architecture": "jumprelu", "hook_name": f"blocks.{layer}.hook_resid_post"}
        (d / "cfg.json").write_text(json.dumps(cfg))
    return model, tmp_path / "saes"


def test_plan_runs_without_weights_and_its_memory_is_the_arithmetic(paper_scale, capsys):
    model, saes = paper_scale
    argv = ["analyze", "coverage", "--plan", "--model", str(model), "--saes", str(saes), "--max-tokens", "5000000"]
    assert cli_main([*argv, "--engine", "vllm", "--plan-device", "h100"]) == 0  # no weights exist: none were read
    out = capsys.readouterr().out
    assert "SAE L31 weights: d_sae 1048576, float32, encoder only" in out and "estimate by arithmetic" in out

    # by hand: embeddings 256000 x 3584 (tied); per layer Q, O 3584 x 16 x 256, K, V 3584 x 8 x 256, MLP 3x 3584 x 14336
    params = 256000 * 3584 + 42 * (3584 * 256 * (2 * 16 + 2 * 8) + 3 * 3584 * 14336)
    assert params == 9_241_100_288 == model_shape(model).params
    sae = {layer: (3584, D_SAE, "jumprelu") for layer in (9, 20, 31)}
    bf16 = dict(engine="vllm", device="h100", sae_dtype="bfloat16", model_dtype="auto")  # the config's bfloat16
    vllm = make_plan(PlanInput(model_shape(model), sae, 5_000_000, 256, 8, **bf16))
    rows = {r[0].split(":")[0]: r for r in vllm.rows}
    assert rows["model"][1] == 2 * params  # bfloat16 weights
    f32 = make_plan(PlanInput(model_shape(model), sae, 5_000_000, 256, 8, engine="vllm", device="h100"))
    assert {r[0].split(":")[0]: r for r in f32.rows}["model"][1] == 4 * params  # --model-dtype's default: what runs
    encoder = 3584 * D_SAE * 2 + 3 * D_SAE * 2 + 3584 * 2  # W_enc, b_enc + threshold (+ a spare d_sae), b_dec
    assert rows["SAE L9 weights"][1] == encoder  # the capture-only worker holds no W_dec
    chunk_rows = (2 << 30) // (D_SAE * 4)  # bf16 pre-activations + 2 bool masks per element
    assert chunk_rows == 512 and rows["capture L9"][0].startswith(f"capture L9: chunks of {chunk_rows} rows")
    tp2 = make_plan(PlanInput(model_shape(model), sae, 5_000_000, 256, 8, **bf16, tensor_parallel=2))
    assert tp2.rows[0][1] == params  # half the bf16 weights per GPU; every rank holds the SAEs and builds the graph
    assert tp2.device_bytes == vllm.device_bytes - params and tp2.host_bytes == 2 * vllm.host_bytes
    dp4 = make_plan(PlanInput(model_shape(model), sae, 5_000_000, 256, 8, **bf16, data_parallel=4))
    assert dp4.device_bytes == vllm.device_bytes and dp4.host_bytes == vllm.host_bytes  # per engine; all edges
    assert dp4.seconds == pytest.approx(vllm.seconds / 4)  # four GPUs at once
    hf = make_plan(PlanInput(model_shape(model), sae, 5_000_000, 256, 8, sae_dtype="bfloat16"))
    hf_rows = {r[0].split(":")[0]: r for r in hf.rows}
    assert hf_rows["model"][1] == 4 * params and hf_rows["SAE L9 weights"][1] == encoder  # float32 model, no W_dec
    assert hf_rows["SAE L9 weights"] == rows["SAE L9 weights"]  # both engines: encoders only, in --sae-dtype
    assert hf.seconds > vllm.seconds  # the CPU is slower than an H100
    assert DEVICES["cpu"].source.startswith("measured") and DEVICES["h100"].source.startswith("estimate")


def test_plan_refuses_what_it_cannot_plan(paper_scale, tmp_path, capsys):
    model, saes = paper_scale
    assert cli_main(["analyze", "coverage", "--plan", "--model", str(model), "--saes", str(saes)]) == 2
    assert "--max-tokens" in capsys.readouterr().err
    (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    argv = ["analyze", "coverage", "--plan", "--model", str(model), "--saes", str(saes), "--max-tokens", "10"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1


def test_encoder_only_sae_fires_like_the_full_one_and_holds_no_decoder():
    for path in sae_dirs([shipped_saes(DEMO_MODEL)]):
        full, lean = SAE.load(path), SAE.load(path, decoder=False)
        assert lean.W_dec is None and "W_dec" not in lean.tensors and full.W_dec is not None
        x = torch.randn(64, full.d_in, generator=torch.Generator().manual_seed(0)) * 4  # (tokens, d_in)
        assert torch.equal(lean.active(x), full.active(x)) and full.active(x).any()
        assert torch.equal(lean.encode(x), full.encode(x))
        held = sum(t.numel() for t in lean.tensors.values())
        assert held == sum(t.numel() for t in full.tensors.values()) - full.d_sae * full.d_in
        with pytest.raises(ValueError, match="encoder-only"):
            lean.decode(lean.encode(x))
