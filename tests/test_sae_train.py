"""The SAE training script on any causal LM (a random 2-layer Llama made here), its sparse gradient, and the shipped
SmolLM2 SAEs as sae-lens reads them."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from functok_vllm.core.sae import SAE
from functok_vllm.engines.placement import decoder_layers
from functok_vllm.paths import DEMO_MODEL, ROOT
from functok_vllm.train.sae_train import (
    PRESETS,
    SAETrainConfig,
    _SelectedPre,
    batch_topk,
    collect_residuals,
    config_for,
    default_layers,
    train_one,
    train_saes,
)

SMOLLM2_SAES = ROOT / "sae_weights" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A 2-layer random-weight Llama saved with functok-tiny's tokenizer: (directory, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("models") / "rand-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / f, d / f)
    return d, model


def test_train_saes_on_a_random_llama_saves_loadable_saes(random_llama, tmp_path):
    model_dir, _ = random_llama
    cfg = SAETrainConfig(
        layers=(0, 1), expansion=4, k=8, activation_tokens=4096, batch_size=256, steps=30, seq_len=64, row_cap=16
    )
    stats = train_saes(model_dir, tmp_path, cfg, threads=1, progress=False)
    assert [s["layer"] for s in stats] == [0, 1]
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["model_name"] == "rand-llama" and report["tokens"] == 4096
    for layer in (0, 1):
        sae = SAE.load(tmp_path / f"layer_{layer}")
        assert (sae.d_in, sae.d_sae, sae.layer, sae.cfg.architecture) == (32, 128, layer, "jumprelu")
        meta = sae.cfg.extra["metadata"]
        assert meta["model_name"] == "rand-llama" and meta["hf_hook_name"] == f"model.layers.{layer}"
        assert json.loads((tmp_path / f"layer_{layer}" / "cfg.json").read_text())["dtype"] == "float16"
        assert torch.isfinite(sae.threshold).all() and (sae.threshold > 0).all()


def test_collection_stops_after_the_deepest_layer_and_skips_first_positions(random_llama):
    _, model = random_llama
    ran = []
    handles = [m.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, m in enumerate(decoder_layers(model))]
    handles.append(model.lm_head.register_forward_hook(lambda *_a: ran.append("lm_head")))
    seqs = torch.randint(0, 8192, (3, 16))  # (n_seq, seq_len)
    try:
        cfg = SAETrainConfig(layers=(0,), seq_len=16, skip_first=1, fwd_batch=2)
        acts = collect_residuals(model, seqs, cfg, progress=False)[0]
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 0]  # two forward batches, layer 1 and the LM head never ran
    assert acts.shape == (3 * 15, 32)
    with torch.no_grad():
        full = model(input_ids=seqs, output_hidden_states=True).hidden_states[1]  # output of layer 0
    torch.testing.assert_close(acts, full[:, 1:].reshape(-1, 32))


def test_sparse_encoder_gradient_equals_dense_autograd():
    g = torch.Generator().manual_seed(0)
    xin = torch.randn(64, 16, generator=g, requires_grad=True)
    W = torch.randn(16, 48, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = torch.addmm(b, xin, W).relu()
    rows, cols = batch_topk(pre, 4, 0)
    w = torch.randn(len(rows), generator=g)  # an arbitrary loss on the selected values
    (_SelectedPre.apply(xin, W, b, pre, rows, cols) * w).sum().backward()
    ours = [t.grad.clone() for t in (xin, W, b)]
    for t in (xin, W, b):
        t.grad = None
    ((xin @ W + b)[rows, cols] * w).sum().backward()
    for a, t in zip(ours, (xin, W, b), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)


def test_row_capped_batch_topk_equals_exact_when_no_row_hits_the_cap():
    pre = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).relu()
    exact = batch_topk(pre, 8, 0)
    capped = batch_topk(pre, 8, 64)
    assert torch.bincount(exact[0]).max() < 64
    assert all(torch.equal(a, b) for a, b in zip(exact, capped, strict=True))


def test_massive_tokens_get_the_sink_feature_and_no_trained_feature_reads_them():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(4096, 16, generator=g)  # (tokens, d_in)
    sink = torch.zeros(16)
    sink[3] = 400.0
    acts[::64] = sink + torch.randn(64, 16, generator=g)  # 64 attention-sink-like tokens, ~100x the others' norm
    cfg = SAETrainConfig(layers=(2,), expansion=4, k=4, batch_size=256, steps=40, seq_len=64, massive_ratio=20.0)
    sae, stats = train_one(acts, cfg, 2, "synthetic", progress=False)
    assert stats["massive_tokens"] == 64 and stats["sink_feature"] == 63 and stats["massive_positions"] == {"0": 64}
    assert sae.d_sae == 64 and sae.cfg.extra["metadata"]["functok_sink_feature"] == 63
    u = sae.W_dec[63]
    assert u[3] > 0.99 and torch.allclose(sae.W_enc[:, 63], u)
    assert (u @ sae.W_enc[:, :63]).abs().max() < 1e-4  # trained encoders are orthogonal to the sink direction
    a = sae.encode(acts)  # (tokens, 64)
    massive = torch.zeros(4096, dtype=torch.bool)
    massive[::64] = True
    assert (a[massive, 63] > 0).all() and (a[~massive, 63] == 0).all()
    rel = (sae.decode(a[massive]) - acts[massive]).norm(dim=-1) / acts[massive].norm(dim=-1)
    assert rel.max() < 0.05


def test_presets_and_default_layers():
    assert config_for("functok-tiny", 4) == SAETrainConfig() and SAETrainConfig().layers == (0, 1, 2)
    assert config_for("SmolLM2-135M-Instruct", 30).layers == (7, 15, 22)
    assert config_for("SmolLM2-135M-Instruct", 30, steps=5, k=None).steps == 5
    assert default_layers(4) == (0, 1, 2) and config_for("other", 12).layers == default_layers(12) == (2, 5, 8)
    with pytest.raises(ValueError, match="skip_first"):
        replace(PRESETS["SmolLM2-135M-Instruct"], skip_first=256)


@pytest.mark.parametrize("layer", [7, 15, 22])
def test_sae_lens_loads_the_smollm2_saes_and_encodes_like_our_core(layer):
    from sae_lens import SAE as LensSAE

    d = SMOLLM2_SAES / f"layer_{layer}"
    ours = SAE.load(d)
    theirs = LensSAE.load_from_disk(str(d), dtype="float32")
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (ours.d_in, ours.d_sae) == (576, 4608)
    assert theirs.cfg.architecture() == "jumprelu"
    assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "SmolLM2-135M-Instruct"
    g = torch.Generator().manual_seed(layer)
    scale = ours.b_dec.norm() / 24  # residual-sized: a few times b_dec's per-dimension scale
    x = ours.b_dec + scale * torch.randn(256, 576, generator=g)  # (tokens, d_model)
    with torch.no_grad():
        acts_ours, acts_theirs = ours.encode(x), theirs.encode(x)
        assert (acts_ours > 0).sum() > 0
        torch.testing.assert_close(acts_ours, acts_theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.decode(acts_ours), theirs.decode(acts_theirs), rtol=1e-4, atol=1e-3)


def test_train_saes_cli_refuses_a_missing_model_a_bad_override_and_a_missing_layer(random_llama, tmp_path, capsys):
    from functok_vllm.cli import main as cli_main

    assert cli_main(["train-saes", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    out = ["--out", str(tmp_path / "o")]
    assert cli_main(["train-saes", "--model", str(random_llama[0]), "--skip-first", "999", *out]) == 2
    assert "skip_first" in capsys.readouterr().err
    assert cli_main(["train-saes", "--model", str(random_llama[0]), "--layers", "1", "2", *out]) == 2
    assert "layers [1, 2]: rand-llama has decoder layers 0-1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
