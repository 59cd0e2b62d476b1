"""No result changes: the golden suites give exactly the metrics, gates, checks and per-sample outcomes
saved in tests/golden/ (regenerate with `.venv/bin/python -m tests.golden.regenerate`, only on purpose)."""

from __future__ import annotations

import json
import math

import pytest

import harness

from .golden.suites import SUITES, golden_path, snapshot


def _same(a, b, path: str = "") -> list[str]:
    """Differences between two JSON values; floats equal up to 1e-9 relative (the same arithmetic)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in the golden file" for k in a.keys() - b.keys()]
        out += [f"{path}.{k}: new" for k in b.keys() - a.keys()]
        return out + [d for k in a.keys() & b.keys() for d in _same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items in the golden file, {len(b)} now"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{path}: {a!r} in the golden file, {b!r} now"]
    return [] if a == b else [f"{path}: {a!r} in the golden file, {b!r} now"]


@pytest.mark.parametrize("name", list(SUITES))
def test_results_match_the_golden_files(name):
    golden = json.loads(golden_path(name).read_text())
    now = json.loads(json.dumps(snapshot(harness.run(SUITES[name], device="cpu", show_progress=False)), sort_keys=True))
    diffs = _same(golden, now)
    assert not diffs, f"{len(diffs)} difference(s) from tests/golden/{name}.json:\n" + "\n".join(diffs[:30])
    assert golden["outcomes"]["flags"]["clean_accuracy"].count("1") > 0  # the files hold real results
