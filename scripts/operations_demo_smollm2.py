"""The README's demonstration of projection and conditional edits on SmolLM2-135M-Instruct, found with the project's
own tools on a running `functok serve` (transformers engine), with a null for each:

1. Projection. The unsteered answer to "Tell me about your favorite city." names Venice. A "venice" vector is built
   from paired prompts (Venice against another city, the same sentence) at layer 15, read at the last function token
   (`POST /v1/steering/vectors` with `examples`), and projected out of the residual at every position
   (`mode: project_out`). Null: the same edit with random unit directions of the same layer (`--nulls` of them).
   Statistics: the log-probability of " Venice" after the assistant's "The city I love most is" (prompt scoring,
   `echo`), its drop under each edit and where the venice vector's drop falls among the random directions'; and
   whether "Venice" is still in the greedy answer.
2. Conditional edit. The shipped French feature (layer 15, feature 1516) added at every position, only where a chosen
   feature at layer 15 is active (`when`), against the same add unconditioned, a condition that never holds, and no
   steering; the readout of the condition's feature before the edits (what the gate reads) says at how many of the
   positions that predict generated tokens the condition held.

    PYTHONPATH=$PWD .venv/bin/python scripts/operations_demo_smollm2.py --out benchmarks/operations_demo_smollm2.json
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import openai
import torch
from transformers import AutoTokenizer

from functok_vllm.launch import functok_serve, start

ADMIN = "sk-example-admin"
ASK = [{"role": "user", "content": "Tell me about your favorite city."}]
PAIRS = [
    (
        "I spent the summer in Venice, walking along the canals.",
        "I spent the summer in Berlin, walking along the streets.",
    ),
    ("Venice is famous for its gondolas and its bridges.", "Madrid is famous for its museums and its parks."),
    ("We took a boat across the lagoon to Venice.", "We took a train across the country to Lyon."),
    ("The carnival in Venice is full of masks.", "The festival in Toronto is full of music."),
    ("My favorite city is Venice, in Italy.", "My favorite city is Chicago, in America."),
    ("St. Mark's Square is the heart of Venice.", "Times Square is the heart of New York."),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--nulls", type=int, default=8, help="random directions projected out, the null of (1)")
    p.add_argument("--condition-feature", type=int, default=None, help="layer-15 feature gating (2) [the busiest]")
    args = p.parse_args()
    home = Path(os.environ.get("FUNCTOK_HOME", Path.home() / ".cache" / "functok"))
    model = home / "models" / "SmolLM2-135M-Instruct"  # `functok prepare-model` derives it
    out: dict = {"command": "PYTHONPATH=$PWD .venv/bin/python scripts/operations_demo_smollm2.py"}
    with tempfile.TemporaryDirectory() as tmp:
        srv = start(
            functok_serve("--model", str(model), "--admin-api-key", ADMIN, "--data-dir", tmp), Path(tmp) / "log"
        )
        try:
            api = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=ADMIN, max_retries=0, timeout=600)

            def ask(steering=None, readout=None, tokens=28) -> dict:
                body = {k: v for k, v in (("steering", steering), ("readout", readout)) if v is not None}
                r = api.chat.completions.create(
                    model=model.name, messages=ASK, max_tokens=tokens, temperature=0, extra_body=body
                )
                return {"answer": r.choices[0].message.content, "readout": getattr(r.choices[0], "readout", None)}

            tok = AutoTokenizer.from_pretrained(str(model))
            head = tok.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True) + "The city I love most is"
            target = head + " Venice"
            n_head = len(tok.encode(head))

            def venice_logprob(steering=None) -> float:
                """log p(" Venice" | chat + "The city I love most is") under `steering` (prompt scoring)."""
                body = {"steering": steering} if steering else {}
                r = api.completions.create(
                    model=model.name, prompt=target, max_tokens=0, echo=True, logprobs=0, extra_body=body
                )
                lps = r.choices[0].logprobs.token_logprobs
                assert len(lps) == n_head + 1, (len(lps), n_head)  # " Venice" is one token after the head
                return float(lps[-1])

            examples = {"positive": [a for a, _ in PAIRS], "negative": [b for _, b in PAIRS], "layers": [15]}
            card = api.post(
                "/steering/vectors",
                body={"name": "venice", "examples": examples | {"position": "last_function"}},
                cast_to=object,
            )
            out_of = lambda name: {"edits": [{"vector": name, "mode": "project_out"}], "positions": "all"}  # noqa: E731
            plain, base_lp = ask()["answer"], venice_logprob()
            removed, venice_lp = ask(out_of("venice"))["answer"], venice_logprob(out_of("venice"))
            g = torch.Generator().manual_seed(0)
            nulls, null_lps = [], []
            for i in range(args.nulls):
                d = torch.randn(576, generator=g)
                body = {"name": f"null{i}", "directions": {"15": d.tolist()}}
                api.post("/steering/vectors", body=body, cast_to=object)
                nulls.append(ask(out_of(f"null{i}"))["answer"])
                null_lps.append(venice_logprob(out_of(f"null{i}")))
            drop, null_drops = base_lp - venice_lp, [base_lp - x for x in null_lps]
            out["projection"] = {
                "vector": card,
                "unsteered": plain,
                "venice_projected_out": removed,
                "random_projected_out": nulls,
                "logprob_venice": {
                    "unsteered": base_lp,
                    "venice_projected_out": venice_lp,
                    "random_projected_out": null_lps,
                    "drop": drop,
                    "null_drops": null_drops,
                    "null_drops_at_least_as_large": sum(x >= drop for x in null_drops),
                    "empirical_p": (1 + sum(x >= drop for x in null_drops)) / (1 + len(null_drops)),
                },
                "venice_in": {
                    "unsteered": "Venice" in plain,
                    "venice_projected_out": "Venice" in removed,
                    "random_projected_out": sum("Venice" in a for a in nulls),
                    "nulls": len(nulls),
                },
            }

            busy = args.condition_feature
            if busy is None:  # the layer-15 feature active at the most positions of the unsteered answer
                probe = ask(readout={"features": [{"layer": 15, "feature": f} for f in range(0, 4608, 144)]})
                series = probe["readout"]["series"]
                busy = max(series, key=lambda s: sum(v > 0 for v in s["values"]))["feature"]
            watch = {"features": [{"layer": 15, "feature": busy}], "pool": ["max"], "edits": "before"}
            french = {"layer": 15, "feature": 1516, "strength": 100.0}
            runs = {
                "none": None,
                "french x100 everywhere": {"edits": [french], "positions": "all"},
                f"french x100 where feature {busy} > 0": {
                    "edits": [french | {"when": {"feature": busy, "above": 0.0}}],
                    "positions": "all",
                },
                f"french x100 where feature {busy} < 0 (never)": {
                    "edits": [french | {"when": {"feature": busy, "below": 0.0}}],
                    "positions": "all",
                },
            }
            cond = {}
            for label, steering in runs.items():
                r = ask(steering, watch)
                (gate,) = r["readout"]["series"]
                cond[label] = {
                    "answer": r["answer"],
                    "condition_held_at": sum(v > 0 for v in gate["values"]),
                    "positions": len(gate["values"]),
                }
            out["conditional"] = {"condition_feature": busy, "runs": cond}
        finally:
            srv.stop()
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
