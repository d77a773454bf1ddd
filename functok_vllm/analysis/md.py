"""Markdown pieces shared by the findings' sections: a table, and a Finding as table cells."""

from __future__ import annotations

import math

from functok_vllm.analysis.verdict import Finding


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def num(x: float, nats: bool = False) -> str:
    """A share as a percentage, or a value in nats; n/a where undefined."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.3f}" if nats else f"{100 * x:.1f}%"


def finding_cells(f: Finding, nats: bool = False) -> list[str]:
    """[statistic, null, interval, verdict] of a finding, as the report's tables show them."""
    lo, hi = f.interval
    return [num(f.statistic, nats), num(f.null, nats), f"[{num(lo, nats)}, {num(hi, nats)}]", f"**{f.verdict}**"]


def tok(s: str) -> str:
    """A token or text in a table: its repr in backticks, with the characters markdown would eat replaced."""
    return "`" + repr(s).replace("`", "'").replace("|", "\\|") + "`"
