"""Projection edits (`project_out`, `cap`, `set`) and norm-relative adds (`strength_unit: "token_norm"`) in the
transformers engine: a mixed batch of requests, each using a different operation (on SAE decoder rows and on a
steering vector) or none, against the independent reference (`reference.py`: a plain forward with each operation
written out in a forward hook at the SAE's hook point), log-probabilities at every generated step within 1e-4
(float32), on the demo model and on a random Llama whose SAEs sit at attn_out, resid_mid and mlp_out (with per-token
output normalisation), so the op's reading of h at each hook point is checked too.
"""

import torch
from reference import eager_model, lens_sae, load_lens, logprobs, random_model
from test_hf_families import serve
from test_hook_points import BASE, BODY, PROMPTS

from functok_vllm.core import SAE
from functok_vllm.core.vector import Vector
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES
from functok_vllm.steering import SteeringSpec, VectorEdit

TOL = 1e-4
MOVED = 1e-2  # each request's log-probabilities must move at least this much from the unsteered ones somewhere
LLAMA_SITES = {
    1: ("attn_out", "gated", "none"),
    2: ("resid_mid", "jumprelu", "layer_norm"),
    3: ("mlp_out", "standard", "none"),
}


def cases(layers: list[int], d_model: int) -> list:
    """(user spec or None, vector edit fields or None): unsteered, then one operation per request, then a mix."""
    a, b, c = layers
    return [
        (None, None),
        ({"edits": [{"layer": a, "feature": 5, "mode": "project_out"}], "positions": "all"}, None),
        ({"edits": [{"layer": b, "feature": 7, "mode": "cap", "min": 1.0, "max": 1.5}], "positions": "all"}, None),
        ({"edits": [{"layer": c, "feature": 2, "mode": "set", "value": -2.0}], "positions": "prompt"}, None),
        (
            {"edits": [{"layer": b, "feature": 9, "strength": 0.5, "strength_unit": "token_norm"}], "positions": "all"},
            None,
        ),
        ({"edits": [], "positions": "all"}, {"mode": "project_out"}),
        (
            {
                "edits": [
                    {"layer": a, "feature": 3, "strength": 2.0},
                    {"layer": c, "feature": 4, "mode": "cap", "max": -0.5},
                    {"layer": c, "feature": 6, "strength": -0.3, "strength_unit": "token_norm"},
                ],
                "positions": "all",
            },
            {"mode": "cap", "min": 0.5},
        ),
    ]


def check(model_dir, sae_dir, sae_paths: dict, points: dict, prompts: list):
    layers = sorted(sae_paths)
    saes = {L: SAE.load(p) for L, p in sae_paths.items()}
    d = next(iter(saes.values())).d_in
    torch.manual_seed(1)
    dirs = {L: torch.randn(d) for L in layers[1:]}  # a steering vector at the two later SAEs' hook points
    vec = Vector.make({saes[L].cfg.hook.canonical().name: t for L, t in dirs.items()})
    hooks = {saes[L].cfg.hook.canonical().name: L for L in layers}
    run, ref = [], []
    for ids in prompts:
        for user, vfields in cases(layers, d):
            if user is None:
                run.append((ids, None))
                ref.append((ids, None))
                continue
            edits = list(SteeringSpec.from_dict(user).edits)
            refs = [dict(e) for e in user["edits"]]
            if vfields is not None:
                edits.append(VectorEdit(vector="probe", **vfields).bound(vec, vec.at(hooks)))
                refs += [{"layer": L, "direction": t, **vfields} for L, t in dirs.items()]
            run.append((ids, SteeringSpec(edits=tuple(edits), positions=user["positions"])))
            ref.append((ids, {"edits": refs, "positions": user["positions"]}))
    tokens, got, _, _ = serve(model_dir, sae_dir, run)
    model = eager_model(model_dir)
    lenses = {L: load_lens(p) for L, p in sae_paths.items()}
    per = len(cases(layers, d))
    for i, ((ids, spec), toks, g) in enumerate(zip(ref, tokens, got, strict=True)):
        rows = logprobs(model, lenses, points, ids + toks, len(ids), spec)[len(ids) - 1 :]  # (NEW, vocab)
        for step, tok in enumerate(toks):
            err = float((g[step] - rows[step]).abs().max())
            assert err < TOL, (i, spec, step, err)
            assert float(rows[step, tok]) >= float(rows[step].max()) - TOL, (i, step)
        if i % per:  # each operation moved the model: agreeing with the reference is not agreeing with no steering
            moved = float((g[0] - got[i - i % per][0]).abs().max())  # the first step: after the same prompt
            assert moved > MOVED, (i, spec, moved)


def test_projections_and_norm_adds_match_the_reference_on_the_demo_model(demo_tokenizer):
    paths = {SAE.load(p).layer: p for p in sorted(DEMO_SAES.glob("layer_*"))}
    points = {L: (SAE.load(p).cfg.hook.layer, SAE.load(p).cfg.hook.site) for L, p in paths.items()}
    check(DEMO_MODEL, DEMO_SAES, paths, points, [demo_tokenizer.encode(p) for p in PROMPTS])


def test_projections_and_norm_adds_match_the_reference_at_other_hook_points(tmp_path, demo_tokenizer):
    model_dir = random_model(tmp_path, "LlamaConfig", DEMO_MODEL, **BASE, **BODY, num_key_value_heads=2)
    paths = {
        L: lens_sae(tmp_path / "saes" / f"layer_{L}", arch, 64, f"blocks.{L}.hook_{site}", norm=norm, seed=L)
        for L, (site, arch, norm) in LLAMA_SITES.items()
    }
    points = {L: (L, site) for L, (site, _, _) in LLAMA_SITES.items()}
    check(model_dir, tmp_path / "saes", paths, points, [demo_tokenizer.encode(p) for p in PROMPTS])
