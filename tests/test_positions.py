"""Positions as an object (token-id allowlists and excludes, windows, the last k function tokens, chat roles) in the
transformers engine: a mixed batch of requests, each with a different selector or none, against the independent
reference (`reference.py`: a plain forward of the whole sequence with the edits written out in forward hooks at
exactly the positions this file computes from the token ids itself), log-probabilities at every generated step within
1e-4 (float32) on the demo model, and `steered_positions` equal to the count of those positions the engine forwarded.

Each narrowed case must also move the model (it differs from the unsteered request) and differ from its base selector
alone (the narrowing changed what was steered), so agreeing with the reference says the narrowing was applied.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reference import eager_model, load_lens, logprobs
from test_hf_families import serve
from test_hook_points import PROMPTS

from functok_vllm.core import SAE
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES
from functok_vllm.server.chat_roles import role_codes
from functok_vllm.steering import SteeringSpec

TOL = 1e-4
MOVED = 1e-2
EDITS = [{"layer": 1, "feature": 7, "strength": 6.0}, {"layer": 2, "feature": 5, "strength": 10.0}]
FN = {t["id"] for t in json.loads(DEMO_FUNCTION_TOKENS.read_text())["tokens"]}  # the function tokens, read plainly
COMMA, THE, PERIOD = 12, 263, 14  # ",", " the", "." in the demo tokenizer (checked below)
# A chat template with multi-token headers and a special end-of-turn token, so template tokens are really there
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Speak as a king, and be brief."},
    {"role": "user", "content": "Tell me, my friend, of the war."},
    {"role": "assistant", "content": "The war was long, and the night was cold."},
    {"role": "user", "content": "And what of the prince?"},
]


def where(ids: list[int], n: int, keep) -> list[int]:
    """Positions t of the sequence ids (first n: the prompt) with keep(t, token id)."""
    return [t for t, tok in enumerate(ids) if keep(t, tok)]


def fn_positions(ids, n):
    return [t for t in range(n) if ids[t] in FN]


# (positions, base selector's positions or None (the same as the object's), expected positions(ids, n))
PLAIN_CASES = [
    (None, None, None),
    ("function", None, lambda ids, n: where(ids, n, lambda t, tok: tok in FN)),
    (
        {"select": "function", "token_ids": [COMMA, THE]},
        "function",
        lambda ids, n: where(ids, n, lambda t, tok: tok in (COMMA, THE)),
    ),
    ({"exclude_ids": [COMMA, THE]}, "all", lambda ids, n: where(ids, n, lambda t, tok: tok not in (COMMA, THE))),
    ({"first_generated": 3}, "all", lambda ids, n: list(range(n, n + 3))),
    ({"select": "prompt", "last_prompt": 4}, "prompt", lambda ids, n: list(range(n - 4, n))),
    ({"last_functions": 3}, "all", lambda ids, n: fn_positions(ids, n)[-3:]),
    ({"select": "last_function"}, None, lambda ids, n: fn_positions(ids, n)[-1:]),
    (  # the windows are a union, then the base selector, then the excludes
        {"select": "content", "last_prompt": 6, "first_generated": 2, "exclude_ids": [THE]},
        "content",
        lambda ids, n: [
            t for t in [*range(n - 6, n), *range(n, n + 2)] if ids[t] not in FN and ids[t] != THE and t < len(ids)
        ],
    ),
]


def base_positions(base, ids, n, fn=FN):
    return {
        "function": lambda: where(ids, n, lambda t, tok: tok in fn),
        "content": lambda: where(ids, n, lambda t, tok: tok not in fn),
        "prompt": lambda: list(range(n)),
        "all": lambda: list(range(len(ids))),
    }[base]()


@dataclass
class Setup:
    """A served model, its SAEs (a directory of layer_* SAEs) and function tokens, the edits every case applies."""

    model: Path = DEMO_MODEL
    saes: Path = DEMO_SAES
    function_tokens: Path = DEMO_FUNCTION_TOKENS
    edits: list = field(default_factory=lambda: EDITS)
    fn: set = field(default_factory=lambda: FN)


def run_cases(cases, prompts, roles=None, setup: Setup | None = None):
    """Serve every (prompt, case) in one mixed batch and check each against the reference."""
    setup = setup or Setup()
    edits = setup.edits
    run = [
        (ids, None if pos is None else SteeringSpec.from_dict({"edits": edits, "positions": pos}))
        for ids in prompts
        for pos, _, _ in cases
    ]
    deltas: dict = {}
    extras = {"prompt_roles": roles} if roles is not None else None
    tokens, got, _, _ = serve(setup.model, setup.saes, run, extras, deltas, setup.function_tokens)
    model = eager_model(setup.model)
    paths = {SAE.load(p).layer: p for p in sorted(setup.saes.glob("layer_*"))}
    lenses = {L: load_lens(p) for L, p in paths.items()}
    points = {L: (SAE.load(p).cfg.hook.layer, SAE.load(p).cfg.hook.site) for L, p in paths.items()}
    per = len(cases)
    for i, ((ids, spec), toks, g) in enumerate(zip(run, tokens, got, strict=True)):
        pos, base, expect = cases[i % per]
        seq, n = ids + toks, len(ids)
        at = [] if expect is None else expect(seq, n)
        rows = logprobs(model, lenses, points, seq, n, None if spec is None else {"edits": edits, "positions": at})
        rows = rows[n - 1 :]  # (NEW, vocab)
        for step in range(len(toks)):
            err = float((g[step] - rows[step]).abs().max())
            assert err < TOL, (i, pos, step, err)
        fed = len([t for t in at if t < len(seq) - 1])  # the last generated token is never fed back
        assert deltas[i][-1].steered_positions == fed, (i, pos, deltas[i][-1].steered_positions, fed)
        if spec is None:
            continue
        unsteered = got[i - i % per]
        moved = max(float((a - b).abs().max()) for a, b in zip(g, unsteered, strict=True))
        assert fed > 0 and moved > MOVED, (i, pos, fed, moved)
        if base is not None:  # the narrowing mattered: the base selector alone gives other log-probabilities
            wide = base_positions(base, seq, n, setup.fn)
            wide = logprobs(model, lenses, points, seq, n, {"edits": edits, "positions": wide})
            apart = max(float((g[s] - wide[n - 1 + s]).abs().max()) for s in range(len(toks)))
            assert apart > MOVED, (i, pos, apart)
    return tokens


def test_each_position_object_matches_the_reference_on_a_mixed_batch(demo_tokenizer):
    assert [demo_tokenizer.decode([t]) for t in (COMMA, THE, PERIOD)] == [",", " the", "."]
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    assert all(COMMA in ids and THE in ids and len(fn_positions(ids, len(ids))) >= 3 for ids in prompts)
    run_cases(PLAIN_CASES, prompts)


def content_spans(tok, ids: list[int], chat=CHAT) -> list[tuple[int, int]]:
    """[start, end) token positions of each message's content in ids, found as the content's own tokens."""
    spans, at = [], 0
    for m in chat:
        want = tok.encode(m["content"], add_special_tokens=False)
        at = next(s for s in range(at, len(ids)) if ids[s : s + len(want)] == want)
        spans.append((at, at + len(want)))
        at += len(want)
    return spans


def chat_prompt(tok):
    """(prompt ids, role codes, content spans) of CHAT under CHAT_TEMPLATE with the demo tokenizer (a copy: the
    session's tokenizer keeps its own template for the other test files)."""
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.encode(
        tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    return ids, role_codes(tok, CHAT, ids), content_spans(tok, ids)


@pytest.fixture(scope="module")
def chat(demo_tokenizer):
    return chat_prompt(demo_tokenizer)


def role_cases(spans, chat=CHAT, fn=FN):
    def content(*roles):
        return lambda ids, n: [t for i, (a, b) in enumerate(spans) if chat[i]["role"] in roles for t in range(a, b)]

    def turns(role):  # a message's turn: from the end of the previous content to the end of its own
        ends = [0] + [b for _, b in spans]
        return lambda ids, n: [
            t for i in range(len(chat)) if chat[i]["role"] == role for t in range(ends[i], ends[i + 1])
        ]

    def assistant(ids, n):
        return content("assistant")(ids, n) + list(range(n, len(ids)))

    return [
        (None, None, None),
        ({"roles": ["user"]}, "all", content("user")),
        ({"roles": ["system"]}, "all", content("system")),
        ({"roles": ["assistant"]}, "all", assistant),
        (
            {"select": "function", "roles": ["user"]},
            "function",
            lambda ids, n: [t for t in content("user")(ids, n) if ids[t] in fn],
        ),
        ({"roles": ["user"], "template_tokens": True}, "all", turns("user")),
        (
            {"roles": ["system"], "first_generated": 2, "exclude_ids": [COMMA]},
            "all",
            lambda ids, n: [t for t in content("system")(ids, n) + [n, n + 1] if ids[t] != COMMA],
        ),
    ]


def test_chat_roles_match_the_reference_on_a_mixed_batch(chat, demo_tokenizer):
    ids, codes, spans = chat
    special = demo_tokenizer.eos_token_id
    assert special in ids and len(ids) - spans[-1][1] > 3  # the template really has tokens of its own, and a tail
    run_cases(role_cases(spans), [ids], codes)


SMOL_CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a city, and one thing to see there."},
    {"role": "assistant", "content": "Rome, and the Colosseum."},
    {"role": "user", "content": "Tell me about your favorite city."},
]


def test_chat_roles_match_the_reference_on_smollm2():
    """The real ChatML template (special <|im_start|>/<|im_end|> tokens, multi-token headers) of SmolLM2, its SAEs."""
    from transformers import AutoTokenizer

    from functok_vllm.paths import ROOT
    from functok_vllm.smollm2 import derive

    model_dir = derive()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.encode(tok.apply_chat_template(SMOL_CHAT, tokenize=False, add_generation_prompt=True))
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5  # four messages and the generation prompt
    ft = ROOT / "models" / model_dir.name / "function_tokens.json"
    fn = {t["id"] for t in json.loads(ft.read_text())["tokens"]}
    edits = [{"layer": 15, "feature": 1516, "strength": 40.0}]
    setup = Setup(model_dir, ROOT / "sae_weights" / model_dir.name, ft, edits, fn)
    spans = content_spans(tok, ids, SMOL_CHAT)
    run_cases(role_cases(spans, SMOL_CHAT, fn), [ids], role_codes(tok, SMOL_CHAT, ids), setup)


# ---- the vLLM worker's batch state and admission salt, on their own (no engine) -----------------------------------

OBJECTS = [pos for pos, _, _ in PLAIN_CASES if isinstance(pos, dict)]


@pytest.mark.parametrize("pos", OBJECTS, ids=[json.dumps(p) for p in OBJECTS])
def test_vllm_batch_state_selects_the_same_positions_chunked_and_after_recomputation(
    demo_saes, demo_function_tokens, demo_tokenizer, pos
):
    from helpers import batch_state
    from test_vllm_engine import run_step

    state = batch_state(demo_saes, demo_function_tokens, max_clamps=8)
    prompt = demo_tokenizer.encode(PROMPTS[0])
    generated = demo_tokenizer.encode(" and the, of a")
    extra = {"steering": json.dumps({"edits": EDITS, "positions": pos})}
    for rid in ("whole", "chunked"):
        state.add_request(rid, prompt, extra)
    state.add_request("plain", prompt, None)
    whole = run_step(state, [("plain", prompt[:5], 0), ("whole", prompt, 0)])["whole"]
    first = run_step(state, [("chunked", prompt[:7], 0), ("plain", prompt[5:9], 5)])
    second = run_step(state, [("plain", prompt[9:12], 9), ("chunked", prompt[7:], 7)])
    assert first["chunked"] + second["chunked"] == whole and not any(first["plain"] + second["plain"])
    for k, tok in enumerate(generated):  # decode steps, then a recomputation of prompt and output in one go
        whole += run_step(state, [("whole", [tok], len(prompt) + k)])["whole"]
    run_step(state, [])
    assert run_step(state, [("whole", prompt + generated, 0)])["whole"] == whole
    seq, n = prompt + generated, len(prompt)
    _, _, expect = next(c for c in PLAIN_CASES if c[0] == pos)
    assert [t for t, s in enumerate(whole) if s] == [t for t in expect(seq, n) if t < len(seq)]
    state.add_request("cached", prompt, extra, num_cached=9)  # 9 prompt tokens from the prefix cache: counted once
    run_step(state, [("cached", prompt[9:], 9)])
    assert state.applied("cached") == state.applied("chunked") == sum(1 for s in whole[:n] if s)


def test_vllm_cache_salt_follows_the_prompt_positions_an_object_selects(demo_function_tokens, demo_tokenizer, chat):
    from functok_vllm.engines.vllm.admission import cache_salt

    mask = demo_function_tokens.mask(8192)
    prompt = demo_tokenizer.encode(PROMPTS[0])
    ids, codes, _ = chat

    def salt(pos, p=prompt, roles=None):
        return cache_salt(SteeringSpec.from_dict({"edits": EDITS, "positions": pos}), p, mask, "r", roles)

    assert salt({"last_prompt": 3}) == salt({"last_prompt": 3})
    assert salt({"last_prompt": 3}) != salt({"last_prompt": 3}, prompt[:-2])  # the same prefix, steered elsewhere
    assert salt({"last_prompt": 3}) != salt({"last_prompt": 4})
    moved = [0 if c & 3 == 2 else c for c in codes]  # the same prompt whose user content is no message's
    assert salt({"roles": ["user"]}, ids, codes) != salt({"roles": ["user"]}, ids, moved)
