"""Server monitors: named SAE features read on every generated token of every request, exported to Prometheus.

    functok serve --monitor french=2:1493:4.0 --monitor royal=1:37

Each `--monitor NAME=LAYER:FEATURE[:THRESHOLD]` adds the feature to every generation request's readout (the same
series a request's `readout` asks for, read after the request's edits), without showing it in the response. When a
request finishes ("stop" or "length"), each monitor's value at every position that predicted a generated token is
observed in the histogram `functok:monitor_activation{monitor=NAME}`; the tokens above its threshold are counted in
`functok:monitor_threshold_crossings_total{monitor=NAME}`. Their rate is crossings / the histogram's `_count`; the
histogram's `le="0.0"` bucket counts the tokens where the feature did not fire. Aborted and failed requests are not
observed. A bad monitor stops the server at start, naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from functok_vllm.core.readout import Probe
from functok_vllm.errors import CLIError
from functok_vllm.readout_request import ReadoutRequest
from functok_vllm.steering import SteeringInfo

ACTIVATION_BUCKETS = (0.0, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)  # SAE activations: 0 (silent) up to a few tens
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Monitor:
    name: str
    layer: int
    feature: int
    threshold: float | None = None  # None: no crossings are counted


def parse_monitor(text: str) -> Monitor:
    """NAME=LAYER:FEATURE[:THRESHOLD] -> Monitor; CLIError naming the flag and what is wrong."""
    name, eq, rest = text.partition("=")
    parts = rest.split(":")
    if not eq or not NAME.fullmatch(name) or len(parts) not in (2, 3):
        raise CLIError(f"--monitor {text!r}: expected NAME=LAYER:FEATURE[:THRESHOLD] (NAME: letters, digits, _.-)")
    try:
        layer, feature = int(parts[0]), int(parts[1])
        threshold = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise CLIError(f"--monitor {text!r}: LAYER and FEATURE are whole numbers, THRESHOLD a number") from None
    if threshold is not None and not math.isfinite(threshold):
        raise CLIError(f"--monitor {text!r}: the threshold must be finite")
    return Monitor(name, layer, feature, threshold)


class Monitors:
    """The server's monitors, checked against the loaded SAEs, and their Prometheus series."""

    def __init__(self, given: tuple[str, ...], info: SteeringInfo, registry: CollectorRegistry):
        self.monitors = [parse_monitor(t) for t in given]
        names = [m.name for m in self.monitors]
        for m in self.monitors:
            if names.count(m.name) > 1:
                raise CLIError(f"--monitor {m.name}: the name is given twice")
            if m.layer not in info.d_sae:
                have = ", ".join(map(str, sorted(info.d_sae))) or "none"
                raise CLIError(f"--monitor {m.name}: no SAE is loaded at layer {m.layer} (layers with SAEs: {have})")
            if not 0 <= m.feature < info.d_sae[m.layer]:
                raise CLIError(f"--monitor {m.name}: feature {m.feature} is outside [0, {info.d_sae[m.layer]})")
        self.request = None
        if self.monitors:
            probes = tuple(Probe(m.layer, m.feature) for m in self.monitors)
            labels = tuple({"monitor": m.name} for m in self.monitors)
            self.request = ReadoutRequest(probes, labels, prompt=False, pool=())
        self.activation = Histogram(
            "functok:monitor_activation",
            "Each monitor's SAE feature activation at every position that predicted a generated token.",
            ["monitor"],
            buckets=ACTIVATION_BUCKETS,
            registry=registry,
        )
        self.crossings = Counter(
            "functok:monitor_threshold_crossings",
            "Generated tokens whose monitor value is above the monitor's threshold.",
            ["monitor"],
            registry=registry,
        )
        for m in self.monitors:  # every series present from the start (0 until observed)
            self.activation.labels(m.name)
            self.crossings.labels(m.name)

    def cards(self) -> list[dict]:
        return [{"name": m.name, "layer": m.layer, "feature": m.feature, "threshold": m.threshold} for m in self]

    def __iter__(self):
        return iter(self.monitors)

    def observe(self, readout: dict | None, first: int, prompt_len: int, generated: int) -> None:
        """A finished request's engine readout: the monitors are its series from column `first` on; observed at
        positions [prompt_len - 1, prompt_len - 1 + generated)."""
        if not self.monitors or readout is None:
            return
        lo, hi = prompt_len - 1, prompt_len - 1 + generated
        rows = [v for p, v in zip(readout["positions"], readout["values"], strict=True) if lo <= p < hi]
        for j, m in enumerate(self.monitors):
            col = [row[first + j] for row in rows]
            hist = self.activation.labels(m.name)
            for v in col:  # the request's generated tokens, once, off the engine's thread
                hist.observe(v)
            if m.threshold is not None:
                self.crossings.labels(m.name).inc(sum(v > m.threshold for v in col))
