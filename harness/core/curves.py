"""Robust accuracy against epsilon, read from a scorecard record: what the runner's checks, the
report and the comparison draw and inspect."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["curves"]


def curves(card: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Robust accuracy against epsilon, per norm: one line per attack id and one for the worst case."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    labels: dict[tuple[str, str], float] = {}
    for a in card.get("attacks", []):
        if a.get("norm") is None or a.get("epsilon_value") is None or not math.isfinite(a["epsilon_value"]):
            continue
        out.setdefault(a["norm"], {}).setdefault(a["id"], []).append((a["epsilon_value"], a["robust_accuracy"]))
        labels[(a["norm"], a["epsilon"])] = a["epsilon_value"]
    for key, value in card.get("metrics", {}).items():
        if key.startswith("robust_accuracy:worst-"):
            norm, _, label = key.removeprefix("robust_accuracy:worst-").partition("@")
            if (norm, label) in labels:
                out.setdefault(norm, {}).setdefault("worst", []).append((labels[(norm, label)], value))
    return {norm: {k: sorted(v) for k, v in lines.items()} for norm, lines in out.items()}
