"""The controlled studies' commands on bad input: one clear message, exit code 2, no traceback."""

import json

from test_analysis_cli import assert_refused, run


def test_reactivation_study_needs_two_prompts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The old prince was sitting in his study, and he"}) + "\n")
    r = run("reactivation-study", "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert_refused(r, "the cross-prompt null needs at least two prompts")


def test_steer_study_on_a_layer_without_an_sae(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The old prince was sitting in his study, and he"}) + "\n")
    r = run("steer-study", "--prompts", str(prompts), "--layer", "3", "--out", str(tmp_path / "o"))
    assert_refused(r, "no SAE for layer 3")


def test_case_study_on_a_model_that_knows_no_capital(tmp_path):
    r = run("case-study", "--layer", "1", "--out", str(tmp_path / "o"))
    assert_refused(r, "answers fewer than one pair of capital questions correctly")
