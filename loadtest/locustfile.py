"""Locust users for a functok server: unsteered, steered and streamed chat, reactivation scoring, recorded replays.

Run through `python -m loadtest.run` (which starts a server and writes a summary), or directly:

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:8000

Options (each also an environment variable): --model (FUNCTOK_MODEL; default: the server's first model),
--api-key (FUNCTOK_API_KEY, sent as a bearer token), --max-tokens (FUNCTOK_LT_MAX_TOKENS, 16), --think-time
(FUNCTOK_LT_THINK_TIME, the most seconds a user waits between requests, 0.5), --seed (FUNCTOK_LT_SEED), and one weight
per user class:
--unsteered-weight, --steered-weight, --stream-weight, --reactivation-weight, --recorded-weight (FUNCTOK_LT_*_WEIGHT;
a weight of 0 leaves the class out). ReactivationUser runs only when the server's /openapi.json lists
POST /v1/analysis/reactivation. RecordedUser (weight 0 unless asked for) sends a fixed set of deterministic requests and
appends each (request, output) pair to --record-file as a JSON line; `loadtest.soak` replays them alone afterwards.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from itertools import count

import requests
from locust import HttpUser, events, stats, task

log = logging.getLogger("functok.loadtest")

REACTIVATION_PATH = "/v1/analysis/reactivation"
POSITIONS = ("function", "last_function", "content", "prompt", "generated", "all")

PROMPTS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom,",
    "Call me Ishmael. Some years ago, never mind how long precisely,",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "Whether I shall turn out to be the hero of my own life, or whether that station will be held by anybody else,",
    "The sun shone, having no alternative, on the nothing new.",
    "In my younger and more vulnerable years my father gave me some advice",
    "Mr. and Mrs. Dursley of number four were proud to say that they were perfectly normal,",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "The old man was thin and gaunt with deep wrinkles in the back of his neck.",
    "There was no possibility of taking a walk that day. We had been wandering, indeed,",
    "Once upon a time, in a kingdom by the sea, there lived a girl who could not sleep.",
)

# Filled in by the `init` listener from the options and the server (GET /v1/models, /v1/steering, /openapi.json).
STATE: dict = {"model": None, "layers": {}, "clamp_layers": [], "max_tokens": 16, "think": 0.5, "seed": 0}
_user_ids = count()
WEIGHTS = {"unsteered": 2, "steered": 2, "stream": 1, "reactivation": 1, "recorded": 0}  # per user class (kind)


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--model", env_var="FUNCTOK_MODEL", default="", help="model id (default: the server's first)")
    parser.add_argument("--api-key", env_var="FUNCTOK_API_KEY", default="", help="bearer token for /v1/*")
    parser.add_argument("--max-tokens", env_var="FUNCTOK_LT_MAX_TOKENS", type=int, default=16)
    parser.add_argument("--think-time", env_var="FUNCTOK_LT_THINK_TIME", type=float, default=0.5)
    parser.add_argument("--seed", env_var="FUNCTOK_LT_SEED", type=int, default=0)
    parser.add_argument("--record-file", env_var="FUNCTOK_LT_RECORD_FILE", default="", help="RecordedUser's JSONL")
    for name, default in WEIGHTS.items():
        parser.add_argument(f"--{name}-weight", env_var=f"FUNCTOK_LT_{name.upper()}_WEIGHT", type=int, default=default)


def steering_layers(info: dict) -> tuple[dict[int, int], list[int]]:
    """GET /v1/steering's body -> ({layer: d_sae}, [layers whose SAE allows clamp edits])."""
    layers = {int(x["layer"]): int(x["d_sae"]) for x in info.get("layers", [])}
    return layers, sorted(int(x["layer"]) for x in info.get("layers", []) if x.get("clamp", True))


def random_spec(rng: random.Random, layers: dict[int, int], clamp_layers: list[int]) -> dict:
    """A steering object of 1-3 edits: random layers and features in [0, d_sae), add (mostly) or clamp, any policy."""
    edits = []
    for _ in range(rng.randint(1, 3)):
        if clamp_layers and rng.random() < 0.4:
            layer = rng.choice(clamp_layers)
            edit = {"mode": "clamp", "value": round(rng.uniform(0.0, 10.0), 2)}
        else:
            layer = rng.choice(sorted(layers))
            edit = {"mode": "add", "strength": round(rng.choice((-1, 1)) * rng.uniform(2.0, 16.0), 2)}
        edits.append({"layer": layer, "feature": rng.randrange(layers[layer])} | edit)
    return {"edits": edits, "positions": rng.choice(POSITIONS)}


def recorded_cases(layers: dict[int, int], clamp_layers: list[int], seed: int, n: int = 16) -> list[dict]:
    """RecordedUser's fixed requests (the same for the same server and seed): every other one steered."""
    rng = random.Random(f"recorded-{seed}")
    cases = []
    for i in range(n):
        case = {"prompt": PROMPTS[i % len(PROMPTS)]}
        if i % 2 and layers:
            case["steering"] = random_spec(rng, layers, clamp_layers)
        cases.append(case)
    return cases


def chat_body(prompt: str, steering: dict | None = None, **extra) -> dict:
    body = {
        "model": STATE["model"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": STATE["max_tokens"],
        "temperature": 0,
    }
    return body | ({"steering": steering} if steering else {}) | extra


def _get(host: str, path: str, headers: dict) -> requests.Response:
    r = requests.get(host.rstrip("/") + path, headers=headers, timeout=30)
    r.raise_for_status()
    return r


def reactivation_body(openapi: dict) -> dict | None:
    """A batch-scoring body fitted to the endpoint's request schema in /openapi.json; None when it cannot be fitted."""
    op = openapi.get("paths", {}).get(REACTIVATION_PATH, {}).get("post")
    if op is None:
        return None
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        schema = openapi.get("components", {}).get("schemas", {}).get(schema["$ref"].rsplit("/", 1)[-1], {})
    props = schema.get("properties", {})
    batch = list(PROMPTS[:4])
    body = {"model": STATE["model"]} if "model" in props else {}
    for key in ("prompts", "texts", "inputs", "prompt", "input"):
        if key in props:
            return body | {key: batch if key.endswith("s") else batch[0]}
    return None


@events.init.add_listener
def _configure(environment, **_kw):
    """Read the options and the server's description; set the user classes' weights; leave out weight-0 classes."""
    opts = environment.parsed_options
    if opts is None or not environment.host:
        return
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    STATE.update(max_tokens=opts.max_tokens, think=opts.think_time, seed=opts.seed, headers=headers)
    STATE["record_file"] = opts.record_file
    STATE["model"] = opts.model or _get(environment.host, "/v1/models", headers).json()["data"][0]["id"]
    STATE["layers"], STATE["clamp_layers"] = steering_layers(_get(environment.host, "/v1/steering", headers).json())
    openapi = _get(environment.host, "/openapi.json", headers).json()
    STATE["reactivation"] = reactivation_body(openapi)
    keep, left_out = [], {}
    for cls in environment.user_classes:
        cls.weight = getattr(opts, f"{cls.kind}_weight")
        why = None
        if cls.weight <= 0:
            why = "weight 0"
        elif cls.kind == "steered" and not STATE["layers"]:
            why = "the server has no SAEs"
        elif cls.kind == "reactivation" and STATE["reactivation"] is None:
            why = f"the server's /openapi.json has no usable POST {REACTIVATION_PATH}"
        elif cls.kind == "recorded" and not opts.record_file:
            why = "no --record-file"
        if why:
            log.info("leaving out %s: %s", cls.__name__, why)
            left_out[cls.__name__] = why
        else:
            keep.append(cls)
    environment.user_classes[:] = keep
    if opts.csv_prefix:  # what ran, for the summary and the tests
        classes = {
            "ran": {c.__name__: {"kind": c.kind, "weight": c.weight, "request_name": c.request_name} for c in keep},
            "left_out": left_out,
            "reactivation_endpoint_listed": REACTIVATION_PATH in openapi.get("paths", {}),
            "model": STATE["model"],
            "layers": STATE["layers"],
        }
        with open(f"{opts.csv_prefix}_classes.json", "w") as f:
            json.dump(classes, f, indent=2)
    if not keep:
        raise SystemExit("loadtest: no user class left to run (all weights are 0?)")


@events.quitting.add_listener
def _final_csv(environment, **_kw):
    """Rewrite <csv prefix>_stats.csv once every user has stopped: locust's own writer runs once a second, so without
    this the file can miss the requests of the last second and of the --stop-timeout phase."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        with open(f"{prefix}_stats.csv", "w", newline="") as f:
            stats.StatsCSV(environment, stats.PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))


class FunctokUser(HttpUser):
    """Common set-up: bearer header, think time, one RNG per user (seeded, so a run's request stream is repeatable)."""

    abstract = True
    kind = ""
    request_name = ""  # the name its requests carry in locust's statistics

    def wait_time(self):
        return self.rng.uniform(0, STATE["think"]) if STATE["think"] > 0 else 0

    def on_start(self):
        self.client.headers.update(STATE.get("headers", {}))
        self.rng = random.Random(f"{self.kind}-{STATE['seed']}-{next(_user_ids)}")

    def chat(self, name: str, body: dict) -> dict | None:
        with self.client.post("/v1/chat/completions", json=body, name=name, catch_response=True, timeout=300) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return None
            out = r.json()
            choice = out["choices"][0]
            if choice.get("finish_reason") not in ("length", "stop"):
                r.failure(f"finish_reason {choice.get('finish_reason')!r}")
                return None
            if ("steering" in body) != (out.get("steering") is not None):
                r.failure("the response's steering report does not match the request")
                return None
            return out


class UnsteeredChatUser(FunctokUser):
    kind = "unsteered"
    request_name = "chat unsteered"

    @task
    def chat_unsteered(self):
        self.chat(self.request_name, chat_body(self.rng.choice(PROMPTS)))


class SteeredChatUser(FunctokUser):
    kind = "steered"
    request_name = "chat steered"

    @task
    def chat_steered(self):
        spec = random_spec(self.rng, STATE["layers"], STATE["clamp_layers"])
        self.chat(self.request_name, chat_body(self.rng.choice(PROMPTS), spec))


class StreamingChatUser(FunctokUser):
    """Streams chat (steered half the time); reports the whole stream as "chat stream" and the time to the first
    generated token as request type TTFT."""

    kind = "stream"
    request_name = "chat stream"

    @task
    def chat_stream(self):
        spec = None
        if STATE["layers"] and self.rng.random() < 0.5:
            spec = random_spec(self.rng, STATE["layers"], STATE["clamp_layers"])
        body = chat_body(self.rng.choice(PROMPTS), spec, stream=True, return_token_ids=True)
        t0 = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, name=self.request_name, stream=True, catch_response=True, timeout=300
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            ttft, tokens, done, size = None, 0, False, 0
            try:
                for line in r.iter_lines():
                    size += len(line)
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise ValueError(f"error event: {chunk['error']}")
                    for choice in chunk.get("choices", []):
                        if choice.get("token_ids") or choice.get("delta", {}).get("content"):
                            tokens += len(choice.get("token_ids") or [0])
                            if ttft is None:
                                ttft = (time.perf_counter() - t0) * 1000
            except (requests.RequestException, ValueError) as e:
                r.failure(f"stream broken: {e}")
                return
            r.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            r.request_meta["response_length"] = size
            if not done or ttft is None:
                r.failure(f"stream ended without {'[DONE]' if ttft is not None else 'a token'}")
                return
        events.request.fire(
            request_type="TTFT",
            name=self.request_name,
            response_time=ttft,
            response_length=tokens,
            exception=None,
            context={},
        )


class ReactivationUser(FunctokUser):
    """Batch-scores a few prompts with POST /v1/analysis/reactivation (only when the server lists it)."""

    kind = "reactivation"
    request_name = "reactivation"

    @task
    def reactivation(self):
        with self.client.post(
            REACTIVATION_PATH, json=STATE["reactivation"], name=self.request_name, catch_response=True, timeout=300
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")


class RecordedUser(FunctokUser):
    """Sends the fixed `recorded_cases` (greedy, token ids returned) and appends (case, request, output) to a file."""

    kind = "recorded"
    request_name = "chat recorded"

    def on_start(self):
        super().on_start()
        self.cases = recorded_cases(STATE["layers"], STATE["clamp_layers"], STATE["seed"])

    @task
    def chat_recorded(self):
        i = self.rng.randrange(len(self.cases))
        case = self.cases[i]
        body = chat_body(case["prompt"], case.get("steering"), return_token_ids=True)
        out = self.chat(self.request_name, body)
        if out is None:
            return
        choice = out["choices"][0]
        record = {"case": i, "request": body, "token_ids": choice["token_ids"], "text": choice["message"]["content"]}
        with open(STATE["record_file"], "a") as f:
            f.write(json.dumps(record) + "\n")
