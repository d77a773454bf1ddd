"""The README's example of a steering vector from contrastive examples, on SmolLM2-135M-Instruct: French against
English sentence pairs, read at the last function token at layer 15, steer the "favourite city" prompt; beside it the
shipped French feature (layer 15, feature 1516) and no steering; with each answer the readout of that feature and of
the vector over the answer (the positions that predicted its tokens: mean and max, the fraction of tokens where the
feature fires; the unsteered answer's readout is the null). Writes the answers as JSON (stdout and --out).

    PYTHONPATH=$PWD .venv/bin/python scripts/french_vector_smollm2.py --strengths 1,1.5,2,3,4,8,12 \
        --out benchmarks/french_vector_smollm2.json
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import openai

from functok_vllm.launch import functok_serve, start

ADMIN = "sk-example-admin"
PAIRS = [
    ("J'aime beaucoup cette ville.", "I really like this city."),
    ("Le chat dort sur le canapé.", "The cat is sleeping on the sofa."),
    ("Nous allons au marché ce matin.", "We are going to the market this morning."),
    ("Il fait très beau aujourd'hui.", "The weather is very nice today."),
    ("Elle lit un livre dans le jardin.", "She is reading a book in the garden."),
    ("Mon frère travaille à la boulangerie.", "My brother works at the bakery."),
]
ASK = [{"role": "user", "content": "Tell me about your favorite city."}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--strengths", default="4,8,12")
    args = p.parse_args()
    home = Path(os.environ.get("FUNCTOK_HOME", Path.home() / ".cache" / "functok"))
    model = home / "models" / "SmolLM2-135M-Instruct"  # `functok prepare-model` derives it
    with tempfile.TemporaryDirectory() as tmp:
        srv = start(
            functok_serve("--model", str(model), "--admin-api-key", ADMIN, "--data-dir", tmp), Path(tmp) / "log"
        )
        try:
            admin = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=ADMIN, max_retries=0, timeout=600)
            examples = {
                "positive": [f for f, _ in PAIRS],
                "negative": [e for _, e in PAIRS],
                "layers": [15],
                "position": "last_function",
            }
            card = admin.post("/steering/vectors", body={"name": "french-pairs", "examples": examples}, cast_to=object)
            out = {"vector": card, "answers": []}

            def ask(steering) -> dict:
                body = {"steering": steering} if steering else {}
                body["readout"] = {"features": [{"layer": 15, "feature": 1516}], "vectors": ["french-pairs"]}
                r = admin.chat.completions.create(
                    model=model.name, messages=ASK, max_tokens=28, temperature=0, extra_body=body
                )
                feature, vector = r.choices[0].readout["series"]
                fires = sum(v > 0 for v in feature["values"]) / len(feature["values"])
                read = {"feature_1516": feature["pooled"] | {"fires": fires}, "french_pairs": vector["pooled"]}
                return {"answer": r.choices[0].message.content, "readout": read}

            runs = [
                ("none", None),
                ("feature 1516 x100", {"edits": [{"layer": 15, "feature": 1516, "strength": 100.0}]}),
            ]
            for s in (float(x) for x in args.strengths.split(",")):
                runs.append((f"french-pairs x{s:g}", {"edits": [{"vector": "french-pairs", "strength": s}]}))
            for label, steering in runs:
                if steering:
                    steering["positions"] = "last_function"
                out["answers"].append({"steering": label, **ask(steering)})
        finally:
            srv.stop()
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
