"""Position objects on vLLM, compiled: one mixed batch of the demo model holding every selector of `test_positions`
(ids, excludes, windows, last k function tokens, chat roles with and without template tokens) and none, sent as a
client of `vllm serve` writes them (the roles' codes as functok serve's engine sends them, `extra_args
["functok_roles"]`); prompt and generated log-probabilities against the independent reference within 1e-4 (float32),
and the worker's count of steered tokens equal to the positions the reference steered. A roles selector without the
codes is refused at admission (stock `vllm serve` does not know where each chat message is)."""

import json
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import steering_llm, worker_stats  # noqa: E402
from reference import eager_model, load_lens, logprobs  # noqa: E402
from test_hook_points import PROMPTS  # noqa: E402
from test_positions import EDITS, MOVED, PLAIN_CASES, TOL, chat_prompt, role_cases  # noqa: E402

from functok_vllm.core import SAE  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.engines.vllm.batch_state import ROLES_XARG  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES  # noqa: E402

NO_VLLM = None if vllm_status().ok else vllm_status().line()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(NO_VLLM is not None, reason=str(NO_VLLM))]
NEW = 6


def test_position_objects_match_the_reference_on_compiled_vllm(demo_tokenizer):
    from vllm import SamplingParams

    plain = demo_tokenizer.encode(PROMPTS[0])
    chat, codes, spans = chat_prompt(demo_tokenizer)
    items = [(plain, case, None) for case in PLAIN_CASES] + [(chat, case, codes) for case in role_cases(spans)]

    def params(pos, roles):
        extra = None
        if pos is not None:
            extra = {"steering": json.dumps({"edits": EDITS, "positions": pos})}
            if roles is not None:
                extra[ROLES_XARG] = roles
        return SamplingParams(
            temperature=0, max_tokens=NEW, logprobs=0, prompt_logprobs=0, ignore_eos=True, extra_args=extra
        )

    llm = steering_llm(DEMO_MODEL, sorted(DEMO_SAES.glob("layer_*")), DEMO_FUNCTION_TOKENS, max_num_seqs=16)
    try:
        with pytest.raises(Exception, match="functok serve"):  # roles without their codes: refused, saying why
            llm.generate([{"prompt_token_ids": chat}], params({"roles": ["user"]}, None), use_tqdm=False)
        prompts = [{"prompt_token_ids": ids} for ids, _, _ in items]
        outs = llm.generate(prompts, [params(pos, roles) for _, (pos, _, _), roles in items], use_tqdm=False)
        stats = worker_stats(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
    model = eager_model(DEMO_MODEL)
    paths = {SAE.load(p).layer: p for p in sorted(DEMO_SAES.glob("layer_*"))}
    lenses = {L: load_lens(p) for L, p in paths.items()}
    points = {L: (SAE.load(p).cfg.hook.layer, SAE.load(p).cfg.hook.site) for L, p in paths.items()}
    steered, got_by = 0, {}
    for k, ((_, (pos, _, expect), _), o) in enumerate(zip(items, outs, strict=True)):
        g = o.outputs[0]
        ids, n = list(o.prompt_token_ids) + list(g.token_ids), len(o.prompt_token_ids)
        at = [] if expect is None else expect(ids, n)
        steered += len([t for t in at if t < len(ids) - 1])
        spec = None if pos is None else {"edits": EDITS, "positions": at}
        want = logprobs(model, lenses, points, ids, n, spec)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:n], strict=True)]
            + [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)]
        )
        err = float((got - want).abs().max())
        assert err < TOL, (k, pos, err)
        got_by[k] = got
    for k, (ids, (pos, _, _), _) in enumerate(items):  # agreeing with the reference is not agreeing with no steering
        base = 0 if ids is plain else len(PLAIN_CASES)
        if pos is not None:
            assert float((got_by[k] - got_by[base]).abs().max()) > MOVED, (k, pos)
    assert stats["steered_tokens"] == steered and stats["slots_in_use"] == 0, (stats, steered)
