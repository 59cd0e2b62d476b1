"""Gates, verdicts and confidence intervals: pure functions with known answers."""

import numpy as np
import pytest

from harness.config import GateConfig, parse_config
from harness.core.errors import BadInput
from harness.verdicts.gates import gates_from_records, judge_gates, overall_verdict
from harness.core.stats import newcombe_interval, paired_drop_interval, wilson_interval
from harness.verdicts.outcomes import Outcomes, sample_digests

M = {"clean_accuracy": 0.96, "robust_accuracy:pgd-linf@0.1": 0.40}
N = {"clean_accuracy": 450, "robust_accuracy:pgd-linf@0.1": 450}
# 95% Wilson intervals of those: clean 432/450 -> [0.9377, 0.9746]; robust 180/450 -> [0.3558, 0.4459]
ROBUST = "robust_accuracy:pgd-linf@0.1"


def test_wilson_reference_values():
    # textbook values (Wilson 1927; e.g. Newcombe 1998, table I)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_min_max_pass_and_fail_with_reasons():
    # The clean gate used to be min 0.95; 0.95 lies inside the clean interval [0.9377, 0.9746], so it
    # is now inconclusive (tested below) and this test uses 0.93, wholly below the interval.
    gates = [GateConfig(metric="clean_accuracy", min=0.93), GateConfig(metric=ROBUST, min=0.5), GateConfig(metric=ROBUST, max=0.45)]
    g = judge_gates(gates, M, N)
    assert [x["verdict"] for x in g] == ["pass", "fail", "pass"]
    assert [x["passed"] for x in g] == [True, False, True]
    assert [x["op"] for x in g] == [">=", ">=", "<="]
    assert "below the minimum 0.5 by 0.1000" in g[1]["reason"] and "[0.3558, 0.4459] on 450 samples" in g[1]["reason"]
    assert g[0]["ci95"] == pytest.approx([0.937662, 0.974551], abs=1e-6)
    assert g[2]["ci95"] == pytest.approx([0.355767, 0.445926], abs=1e-6)


@pytest.mark.parametrize("bound, threshold, verdict", [
    ("min", 0.30, "pass"), ("min", 0.3557, "pass"), ("min", 0.3559, "inconclusive"), ("min", 0.40, "inconclusive"),
    ("min", 0.4459, "inconclusive"), ("min", 0.4460, "fail"), ("min", 0.60, "fail"),
    ("max", 0.50, "pass"), ("max", 0.4460, "pass"), ("max", 0.4458, "inconclusive"), ("max", 0.36, "inconclusive"),
    ("max", 0.3557, "fail"), ("max", 0.20, "fail"),
])
def test_verdict_table_against_the_interval(bound, threshold, verdict):
    # 0.40 on 450 samples: the interval [0.355767, 0.445926] decides, not the point value
    (g,) = judge_gates([GateConfig(metric=ROBUST, **{bound: threshold})], M, N)
    assert g["verdict"] == verdict and g["passed"] is (verdict == "pass")
    if verdict == "inconclusive":
        assert f"lies inside the 95% CI [0.3558, 0.4459] of 0.4000 on 450 samples" in g["reason"]
        assert "(on_inconclusive: fail)" in g["reason"]


def test_threshold_equal_to_value():
    # Before intervals this passed outright. With 450 samples a value on its threshold cannot be told
    # apart from it, so it is inconclusive, and passes only where the policy says so.
    (g,) = judge_gates([GateConfig(metric="clean_accuracy", min=0.96)], M, N)
    assert g["verdict"] == "inconclusive" and not g["passed"]
    (g,) = judge_gates([GateConfig(metric="clean_accuracy", min=0.96)], M, N, on_inconclusive="pass")
    assert g["verdict"] == "inconclusive" and g["passed"]
    # without a count there is no interval: the point comparison, with the 1e-12 tolerance
    (g,) = judge_gates([GateConfig(metric="clean_accuracy", min=0.96 + 1e-13)], M, {})
    assert g["verdict"] == "pass" and g["ci95"] is None
    # near-degenerate intervals: all of 10**6 samples right is [0.999996, 1], which still reaches below
    # min 1.0 (inconclusive) but meets max 1.0; 0 of 10**6 meets min 0.0; 0.5 of 10**12 is still not 0.5 for sure.
    big = {"a": 10**6}
    assert judge_gates([GateConfig(metric="a", max=1.0)], {"a": 1.0}, big)[0]["verdict"] == "pass"
    assert judge_gates([GateConfig(metric="a", min=1.0)], {"a": 1.0}, big)[0]["verdict"] == "inconclusive"
    assert judge_gates([GateConfig(metric="a", min=0.0)], {"a": 0.0}, big)[0]["verdict"] == "pass"
    assert judge_gates([GateConfig(metric="a", min=0.5)], {"a": 0.5}, {"a": 10**12})[0]["verdict"] == "inconclusive"
    assert judge_gates([GateConfig(metric="a", min=0.499)], {"a": 0.5}, {"a": 10**12})[0]["verdict"] == "pass"


def test_inconclusive_policy_per_gate_and_top_level():
    def gate(policy=None):
        return GateConfig(metric=ROBUST, min=0.42, on_inconclusive=policy)

    table = [(None, "fail", False, "config"), (None, "pass", True, "config"), ("pass", "fail", True, "gate"),
             ("fail", "pass", False, "gate"), ("pass", "pass", True, "gate")]
    for own, top, passed, source in table:
        (g,) = judge_gates([gate(own)], M, N, on_inconclusive=top)
        assert g["verdict"] == "inconclusive" and g["passed"] is passed, (own, top)
        assert g["on_inconclusive"] == (own or top) and g["on_inconclusive_from"] == source
        assert g["reason"].endswith(f"(on_inconclusive: {own or top})")
    # the policy decides inconclusive gates only: a clear fail stays a fail
    (g,) = judge_gates([GateConfig(metric=ROBUST, min=0.6, on_inconclusive="pass")], M, N)
    assert g["verdict"] == "fail" and not g["passed"]
    with pytest.raises(ValueError, match="on_inconclusive must be one of fail, pass"):
        judge_gates([gate()], M, N, on_inconclusive="maybe")


def test_missing_metric_never_passes():
    (g,) = judge_gates([GateConfig(metric="clean_accuracy", min=0.5)], {}, {}, on_inconclusive="pass")
    assert g["verdict"] == "inconclusive" and not g["passed"] and "not produced" in g["reason"]


def test_max_drop_without_baseline_counts_is_a_point_comparison():
    # A baseline given as bare numbers (no sample counts, no outcomes) has no interval: the old point rule.
    gate = [GateConfig(metric=ROBUST, max_drop=0.02)]
    ok = judge_gates(gate, M, N, baseline={ROBUST: 0.41})
    bad = judge_gates(gate, M, N, baseline={ROBUST: 0.45})
    assert ok[0]["verdict"] == "pass" and ok[0]["baseline"] == 0.41 and ok[0]["delta"] == pytest.approx(-0.01)
    assert ok[0]["test"] == "point" and ok[0]["drop"] == pytest.approx(0.01) and ok[0]["drop_ci95"] is None
    assert ok[0]["interval_method"] == "point" and "judged on its point value" in ok[0]["reason"]
    assert bad[0]["verdict"] == "fail" and "dropped 0.0500" in bad[0]["reason"]


def test_max_drop_without_a_baseline_value_fails_whatever_the_policy():
    # a missing baseline is a configuration error, not sampling noise: on_inconclusive cannot pass it
    gate = [GateConfig(metric=ROBUST, max_drop=0.02, on_inconclusive="pass")]
    for baseline, why in [(None, "no --baseline scorecard was given"), ({}, f"the baseline scorecard has no metric {ROBUST}"),
                          ({ROBUST: None}, "is not a number"), ({ROBUST: float("nan")}, "is not a number")]:
        (g,) = judge_gates(gate, M, N, baseline=baseline, on_inconclusive="pass")
        assert g["verdict"] == "fail" and g["passed"] is False and why in g["reason"], baseline
        assert overall_verdict([g], []) == (False, "fail")


def _digests(ids) -> np.ndarray:
    """Digests of stand-in samples: sample i is an image of the value i, labelled i % 10."""
    ids = np.asarray(ids)
    return sample_digests(ids.reshape(-1, 1, 1, 1).astype(np.float32), ids % 10)


def _paired(n10: int, n01: int, n11: int, n00: int, seed: int = 0) -> tuple[Outcomes, Outcomes]:
    """(this run, baseline) over the same shuffled ids with exactly these paired counts."""
    before = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00, dtype=bool)
    now = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00, dtype=bool)
    ids = np.random.default_rng(seed).permutation(len(before)) * 3 + 7  # stable ids need not be 0..n-1
    return Outcomes(ids, {ROBUST: now}, digests=_digests(ids)), Outcomes(ids, {ROBUST: before}, digests=_digests(ids))


def _judge_paired(n10, n01, n11, n00, max_drop=0.02, **kw):
    now, base = _paired(n10, n01, n11, n00)
    n = n10 + n01 + n11 + n00
    metrics = {ROBUST: (n11 + n01) / n}
    baseline = {ROBUST: (n11 + n10) / n}
    (g,) = judge_gates([GateConfig(metric=ROBUST, max_drop=max_drop)], metrics, {ROBUST: n}, baseline,
                       outcomes=now, baseline_outcomes=base, baseline_counts={ROBUST: n}, **kw)
    return g


def test_max_drop_identical_outcomes_at_zero_are_inconclusive():
    # nothing flipped on 400 pairs: the paired interval still spans +-z^2/(n + z^2) ~ 0.0095, so
    # "no drop at all" cannot be shown; any positive allowance above it passes
    g = _judge_paired(0, 0, 220, 180, max_drop=0.0)
    assert g["verdict"] == "inconclusive" and g["test"] == "mcnemar" and g["p_value"] == 1.0 and not g["passed"]
    assert g["pairing"] == "paired" and g["interval_method"] == "tango-score"
    assert g["drop"] == 0.0 and g["drop_ci95"] == pytest.approx([-0.009512, 0.009512], abs=1e-6) and g["n_pairs"] == 400
    assert g["flipped"] == {"worse": [], "better": [], "n_worse": 0, "n_better": 0}
    assert _judge_paired(0, 0, 220, 180, max_drop=0.01)["verdict"] == "pass"


def test_max_drop_zero_on_ten_unchanged_samples_is_not_a_conclusive_pass():
    # the review's case: ten samples, none flipped; the old interval [0, 0] passed max_drop 0 conclusively
    g = _judge_paired(0, 0, 6, 4, max_drop=0.0)
    assert g["verdict"] == "inconclusive" and g["drop_ci95"] == pytest.approx([-0.277533, 0.277533], abs=1e-6)


def test_max_drop_small_drop_with_many_flips_is_inconclusive():
    # drop 4/400 = 0.01 within the allowed 0.02, but 56 samples changed: the paired interval
    # [-0.0260, 0.0447] reaches beyond 0.02, so it cannot be called either way
    g = _judge_paired(30, 26, 200, 144)
    assert g["verdict"] == "inconclusive" and not g["passed"] and g["drop"] == pytest.approx(0.01)
    assert g["drop_ci95"] == pytest.approx(list(paired_drop_interval(30, 26, 400)), abs=1e-6)
    assert g["drop_ci95"][0] < 0.02 < g["drop_ci95"][1]
    assert g["n10"] == 30 and g["n01"] == 26 and g["p_value"] == pytest.approx(0.68888, abs=1e-5)
    assert "the allowed drop 0.02 lies inside" in g["reason"] and "30 of 400 paired samples got worse" in g["reason"]
    assert _judge_paired(30, 26, 200, 144, on_inconclusive="pass")["passed"]


def test_max_drop_few_flips_pass_and_clear_regression_fails():
    ok = _judge_paired(3, 1, 200, 196)
    assert ok["verdict"] == "pass" and ok["drop_ci95"][1] <= 0.02
    bad = _judge_paired(40, 2, 180, 178)
    assert bad["verdict"] == "fail" and bad["drop_ci95"][0] > 0.02 and bad["p_value"] < 1e-8
    assert "dropped 0.0950" in bad["reason"] and "more than the allowed 0.02" in bad["reason"]


def test_max_drop_lists_the_flipped_ids():
    now, base = _paired(25, 3, 100, 72)
    worse, better = now.flipped(base, ROBUST)
    (g,) = judge_gates([GateConfig(metric=ROBUST, max_drop=0.05)], {ROBUST: 0.515}, {ROBUST: 200}, {ROBUST: 0.625},
                       outcomes=now, baseline_outcomes=base, baseline_counts={ROBUST: 200})
    flipped = g["flipped"]
    assert flipped["n_worse"] == 25 and flipped["n_better"] == 3
    assert flipped["worse"] == sorted(worse.tolist())[:20] and len(flipped["worse"]) == 20
    assert flipped["better"] == sorted(better.tolist()) and len(flipped["better"]) == 3
    assert all(i % 3 == 1 for i in flipped["worse"] + flipped["better"])  # the stored ids, not positions


def test_max_drop_pairs_only_the_shared_ids():
    now, base = _paired(10, 0, 50, 40)
    ids = np.concatenate([base.ids, [10_000, 10_001]])
    extra = Outcomes(ids, {ROBUST: np.concatenate([base.flags[ROBUST], [True, True]])}, digests=_digests(ids))
    (g,) = judge_gates([GateConfig(metric=ROBUST, max_drop=0.5)], {ROBUST: 0.5}, {ROBUST: 100}, {ROBUST: 0.6},
                       outcomes=now, baseline_outcomes=extra, baseline_counts={ROBUST: 102})
    assert g["test"] == "mcnemar" and g["n_pairs"] == 100 and g["n10"] == 10


def test_max_drop_unpaired_fallback():
    gate = [GateConfig(metric=ROBUST, max_drop=0.02)]
    base, base_n = {ROBUST: 0.50}, {ROBUST: 400}
    (g,) = judge_gates(gate, M, N, base, baseline_counts=base_n)
    assert g["test"] == "unpaired" and g["drop"] == pytest.approx(0.10)
    assert g["drop_ci95"] == pytest.approx(list(newcombe_interval(200, 400, 180, 450)), abs=1e-6)
    assert g["verdict"] == "fail" and g["drop_ci95"][0] > 0.02 and "unpaired" in g["reason"]
    (close,) = judge_gates(gate, M, N, {ROBUST: 0.41}, baseline_counts=base_n)
    assert close["test"] == "unpaired" and close["verdict"] == "inconclusive"
    # outcomes on one side only, or without this metric, cannot be paired
    now, _ = _paired(1, 1, 200, 248)
    (one,) = judge_gates(gate, M, N, base, outcomes=now, baseline_counts=base_n)
    other = Outcomes(now.ids, {"clean_accuracy": now.flags[ROBUST]})
    (wrong,) = judge_gates(gate, M, N, base, outcomes=now, baseline_outcomes=other, baseline_counts=base_n)
    assert one["test"] == "unpaired" and wrong["test"] == "unpaired"


def test_overall_verdict():
    passed = [{"verdict": "pass"}]
    assert overall_verdict(passed, [{"status": "pass"}, {"status": "warn"}]) == (True, "pass")
    assert overall_verdict(passed, [{"status": "fail"}]) == (False, "fail")
    assert overall_verdict([{"verdict": "pass"}, {"verdict": "fail"}], []) == (False, "fail")
    assert overall_verdict([{"verdict": "inconclusive", "passed": False}], []) == (False, "inconclusive")
    assert overall_verdict([{"verdict": "inconclusive", "passed": True}, {"verdict": "pass", "passed": True}], []) == (True, "inconclusive")
    assert overall_verdict([{"verdict": "inconclusive", "passed": True}, {"verdict": "inconclusive", "passed": False}], []) == (False, "inconclusive")
    assert overall_verdict([{"verdict": "inconclusive", "passed": True}], [{"status": "fail"}]) == (False, "fail")
    assert overall_verdict([], []) == (True, "pass")


def test_gates_round_trip_through_records():
    gates = [GateConfig(metric="clean_accuracy", min=0.9, on_inconclusive="pass"), GateConfig(metric=ROBUST, max=0.45),
             GateConfig(metric=ROBUST, max_drop=0.01, on_inconclusive="fail"), GateConfig(metric=ROBUST, max_drop=0.05, min_overlap=0.9)]
    records = judge_gates(gates, M, N, on_inconclusive="pass")
    assert gates_from_records(records) == gates  # the inherited "pass" is not frozen into the second gate
    old = [{"metric": "clean_accuracy", "op": ">=", "threshold": 0.9}]  # a record from before policies
    assert gates_from_records(old) == [GateConfig(metric="clean_accuracy", min=0.9)]


def test_config_policy_keys():
    cfg = parse_config({"on_inconclusive": "pass", "gates": [{"metric": "clean_accuracy", "min": 0.9, "on_inconclusive": "fail"},
                                                            {"metric": "clean_accuracy", "max": 1.0}]})
    assert cfg.on_inconclusive == "pass" and [g.on_inconclusive for g in cfg.gates] == ["fail", None]
    assert parse_config({}).on_inconclusive == "fail"  # the default for CI: unsure is not a pass
    for raw, where in [({"on_inconclusive": "maybe"}, "suite.yaml: on_inconclusive"),
                       ({"gates": [{"metric": "clean_accuracy", "min": 0.9, "on_inconclusive": "maybe"}]}, "suite.yaml: gates[0].on_inconclusive")]:
        with pytest.raises(BadInput) as e:
            parse_config(raw, "suite.yaml")
        assert e.value.where == where and "'fail' or 'pass'" in e.value.problem and "'maybe'" in e.value.problem


def test_a_gate_on_a_non_adaptive_defense_figure_carries_a_warning():
    metrics = {"detection_rate:mahal/worst-linf@0.1": 0.9, "detection_rate:mahal/adaptive-linf@0.1": 0.1,
               "robust_accuracy:jpeg-naive/pgd-linf@0.1": 0.9, "robust_accuracy:jpeg/pgd-linf@0.1": 0.1}
    gates = [GateConfig(metric=m, min=0.5) for m in metrics]
    naive, adaptive, naive_pre, adaptive_pre = judge_gates(gates, metrics, {m: 1000 for m in metrics})
    assert "detection_rate:mahal/adaptive-linf@0.1" in naive["warning"] and "warning" not in adaptive
    assert "robust_accuracy:jpeg/pgd-linf@0.1" in naive_pre["warning"] and "warning" not in adaptive_pre
    assert naive["verdict"] == "pass" and adaptive["verdict"] == "fail"  # a warning informs, it does not judge
