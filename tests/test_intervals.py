"""Intervals for every gated metric: the interval functions against reference values and simulated
coverage, and the producers (minimal attacks, probes and scans) giving each metric its interval."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

import harness
from harness.evaluation import probes as probes_module
from harness.verdicts.metrics import auroc_interval, median_interval, metric_counts, paired_drop_interval, wilson_interval


def uncovered(record: dict[str, Any]) -> set[str]:
    """The metrics of a scorecard record with neither a sample count nor a `metric_intervals` entry."""
    entries: dict[str, Any] = {}
    for rec in [*record.get("attacks", []), *record.get("probes", []), *record.get("defenses", []),
                *[a for d in record.get("defenses", []) for a in d.get("attacks", [])]]:
        entries.update(rec.get("metric_intervals", {}))
    return set(record["metrics"]) - set(metric_counts(record)) - set(entries)


# ---- the interval functions ---------------------------------------------------------------------

def test_median_interval_order_statistics():
    xs = list(range(1, 101))
    random.Random(0).shuffle(xs)
    assert median_interval(xs) == (40, 61)  # n = 100: (x_(40), x_(61)), P(Bin(100, 1/2) <= 39) = 0.0176
    assert median_interval([float(v) for v in range(1, 7)]) == (1.0, 6.0)  # n = 6: the extremes, 1 - 2/64 = 0.969
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == (-math.inf, math.inf)  # under 6: no finite interval
    # a point never broken counts as the largest distance: the upper end can be inf
    assert median_interval([1.0] * 50 + [math.inf] * 50) == (1.0, math.inf)


@pytest.mark.parametrize("n_pos, n_neg, shift", [(30, 30, 0.954), (50, 100, 1.812), (20, 20, 2.326)])
def test_auroc_interval_covers_at_its_nominal_rate(n_pos, n_neg, shift):
    """Normal scores a `shift` apart have AUROC Phi(shift / sqrt 2): 0.75, 0.9, 0.95 here."""
    from harness.defenses.detectors import auroc

    truth = 0.5 * (1 + math.erf(shift / 2))
    g, hits, reps = torch.Generator().manual_seed(n_pos * 7 + n_neg), 0, 1000
    for _ in range(reps):
        neg, pos = torch.randn(n_neg, generator=g), torch.randn(n_pos, generator=g) + shift
        lo, hi = auroc_interval(auroc(neg, pos), n_pos, n_neg)
        hits += lo <= truth <= hi
    assert hits / reps >= 0.93  # measured 0.958, 0.977, 0.972 (1000 draws each)


def test_auroc_interval_does_not_collapse_at_perfect_separation():
    lo, hi = auroc_interval(1.0, 20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.899, abs=1e-3)
    assert auroc_interval(1.0, 200, 200)[0] > auroc_interval(1.0, 20, 20)[0]  # narrower with more trials, never a point
    assert auroc_interval(0.7, 0, 30) == (0.0, 1.0)  # nothing measured on one side


# ---- the producers --------------------------------------------------------------------------------

def test_a_minimal_attack_record_carries_the_order_statistic_interval_of_its_median():
    from harness.config import AttackConfig
    from harness.evaluation.runner import AttackResult

    entry = AttackConfig(name="deepfool", norm="l2")
    sizes = [float(v) for v in range(1, 71)] + [math.inf] * 30  # 30 points it never broke
    random.Random(1).shuffle(sizes)
    n = 104
    distance = torch.tensor(sizes + [math.nan] * 4)  # the last 4 were misclassified: not attacked
    attacked = torch.arange(n) < 100
    broken = attacked & torch.isfinite(distance)
    r = AttackResult(entry, "deepfool-l2", "inf", math.inf, attacked & ~broken, attacked, broken, distance,
                     minimal=True, median_perturbation=float(distance[attacked].median()))
    rec = r.record()
    assert rec["metric_intervals"] == {"median_perturbation:deepfool-l2": {"ci95": [40.0, 61.0], "method": "order-statistic", "n": 100}}
    mostly_unbroken = AttackResult(entry, "deepfool-l2", "inf", math.inf, attacked, attacked, torch.zeros(n, dtype=torch.bool),
                                   torch.where(attacked, torch.inf, torch.nan), minimal=True, median_perturbation=math.inf)
    assert mostly_unbroken.record()["metric_intervals"]["median_perturbation:deepfool-l2"]["ci95"] == [math.inf, math.inf]


def test_a_suite_with_a_minimal_attack_gives_its_median_an_interval_over_the_correct_points():
    card = harness.run({"name": "df", "device": "cpu", "data": {"limit": 40},
                        "attacks": [{"name": "deepfool", "norm": "l2", "epsilons": [0.5]}]}, show_progress=False)
    (rec,) = card.record["attacks"]
    entry = rec["metric_intervals"]["median_perturbation:deepfool-l2"]
    lo, hi = entry["ci95"]
    assert entry["method"] == "order-statistic" and entry["n"] == rec["n_attacked"] == round(card.metrics["clean_accuracy"] * 40)
    assert 0 < lo <= card.metrics["median_perturbation:deepfool-l2"] <= hi
    assert not uncovered(card.record)


def test_every_probe_and_scan_metric_has_a_count_or_an_interval(monkeypatch):
    nc_calls = []

    def fake_neural_cleanse(model, x, y, num_classes, params):  # its 300 Adam steps per class are not what is tested here
        nc_calls.append(num_classes)
        return {"anomaly_index": 1.5, "norms": [10.0] * num_classes, "flagged": False}

    monkeypatch.setattr(probes_module, "_neural_cleanse", fake_neural_cleanse)
    card = harness.run({"name": "flip", "device": "cpu", "data": {"limit": 120}, "attacks": [], "train": {"epochs": 1},
                        "probes": [{"name": "label-flip", "fractions": [0.2], "scans": ["activation-clustering", "neural-cleanse"]},
                                   {"name": "spectral-signatures"}, {"name": "neural-cleanse"}]}, show_progress=False)
    assert nc_calls == [10, 10] and not uncovered(card.record)
    flip, spectral, nc = card.record["probes"]
    iv = flip["metric_intervals"]
    n10, n01 = flip["n_discordant"]
    cost = card.metrics["clean_accuracy_cost:label-flip@0.2"]
    assert cost == pytest.approx((n10 - n01) / flip["n_test"], abs=1e-5)  # the same test points, counted in pairs
    assert iv["clean_accuracy_cost:label-flip@0.2"] == {
        "ci95": [round(v, 6) for v in paired_drop_interval(n10, n01, flip["n_test"])], "method": "tango-score", "n": 120}
    (ac,) = [s for s in flip["scans"] if s["scan"] == "activation-clustering"]
    precision, recall = iv["scan_precision:label-flip/activation-clustering@0.2"], iv["scan_recall:label-flip/activation-clustering@0.2"]
    assert precision["n"] == ac["n_flagged"] and recall["n"] == ac["n_poisoned"] == flip["n_poisoned"]
    assert precision["ci95"] == [round(v, 6) for v in wilson_interval(ac["true_positives"], ac["n_flagged"])]
    assert recall["ci95"] == [round(v, 6) for v in wilson_interval(ac["true_positives"], ac["n_poisoned"])]
    point = iv["anomaly_index:label-flip/neural-cleanse@0.2"]
    assert point["ci95"] is None and point["method"] == "point" and "median absolute deviation" in point["why"]
    assert nc["metric_intervals"]["anomaly_index:neural-cleanse"]["method"] == "point"
    flagged = spectral["metric_intervals"]["flagged_fraction:spectral-signatures"]
    assert flagged == {"ci95": [round(v, 6) for v in wilson_interval(spectral["n_flagged"], spectral["n"])], "method": "wilson",
                       "n": spectral["n"]}


def test_a_scan_that_flags_nothing_has_an_unmeasured_precision():
    assert probes_module._wilson(0, 0) == {"ci95": [0.0, 1.0], "method": "wilson", "n": 0}
    assert probes_module._paired_cost(None, 100)["method"] == "point"
