"""Gates, verdicts and confidence intervals: pure functions with known answers."""

import pytest

from harness.config import GateConfig
from harness.gates import judge_gates, overall_verdict
from harness.metrics import wilson_interval

M = {"clean_accuracy": 0.96, "robust_accuracy:pgd-linf@0.1": 0.40}
N = {"clean_accuracy": 450, "robust_accuracy:pgd-linf@0.1": 450}


def test_wilson_reference_values():
    # textbook values (Wilson 1927; e.g. Newcombe 1998, table I)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_min_max_pass_and_fail_with_reasons():
    gates = [GateConfig(metric="clean_accuracy", min=0.95), GateConfig(metric="robust_accuracy:pgd-linf@0.1", min=0.5),
             GateConfig(metric="robust_accuracy:pgd-linf@0.1", max=0.45)]
    g = judge_gates(gates, M, N)
    assert [x["verdict"] for x in g] == ["pass", "fail", "pass"]
    assert [x["op"] for x in g] == [">=", ">=", "<="]
    assert "below the minimum 0.5 by 0.1000" in g[1]["reason"]
    lo, hi = g[0]["ci95"]
    assert lo < 0.96 < hi and hi - lo < 0.05


def test_threshold_equal_to_value_passes():
    g = judge_gates([GateConfig(metric="clean_accuracy", min=0.96)], M, N)
    assert g[0]["passed"]


def test_max_drop_against_a_baseline():
    gate = [GateConfig(metric="robust_accuracy:pgd-linf@0.1", max_drop=0.02)]
    ok = judge_gates(gate, M, N, baseline={"robust_accuracy:pgd-linf@0.1": 0.41})
    bad = judge_gates(gate, M, N, baseline={"robust_accuracy:pgd-linf@0.1": 0.45})
    assert ok[0]["verdict"] == "pass" and ok[0]["baseline"] == 0.41 and ok[0]["delta"] == pytest.approx(-0.01)
    assert bad[0]["verdict"] == "fail" and "dropped 0.0500" in bad[0]["reason"]
    none = judge_gates(gate, M, N)
    assert none[0]["verdict"] == "inconclusive" and "--baseline" in none[0]["reason"]
    missing = judge_gates(gate, M, N, baseline={})
    assert missing[0]["verdict"] == "inconclusive" and "no such metric" in missing[0]["reason"]


def test_overall_verdict():
    passed = [{"verdict": "pass"}]
    assert overall_verdict(passed, [{"status": "pass"}, {"status": "warn"}]) == (True, "pass")
    assert overall_verdict(passed, [{"status": "fail"}]) == (False, "fail")
    assert overall_verdict([{"verdict": "pass"}, {"verdict": "fail"}], []) == (False, "fail")
    assert overall_verdict([{"verdict": "inconclusive"}], []) == (False, "inconclusive")
    assert overall_verdict([], []) == (True, "pass")
