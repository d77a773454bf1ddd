"""What every benchmark script shares: the prompt set and the JSON writer that stamps date, machine and load."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "It was a bright cold day in the spring, and the old soldier walked slowly along the river towards the town, "
    "thinking of the war, of his son who had gone to the army, and of the letter he had not yet dared to open. "
    "The princess stood at the window and watched the carriages arrive one after another, while her father sat in "
    "his study and wrote to the Emperor about the harvest, the roads and the price of grain in Moscow this year."
)


def prompts(n: int) -> list[str]:
    """n prompts of different lengths cut from TEXT (deterministic, so every run and engine sees the same)."""
    words = TEXT.split()
    return [" ".join(words[(7 * i) % 20 : (7 * i) % 20 + 6 + (5 * i) % 37]) for i in range(n)]


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "loadavg": os.getloadavg(),
    }


def write_result(name: str, payload: dict, stamp: bool = False) -> Path:
    """Write payload + date + machine to results/NAME.json (NAME-YYYYmmdd-HHMMSS.json with `stamp`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json" if stamp else f"{name}.json")
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
