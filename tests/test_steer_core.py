"""The steering core on its own: per-token slot indexes, the slot table, the add / clamp / ablate maths."""

import subprocess
import sys

import pytest
import torch

from functok_vllm.core import (
    POLICY_CODES,
    POSITIONS,
    SlotsFull,
    SteeringTable,
    StepIndex,
    build_slot_index,
    last_function_position,
)
from functok_vllm.engines.placement import residual_hooks
from functok_vllm.steering import SteeringSpec

# A hand-made step: vocab of 8 with function tokens {1, 2}. Request A (slot 3) is a 5-token prompt plus 2 generated
# tokens; request B (slot 5) is a 2-token prompt; one padding token belongs to entry 2, whose slot is 0.
FN_MASK = torch.tensor([False, True, True, False, False, False, False, False])
A_IDS, B_IDS = [5, 1, 6, 2, 7, 1, 6], [2, 3]
IDS = torch.tensor(A_IDS + B_IDS + [0])
POS = torch.tensor(list(range(7)) + [0, 1] + [0])
REQ = torch.tensor([0] * 7 + [1, 1] + [2])
EXPECTED = {  # (A's 7 tokens, B's 2 tokens); the padding token is always 0
    "function": ([0, 3, 0, 3, 0, 3, 0], [5, 0]),
    "last_function": ([0, 0, 0, 3, 0, 0, 0], [5, 0]),
    "content": ([3, 0, 3, 0, 3, 0, 3], [0, 5]),
    "prompt": ([3, 3, 3, 3, 3, 0, 0], [5, 5]),
    "generated": ([0, 0, 0, 0, 0, 3, 3], [0, 0]),
    "all": ([3] * 7, [5, 5]),
}
PROMPT = 'The king said to his son, "I have not seen you." She walked into the room and went up to the door'


def step(policy_a: str, policy_b: str) -> StepIndex:
    return StepIndex(
        input_ids=IDS,
        positions=POS,
        req=REQ,
        slot=torch.tensor([3, 5, 0]),
        policy=torch.tensor([POLICY_CODES[policy_a], POLICY_CODES[policy_b], 0]),
        prompt_len=torch.tensor([5, 2, 0]),
        last_fn=torch.tensor([last_function_position(A_IDS[:5], FN_MASK), last_function_position(B_IDS, FN_MASK), -1]),
    )


@pytest.mark.parametrize("policy", POSITIONS)
def test_build_slot_index_each_policy(policy):
    got = build_slot_index(step(policy, policy), FN_MASK).tolist()
    a, b = EXPECTED[policy]
    assert got == a + b + [0]


def test_build_slot_index_mixes_policies_per_request():
    got = build_slot_index(step("generated", "content"), FN_MASK).tolist()
    assert got == EXPECTED["generated"][0] + EXPECTED["content"][1] + [0]


def test_last_function_without_function_tokens_selects_nothing():
    s = step("last_function", "last_function")
    s.last_fn = torch.tensor([-1, -1, -1])
    assert not build_slot_index(s, FN_MASK).any()


def test_last_function_selects_exactly_one_prompt_position(demo_tokenizer, demo_function_tokens):
    ids = torch.tensor(demo_tokenizer.encode(PROMPT))
    mask = demo_function_tokens.mask(len(demo_tokenizer))
    last = last_function_position(ids, mask)
    n = len(ids)
    gen = torch.tensor([12, 263])  # two generated function tokens (',' and ' the') after the prompt
    s = StepIndex(
        input_ids=torch.cat([ids, gen]),
        positions=torch.arange(n + 2),
        req=torch.zeros(n + 2, dtype=torch.long),
        slot=torch.tensor([7]),
        policy=torch.tensor([POLICY_CODES["last_function"]]),
        prompt_len=torch.tensor([n]),
        last_fn=torch.tensor([last]),
    )
    slots = build_slot_index(s, mask)
    assert slots.nonzero().flatten().tolist() == [last]
    assert mask[ids[last]] and not mask[ids[last + 1 :]].any()


def spec(*edits, positions="function") -> SteeringSpec:
    return SteeringSpec.from_dict({"edits": list(edits), "positions": positions})


def test_table_shares_slots_for_equal_specs_and_release_frees(demo_saes):
    table = SteeringTable(demo_saes, max_slots=3, max_clamps=4, max_tokens=16)
    a1 = spec({"layer": 2, "feature": 10, "strength": 8.0})
    a2 = spec({"layer": 2, "feature": 10, "strength": 8.0})  # equal, built separately
    b = spec({"layer": 1, "feature": 77, "mode": "clamp", "value": 0.5})
    assert table.acquire(None) == 0
    sa = table.acquire(a1)
    assert table.acquire(a2) == sa
    sb = table.acquire(b)
    assert sb not in (0, sa) and table.slots_in_use == 2
    with pytest.raises(SlotsFull):
        table.acquire(spec({"layer": 0, "feature": 1, "strength": 1.0}))
    table.release(a1)
    assert table.slots_in_use == 2  # a2 still holds it
    table.release(a2)
    assert table.slots_in_use == 1
    assert not table.layers[2].add_table[sa].any()
    assert table.acquire(spec({"layer": 0, "feature": 1, "strength": 1.0})) == sa  # the freed slot is reused
    table.release(b)
    assert (table.layers[1].clamp_owner == -1).all()


def test_add_row_is_strength_times_decoder_row(demo_saes):
    table = SteeringTable(demo_saes, max_slots=4, max_clamps=4, max_tokens=16)
    slot = table.acquire(
        spec({"layer": 2, "feature": 1234, "strength": 8.0}, {"layer": 2, "feature": 5, "strength": -2.5})
    )
    want = 8.0 * demo_saes[2].W_dec[1234] + -2.5 * demo_saes[2].W_dec[5]
    assert torch.allclose(table.layers[2].add_table[slot], want, atol=1e-6)
    assert not table.layers[1].add_table[slot].any() and not table.layers[2].add_table[0].any()


@pytest.fixture(scope="module")
def resid(demo_model, demo_tokenizer):
    """(tokens, d_model) residual stream leaving decoder layer 1 on a real prompt."""
    out = {}
    with torch.no_grad(), residual_hooks(demo_model, {1: lambda h: out.setdefault("h", h.clone())}):
        demo_model(torch.tensor([demo_tokenizer.encode(PROMPT)]))
    return out["h"]


def active_feature(sae, h, at_least: int):
    """The feature active at the most positions (and at `at_least` or more)."""
    counts = (sae.encode(h) > 0).sum(0)
    f = int(counts.argmax())
    assert counts[f] >= at_least
    return f


def test_clamp_to_own_value_leaves_residual_unchanged(demo_saes, resid):
    sae = demo_saes[1]
    f = active_feature(sae, resid, 2)
    acts = sae.encode(resid)[:, f]
    t = int(acts.argmax())
    table = SteeringTable(demo_saes, max_slots=4, max_clamps=4, max_tokens=len(resid))
    slot = table.acquire(spec({"layer": 1, "feature": f, "mode": "clamp", "value": float(acts[t])}))
    index = torch.zeros(len(resid), dtype=torch.long)
    index[t] = slot
    table.set_slot_index(index)
    delta = table.layers[1].delta(resid)
    assert delta[t].abs().max() < 1e-5 * resid[t].abs().max()
    assert not delta[index == 0].any()


def test_ablate_removes_the_features_decoder_share_at_steered_positions(demo_saes, resid):
    """Ablate = clamp to 0 keeping the SAE error: the residual loses exactly a_f(h) * W_dec[f] where steered.

    Re-encoding the steered residual lowers the feature's activation wherever it was active (W_enc[:, f] . W_dec[f]
    is positive for every feature of these SAEs) and zeroes it at most positions, but not all: the encoder is not the
    decoder's inverse, so a single clamp does not guarantee a re-encoded activation of exactly 0.
    """
    sae = demo_saes[1]
    f = active_feature(sae, resid, 3)
    before = sae.encode(resid)[:, f]
    table = SteeringTable(demo_saes, max_slots=4, max_clamps=4, max_tokens=len(resid))
    slot = table.acquire(spec({"layer": 1, "feature": f, "mode": "ablate"}))
    index = torch.full((len(resid),), slot)
    index[::2] = 0  # every other position unsteered
    table.set_slot_index(index)
    delta = table.layers[1].delta(resid)
    steered = index != 0
    want = -before[:, None] * sae.W_dec[f]  # (tokens, d_model)
    assert torch.allclose(delta[steered], want[steered], atol=1e-5)
    assert not delta[~steered].any()
    after = sae.encode(resid + delta)[:, f]
    was_on = steered & (before > 0)
    assert was_on.any()
    assert (after[was_on] < before[was_on]).all()
    assert torch.equal(after[~steered], before[~steered])


def test_add_strength_zero_is_exactly_no_change(demo_saes, resid):
    table = SteeringTable(demo_saes, max_slots=4, max_clamps=4, max_tokens=len(resid))
    table.set_slot_index(torch.full((len(resid),), table.acquire(spec({"layer": 1, "feature": 3, "strength": 0.0}))))
    assert torch.equal(table.layers[1](resid), resid)


def test_core_imports_no_engine_or_server_libraries():
    code = (
        "import sys, functok_vllm.core, functok_vllm.core.steer, functok_vllm.core.batch, functok_vllm.core.sae;"
        "print(sorted(m for m in ('vllm', 'transformers', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_projection_columns_are_a_pool_of_their_own_and_release_frees(demo_saes, resid):
    """Two projection columns at layer 1: a third waits (SlotsFull) while clamps still fit; a released spec's columns
    and norm-relative row are free again, and the layer's update is then exactly its plain add row again."""
    table = SteeringTable(demo_saes, max_slots=8, max_clamps=4, max_projections=2, max_tokens=len(resid))
    two = spec(
        {"layer": 1, "feature": 3, "mode": "project_out"}, {"layer": 1, "feature": 4, "mode": "set", "value": 1.0}
    )
    s = table.acquire(two)
    assert (table.layers[1].proj_owner == s).sum() == 2 and (table.layers[2].proj_owner == -1).all()
    with pytest.raises(SlotsFull, match="2 projection columns"):
        table.acquire(spec({"layer": 1, "feature": 5, "mode": "cap", "max": 0.0}))
    assert table.acquire(spec({"layer": 1, "feature": 5, "mode": "ablate"}))  # the clamp pool is another
    norm = table.acquire(spec({"layer": 2, "feature": 5, "strength": 0.5, "strength_unit": "token_norm"}))
    assert table.layers[2].norm_add_table[norm].abs().sum() > 0
    unit = demo_saes[2].W_dec[5] / demo_saes[2].W_dec[5].norm()
    table.set_slot_index(torch.full((len(resid),), norm))
    assert torch.allclose(table.layers[2].delta(resid), 0.5 * resid.norm(dim=-1, keepdim=True) * unit, atol=1e-5)
    table.release(two)
    table.release(spec({"layer": 2, "feature": 5, "strength": 0.5, "strength_unit": "token_norm"}))
    assert (table.layers[1].proj_owner == -1).all() and not table.layers[2].norm_add_table.any()
    add = table.acquire(spec({"layer": 2, "feature": 3, "strength": 2.0}))
    table.set_slot_index(torch.full((len(resid),), add))
    assert torch.equal(table.layers[2].delta(resid), table.layers[2].add_table[add].expand_as(resid))


def test_projection_maths_on_a_real_residual(demo_saes, resid):
    """project_out leaves h orthogonal to the unit decoder direction; set puts its projection at the value; cap
    leaves projections inside [min, max] untouched and moves the others to the nearest bound; unselected tokens keep
    h exactly (slot 0)."""
    v = demo_saes[1].W_dec[3] / demo_saes[1].W_dec[3].norm()
    p = resid @ v
    lo, hi = float(p.quantile(0.3)), float(p.quantile(0.7))  # a cap that binds on both sides and not in between
    cases = [({"mode": "project_out"}, torch.zeros_like(p)), ({"mode": "set", "value": 2.5}, torch.full_like(p, 2.5))]
    cases.append(({"mode": "cap", "min": lo, "max": hi}, p.clamp(lo, hi)))
    for fields, want in cases:
        table = SteeringTable(demo_saes, max_slots=4, max_clamps=4, max_tokens=len(resid))
        slot = table.acquire(spec({"layer": 1, "feature": 3, **fields}))
        table.set_slot_index(torch.arange(len(resid)) % 2 * slot)  # odd tokens steered
        out = table.layers[1](resid)
        assert torch.allclose((out @ v)[1::2], want[1::2], atol=1e-4), fields
        assert torch.equal(out[0::2], resid[0::2])
        rest = (out - resid) - ((out - resid) @ v)[:, None] * v  # nothing moves off the direction
        assert float(rest.abs().max()) < 1e-5
