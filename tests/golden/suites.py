"""The suites whose results must not change when code moves (issue 12): the embedded default, the CI
gate config, and a composite that walks every evaluation path (minimal and black-box attacks, the
ensemble, corruptions, a preprocessing defense, a detector, a poisoning probe with a scan).

Regenerate the golden files after a change that is MEANT to change results, and say why in the commit:

    .venv/bin/python -m tests.golden.regenerate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

COMPOSITE: dict[str, Any] = {
    "name": "golden-composite",
    "seed": 3,
    "device": "cpu",
    "data": {"source": "builtin:digits", "split": "test", "limit": 96, "batch_size": 32},
    "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.1]},
        {"name": "pgd", "norm": "linf", "epsilons": [0.1, 0.2], "steps": 5},
        {"name": "square", "norm": "linf", "epsilons": [0.1], "queries": 40},
        {"name": "standard", "norm": "l2", "epsilons": [1.0], "steps": 5, "queries": 20},
        {"name": "deepfool", "norm": "l2", "steps": 10},
        {"name": "cw", "norm": "l2", "steps": 10, "binary_search_steps": 2},
        {"name": "corruptions", "kinds": ["gaussian-noise", "brightness"], "severities": [2]},
    ],
    "defenses": [
        {"name": "bit-depth", "bits": 3},
        {"name": "mahalanobis", "fpr": 0.1},
    ],
    "probes": [
        {"name": "label-flip", "fractions": [0.2], "scans": ["spectral-signatures"]},
    ],
    "train": {"data": {"source": "builtin:digits", "split": "train", "limit": 300, "holdout": 30}, "epochs": 1, "batch_size": 64},
    "gates": [
        {"metric": "clean_accuracy", "min": 0.9},
        {"metric": "robust_accuracy:worst-linf@0.1", "min": 0.5},
        {"metric": "median_perturbation:deepfool-l2", "min": 0.1},
        {"metric": "detection_rate:mahalanobis/adaptive-linf@0.1", "max": 0.5},
    ],
}

SUITES: dict[str, Any] = {
    "default": None,  # the embedded default (configs/default.yaml)
    "ci-gate": ROOT / "configs" / "ci-gate.yaml",
    "composite": COMPOSITE,
}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def snapshot(card: Any) -> dict[str, Any]:
    """What must not change: metrics, gates (value, interval, verdict), checks and per-sample outcomes."""
    rec = card.to_dict()
    outcomes = card.outcomes
    return {
        "metrics": rec["metrics"],
        "intervals": rec.get("intervals", {}),
        "gates": [{k: g.get(k) for k in ("metric", "op", "threshold", "value", "ci95", "verdict", "passed")} for g in rec["gates"]],
        "checks": [{"name": c["name"], "status": c["status"]} for c in rec["checks"]],
        "verdict": rec["verdict"],
        "outcomes": None if outcomes is None else {
            "ids": [int(i) for i in outcomes.ids],
            "flags": {m: "".join("1" if b else "0" for b in f) for m, f in sorted(outcomes.flags.items())},
        },
    }
