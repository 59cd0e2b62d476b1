"""End to end: a model that trips a validity check fails the run (exit 1) with the reason in every
output; a saved run resumes through the CLI; gates judge with intervals and the config's policy."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml

from harness.evaluation import runner

BASE = {"data": {"source": "builtin:digits", "limit": 150, "batch_size": 150},
        "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 10}],
        "gates": [{"metric": "clean_accuracy", "min": 0.5}]}


def write(tmp_path, cfg) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_masked_gradients_fail_the_run_whatever_the_gates_say(tmp_path, cli):
    cfg = {**BASE, "name": "quantized", "model": {"source": "python:tests.trick_models:quantized_digits"}}
    out = tmp_path / "out"
    result = cli("run", write(tmp_path, cfg), "--out", str(out))
    assert result.exit_code == 1, result.output
    card = json.loads((out / "scorecard.json").read_text())
    status = {c["name"]: c["status"] for c in card["checks"]}
    assert status["vanishing-gradients"] == "fail" and status["large-epsilon"] == "fail"
    assert card["gates"][0]["verdict"] == "pass" and card["passed"] is False and card["verdict"] == "fail"
    # the quantized model looks robust (PGD cannot move it), which is exactly what must not pass
    assert card["metrics"]["robust_accuracy:pgd-linf@0.1"] > 0.8
    assert "[check fail] vanishing-gradients" in result.output
    assert "check vanishing-gradients" in (out / "summary.md").read_text()
    failed = [c.get("name") for c in ET.parse(out / "junit.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert "vanishing-gradients" in failed and "large-epsilon" in failed
    assert "vanishing-gradients" in (out / "report.html").read_text()


def test_a_randomized_model_fails_and_a_softmax_head_warns(tmp_path):
    import harness

    card = harness.run({**BASE, "name": "dropout", "model": {"source": "python:tests.trick_models:dropout_digits"}}, show_progress=False)
    assert {c["name"]: c["status"] for c in card.checks}["randomized-model"] == "fail" and not card.passed
    card = harness.run({**BASE, "name": "softmax", "model": {"source": "python:tests.trick_models:softmax_digits"}}, show_progress=False)
    status = {c["name"]: c["status"] for c in card.checks}
    assert status["output-logits"] == "warn" and status["vanishing-gradients"] == "pass" and card.passed


def test_resume_through_the_cli_reuses_what_finished(tmp_path, cli, monkeypatch):
    cfg = write(tmp_path, {**BASE, "name": "resumable"})
    out = tmp_path / "out"
    real, calls = runner._Suite.attack_points, []

    def interrupted(suite, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(suite, *args, **kwargs)

    monkeypatch.setattr(runner._Suite, "attack_points", interrupted)
    result = cli("run", cfg, "--out", str(out))
    assert result.exit_code == 3 and "--resume" in result.stderr
    calls.clear()
    monkeypatch.setattr(runner._Suite, "attack_points", lambda suite, *a, **k: (calls.append(a), real(suite, *a, **k))[1])
    result = cli("run", cfg, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # pgd at 0.1 only; 0.05 was saved
    card = json.loads((out / "scorecard.json").read_text())
    assert [a.get("resumed", False) for a in card["attacks"]] == [True, False]
    assert "1 finished result(s) reused" in result.stderr


@pytest.mark.parametrize("policy, code", [("fail", 1), ("pass", 0)])
def test_a_threshold_inside_the_interval_is_inconclusive_and_the_policy_decides(tmp_path, cli, policy, code):
    # clean accuracy of the builtin model on 150 digits is about 0.98: a 0.98 minimum lies inside its interval
    cfg = {**BASE, "name": "edge", "attacks": [], "on_inconclusive": policy, "gates": [{"metric": "clean_accuracy", "min": 0.98}]}
    out = tmp_path / "out"
    result = cli("run", write(tmp_path, cfg), "--out", str(out))
    assert result.exit_code == code, result.output
    gate = json.loads((out / "scorecard.json").read_text())["gates"][0]
    lo, hi = gate["ci95"]
    assert gate["verdict"] == "inconclusive" and lo < 0.98 < hi and gate["passed"] is (policy == "pass")
