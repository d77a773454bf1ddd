"""Position objects over HTTP (`functok serve` on loopback, transformers engine): every bad field gets a 400 naming it
(`steering.positions.token_ids[3]`), roles on a plain completion are refused saying why, and `steered_positions` in
the response counts exactly the positions the object selects, found here from the token ids."""

import httpx
import pytest
from helpers import ServerProc

KEY = "sk-test-positions"
MODEL = "functok-tiny"
EDITS = [{"layer": 2, "feature": 5, "strength": 10.0}]
CHAT = [
    {"role": "system", "content": "Speak as a king."},
    {"role": "user", "content": "Tell me, my friend, of the war."},
    {"role": "assistant", "content": "The war was long, and the night was cold."},
    {"role": "user", "content": "And what of the prince?"},
]


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    proc = ServerProc(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-position-ids", "4")
    with httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c
    proc.stop()


def post(http, path: str, steering, **body):
    base = {"model": MODEL, "max_tokens": 4, "temperature": 0, "steering": steering}
    if path == "chat":
        return http.post("/v1/chat/completions", json={**base, "messages": CHAT, **body})
    return http.post("/v1/completions", json={**base, "prompt": "The king said, to his son, that the war", **body})


@pytest.mark.parametrize(
    ("path", "steering", "param", "says"),
    [
        (
            "chat",
            {"edits": EDITS, "positions": {"token_ids": [1, 2, 3, 9000]}},
            "steering.positions.token_ids[3]",
            "vocab",
        ),
        (
            "chat",
            {"edits": EDITS, "positions": {"exclude_ids": [1, -2]}},
            "steering.positions.exclude_ids[1]",
            "greater",
        ),
        (
            "chat",
            {"edits": EDITS, "positions": {"exclude_ids": [1, 2, 3, 4, 5]}},
            "steering.positions.exclude_ids",
            "at most 4",
        ),
        ("chat", {"edits": EDITS, "positions": {"firstgenerated": 2}}, "steering.positions.firstgenerated", "unknown"),
        (
            "chat",
            {"edits": EDITS, "positions": {"first_generated": 0}},
            "steering.positions.first_generated",
            "greater",
        ),
        ("chat", {"edits": EDITS, "positions": {"last_prompt": "4"}}, "steering.positions.last_prompt", "integer"),
        ("chat", {"edits": EDITS, "positions": {"roles": ["bot"]}}, "steering.positions.roles[0]", "'user'"),
        ("chat", {"edits": EDITS, "positions": {"roles": []}}, "steering.positions.roles", "selects nothing"),
        (
            "chat",
            {"edits": EDITS, "positions": {"template_tokens": True}},
            "steering.positions.template_tokens",
            "roles",
        ),
        ("chat", {"edits": EDITS, "positions": {"select": "every"}}, "steering.positions.select", "'function'"),
        ("chat", {"edits": EDITS, "positions": 7}, "steering.positions", "object"),
        ("text", {"edits": EDITS, "positions": {"roles": ["user"]}}, "steering.positions.roles", "chat"),
        (
            "text",
            [None, {"edits": EDITS, "positions": {"token_ids": [8192]}}],
            "steering[1].positions.token_ids[0]",
            "vocab",
        ),
    ],
)
def test_bad_positions_get_a_400_naming_the_field(http, path, steering, param, says):
    r = post(http, path, steering)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"] and err["message"].startswith(param), err


def test_steered_positions_count_what_the_object_selects(http, demo_tokenizer):
    text = demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    want = 0
    for m in CHAT[1::2]:  # each user message's content, found as its own tokens in the prompt
        content = demo_tokenizer.encode(m["content"], add_special_tokens=False)
        assert any(ids[s : s + len(content)] == content for s in range(len(ids))), m
        want += len(content)
    r = post(http, "chat", {"edits": EDITS, "positions": {"roles": ["user"]}})
    assert r.status_code == 200, r.text
    got = r.json()["steering"]
    assert got["positions"] == {"roles": ["user"]} and got["steered_positions"] == want, got
    comma = demo_tokenizer.encode(",")[0]
    r = post(http, "text", {"edits": EDITS, "positions": {"token_ids": [comma]}}, return_token_ids=True)
    assert r.status_code == 200, r.text
    body = r.json()
    seq = demo_tokenizer.encode("The king said, to his son, that the war") + body["choices"][0]["token_ids"][:-1]
    assert body["steering"]["steered_positions"] == seq.count(comma) >= 2, (body["steering"], seq)
