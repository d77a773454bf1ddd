"""Conditional edits (`when`) in the transformers engine: a mixed batch of requests (a conditional add, clamp,
projection and norm-relative vector add, an unconditional add, a mix, and an unsteered one) against the independent
reference (`reference.py`: a plain forward whose hooks read the condition with sae-lens, or as h . v, and write the
operation out), log-probabilities at every generated step within 1e-4 (float32), on the demo model, on a random
Llama whose SAEs sit at attn_out (gated), resid_mid (JumpReLU, per-token normalisation) and mlp_out, on random GPT-2
and Gemma-2 models (two more families, each with its own module layout), and on SmolLM2
with its shipped SAEs at layers 7, 15 and 22 (one prompt: 19 s). A condition that
never holds gives exactly the unsteered log-probabilities, one that always holds exactly the unconditional edit's; the
layer rule and the architectures a feature condition cannot read are refused with the field named.
"""

import asyncio

import pytest
import torch
from reference import eager_model, lens_sae, load_lens, logprobs, random_model
from test_hf_families import serve
from test_hook_points import BASE, BODY, PROMPTS

from functok_vllm.core import SAE, SlotsFull, SpecError, SteeringTable
from functok_vllm.core.vector import Vector
from functok_vllm.engines.base import GenerateRequest, SamplingParams
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
from functok_vllm.engines.vllm.budget import ClampBudget
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES, ROOT
from functok_vllm.steering import SteeringContext, SteeringInfo, SteeringSpec, VectorEdit, parse_steering

TOL = 1e-4
MOVED = 1e-2  # a steered request moves some log-probability at least this much from the unsteered one
LLAMA_SITES = {
    1: ("attn_out", "gated", "none"),
    2: ("resid_mid", "jumprelu", "layer_norm"),
    3: ("mlp_out", "standard", "none"),
}


def split(r: torch.Tensor) -> float:
    """A threshold through the widest gap of the readings r between their quartiles: it holds on one side for a
    good share of the tokens and sits far (relative to float error) from every reading."""
    s = r.sort().values
    lo, hi = len(s) // 4, max(3 * len(s) // 4, len(s) // 4 + 1)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    k = lo + int(gaps.argmax())
    return float(s[k] + s[k + 1]) / 2


def conditions(model, lenses, points, prompts) -> dict:
    """{layer: (feature, threshold)}: per SAE layer the feature firing on the share of the unsteered prompts' tokens
    nearest a half (a condition that holds at some tokens and not at others), with `split`'s threshold."""
    out = {}
    grabbed = [{} for _ in prompts]
    for ids, g in zip(prompts, grabbed, strict=True):
        logprobs(model, lenses, points, ids, len(ids), None, grab=g)
    for layer, lens in lenses.items():
        with torch.no_grad():
            acts = torch.cat([lens.encode(g[layer]) for g in grabbed])  # (tokens, d_sae)
        share = (acts > 0).float().mean(0)
        f = int((share - 0.5).abs().argmin())
        out[layer] = (f, split(acts[:, f]))
    return out


def cases(layers: list[int], cond: dict) -> list:
    """(user spec or None, vector edit fields or None, the same spec with every `when` removed or None)."""
    a, b, c = layers
    fa, ta = cond[a]
    fb, tb = cond[b]
    fc, tc = cond[c]
    below_b = {"feature": fb, "below": tb}
    probe = {"vector": "probe", "above": 0.0}  # the projection onto the vector's unit direction at that layer
    return [
        (None, None),
        ({"edits": [{"layer": a, "feature": 3, "strength": 6.0, "when": {"feature": fa, "above": ta}}]}, None),
        ({"edits": [{"layer": b, "feature": 7, "mode": "clamp", "value": 4.0, "when": below_b}]}, None),
        ({"edits": [{"layer": c, "feature": 2, "mode": "set", "value": -3.0, "when": probe}]}, None),
        ({"edits": [{"layer": a, "feature": 3, "strength": 6.0}]}, None),
        ({"edits": []}, {"strength": 1.0, "strength_unit": "token_norm", "when": {"feature": fb, "above": 0.0}}),
        (
            {
                "edits": [
                    {"layer": a, "feature": 3, "strength": 3.0, "when": {"feature": fa, "above": ta}},
                    {"layer": c, "feature": 1, "mode": "clamp", "value": 3.0},
                    {"layer": c, "feature": 4, "mode": "cap", "max": -0.5, "when": {"feature": fc, "below": tc}},
                ]
            },
            {"mode": "project_out", "when": {"vector": "probe", "below": 0.0}},
        ),
    ]


def bind_probe(e, vec: Vector, hooks: dict):
    """An edit whose condition names the vector "probe", bound to it (as a client's parsed spec would be)."""
    if e.when is None or e.when.vector is None:
        return e
    out = e.model_copy(update={"when": e.when.bound(vec, vec.at(hooks))})
    if isinstance(e, VectorEdit):
        out._content, out._at = e.content, dict(e.at)
    return out


def build(user, vfields, vec, hooks, dirs) -> tuple:
    """(engine spec, reference spec) of one case, both with positions "all"."""
    edits = list(SteeringSpec.from_dict({"edits": user["edits"]}).edits)
    refs = [dict(e) for e in user["edits"]]
    if vfields is not None:
        edits.append(VectorEdit(vector="probe", **vfields).bound(vec, vec.at(hooks)))
        refs += [{"layer": L, "direction": t, **vfields} for L, t in dirs.items()]
    for e in refs:  # the reference reads a vector condition from the direction at the edit's own layer
        if "when" in e and "vector" in e["when"]:
            e["when"] = {k: v for k, v in e["when"].items() if k != "vector"} | {"direction": dirs[e["layer"]]}
    spec = SteeringSpec(edits=tuple(bind_probe(e, vec, hooks) for e in edits), positions="all")
    return spec, {"edits": refs, "positions": "all"}


def unconditional(ref: dict) -> dict:
    return {**ref, "edits": [{k: v for k, v in e.items() if k != "when"} for e in ref["edits"]]}


def check(model_dir, sae_dir, sae_paths: dict, points: dict, prompts: list):
    layers = sorted(sae_paths)
    saes = {L: SAE.load(p) for L, p in sae_paths.items()}
    d = next(iter(saes.values())).d_in
    torch.manual_seed(1)
    dirs = {L: torch.randn(d) for L in layers[1:]}  # a vector at the two later SAEs' hook points
    vec = Vector.make({saes[L].cfg.hook.canonical().name: t for L, t in dirs.items()})
    hooks = {saes[L].cfg.hook.canonical().name: L for L in layers}
    model = eager_model(model_dir)
    lenses = {L: load_lens(p) for L, p in sae_paths.items()}
    cond = conditions(model, lenses, points, prompts)
    run, ref = [], []
    for ids in prompts:
        for user, vfields in cases(layers, cond):
            if user is None:
                run.append((ids, None))
                ref.append((ids, None))
                continue
            spec, r = build(user, vfields, vec, hooks, dirs)
            run.append((ids, spec))
            ref.append((ids, r))
    tokens, got, _, _ = serve(model_dir, sae_dir, run)
    per = len(cases(layers, cond))
    for i, ((ids, spec), toks, g) in enumerate(zip(ref, tokens, got, strict=True)):
        rows = logprobs(model, lenses, points, ids + toks, len(ids), spec)[len(ids) - 1 :]  # (NEW, vocab)
        for step, tok in enumerate(toks):
            err = float((g[step] - rows[step]).abs().max())
            assert err < TOL, (i, spec, step, err)
            assert float(rows[step, tok]) >= float(rows[step].max()) - TOL, (i, step)
        if i % per == 0:
            continue
        moved = max(float((a - b).abs().max()) for a, b in zip(g, got[i - i % per], strict=True))  # it steers
        assert moved > MOVED, (i, spec, moved)
        if any("when" in e for e in spec["edits"]):  # the condition matters: not the unconditional edits either
            plain = logprobs(model, lenses, points, ids + toks, len(ids), unconditional(spec))[len(ids) - 1 :]
            assert float((rows - plain).abs().max()) > MOVED, (i, spec)


def test_conditional_edits_match_the_reference_on_the_demo_model(demo_tokenizer):
    paths = {SAE.load(p).layer: p for p in sorted(DEMO_SAES.glob("layer_*"))}
    points = {L: (SAE.load(p).cfg.hook.layer, SAE.load(p).cfg.hook.site) for L, p in paths.items()}
    check(DEMO_MODEL, DEMO_SAES, paths, points, [demo_tokenizer.encode(p) for p in PROMPTS])


def test_conditional_edits_match_the_reference_at_other_hook_points(tmp_path, demo_tokenizer):
    # initializer_range 0.08 (not 0.02): attention and MLP outputs large enough for the SAEs to fire at some tokens
    model_dir = random_model(
        tmp_path, "LlamaConfig", DEMO_MODEL, **BASE, **BODY, num_key_value_heads=2, initializer_range=0.08
    )
    paths = {
        L: lens_sae(tmp_path / "saes" / f"layer_{L}", arch, 64, f"blocks.{L}.hook_{site}", norm=norm, seed=L)
        for L, (site, arch, norm) in LLAMA_SITES.items()
    }
    points = {L: (L, site) for L, (site, _, _) in LLAMA_SITES.items()}
    check(model_dir, tmp_path / "saes", paths, points, [demo_tokenizer.encode(p) for p in PROMPTS])


# config class, keywords, SAE (site, architecture) by layer: two families besides Llama, with their own module layouts
# (GPT-2's random attention output is too small for an SAE to fire at a quarter of the tokens, which the clamp's
# "below" condition needs: its attn_out SAE reads the stream after it, resid_post, instead)
OTHER_FAMILIES = {
    "gpt2": (
        "GPT2Config",
        {"n_embd": 64, "n_layer": 3, "n_head": 4, "initializer_range": 0.08},
        {0: ("resid_post", "jumprelu"), 1: ("resid_post", "standard"), 2: ("mlp_out", "gated")},
    ),
    "gemma2": (
        "Gemma2Config",
        {**BODY, "num_key_value_heads": 2, "head_dim": 16, "initializer_range": 0.08, "sliding_window": 6},
        {0: ("resid_post", "standard"), 1: ("attn_out", "jumprelu"), 2: ("mlp_out", "gated")},
    ),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_conditional_and_projection_edits_match_the_reference_on_other_families(tmp_path, demo_tokenizer, family):
    """The same mixed batch (conditional add, clamp, set, cap, project_out, token_norm vector add) on GPT-2 (fused
    qkv, no gate) and Gemma-2 (sandwich norms: attn_out/mlp_out read after the post-norms, sliding window)."""
    cls, kw, sites = OTHER_FAMILIES[family]
    model_dir = random_model(tmp_path, cls, DEMO_MODEL, **BASE, **kw)
    paths = {
        L: lens_sae(tmp_path / "saes" / f"layer_{L}", arch, 64, f"blocks.{L}.hook_{site}", seed=L)
        for L, (site, arch) in sites.items()
    }
    points = {L: (L, site) for L, (site, _) in sites.items()}
    check(model_dir, tmp_path / "saes", paths, points, [demo_tokenizer.encode(p) for p in PROMPTS])


def test_conditional_edits_match_the_reference_on_smollm2():
    from transformers import AutoTokenizer

    from functok_vllm.smollm2 import derive

    model_dir = derive()
    sae_dir = ROOT / "sae_weights" / model_dir.name
    paths = {L: sae_dir / f"layer_{L}" for L in (7, 15, 22)}
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    check(model_dir, sae_dir, paths, {L: (L, "resid_post") for L in paths}, [tok.encode(PROMPTS[0])])


NEVER, ALWAYS = {"feature": 9, "below": 0.0}, {"feature": 9, "above": -1.0}  # an activation is never below 0
EXACT = [  # edits whose conditional forms must reproduce the unsteered / unconditional log-probabilities exactly
    {"layer": 1, "feature": 77, "strength": 8.0},
    {"layer": 2, "feature": 12, "strength": 0.7, "strength_unit": "token_norm"},
    {"layer": 1, "feature": 77, "mode": "clamp", "value": 6.0},
    {"layer": 2, "feature": 5, "mode": "cap", "max": -1.0},
    {"layer": 0, "feature": 30, "mode": "project_out"},
]


def one_by_one(specs: list, ids: list[int]) -> list[torch.Tensor]:
    """(steps, vocab) log-probabilities of each spec, run alone on one demo engine (the same batch shape each time,
    so equal maths gives equal bits)."""
    eng = HFEngine(HFEngineConfig(DEMO_MODEL, [DEMO_SAES], DEMO_FUNCTION_TOKENS, max_running=1, warmup=False))
    seen: list = []
    sample = eng.batcher._sample

    def recording_sample(logits, seqs):
        seen.extend(torch.log_softmax(row.float(), -1) for row in logits)
        return sample(logits, seqs)

    eng.batcher._sample = recording_sample

    async def go():
        await eng.start()
        out = []
        try:
            for i, spec in enumerate(specs):
                seen.clear()
                params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
                async for _ in eng.generate(GenerateRequest(f"r{i}", ids, params, spec)):
                    pass
                out.append(torch.stack(seen))
        finally:
            await eng.shutdown()
        return out

    return asyncio.run(go())


def test_a_condition_that_never_holds_is_unsteered_and_one_that_always_holds_is_the_edit(demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[0])
    specs = [None]
    for e in EXACT:
        specs += [SteeringSpec.from_dict({"edits": [e | {"when": w}], "positions": "all"}) for w in (NEVER, ALWAYS)]
        specs.append(SteeringSpec.from_dict({"edits": [e], "positions": "all"}))
    got = one_by_one(specs, ids)
    base = got[0]
    for k, e in enumerate(EXACT):
        never, always, plain = got[1 + 3 * k : 4 + 3 * k]
        assert float((plain - base).abs().max()) > MOVED, e  # the edit moves the model: the two claims can fail
        assert torch.equal(never, base), (e, float((never - base).abs().max()))
        assert torch.equal(always, plain), (e, float((always - plain).abs().max()))


def test_the_layer_rule_and_feature_conditions_on_topk_saes_are_refused():
    info = SteeringInfo(
        d_sae={1: 64, 2: 64},
        clamp_ok={1: True, 2: False},
        sae={1: {"architecture": "jumprelu"}, 2: {"architecture": "topk"}},
        function_token_ids=[],
        function_token_strings=[],
        add_layers=[3],
        hook_layers={"blocks.1.hook_resid_post": 1, "blocks.2.hook_resid_post": 2, "blocks.3.hook_resid_post": 3},
        d_model=8,
    )
    vec = Vector.make({"blocks.1.hook_resid_post": torch.ones(8), "blocks.3.hook_resid_post": torch.ones(8)})
    ctx = SteeringContext(info, lookup=lambda name, version: vec)
    when = {"feature": 3, "above": 0.5}
    ok = parse_steering({"edits": [{"layer": 1, "feature": 2, "strength": 1.0, "when": when}]}, "steering", ctx)
    assert ok.edits[0].when.feature == 3
    bad = [
        ({"layer": 2, "feature": 2, "strength": 1.0, "when": when}, "steering.edits[0].when.feature", "topk"),
        ({"vector": "v", "strength": 1.0, "when": when}, "steering.edits[0].when.feature", "no SAE"),
        ({"layer": 2, "feature": 2, "strength": 1.0, "when": {"vector": "v", "above": 0.0}}, ".when.vector", "layer 2"),
    ]
    for edit, field, shows in bad:
        with pytest.raises(SpecError) as err:
            parse_steering({"edits": [edit]}, "steering", ctx)
        assert err.value.field.endswith(field) and shows in err.value.message, (edit, err.value)
    both = {"vector": "v", "strength": 1.0, "when": {"vector": "v", "below": 2.0}}  # read at layers 1 and 3
    spec = parse_steering({"edits": [both]}, "steering", ctx)
    assert sorted(spec.edits[0].when.at) == [1, 3] and spec.edits[0].when.version == vec.id
    assert parse_steering(spec.key(), "steering", ctx) == spec  # the canonical form parses to the same spec


def test_condition_columns_are_a_pool_that_waits_and_frees_and_the_budget_counts_them(demo_saes):
    table = SteeringTable(demo_saes, max_slots=8, max_clamps=2, max_projections=2, max_conditions=2)
    h = torch.randn(6, 256) * 3  # (tokens, d_model) at layer 1's hook point
    clamp = {"layer": 1, "feature": 77, "mode": "clamp", "value": 6.0}
    plain = SteeringSpec.from_dict({"edits": [clamp], "positions": "all"})

    def delta(spec):
        slot = table.acquire(spec)
        table.set_slot_index(torch.full((6,), slot))
        out = table.layers[1].delta(h)
        table.release(spec)
        return out

    before = delta(plain)
    two = SteeringSpec.from_dict({"edits": [clamp | {"when": NEVER}, EXACT[0] | {"when": ALWAYS}], "positions": "all"})
    assert ClampBudget.need(two) == {("clamp", 1): 1, ("condition", 1): 2}
    slot = table.acquire(two)
    assert (table.layers[1].cond_owner == slot).sum() == 2 and (table.layers[0].cond_owner == -1).all()
    one_more = SteeringSpec.from_dict({"edits": [EXACT[0] | {"when": NEVER}]})
    with pytest.raises(SlotsFull, match="2 condition columns"):
        table.acquire(one_more)
    table.release(two)
    assert (table.layers[1].cond_owner == -1).all()
    assert torch.equal(delta(plain), before)  # a column a conditional clamp held is ungated again for a plain one
    assert torch.equal(delta(one_more), torch.zeros_like(h))  # never holds: exact zeros
