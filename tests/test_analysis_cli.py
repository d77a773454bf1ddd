"""`functok analyze` on bad input: one clear message naming the problem, exit code 2, no traceback; and one real run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
FUNCTOK = str(Path(sys.executable).parent / "functok")


def run(*args, cwd=None):
    return subprocess.run(
        [FUNCTOK, "analyze", *args, "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def assert_refused(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_missing_corpus_file(tmp_path):
    missing = tmp_path / "nope.txt"
    r = run("coverage", "--corpus", str(missing), "--out", str(tmp_path / "o"))
    assert_refused(r, f"corpus file {missing} does not exist")


def test_report_on_a_missing_corpus_file(tmp_path):
    missing = tmp_path / "nope.txt"
    r = run("report", "--corpus", str(missing), "--out", str(tmp_path / "o"))
    assert_refused(r, f"corpus file {missing} does not exist")


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = run("loss-split", "--corpus", str(empty), "--out", str(tmp_path / "o"))
    assert_refused(r, "holds no tokens", str(empty))


def test_layer_without_an_sae(tmp_path):
    r = run("coverage", "--layers", "3", "--max-tokens", "64", "--out", str(tmp_path / "o"))
    assert_refused(r, "no SAE for layer 3", "layers with SAEs: 0, 1, 2")


def test_two_saes_for_one_layer(tmp_path):
    import shutil

    from functok_vllm.paths import DEMO_SAES

    for name in ("a", "b"):
        shutil.copytree(DEMO_SAES / "layer_1", tmp_path / "saes" / name)
    r = run("coverage", "--saes", str(tmp_path / "saes"), "--max-tokens", "64", "--out", str(tmp_path / "o"))
    assert_refused(r, f"{tmp_path / 'saes' / 'b'}: a second SAE for layer 1")


def test_function_tokens_from_another_tokenizer(tmp_path):
    bad = tmp_path / "ft.json"
    bad.write_text(json.dumps({"tokens": [{"id": 12, "token": ","}, {"id": 50256, "token": "<|endoftext|>"}]}))
    r = run("coverage", "--function-tokens", str(bad), "--max-tokens", "64", "--out", str(tmp_path / "o"))
    assert_refused(r, "[50256] are outside this model's vocabulary of 8192")


def test_prompt_longer_than_the_context(tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "Hello there."}), json.dumps({"text": "the cat sat " * 400})]
    prompts.write_text("\n".join(lines) + "\n")
    r = run("reactivation", "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert_refused(r, "prompt 2 has", "longer than the model's context of 512")


@pytest.mark.parametrize(
    "lines, needle",
    [(["{not json"], "p.jsonl:1: not valid JSON"), (['{"prompt": 3}'], 'needs a non-empty "prompt" or "text"')],
)
def test_malformed_prompt_file(tmp_path, lines, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    r = run("reactivation", "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert_refused(r, needle)


def test_missing_model_and_function_tokens(tmp_path):
    r = run("coverage", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o"))
    assert_refused(r, "does not exist or has no config.json")
    r = run("coverage", "--function-tokens", str(tmp_path / "ft.json"), "--out", str(tmp_path / "o"))
    assert_refused(r, f"function-token file {tmp_path / 'ft.json'} does not exist")


def test_bad_numbers_are_refused_by_the_parser(tmp_path):
    r = run("coverage", "--max-tokens", "0", "--out", str(tmp_path / "o"))
    assert_refused(r, "--max-tokens", "must be at least 1")


def test_coverage_run_writes_json_csv_and_small_pngs(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The king said to the queen that the war was over.\n\nAnd the queen said to the king: no.\n")
    out = tmp_path / "o"
    r = run("coverage", "--corpus", str(corpus), "--layers", "0", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "coverage.json").read_text())
    assert set(data["layers"]) == {"0", "2"}
    assert data["table"][0]["token"] == " the"  # the most frequent token of the file
    assert data["table"][-1]["coverage_L0"] == 1.0
    rows = (out / "coverage.csv").read_text().splitlines()
    assert len(rows) == data["distinct_tokens"] + 1
    for png in ("coverage_vs_rank.png", "degree_vs_frequency.png"):
        assert 0 < (out / png).stat().st_size < 200_000
