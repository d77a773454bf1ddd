"""How close per-request capture is to the independent reference (`tests/reference.py`: a plain transformers forward
with the edits applied by hooks): the worst per-position relative error over 4 layers, for a steered and an unsteered
choice decoded in one batch, 16 greedy tokens each, on the demo model. Prints the answers, bytes and the error.

    PYTHONPATH=$PWD .venv/bin/python scripts/measure_capture_error.py
"""

import sys
import tempfile
from pathlib import Path

import openai
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import eager_model, load_lens, logprobs  # noqa: E402

from functok_vllm.activation_capture import read_capture  # noqa: E402
from functok_vllm.launch import functok_serve, start  # noqa: E402
from functok_vllm.paths import DEMO_MODEL, DEMO_SAES  # noqa: E402

LAYERS = (0, 1, 2, 3)  # the demo's SAE layers and one add-only layer (--steer-layers 3), all at resid_post
EDITS = [{"layer": 2, "feature": 1493, "strength": 150.0}, {"layer": 0, "feature": 3, "strength": -4.0}]
PROMPTS = ["Prince Andrew looked at", "Once upon a time, there was a"]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    model = eager_model(DEMO_MODEL)
    lenses = {L: load_lens(DEMO_SAES / f"layer_{L}") for L in (0, 1, 2)}
    points = {L: (L, "resid_post") for L in LAYERS}
    spec = {"edits": EDITS, "positions": "all"}
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        srv = start(
            functok_serve("--model", str(DEMO_MODEL), "--steer-layers", "3", "--data-dir", tmp), Path(tmp) / "log"
        )
        try:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
            for prompt in PROMPTS:
                extra = {"steering": [None, spec], "return_token_ids": True, "capture": {"layers": list(LAYERS)}}
                r = client.completions.create(
                    model="functok-tiny", prompt=prompt, max_tokens=16, temperature=0, extra_body=extra
                )
                ids = tok.encode(prompt)
                for choice, s in zip(r.choices, [None, spec], strict=True):
                    got = read_capture(choice.capture)
                    forwarded = ids + choice.token_ids[:-1]
                    want = {}
                    logprobs(model, lenses, points, forwarded, len(ids), s, grab=want)
                    for L in LAYERS:
                        t, w = got[f"blocks.{L}.hook_resid_post"].double(), want[L].double()
                        worst = max(worst, float(((t - w).norm(dim=-1) / w.norm(dim=-1)).max()))
                print(prompt, [c.text for c in r.choices], "bytes", [c.capture["bytes"] for c in r.choices])
        finally:
            srv.stop()
    print(f"worst per-position relative error: {worst:.2e}")


if __name__ == "__main__":
    main()
