"""Conditional edits (`when`) in the vLLM engine, compiled: one batch mixing a conditional add, clamp, projection
(gated by a vector's projection) and norm-relative vector add, an unconditional add, a mix and an unsteered request,
prompt and generated log-probabilities against the independent reference (`reference.py`: a plain transformers
forward whose hooks read each condition with sae-lens, or as h . v, and write the operation out) within 1e-4
(float32). Specs without vectors go in as JSON text (what a client of stock `vllm serve` writes: the admission hook
parses it), the others as `SteeringSpec` objects (an offline caller's). What the worker reports as applied
(`functok_applied`, the engine's `steered_positions`) is the positions where some edit acted, counted by the
reference: a conditional edit's where its condition held.

A random Llama (fused add+norm layers) with SAEs at attn_out (gated), resid_mid (JumpReLU, per-token normalisation)
and mlp_out, so each condition is read from h at each kind of hook point inside vLLM's compiled graph.
"""

import json
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import steering_llm  # noqa: E402
from reference import eager_model, lens_sae, load_lens, logprobs, random_model  # noqa: E402
from test_conditional import build, cases, conditions, unconditional  # noqa: E402
from test_vllm_hook_points import BASE, LLAMA, PROMPTS  # noqa: E402

from functok_vllm.core import SAE, Vector  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL  # noqa: E402

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


def test_conditional_edits_match_the_reference_on_compiled_vllm(tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    # initializer_range 0.08 (not 0.02): attention and MLP outputs large enough for the SAEs to fire at some tokens
    model_dir = random_model(
        tmp_path, "LlamaConfig", DEMO_MODEL, **BASE, **LLAMA, num_key_value_heads=2, initializer_range=0.08
    )
    paths = {
        L: lens_sae(tmp_path / "saes" / f"layer_{L}", arch, 256, f"blocks.{L}.hook_{site}", norm=norm, seed=L)
        for L, (site, arch, norm) in SITES.items()
    }
    saes = {L: SAE.load(p) for L, p in paths.items()}
    hooks = {sae.cfg.hook.canonical().name: L for L, sae in saes.items()}
    torch.manual_seed(1)
    dirs = {2: torch.randn(256), 3: torch.randn(256)}  # a steering vector at the two later SAEs' hook points
    vec = Vector.make({h: dirs[L] for h, L in hooks.items() if L in dirs})
    model = eager_model(model_dir)
    lenses = {L: load_lens(p) for L, p in paths.items()}
    points = {L: (L, site) for L, (site, _, _) in SITES.items()}
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(PROMPTS[0])
    cond = conditions(model, lenses, points, [ids])
    run, ref = [], []
    for user, vfields in cases(sorted(SITES), cond):
        if user is None:
            run.append(None)
            ref.append(None)
            continue
        spec, r = build(user, vfields, vec, hooks, dirs)
        plain = vfields is None and not any("vector" in e.get("when", {}) for e in user["edits"])
        run.append(json.dumps(user | {"positions": "all"}) if plain else spec)  # as a `vllm serve` client writes it
        ref.append(r)
    llm = steering_llm(model_dir, paths.values(), DEMO_FUNCTION_TOKENS, max_num_seqs=8)
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=NEW,
                logprobs=0,
                prompt_logprobs=0,
                ignore_eos=True,
                extra_args={"steering": s, "functok_id": f"c{i}"} if s is not None else None,
            )
            for i, s in enumerate(run)
        ]
        outs = llm.generate([PROMPTS[0]] * len(run), params, use_tqdm=False)
        applied = {i: llm.collective_rpc("functok_applied", args=(f"c{i}",))[0] for i, s in enumerate(run) if s}
    finally:
        llm.llm_engine.engine_core.shutdown()
    got_all, counts = [], []
    for i, (spec, o) in enumerate(zip(ref, outs, strict=True)):
        g = o.outputs[0]
        seq = list(o.prompt_token_ids) + list(g.token_ids)
        n = len(o.prompt_token_ids)
        rows = logprobs(model, lenses, points, seq, n, spec)  # (seq - 1, vocab)
        want = rows[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
        got = torch.tensor(
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], seq[1:n], strict=True)]
            + [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)]
        )
        err = float((got - want).abs().max())
        assert err < TOL, (i, spec, err)
        best = rows[n - 1 :].max(-1).values
        assert ((best - want[n - 1 :]) < TOL).all(), (i, spec, g.token_ids)
        got_all.append(got[: n - 1])  # the prompt's log-probabilities: the same tokens in every request
        if spec is not None:  # what the worker applied inside the compiled graph: where some edit acted
            acted = torch.zeros(len(seq), dtype=torch.bool)
            logprobs(model, lenses, points, seq, n, spec, acted=acted)
            assert applied[i] == int(acted[:-1].sum()), (i, spec, applied[i], int(acted[:-1].sum()))
            counts.append(applied[i])
        if spec is not None and any("when" in e for e in spec["edits"]):  # the condition matters
            plain = logprobs(model, lenses, points, seq, n, unconditional(spec))
            assert float((rows - plain).abs().max()) > MOVED, (i, spec)
    fed = len(outs[0].prompt_token_ids) + NEW - 1
    assert fed in counts and any(0 < c < fed for c in counts), counts  # some counts are not the selector's
    for i in range(1, len(got_all)):  # agreeing with the reference is not agreeing with no steering
        moved = float((got_all[i] - got_all[0]).abs().max())
        assert moved > MOVED, (i, moved)
