"""SAEs saved by sae-lens itself, every architecture, normalisation and hook point: loaded and encoded as sae-lens does.

The reference is sae-lens 6's own `encode` and `forward` (decode(encode(x)) with its output normalisation); for
`expected_average_only_in`, sae-lens after `fold_activation_norm_scaling_factor`, which is what its `from_pretrained`
does with a release's scaling factor. What functok cannot apply is refused with a message naming what it is.
"""

import json
import re

import pytest
import torch
from reference import lens_new

from functok_vllm.core.hookpoint import HookPoint, parse_hook_name
from functok_vllm.core.sae import SAE, SAELoadError, add_only_points, load_saes

ARCHS = ("standard", "jumprelu", "topk", "gated")
NORMS = ("none", "constant_norm_rescale", "layer_norm")
D_IN, D_SAE = 16, 64


@pytest.fixture(scope="module")
def lens():
    import sae_lens

    return sae_lens


def lens_saved(tmp_path, lens, arch: str, hook_name: str, norm: str = "none", seed: int = 0):
    """(sae-lens SAE, its directory): random weights, saved with sae-lens's own `save_model`."""
    sae = lens_new(arch, D_IN, D_SAE, hook_name, norm, seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.2)
    out = tmp_path / f"{arch}-{norm}-{hook_name}"
    sae.save_model(str(out))
    return sae, out


def inputs(n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, D_IN, generator=g) * 3 + 0.5  # (tokens, d_in), off-centre so layer_norm has work to do


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_and_normalisation_encodes_and_reconstructs_as_sae_lens(tmp_path, lens, arch, norm):
    theirs, path = lens_saved(tmp_path, lens, arch, "blocks.2.hook_resid_post", norm)
    ours = SAE.load(path)
    assert (ours.cfg.architecture, ours.cfg.normalize_activations) == (arch, norm)
    x = inputs()
    with torch.no_grad():
        want_acts, want_recon = theirs.encode(x), theirs(x)
    acts = ours.encode(x)
    assert (acts > 0).any() and not (acts > 0).all()
    torch.testing.assert_close(acts, want_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.reconstruct(x), want_recon, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.active(x), acts > 0)
    if arch != "topk":  # one feature alone, as clamping and top contexts read it
        feats = torch.tensor([0, 5, 17, 63])
        torch.testing.assert_close(ours.encode_features(x, feats), acts[:, feats], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_expected_average_only_in_is_folded_with_its_scaling_factor(tmp_path, lens, arch):
    theirs, path = lens_saved(tmp_path, lens, arch, "blocks.1.hook_resid_post", "expected_average_only_in")
    raw = json.loads((path / "cfg.json").read_text())
    with pytest.raises(SAELoadError, match="expected_average_only_in.*needs its scaling factor"):
        SAE.load(path)
    factor = 0.37
    (path / "cfg.json").write_text(json.dumps(raw | {"norm_scaling_factor": factor}))
    ours = SAE.load(path)
    theirs.fold_activation_norm_scaling_factor(factor)  # what sae-lens's from_pretrained does with the factor
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)
    # Llama Scope writes the dataset's average input norm instead: factor = sqrt(d_in) / norm
    (path / "cfg.json").write_text(json.dumps(raw | {"dataset_average_activation_norm": {"in": D_IN**0.5 / factor}}))
    torch.testing.assert_close(SAE.load(path).encode(x), ours.encode(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,point",
    [
        ("blocks.0.hook_resid_pre", HookPoint(0, "resid_pre")),
        ("blocks.7.hook_resid_pre", HookPoint(7, "resid_pre")),
        ("blocks.7.hook_resid_mid", HookPoint(7, "resid_mid")),
        ("blocks.7.hook_resid_post", HookPoint(7, "resid_post")),
        ("blocks.7.hook_attn_out", HookPoint(7, "attn_out")),
        ("blocks.7.hook_mlp_out", HookPoint(7, "mlp_out")),
        ("model.layers.7", HookPoint(7, "resid_post")),
        ("model.layers.7.mlp", HookPoint(7, "mlp_out")),
        ("model.layers.7.self_attn", HookPoint(7, "attn_out")),
        ("transformer.h.7.attn", HookPoint(7, "attn_out")),
        ("gpt_neox.layers.7.attention", HookPoint(7, "attn_out")),
    ],
)
def test_hook_names_of_both_conventions(name, point):
    assert parse_hook_name(name) == point


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
def test_sae_lens_saes_at_every_hook_point_load_with_their_site(tmp_path, lens, site):
    theirs, path = lens_saved(tmp_path, lens, "jumprelu", f"blocks.3.hook_{site}")
    ours = SAE.load(path)
    assert (ours.layer, ours.cfg.site) == (3, site)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(inputs()), theirs.encode(inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hook_name,why",
    [
        ("blocks.3.attn.hook_z", "per-head tensor"),
        ("blocks.3.attn.hook_q", "per-head tensor"),
        ("blocks.3.mlp.hook_post", "not a point functok reads"),
        ("blocks.3.ln2.hook_normalized", "not a point functok reads"),
    ],
)
def test_other_hook_points_are_refused_naming_the_hook(tmp_path, lens, hook_name, why):
    _, path = lens_saved(tmp_path, lens, "jumprelu", hook_name)
    with pytest.raises(SAELoadError, match=rf"cfg.json: hook point '{re.escape(hook_name)}' is not supported: .*{why}"):
        SAE.load(path)


def test_transcoders_and_head_saes_are_refused_naming_what_they_are(tmp_path, lens):
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    Transcoder(cfg).save_model(str(tmp_path / "tc"))
    with pytest.raises(SAELoadError, match=r"transcoder \(it reads blocks\.1\.hook_resid_mid"):
        SAE.load(tmp_path / "tc")
    _, path = lens_saved(tmp_path, lens, "standard", "blocks.3.hook_resid_post")
    raw = json.loads((path / "cfg.json").read_text())
    raw["metadata"]["hook_head_index"] = 2
    (path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAELoadError, match="one attention head"):
        SAE.load(path)


def test_one_loader_refuses_two_saes_on_one_layer_or_one_tensor(tmp_path, lens):
    _, a = lens_saved(tmp_path / "a", lens, "standard", "blocks.3.hook_resid_post")
    _, b = lens_saved(tmp_path / "b", lens, "standard", "blocks.3.hook_mlp_out")
    with pytest.raises(SAELoadError, match="a second SAE for layer 3"):
        load_saes([a, b])
    _, c = lens_saved(tmp_path / "c", lens, "standard", "blocks.4.hook_resid_pre")  # the same tensor as a
    with pytest.raises(SAELoadError, match=r"reads the same tensor \(blocks\.4\.hook_resid_pre\)"):
        load_saes([a, c])
    with pytest.raises(SAELoadError, match=r"d_in 16 does not match the model's hidden size 32"):
        load_saes([a], d_model=32)
    with pytest.raises(SAELoadError, match="outside the model's 2 decoder layers"):
        load_saes([a], n_layers=2)
    got = load_saes([tmp_path / "a"], weights=False)  # a directory of SAE directories, cfg.json only
    assert list(got) == [3] and got[3].path == a and not hasattr(got[3], "W_enc")


def test_add_only_layers_are_refused_outside_the_model_or_where_an_sae_steers(tmp_path, lens):
    _, a = lens_saved(tmp_path / "a", lens, "standard", "blocks.3.hook_resid_post")
    _, b = lens_saved(tmp_path / "b", lens, "standard", "blocks.2.hook_resid_pre")  # the output of layer 1
    configs = load_saes([a, b], weights=False)
    assert add_only_points([4, 0, 4], configs, 6) == {0: HookPoint(0, "resid_post"), 4: HookPoint(4, "resid_post")}
    with pytest.raises(ValueError, match=r"^3: the SAE at layer 3 \(blocks\.3\.hook_resid_post\) steers there"):
        add_only_points([3], configs)
    with pytest.raises(ValueError, match=r"^1: the SAE at layer 2 \(blocks\.2\.hook_resid_pre\) steers there"):
        add_only_points([1], configs)
    with pytest.raises(ValueError, match=r"^6: the model has decoder layers 0-5"):
        add_only_points([6], configs, 6)
    with pytest.raises(ValueError, match=r"^-1: the model has decoder layers"):
        add_only_points([-1], {})
