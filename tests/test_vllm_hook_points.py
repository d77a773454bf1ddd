"""SAEs at every hook point in the vLLM engine, compiled and eager, against the independent reference (`reference.py`:
a plain transformers forward with hooks at each hook point, activations from sae-lens), prompt and generated
log-probabilities within 1e-4 (float32), in one batch mixing unsteered, added, clamped, conditionally added
(`when`) and projected (`project_out`, `cap`, `set`, with a norm-relative add) requests; and the features
that fired at every SAE, read out by the worker's op inside the (compiled) model and fetched as a Python caller of
`LLM` does (`extra_args["functok_features"]`, `collective_rpc("functok_features")`), against sae-lens's encode. In
the same batch, captures and readouts (`functok_capture`, `functok_readout`) at every hook point: the added request
reads before its edits, the clamped and the unsteered ones after, each equal to the reference's tensor at that point
(before: as its forward went, the edits upstream applied) within 1e-5 relative, and to sae-lens's encode of it.

Random Llama (grouped-query attention, fused add+norm layers): resid_pre of block 0 (the embeddings), attn_out (a gated
SAE), resid_mid (JumpReLU with constant_norm_rescale), mlp_out (standard with layer_norm), compiled and eager. Random
GPT-2 (one-tensor layers): resid_pre 0, resid_post, attn_out, mlp_out; its resid_mid has no fused norm to steer at and
is refused by name. Gemma-2 (window, attention and final soft-capping, norms after attention and MLP) compiled;
Mistral (sliding window shorter than the prompt), Qwen2, Qwen3 and Phi-3 eager: resid_pre 0, resid_post, resid_mid,
mlp_out.
"""

import json
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import steering_llm  # noqa: E402
from reference import check_features, eager_model, lens_sae, lens_top, load_lens, logprobs, random_model  # noqa: E402

from functok_vllm.engines.vllm.available import vllm_status  # noqa: E402
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL  # noqa: E402

STATUS = vllm_status()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not STATUS.ok, reason=STATUS.line())]

TOL = 1e-4
NEW = 5
BASE = {"vocab_size": 8192, "max_position_embeddings": 512, "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
CASES = {
    "llama": (
        "LlamaConfig",
        {**LLAMA, "num_key_value_heads": 2, "tie_word_embeddings": False},
        {
            0: ("resid_pre", "jumprelu", "none"),
            1: ("attn_out", "gated", "none"),
            2: ("resid_mid", "jumprelu", "constant_norm_rescale"),
            3: ("mlp_out", "standard", "layer_norm"),
        },
    ),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512},
        {
            0: ("resid_pre", "standard", "none"),
            1: ("resid_post", "jumprelu", "none"),
            2: ("attn_out", "jumprelu", "none"),
            3: ("mlp_out", "gated", "none"),
        },
    ),
}
# Other families vLLM serves natively on CPU, compiled, each with four hook points (resid_mid at its fused norm).
GQA = {**LLAMA, "num_key_value_heads": 2}
MIXED = {
    0: ("resid_pre", "jumprelu", "none"),
    1: ("resid_post", "standard", "none"),
    2: ("resid_mid", "jumprelu", "none"),
    3: ("mlp_out", "gated", "none"),
}
WINDOW = 8  # shorter than the prompt (17 tokens): a sliding window that bites
CASES |= {
    "mistral": ("MistralConfig", {**GQA, "sliding_window": WINDOW}, MIXED),
    "qwen2": ("Qwen2Config", GQA, MIXED),
    "qwen3": ("Qwen3Config", {**GQA, "head_dim": 64}, MIXED),
    "gemma2": (
        "Gemma2Config",
        {**GQA, "head_dim": 64, "sliding_window": WINDOW, "attn_logit_softcapping": 5.0}
        | {"final_logit_softcapping": 3.0},
        MIXED,
    ),
    "phi3": ("Phi3Config", {**GQA, "pad_token_id": 0}, MIXED),
}
# Compiled (Inductor, where the steering op once met a fusion bug) for each distinct layer code path: Llama-style fused
# add+norm (Llama, also eager), Gemma-2's norms after attention and MLP, GPT-2's one-tensor layers. Mistral, Qwen2/3
# and Phi-3 run vLLM's Llama-style layer code with their own attention settings: eager, to keep CI within budget.
RUNS = [("llama", "compiled"), ("llama", "eager"), ("gpt2", "compiled"), ("gemma2", "compiled")]
RUNS += [(f, "eager") for f in ("mistral", "qwen2", "qwen3", "phi3")]
PROMPTS = ["The old house by the river was empty, and the children of the village said that"]


PROJECTIONS = ({"mode": "project_out"}, {"mode": "cap", "min": -0.5, "max": 0.5}, {"mode": "set", "value": 1.0})


def conditional(gates: dict) -> dict:
    """An add at each gated layer, applied only where {layer: (feature, threshold)}'s feature is above it."""
    edits = [{"layer": L, "feature": 3 + L, "strength": 3.0, "when": {"feature": f, "above": t}} for L, (f, t) in gates]
    return {"edits": edits, "positions": "all"}


def gate_features(model, lenses: dict, points: dict, ids: list[int]) -> list:
    """[(layer, (feature, threshold))], each read from the stream its edit sees (the gated adds upstream applied):
    the feature active at most positions there, cut between its two middle values, so the gate holds at about half.
    A layer where no feature is active at two positions is left ungated (GPT-2's random SAEs here fire on no
    unsteered token: no conditional request there; `test_conditional.py` gates GPT-2 in the transformers engine)."""
    gates = []
    for L in sorted(points):
        before = {}
        logprobs(model, lenses, points, ids, len(ids), conditional(gates), {}, before)
        acts = lens_top(lenses[L], before[L], 1)[0]  # (seq, d_sae)
        f = int((acts > 0).sum(0).argmax())
        v = acts[:, f].sort().values
        if int((v > 0).sum()) >= 2:  # cut halfway between the two middle values: no position sits on the threshold,
            gates.append((L, (f, float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)))  # where 1e-7 could flip it
    return gates


def specs(sites: dict, gates: list) -> list:
    """Unsteered, add, clamp on the prompt, conditional adds (`gates`), and projections (project_out, cap, set in turn
    by layer) with a norm-relative add: issue 25's operations at the hook points."""
    layers = sorted(sites)
    project = [{"layer": L, "feature": 3 + L, **PROJECTIONS[i % 3]} for i, L in enumerate(layers)]
    norm_add = {"layer": layers[0], "feature": 7, "strength": 0.5, "strength_unit": "token_norm"}
    return [
        None,
        {"edits": [{"layer": L, "feature": 3 + L, "strength": 3.0} for L in layers], "positions": "all"},
        {"edits": [{"layer": L, "feature": 1, "mode": "clamp", "value": 4.0} for L in layers], "positions": "prompt"},
        *([conditional(gates)] if gates else []),
        {"edits": [*project, norm_add], "positions": "all"},
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for name, (cls, kw, sites) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        model_dir = random_model(root, cls, DEMO_MODEL, **BASE, **kw)
        d = kw.get("hidden_size", kw.get("n_embd"))
        saes = {
            L: lens_sae(root / "saes" / f"layer_{L}", arch, d, f"blocks.{L}.hook_{site}", norm=norm, seed=L)
            for L, (site, arch, norm) in sites.items()
        }
        out[name] = (root, model_dir, saes)
    return out


def reads(sites: dict, i: int) -> dict:
    """extra_args of case i's capture and readout of every SAE layer: before the edits for the added request (1),
    after them for the others."""
    edits = "before" if i == 1 else "after"
    capture = {"layers": sorted(sites), "positions": "all", "dtype": "float32", "edits": edits}
    probes = [{"layer": L, "feature": 3 + L, "before": i == 1} for L in sorted(sites)]
    return {"functok_capture": capture, "functok_readout": {"probes": probes, "prompt": True}}


def check_reads(llm, tag: str, n_ids: int, stream: dict, lenses: dict) -> float:
    """A request's capture and readout, fetched as a Python caller does, against the reference's `stream` ({layer:
    (seq, d)}) and sae-lens's encode of it; the largest relative error."""
    cap = llm.collective_rpc("functok_request_capture", args=(tag,))[0]
    ro = llm.collective_rpc("functok_readout", args=(tag,))[0]
    assert cap["positions"] == list(range(n_ids - 1)) == ro["positions"]  # the last token is never forwarded
    worst = 0.0
    for col, L in enumerate(sorted(stream)):
        want = stream[L][: n_ids - 1].double()
        got = torch.frombuffer(bytearray(cap["rows"][L]), dtype=torch.float32).view(n_ids - 1, -1).double()
        worst = max(worst, float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()))
        with torch.no_grad():
            acts = lenses[L].encode(want.float())[:, 3 + L].double()
        vals = torch.tensor([v[col] for v in ro["values"]], dtype=torch.float64)
        worst = max(worst, float((vals - acts).norm() / acts.norm()) if acts.any() else float(vals.abs().max()))
    return worst


def make_llm(model_dir, sae_dirs, enforce_eager: bool, in_process: bool = True):
    return steering_llm(model_dir, sae_dirs, DEMO_FUNCTION_TOKENS, enforce_eager, in_process=in_process, max_num_seqs=8)


@pytest.mark.parametrize("name,mode", RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_every_hook_point_matches_the_reference_on_vllm(built, name, mode):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    root, model_dir, saes = built[name]
    sites = CASES[name][2]
    model = eager_model(model_dir)
    lenses = {L: load_lens(p) for L, p in saes.items()}
    points = {L: (L, site) for L, (site, _, _) in sites.items()}
    ids = AutoTokenizer.from_pretrained(str(model_dir))(PROMPTS[0]).input_ids
    gates = gate_features(model, lenses, points, ids)
    cases = specs(sites, gates)
    llm = make_llm(model_dir, saes.values(), mode == "eager")
    feats = {"layers": sorted(sites), "top_k": 4, "prompt": True}
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=NEW,
                logprobs=0,
                prompt_logprobs=0,
                ignore_eos=True,
                extra_args={"functok_features": feats, "functok_id": f"case{i}"}
                | reads(sites, i)
                | ({"steering": json.dumps(s)} if s else {}),
            )
            for i, s in enumerate(cases)
        ]
        outs = llm.generate([PROMPTS[0]] * len(cases), params, use_tqdm=False)
        read = llm.collective_rpc("functok_features", args=({f"case{i}": [NEW, True] for i in range(len(cases))},))[0]
        for i, (spec, o) in enumerate(zip(cases, outs, strict=True)):
            ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
            after, before = {}, {}
            logprobs(model, lenses, points, ids, len(o.prompt_token_ids), spec, after, before)
            for L, (f, t) in gates if i == 3 else ():  # each gate held at some positions and not at others (what
                held = lens_top(lenses[L], before[L], 1)[0][:, f] > t  # it reads: the stream before the edits there)
                assert 0 < int(held.sum()) < len(held), (name, L, int(held.sum()))
            err = check_reads(llm, f"case{i}", len(ids), before if i == 1 else after, lenses)
            assert err <= 1e-5, (name, mode, i, err)
            if i == 1:  # before and after differ at every layer: reading the wrong one fails the check above
                assert all(float((after[L] - before[L]).norm() / before[L].norm()) > 1e-3 for L in sites), name
    finally:
        llm.llm_engine.engine_core.shutdown()
    got_first = []
    fired = 0
    for i, (spec, o) in enumerate(zip(cases, outs, strict=True)):
        g = o.outputs[0]
        ids = list(o.prompt_token_ids) + list(g.token_ids)
        n = len(o.prompt_token_ids)
        grabbed = {}
        rows = logprobs(model, lenses, points, ids, n, spec, grabbed)  # (seq - 1, vocab)
        fe = read[f"case{i}"]  # the worker's entries: every prompt position, then the generated tokens'
        assert len(fe["prompt"]) == n and len(fe["generated"]) == NEW
        entries = [{"position": p, "layers": e} for p, e in enumerate(fe["prompt"])]
        entries += [{"position": n - 1 + j, "layers": e} for j, e in enumerate(fe["generated"])]
        fired += check_features(entries, grabbed, lenses)[0]
        want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(
            [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:n], strict=True)]
            + [d[t].logprob for d, t in zip(g.logprobs, g.token_ids, strict=True)]
        )
        err = float((got - want).abs().max())
        assert err < TOL, (name, mode, spec, err)
        best = rows[n - 1 :].max(-1).values
        assert ((best - want[n - 1 :]) < TOL).all(), (name, mode, spec, g.token_ids)
        got_first.append(got)
    for i in range(1, len(cases)):
        assert float((got_first[i] - got_first[0]).abs().max()) > 1e-3, (name, i)
    assert fired > 0, name


def test_resid_mid_where_vllm_has_no_fused_norm_is_refused_by_name(built, tmp_path, capfd):
    _, model_dir, _ = built["gpt2"]
    sae = lens_sae(tmp_path / "mid", "standard", 256, "blocks.1.hook_resid_mid")
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):  # vLLM's words for a worker's error
        make_llm(model_dir, [sae], enforce_eager=True, in_process=False)  # as served: the line is the worker's log
    log = "".join(capfd.readouterr())  # the worker's own log line, naming the SAE, its hook and the layer class
    assert f"{sae}: cannot apply an SAE at blocks.1.hook_resid_mid on vLLM: GPT2Block adds its attention" in log
