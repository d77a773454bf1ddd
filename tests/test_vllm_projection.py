"""Projection edits (`project_out`, `cap`, `set`, on SAE decoder rows and on a steering vector) and norm-relative
adds (`strength_unit: "token_norm"`) in the vLLM engine, compiled and eager: one batch mixing a request per operation
and an unsteered one, prompt and generated log-probabilities against the independent reference (`reference.py`: a
plain transformers forward with each operation written out in a forward hook at the SAE's hook point) within 1e-4
(float32).

A random Llama (fused add+norm layers) with SAEs at attn_out, resid_mid (per-token normalisation) and mlp_out, so the
op reads h at each kind of hook point inside vLLM's compiled graph.
"""

import json
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import steering_llm  # noqa: E402
from reference import eager_model, lens_sae, load_lens, logprobs, random_model  # noqa: E402
from test_vllm_hook_points import BASE, LLAMA, PROMPTS  # noqa: E402

from functok_vllm.core import SAE, Vector  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL  # noqa: E402
from functok_vllm.steering import SteeringSpec, VectorEdit  # noqa: E402

STATUS = vllm_status()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not STATUS.ok, reason=STATUS.line())]

TOL = 1e-4
NEW = 5
MOVED = 1e-2  # each steered request moves some log-probability at least this much from the unsteered one
SITES = {
    1: ("attn_out", "gated", "none"),
    2: ("resid_mid", "jumprelu", "constant_norm_rescale"),
    3: ("mlp_out", "standard", "none"),
}


def cases() -> list:
    """(user spec or None, vector edit fields or None): unsteered, one operation per request, then a mix."""
    return [
        (None, None),
        ({"edits": [{"layer": 1, "feature": 5, "mode": "project_out"}], "positions": "all"}, None),
        ({"edits": [{"layer": 2, "feature": 7, "mode": "cap", "min": 1.0, "max": 1.5}], "positions": "all"}, None),
        ({"edits": [{"layer": 3, "feature": 2, "mode": "set", "value": -2.0}], "positions": "prompt"}, None),
        (
            {"edits": [{"layer": 2, "feature": 9, "strength": 0.5, "strength_unit": "token_norm"}], "positions": "all"},
            None,
        ),
        ({"edits": [], "positions": "all"}, {"mode": "project_out"}),
        (
            {
                "edits": [
                    {"layer": 1, "feature": 3, "strength": 2.0},
                    {"layer": 3, "feature": 4, "mode": "cap", "max": -0.5},
                    {"layer": 3, "feature": 1, "mode": "clamp", "value": 3.0},
                    {"layer": 3, "feature": 6, "strength": -0.3, "strength_unit": "token_norm"},
                ],
                "positions": "all",
            },
            {"mode": "cap", "min": 0.5},
        ),
    ]


@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_projections_and_norm_adds_match_the_reference_on_vllm(tmp_path, mode):
    from vllm import SamplingParams

    model_dir = random_model(tmp_path, "LlamaConfig", DEMO_MODEL, **BASE, **LLAMA, num_key_value_heads=2)
    paths = {
        L: lens_sae(tmp_path / "saes" / f"layer_{L}", arch, 256, f"blocks.{L}.hook_{site}", norm=norm, seed=L)
        for L, (site, arch, norm) in SITES.items()
    }
    hooks = {SAE.load(p).cfg.hook.canonical().name: L for L, p in paths.items()}
    torch.manual_seed(1)
    dirs = {2: torch.randn(256), 3: torch.randn(256)}  # a steering vector at two of the SAEs' hook points
    vec = Vector.make({h: dirs[L] for h, L in hooks.items() if L in dirs})
    run, ref = [], []
    for user, vfields in cases():
        if vfields is None:
            run.append(json.dumps(user) if user else None)  # as a client of `vllm serve` writes it
            ref.append(user)
            continue
        edits = [*SteeringSpec.from_dict(user).edits, VectorEdit(vector="probe", **vfields).bound(vec, vec.at(hooks))]
        run.append(SteeringSpec(edits=tuple(edits), positions=user["positions"]))  # an offline caller's object
        ref.append(
            {"edits": user["edits"] + [{"layer": L, "direction": t, **vfields} for L, t in dirs.items()]}
            | {"positions": user["positions"]}
        )
    llm = steering_llm(model_dir, paths.values(), DEMO_FUNCTION_TOKENS, enforce_eager=mode == "eager", max_num_seqs=8)
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=NEW,
                logprobs=0,
                prompt_logprobs=0,
                ignore_eos=True,
                extra_args={"steering": s} if s is not None else None,
            )
            for s in run
        ]
        outs = llm.generate([PROMPTS[0]] * len(run), params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    model = eager_model(model_dir)
    lenses = {L: load_lens(p) for L, p in paths.items()}
    points = {L: (L, site) for L, (site, _, _) in SITES.items()}
    got_all = []
    for spec, o in zip(ref, outs, strict=True):
        g = o.outputs[0]
        ids = list(o.prompt_token_ids) + list(g.token_ids)
        n = len(o.prompt_token_ids)
        rows = logprobs(model, lenses, points, ids, n, spec)  # (seq - 1, vocab)
        want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:n], strict=True)]
            + [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)]
        )
        err = float((got - want).abs().max())
        assert err < TOL, (mode, spec, err)
        best = rows[n - 1 :].max(-1).values
        assert ((best - want[n - 1 :]) < TOL).all(), (spec, g.token_ids)
        got_all.append(got[: n - 1])  # the prompt's log-probabilities: the same tokens in every request
    for i in range(1, len(got_all)):  # agreeing with the reference is not agreeing with no steering
        moved = float((got_all[i] - got_all[0]).abs().max())
        assert moved > MOVED, (i, moved)
