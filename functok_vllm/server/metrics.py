"""Prometheus metrics on the server's own registry, named `functok:*` (vLLM's `vllm:*` convention)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from functok_vllm.engines.base import Engine
from functok_vllm.server.monitors import Monitors

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineStats:
    """Counters the engine keeps itself (prefills, decode steps, rows decoded), read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        helps = {
            "prefills": "Prompts prefilled.",
            "decode_steps": "Decode forwards (one token for every running request).",
            "decode_rows": "Requests decoded, summed over decode steps; divided by decode_steps: the mean batch size.",
        }
        for name, help_text in helps.items():
            if name in stats:
                m = CounterMetricFamily(f"functok:engine_{name}", help_text)
                m.add_metric([], stats[name])
                yield m


class Metrics:
    def __init__(self, engine: Engine, monitors: tuple[str, ...] = ()):
        r = self.registry = CollectorRegistry()
        self.monitors = Monitors(monitors, engine.steering_info(), r)  # CLIError naming a bad one
        self.requests = Counter(
            "functok:requests",
            "HTTP requests to the generation and analysis endpoints, by endpoint, status code and whether steered.",
            ["endpoint", "status", "steered"],
            registry=r,
        )
        self.finished = Counter(
            "functok:request_finished",
            "Generations by finish reason (abort and timeout included).",
            ["finish_reason", "steered"],
            registry=r,
        )
        self.prompt_tokens = Counter("functok:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("functok:generation_tokens", "Tokens generated.", registry=r)
        self.steered_positions = Counter(
            "functok:steered_positions", "Token positions where steering was applied.", registry=r
        )
        self.ttft = Histogram(
            "functok:time_to_first_token_seconds",
            "Request arrival to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "functok:e2e_request_latency_seconds", "Request arrival to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        running = Gauge("functok:num_requests_running", "Requests in the running batch.", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge("functok:num_requests_waiting", "Requests queued for the running batch.", registry=r)
        waiting.set_function(lambda: engine.num_waiting)
        r.register(_EngineStats(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
