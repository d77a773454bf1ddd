"""The shipped SAEs: SAELens format (sae_lens loads them and agrees with our core), corrupt files, quality, releases."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from functok_vllm.cli import main as cli_main
from functok_vllm.core.sae import SAE, SAEConfig, SAELoadError
from functok_vllm.corpus import load_split
from functok_vllm.engines.hf.hooks import load_model
from functok_vllm.engines.placement import residual_hooks
from functok_vllm.errors import CLIError
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES, SAE_RELEASES
from functok_vllm.releases import known_releases, resolve_sae
from functok_vllm.train.sae_eval import L0_RANGE, MAX_DEAD_PCT, MIN_FVE, evaluate, failed_bars

torch.set_num_threads(1)
SAE_DIRS = sorted(DEMO_SAES.glob("layer_*"))


@pytest.fixture(scope="module")
def lens():
    import sae_lens

    return sae_lens


@pytest.fixture(scope="module")
def residuals() -> dict[int, torch.Tensor]:
    """Real residual streams of the demo model on held-out text: {layer: (tokens, d_model)}."""
    model, tok = load_model(DEMO_MODEL)
    ids = tok(" ".join(load_split().val[:40]), return_tensors="pt")["input_ids"][:, :512]  # (1, 512)
    store = {}

    def capture(layer):
        return lambda h: store.__setitem__(layer, h.clone())

    with torch.no_grad(), residual_hooks(model, {sae.layer: capture(sae.layer) for sae in _ours()}):
        model(input_ids=ids)
    return store


def _ours() -> list[SAE]:
    return [SAE.load(d) for d in SAE_DIRS]


def test_three_shipped_saes_exist():
    assert [d.name for d in SAE_DIRS] == ["layer_0", "layer_1", "layer_2"]


def test_sae_lens_loads_shipped_saes_and_encodes_like_our_core(lens, residuals):
    hidden = json.loads((DEMO_MODEL / "config.json").read_text())["hidden_size"]
    for d, ours in zip(SAE_DIRS, _ours(), strict=True):
        theirs = lens.SAE.load_from_disk(str(d), dtype="float32")
        assert theirs.cfg.d_in == hidden == ours.d_in
        assert theirs.cfg.d_sae == ours.d_sae
        assert theirs.cfg.architecture() == ours.cfg.architecture == "jumprelu"
        assert theirs.cfg.metadata.hook_name == f"blocks.{ours.layer}.hook_resid_post"
        x = residuals[ours.layer]  # (tokens, d_model)
        with torch.no_grad():
            acts_theirs, acts_ours = theirs.encode(x), ours.encode(x)
            assert (acts_ours > 0).sum() > 0
            torch.testing.assert_close(acts_ours, acts_theirs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.decode(acts_ours), theirs.decode(acts_theirs), rtol=1e-4, atol=1e-4)


def _random_sae(arch: str) -> SAE:
    g = torch.Generator().manual_seed(len(arch))
    d_in, d_sae = 16, 64
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, hook_name="blocks.3.hook_resid_post", k=8)
    threshold = torch.rand(d_sae, generator=g) * 0.5 if arch == "jumprelu" else None
    W = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return SAE(
        cfg,
        {"W_enc": W(d_in, d_sae), "b_enc": W(d_sae), "W_dec": W(d_sae, d_in), "b_dec": W(d_in), "threshold": threshold},
    )


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_save_then_sae_lens_load_round_trip(lens, tmp_path, arch):
    ours = _random_sae(arch)
    ours.save(tmp_path / "ours")
    theirs = lens.SAE.load_from_disk(str(tmp_path / "ours"), dtype="float32")
    assert theirs.cfg.architecture() == arch
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu" else ()):
        torch.testing.assert_close(getattr(theirs, name).detach(), getattr(ours, name), rtol=0, atol=0)
    if arch == "topk":
        assert theirs.cfg.k == ours.cfg.k
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))  # (tokens, d_in)
    with torch.no_grad():
        assert (ours.encode(x) > 0).any()
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    theirs.save_model(tmp_path / "theirs")  # and back: what sae-lens writes (e.g. a fetched release), our core reads
    back = SAE.load(tmp_path / "theirs")
    assert back.cfg.architecture == arch and back.layer == 3
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(back, name), getattr(ours, name), rtol=0, atol=0)


@pytest.fixture
def sae_copy(tmp_path) -> Path:
    d = tmp_path / "layer_0"
    shutil.copytree(SAE_DIRS[0], d)
    return d


def test_truncated_safetensors_names_the_file(sae_copy):
    w = sae_copy / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(SAELoadError, match="sae_weights.safetensors"):
        SAE.load(sae_copy)


def test_d_in_that_contradicts_the_weights_names_the_file(sae_copy):
    cfg = json.loads((sae_copy / "cfg.json").read_text())
    cfg["d_in"] = cfg["d_in"] // 2
    (sae_copy / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match=r"sae_weights\.safetensors: W_enc has shape"):
        SAE.load(sae_copy)


def test_missing_cfg_json_names_the_file(sae_copy):
    (sae_copy / "cfg.json").unlink()
    with pytest.raises(SAELoadError, match=r"cfg\.json: missing"):
        SAE.load(sae_copy)


def test_resid_pre_hook_reads_the_previous_layers_output():
    pre = SAEConfig(d_in=4, d_sae=8, hook_name="blocks.8.hook_resid_pre")
    assert (pre.layer, pre.site, pre.hook.output_of()) == (8, "resid_pre", 7)
    post = SAEConfig(d_in=4, d_sae=8, hook_name="blocks.8.hook_resid_post")
    assert (post.layer, post.site, post.hook.output_of()) == (8, "resid_post", 8)
    assert SAEConfig(d_in=4, d_sae=8, hook_name="blocks.0.hook_resid_pre").hook.output_of() is None


def test_quality_bars_hold_on_heldout_text():
    result = evaluate(DEMO_MODEL, DEMO_SAES, n_tokens=8192, progress=False)
    assert result["tokens"] == 8192 and len(result["layers"]) == len(SAE_DIRS)
    assert 0 < result["ce_clean"] < 6.0
    for row in result["layers"]:
        assert row["fve"] >= MIN_FVE, row
        assert L0_RANGE[0] <= row["mean_l0"] <= L0_RANGE[1], row
        assert row["dead_pct"] < MAX_DEAD_PCT, row
        assert math.isfinite(row["ce_increase"]) and row["ce_increase"] < 1.0, row
        assert failed_bars(row) == []


def test_sae_eval_cli_refuses_missing_dirs(tmp_path, capsys):
    assert cli_main(["sae-eval", "--model", str(tmp_path / "nope"), "--saes", str(DEMO_SAES)]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli_main(["sae-eval", "--model", str(DEMO_MODEL), "--saes", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert "gone" in err and len(err.strip().splitlines()) == 1


def test_releases_json_matches_sae_lens_directory(lens):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for name, e in known_releases(SAE_RELEASES).items():
        assert name in directory, name
        assert directory[name].repo_id == e["repo_id"] and directory[name].model == e["model"], name
        lo, hi = e["layers"]
        ids = (
            e["sae_ids"].values()
            if "sae_ids" in e
            else [e["sae_id_pattern"].format(layer=n) for n in range(lo, hi + 1)]
        )
        for sae_id in ids:
            assert sae_id in directory[name].saes_map, (name, sae_id)
    paper = known_releases(SAE_RELEASES)["gemma-scope-9b-pt-res"]["sae_ids"]  # the paper's 1M-wide dictionaries
    assert sorted(map(int, paper)) == [9, 20, 31] and all(f"layer_{n}/width_1m/" in paper[n] for n in paper)


def test_resolve_sae_local_dir_and_offline_release(tmp_path, monkeypatch):
    assert resolve_sae(str(SAE_DIRS[1])) == SAE_DIRS[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLIError, match=r"gpt2-small-res-jb \(sae id blocks\.8\.hook_resid_pre\).*hub"):
        resolve_sae("gpt2-small-res-jb:8", cache_dir=tmp_path)
    with pytest.raises(CLIError, match="gemma-scope-2b-pt-res-canonical.*hub"):
        resolve_sae("gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical", cache_dir=tmp_path)
    with pytest.raises(CLIError, match=r"covers layers 0\.\.31, not 40"):
        resolve_sae("llama_scope_lxr_8x:40", cache_dir=tmp_path)
    with pytest.raises(CLIError, match=r"gemma-scope-9b-pt-res \(sae id layer_20/width_1m/average_l0_101\).*hub"):
        resolve_sae("gemma-scope-9b-pt-res:20", cache_dir=tmp_path)
    with pytest.raises(CLIError, match=r"lists layers 9/20/31, not 10"):
        resolve_sae("gemma-scope-9b-pt-res:10", cache_dir=tmp_path)
    with pytest.raises(CLIError, match="neither an existing directory nor release:sae_id"):
        resolve_sae(str(tmp_path / "no_such_sae"), cache_dir=tmp_path)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "standard"])
def test_active_is_exactly_encode_above_zero(arch):
    sae = _random_sae(arch)
    if arch == "jumprelu":
        sae.threshold[:8] = -0.3  # a negative threshold: relu still decides
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))  # (tokens, d_in)
    active = sae.active(x)
    assert active.dtype == torch.bool and active.any() and not active.all()
    assert torch.equal(active, sae.encode(x) > 0)
