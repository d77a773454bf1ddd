"""The transformers engine on each model family: a mixed, steered batch matches an independent plain forward.

Each family is a tiny random-weight model built from its transformers config class (float32, seeded), saved with the
demo tokenizer, and served by HFEngine with a random SAE on a middle layer. The reference is independent of the
project's code: the model loaded again with eager attention, the whole sequence (prompt + tokens so far) run without
a KV cache at every step, and steering applied by a forward hook on the decoder layer (h += strength * W_dec[f]).
"""

import asyncio
import shutil
from operator import attrgetter

import pytest
import torch

from functok_vllm.core import SAE, SAEConfig
from functok_vllm.engines.base import GenerateRequest, SamplingParams
from functok_vllm.engines.hf.engine import HFEngine, HFEngineConfig
from functok_vllm.engines.hf.ragged import RaggedAttention, UnsupportedModel
from functok_vllm.engines.placement import decoder_layers
from functok_vllm.offline import go_offline
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL
from functok_vllm.steering import SteeringSpec

VOCAB = 8192  # the demo tokenizer's, so the demo function-token file fits
WINDOW = 6  # sliding window, well under the prompts' 16-17 tokens
NEW = 8  # greedy tokens per request
TOL = 1e-4  # float32 log-probabilities, engine against reference
STRENGTH = 4.0  # the residual stream of these models has norm ~1: a visible push
BASE = {"vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
BODY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
GQA = {**BODY, "num_key_value_heads": 2}
# name: (config class, where the decoder layers are, config keywords)
FAMILIES = {
    "llama-mha": ("LlamaConfig", "model.layers", {**BODY, "num_key_value_heads": 4}),
    "llama-gqa": ("LlamaConfig", "model.layers", GQA),
    "mistral-window": ("MistralConfig", "model.layers", {**GQA, "sliding_window": WINDOW}),
    "qwen2-window": (  # layer 0 full attention, layers 1-2 sliding: two mask types in one forward
        "Qwen2Config",
        "model.layers",
        {**GQA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "model.layers", {**GQA, "head_dim": 16}),
    "gemma2-softcap": (  # an attention softcap under these small scores (max ~0.02), so that it bites
        "Gemma2Config",
        "model.layers",
        {
            **GQA,
            "head_dim": 16,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 0.01,
            "final_logit_softcapping": 1.0,
        },
    ),
    "gpt2": ("GPT2Config", "transformer.h", {"n_embd": 64, "n_layer": 3, "n_head": 4}),
    "gpt-neox": ("GPTNeoXConfig", "gpt_neox.layers", BODY),
    "phi3": ("Phi3Config", "model.layers", GQA),
}
PROMPTS = [
    "My dear friend, I have written to you because the king said to his son",
    "Once upon a time, there was a girl who walked into the room and",
    "It was the best of times, it was the worst of times, and war is",
]


def transformers():
    go_offline()
    import transformers

    return transformers


@pytest.fixture(scope="module")
def demo_tokenizer():
    return transformers().AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def build(family: str, root) -> tuple:
    """(model dir, SAE dir, layer, W_dec row): a seeded random model with the demo tokenizer, and a random SAE."""
    cls, _, kw = FAMILIES[family]
    t = transformers()
    torch.manual_seed(0)
    cfg = getattr(t, cls)(**BASE, **kw)
    model = t.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, model_dir / name)
    d, d_sae, layer = cfg.hidden_size, 16, cfg.num_hidden_layers // 2
    w_dec = torch.nn.functional.normalize(torch.randn(d_sae, d), dim=1)  # (d_sae, d), unit rows
    sae_cfg = SAEConfig(d_in=d, d_sae=d_sae, architecture="standard", hook_name=f"blocks.{layer}.hook_resid_post")
    sae = SAE(
        sae_cfg, {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec, "b_dec": torch.zeros(d)}
    )
    sae.save(root / "sae")
    return model_dir, root / "sae", layer, w_dec[3]


def serve(model_dir, sae_dir, cases, extras=None, deltas=None, function_tokens=DEMO_FUNCTION_TOKENS):
    """Run `cases` [(prompt ids, spec)] concurrently on one engine: tokens, per-step log-probs, stats, the engine.

    The test wraps the worker's sampler to read the whole (vocab,) rows it samples from. `extras`: GenerateRequest
    keywords (logprobs, features, ...) for every case; `deltas` (a dict) receives each case's deltas by index.
    Returns (tokens, per-step log-probs, stats, the engine).
    """
    eng = HFEngine(HFEngineConfig(model_dir, [sae_dir], function_tokens, max_running=8, warmup=False))
    seen: dict[str, list[torch.Tensor]] = {}
    sample = eng.batcher._sample

    def recording_sample(logits, seqs):
        for row, s in zip(logits, seqs, strict=True):
            seen.setdefault(s.req.request_id, []).append(torch.log_softmax(row.float(), -1))
        return sample(logits, seqs)

    eng.batcher._sample = recording_sample

    async def one(i, ids, spec):
        params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
        out = []
        async for d in eng.generate(GenerateRequest(f"r{i}", ids, params, spec, **(extras or {}))):
            out += d.token_ids
            if deltas is not None:
                deltas.setdefault(i, []).append(d)
        return out

    async def go():
        await eng.start()
        try:
            return await asyncio.gather(*(one(i, ids, spec) for i, (ids, spec) in enumerate(cases)))
        finally:
            await eng.shutdown()

    tokens = asyncio.run(go())
    return tokens, [seen[f"r{i}"] for i in range(len(cases))], eng.stats(), eng


def reference(model_dir, layers_at: str, layer: int, direction, cases, tokens) -> list[list[torch.Tensor]]:
    """Per-step log-probs of a plain eager forward of the whole sequence so far, steered by a forward hook."""
    t = transformers()
    model = t.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()

    def steer(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + STRENGTH * direction  # every position: positions "all"
        return (h, *out[1:]) if isinstance(out, tuple) else h

    result = []
    for (ids, spec), toks in zip(cases, tokens, strict=True):
        hook = attrgetter(layers_at)(model)[layer].register_forward_hook(steer) if spec else None
        try:
            seq, lps = list(ids), []
            with torch.inference_mode():
                for tok in toks:
                    logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                    lps.append(torch.log_softmax(logits.float(), -1))
                    seq.append(tok)
        finally:
            if hook is not None:
                hook.remove()
        result.append(lps)
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_plain_forward(family, tmp_path, demo_tokenizer):
    model_dir, sae_dir, layer, direction = build(family, tmp_path)
    steer = SteeringSpec.from_dict(
        {"edits": [{"layer": layer, "feature": 3, "strength": STRENGTH}], "positions": "all"}
    )
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    assert min(map(len, prompts)) > 2 * WINDOW
    cases = [(prompts[0], None), (prompts[1], None), (prompts[0], steer), (prompts[2], None)]
    tokens, got, stats, eng = serve(model_dir, sae_dir, cases)
    assert decoder_layers(eng.model) is attrgetter(FAMILIES[family][1])(eng.model)
    assert eng.ragged.impl == ("eager" if family.startswith("gemma2") else "sdpa")  # sdpa would drop the softcap
    assert stats["decode_rows"] > stats["decode_steps"]  # the requests really shared decode steps
    want = reference(model_dir, FAMILIES[family][1], layer, direction, cases, tokens)
    for i, (toks, g, w) in enumerate(zip(tokens, got, want, strict=True)):
        assert len(toks) == len(g) == NEW, i
        for step, (tok, gs, ws) in enumerate(zip(toks, g, w, strict=True)):
            err = float((gs - ws).abs().max())
            assert err < TOL, (family, i, step, err)
            # Same greedy token: the engine's token is the reference's argmax, or within TOL of it (a near-tie may
            # go either way without any error; the log-probs above are compared in full either way).
            assert float(ws[tok]) >= float(ws.max()) - TOL, (family, i, step)
    assert float((got[2][0] - got[0][0]).abs().max()) > 1e-2  # steering changed the steered request


@pytest.mark.parametrize("family", ["mistral-window", "gemma2-softcap"])
def test_the_window_and_softcaps_matter_here(family, tmp_path, demo_tokenizer):
    """The comparison above can fail: without the sliding window (and, for Gemma-2, without its attention softcap,
    which transformers' sdpa drops) the reference's log-probs move well beyond TOL on these prompts."""
    model_dir, *_ = build(family, tmp_path)
    t = transformers()
    model = t.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([demo_tokenizer.encode(PROMPTS[0])])

    def logits():
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0], -1)

    base = logits()
    model.config.sliding_window = 10**4
    assert float((logits() - base).abs().max()) > 10 * TOL
    if family.startswith("gemma2"):
        model.config.sliding_window = WINDOW
        model.set_attn_implementation("sdpa")
        assert float((logits() - base).abs().max()) > 10 * TOL


def test_a_model_that_cannot_be_served_is_refused_by_name():
    """GPT-2 with reorder_and_upcast_attn under eager computes attention outside the attention interface."""
    t = transformers()
    torch.manual_seed(0)
    cfg = t.GPT2Config(**BASE, n_embd=64, n_layer=2, n_head=4, reorder_and_upcast_attn=True)
    model = t.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with pytest.raises(UnsupportedModel, match=r"^GPT2LMHeadModel: .*reorder_and_upcast_attn") as e:
        RaggedAttention(model)
    assert "\n" not in str(e.value)


def test_attention_off_the_interface_is_refused_by_name():
    """A layer whose attention does not go through transformers' attention interface cannot be read per request."""
    t = transformers()
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.LlamaConfig(**BASE, **{**BODY, "num_hidden_layers": 2})).eval()
    model.model.layers[1].self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    with pytest.raises(UnsupportedModel, match=r"^LlamaForCausalLM: attention calls per forward by layer \[0\], not"):
        RaggedAttention(model)
