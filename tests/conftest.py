"""Shared fixtures: the shipped demo model, its tokenizer, SAEs and function tokens (loaded once per session)."""

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from functok_vllm.core import SAE, FunctionTokens
from functok_vllm.engines.hf.hooks import load_model
from functok_vllm.engines.vllm.available import vllm_status
from functok_vllm.paths import DEMO_FUNCTION_TOKENS, DEMO_MODEL, DEMO_SAES

torch.set_num_threads(2)  # the test machine has 2 cores, shared with other jobs


def _bind_vllm_workers_to_this_test_worker_s_core() -> None:
    """vLLM's CPU worker binds its threads to the first core of the machine unless told otherwise (its automatic
    binding, `VLLM_CPU_OMP_THREADS_BIND=auto`), so the vLLM workers of two pytest workers shared one core while the
    other idled. Each pytest worker's vLLM workers get a core of their own here; a test that starts several ranks
    or checks the automatic binding sets or clears the variable itself."""
    worker, cores = os.environ.get("PYTEST_XDIST_WORKER", ""), sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and len(cores) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[int(worker[2:]) % len(cores)]))


_bind_vllm_workers_to_this_test_worker_s_core()


# The model classes vLLM is asked to serve in the tests, in the order they are first needed. vLLM inspects a class
# (can it run pipeline-parallel? is it multimodal?) in a child process that imports vLLM, once per class and cache
# (~/.cache/vllm/modelinfos, keyed by the model file's hash): 7-8 s of CPU each, 8 classes here, from an empty HOME.
MODEL_CLASSES = (
    "LlamaForCausalLM",
    "GPT2LMHeadModel",
    "Gemma2ForCausalLM",
    "TransformersForCausalLM",  # the random GPT-NeoX of test_vllm_parity
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
)
# One child inspects them all, as vLLM's own child would (its plugins loaded, `_ModelInfo.from_model_cls` of the
# class), and vLLM saves each to that cache; the tests then read the cache as they would after their first start.
INSPECT = """
import sys
import vllm.model_executor.models.registry as r
from vllm.plugins import load_general_plugins
load_general_plugins()
r._run_in_subprocess = lambda fn: fn()  # this process is the child vLLM would start for each class
for name in sys.argv[1:]:
    r.ModelRegistry.models[name].inspect_model_cls()
"""
INSPECTING = pytest.StashKey[tuple]()


def pytest_configure(config):
    """Probe vLLM once, in the first pytest process: the answer is kept in the environment (`vllm_status`), which the
    xdist workers inherit, so they do not each start the 5-second probe while collecting. Where vLLM runs, the first
    process also starts the one child that inspects `MODEL_CLASSES` while the workers collect; a test that needs a
    class before it is done inspects that class itself, as vLLM does (the cache is written atomically)."""
    if vllm_status().ok and not hasattr(config, "workerinput"):
        log = tempfile.TemporaryFile()  # its warnings (no Triton on CPU) are shown only if it fails
        child = subprocess.Popen([sys.executable, "-c", INSPECT, *MODEL_CLASSES], stdout=log, stderr=log)
        config.stash[INSPECTING] = child, log


def pytest_unconfigure(config):
    """Report the inspecting child's failure with its output; one still running at the end (it takes ~10 s alone) is
    stopped and reported, so it never holds the run open."""
    child, log = config.stash.get(INSPECTING, (None, None))
    if child is None:
        return
    try:
        code = child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        code = "still running after the tests; stopped"
    if code != 0:
        log.seek(0)
        print(log.read().decode(errors="replace")[-3000:])
        print(f"functok: inspecting vLLM's model classes failed ({code}); the tests inspected them themselves")


def pytest_report_header(config):
    """Say on the first lines whether the vLLM tests run here and on which kernels (they skip, with this reason)."""
    return vllm_status().line()


# The longest files (vLLM compiles and engine start-ups), longest first. `make test` runs two workers that take a file
# at a time; xdist alone would queue files by their number of tests, which put these few-test, minutes-long files
# last, leaving one worker idle while the other finished them. Order only: no test is skipped or changed.
LONGEST_FIRST = (
    "test_vllm_hook_points.py",
    "test_vllm_parity.py",
    "test_analysis_vllm.py",
    "test_vllm_parallel.py",
    "test_vllm_engine.py",
    "test_vllm_serve.py",
    "test_vllm_projection.py",
)


def pytest_collection_modifyitems(config, items):
    """Longest files first, then the other files that start vLLM, then the rest; a file's tests stay together and in
    their order (the sort is stable and ranks whole files)."""
    rank = {}
    for item in items:
        name = item.path.name
        r = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST) + 1
        if item.get_closest_marker("vllm") is not None:
            r = min(r, len(LONGEST_FIRST))
        rank[item.path] = min(r, rank.get(item.path, r))
    items.sort(key=lambda item: rank[item.path])


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"functok: {vllm_status().line()}")


@pytest.fixture(scope="session")
def demo_model_and_tokenizer():
    return load_model(DEMO_MODEL, dtype=torch.float32)


@pytest.fixture(scope="session")
def demo_model(demo_model_and_tokenizer):
    """functok-tiny in float32, eval mode. Shared: attach hooks only inside `residual_hooks` blocks."""
    return demo_model_and_tokenizer[0]


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_and_tokenizer):
    return demo_model_and_tokenizer[1]


@pytest.fixture(scope="session")
def demo_saes() -> dict[int, SAE]:
    """The shipped SAEs by layer (float32): {0: SAE, 1: SAE, 2: SAE}."""
    saes = [SAE.load(p) for p in sorted(DEMO_SAES.glob("layer_*"))]
    return {sae.layer: sae for sae in saes}


@pytest.fixture(scope="session")
def demo_function_tokens() -> FunctionTokens:
    return FunctionTokens.load(DEMO_FUNCTION_TOKENS)


@pytest.fixture(scope="session")
def logit_lens_feature(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    """(layer, feature, token): the layer-2 feature whose decoder row, read through the final norm and unembedding,
    most raises a whole-word content token (a visible steering direction at strengths ~10-20)."""
    layer = 2
    vocab = len(demo_tokenizer)
    words = torch.tensor([re.fullmatch(r" [a-z]{4,}", demo_tokenizer.decode([i])) is not None for i in range(vocab)])
    words &= ~demo_function_tokens.mask(vocab)
    with torch.no_grad():
        logits = (demo_saes[layer].W_dec * demo_model.model.norm.weight) @ demo_model.lm_head.weight.T  # (d_sae, vocab)
        logits[:, ~words] = -torch.inf
        best, token = logits.max(1)
    feature = int(best.argmax())
    return layer, feature, demo_tokenizer.decode([int(token[feature])])
