"""No result changes: the golden suites give exactly the metrics, gates, checks and per-sample outcomes
saved in tests/golden/ (regenerate with `.venv/bin/python -m tests.golden.regenerate`, only on purpose).

Exactly on a machine whose numerics are those the files were made with (tests/numerics.py); on any
other, within the statistics: every metric inside its golden 95% interval (or the golden value inside
the new one's: 1 of 96 and 0 of 96 are each only in the other's), the same checks, and at
most 2% of the samples (or 3, whichever is more) flipped per metric. Measured between an AMD EPYC and an
Intel Xeon: at most 3 of 450 samples flipped, every metric inside its interval."""

from __future__ import annotations

import json
import math

import pytest

import harness

from .golden.suites import SUITES, golden_path, snapshot
from .numerics import elsewhere_note, on_reference


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


def _number(v) -> float:
    return float(v)  # "inf" as the files write it, too


def _close(golden: dict, now: dict) -> list[str]:
    """Differences beyond what another machine's float rounding can make (the module docstring)."""
    out = []
    if golden["metrics"].keys() != now["metrics"].keys():
        out.append(f"metric ids differ: {sorted(golden['metrics'].keys() ^ now['metrics'].keys())}")
    for m in golden["metrics"].keys() & now["metrics"].keys():
        a, b, ci, ci_now = _number(golden["metrics"][m]), _number(now["metrics"][m]), golden["intervals"].get(m), now["intervals"].get(m)
        if ci is not None and ci_now is not None:
            (lo, hi), (lo_now, hi_now) = ((_number(v) for v in c) for c in (ci, ci_now))
            if not (lo - 1e-9 <= b <= hi + 1e-9 or lo_now - 1e-9 <= a <= hi_now + 1e-9):  # 1 of 96 and 0 of 96: each in the other's
                out.append(f"metrics.{m}: {b!r} now, outside the golden 95% interval [{lo}, {hi}] of {a!r}, and that outside [{lo_now}, {hi_now}]")
        elif not math.isclose(a, b, rel_tol=0.05, abs_tol=1e-9):
            out.append(f"metrics.{m}: {b!r} now, {a!r} in the golden file (no interval: 5% allowed)")
    if golden["checks"] != now["checks"]:
        out.append(f"checks: {golden['checks']} in the golden file, {now['checks']} now")
    g, n = golden["outcomes"], now["outcomes"]
    if g["ids"] != n["ids"] or g["flags"].keys() != n["flags"].keys():
        out.append("outcomes: other samples or metrics")
    else:
        for m, flags in g["flags"].items():
            flipped = sum(x != y for x, y in zip(flags, n["flags"][m]))
            if flipped > max(3, 0.02 * len(flags)):
                out.append(f"outcomes.{m}: {flipped} of {len(flags)} samples flipped")
    return out


@pytest.mark.parametrize("name", list(SUITES))
def test_results_match_the_golden_files(name):
    golden = json.loads(golden_path(name).read_text())
    now = json.loads(json.dumps(snapshot(harness.run(SUITES[name], device="cpu", show_progress=False)), sort_keys=True))
    if on_reference():
        diffs = _same(golden, now)
    else:
        diffs = _close(golden, now)
        print(elsewhere_note())
    assert not diffs, f"{len(diffs)} difference(s) from tests/golden/{name}.json:\n" + "\n".join(diffs[:30])
    assert golden["outcomes"]["flags"]["clean_accuracy"].count("1") > 0  # the files hold real results


def test_the_comparison_within_the_statistics_catches_a_real_change():
    """What another machine's comparison lets through and what it does not, on the default suite's file."""
    import copy

    golden = json.loads(golden_path("default").read_text())
    assert _close(golden, golden) == []
    two_flips = copy.deepcopy(golden)  # as another processor's rounding does: a couple of samples, the metric inside its interval
    flags = two_flips["outcomes"]["flags"]["robust_accuracy:pgd-linf@0.2"]
    two_flips["outcomes"]["flags"]["robust_accuracy:pgd-linf@0.2"] = "".join(("1" if c == "0" else "0") if i < 2 else c for i, c in enumerate(flags))
    assert _close(golden, two_flips) == []
    for metric, shift in (("clean_accuracy", -0.05), ("robust_accuracy:worst-linf@0.1", -0.1)):
        moved = copy.deepcopy(golden)
        moved["metrics"][metric] += shift
        moved["intervals"][metric] = [v + shift for v in moved["intervals"][metric]]
        assert any(metric in d for d in _close(golden, moved))
    flipped = copy.deepcopy(golden)
    flipped["outcomes"]["flags"]["clean_accuracy"] = "0" * 12 + flipped["outcomes"]["flags"]["clean_accuracy"][12:]
    assert any("clean_accuracy: 1" in d for d in _close(golden, flipped))
    changed = copy.deepcopy(golden)
    changed["checks"][0]["status"] = "fail"
    assert any(d.startswith("checks") for d in _close(golden, changed))
