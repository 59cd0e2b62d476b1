"""The pytest plugin (harness/pytest_plugin.py), driven through pytester: `pytest --harness CONFIG`
collects a config's gates as items whose outcomes, messages and JUnit properties are the scorecard's,
and the `harness_run` fixture returns a Scorecard."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def _config(path: Path, gates: list, **extra) -> Path:
    """The builtin digits model on 60 test digits, FGSM at 0.05: quick, and its numbers known below."""
    cfg = {"name": "plugin-suite", "seed": 0, "device": "cpu", "model": {"source": "builtin:digits-cnn"},
           "data": {"source": "builtin:digits", "split": "test", "limit": 60},
           "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.05]}], "gates": gates, **extra}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _properties(xml: Path) -> dict[str, dict[str, str]]:
    cases = ET.parse(xml).getroot().iter("testcase")
    return {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases}


@pytest.fixture(scope="module", autouse=True)
def _imports_done(tmp_path_factory) -> None:
    """pytester's in-process runs drop the modules a run imported for the first time, and a C extension
    cannot load twice in one process: one run here first brings in all that the runs below import."""
    import harness

    here = tmp_path_factory.mktemp("warm")
    harness.run(str(_config(here / "warm.yaml", [{"metric": "clean_accuracy", "min": 0.5}],
                            attacks=[{"name": "fgsm", "norm": "linf", "epsilons": [0.05]},
                                     {"name": "square", "norm": "linf", "epsilons": [0.1], "queries": 10}])),
                out=here / "out", show_progress=False)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> Path:
    return _config(pytester.path / "suite.yaml", [
        {"metric": "clean_accuracy", "min": 0.5},
        {"metric": "robust_accuracy:worst-linf@0.05", "min": 0.99},       # fails: FGSM breaks some
        {"metric": "clean_accuracy", "min": 0.97, "on_inconclusive": "fail"},  # inside the interval on 60 digits
    ])


def test_each_gate_is_an_item_with_the_scorecards_verdict_message_and_junit_properties(pytester, suite, tmp_path):
    xml = tmp_path / "junit.xml"
    result = pytester.runpytest("--harness", str(suite), f"--junitxml={xml}", "--harness-out", str(tmp_path / "out"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)  # gates 0 pass, 1 fail, 2 inconclusive -> fail; checks pass
    card = json.loads((tmp_path / "out" / "plugin-suite" / "scorecard.json").read_text())
    robust = card["metrics"]["robust_accuracy:worst-linf@0.05"]
    lo, hi = card["gates"][1]["ci95"]
    assert 0 < robust < 0.99 and card["gates"][2]["verdict"] == "inconclusive"
    out = result.stdout.str()
    assert (f"FAIL robust_accuracy:worst-linf@0.05 >= 0.99: {robust:.4f}; " in out and f"95% CI [{lo:.4f}, {hi:.4f}]" in out
            and "INCONCLUSIVE clean_accuracy >= 0.97: " in out and "the minimum 0.97 lies inside the 95% CI" in out)
    assert "Traceback" not in result.stdout.str() and "runtest" not in result.stdout.str()  # the message, not the plugin's frames
    props = _properties(xml)
    assert set(props) == {"gate 0: clean_accuracy >= 0.5", "gate 1: robust_accuracy:worst-linf@0.05 >= 0.99",
                          "gate 2: clean_accuracy >= 0.97", "checks"}
    failed = props["gate 1: robust_accuracy:worst-linf@0.05 >= 0.99"]
    assert float(failed["value"]) == pytest.approx(robust) and failed["threshold"] == "0.99" and failed["op"] == ">="
    assert (float(failed["ci95_low"]), float(failed["ci95_high"])) == pytest.approx((lo, hi)) and failed["verdict"] == "fail"
    assert float(props["gate 0: clean_accuracy >= 0.5"]["value"]) == pytest.approx(card["metrics"]["clean_accuracy"])
    assert props["checks"]["check:budget"] == "pass"


def test_the_suite_runs_once_for_all_its_gates_and_not_at_collection(pytester, suite, tmp_path, monkeypatch):
    collected = pytester.runpytest("--harness", str(suite), "--collect-only", "-q", "--harness-out", str(tmp_path / "co"))
    collected.stdout.fnmatch_lines(["*suite.yaml::gate 0: clean_accuracy >= 0.5", "*suite.yaml::checks", "4 tests collected*"])
    assert not (tmp_path / "co").exists()  # collecting validated the config and ran nothing

    calls = []
    import harness.api

    real = harness.api.run
    monkeypatch.setattr(harness.api, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    pytester.runpytest("--harness", str(suite), "--harness-out", str(tmp_path / "once")).assert_outcomes(passed=2, failed=2)
    assert len(calls) == 1


def test_alone_it_runs_only_the_gates_and_beside_test_paths_both(pytester, tmp_path):
    cfg = _config(pytester.path / "gate.yaml", [{"metric": "clean_accuracy", "min": 0.5}])
    pytester.makepyfile(test_other="def test_other():\n    assert True\n")
    pytester.runpytest("--harness", str(cfg), "--harness-out", str(tmp_path / "a")).assert_outcomes(passed=2)
    pytester.runpytest("test_other.py", "--harness", str(cfg), "--harness-out", str(tmp_path / "b")).assert_outcomes(passed=3)
    pytester.runpytest().assert_outcomes(passed=1)  # without --harness the plugin collects nothing


def test_a_bad_config_is_one_line_naming_the_file_and_key(pytester):
    bad = pytester.path / "bad.yaml"
    bad.write_text("name: x\nattacks: [{name: pgd, norm: linf, epsilons: [0.1], stepz: 3}]\n", encoding="utf-8")
    result = pytester.runpytest("--harness", str(bad))
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error stops the session, as for a broken test module
    result.stdout.fnmatch_lines(["*harness: error: *bad.yaml*attacks[[]0[]]*stepz*"])
    assert "Traceback" not in result.stdout.str()


def test_a_run_that_cannot_load_its_model_errors_every_item_with_one_line(pytester, tmp_path):
    cfg = _config(pytester.path / "nomodel.yaml", [{"metric": "clean_accuracy", "min": 0.5}],
                  model={"source": "torchscript:missing.pt"})
    result = pytester.runpytest("--harness", str(cfg), "--harness-out", str(tmp_path / "o"))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*harness: error: *missing.pt*"])


def test_a_failed_check_fails_the_checks_item_whatever_the_gates_say(pytester, tmp_path):
    cfg = _config(pytester.path / "masked.yaml", [{"metric": "clean_accuracy", "min": 0.1}],
                  model={"source": "python:tests.trick_models:quantized_digits"},
                  attacks=[{"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 10},
                           {"name": "square", "norm": "linf", "epsilons": [0.1], "queries": 200}])
    result = pytester.runpytest("--harness", str(cfg), "--harness-out", str(tmp_path / "o"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*check(s) failed, so no gate of this run can be trusted: *"])


def test_the_harness_run_fixture_returns_a_scorecard(pytester, suite):
    pytester.makepyfile(test_fixture=f"""
        def test_gate(harness_run, tmp_path):
            card = harness_run({str(suite)!r})
            assert not card.passed and card.verdict == "fail"
            assert 0.9 < card.metrics["clean_accuracy"] <= 1.0

        def test_relative_to_the_rootdir(harness_run, tmp_path):
            card = harness_run("suite.yaml", out=tmp_path / "mine")
            assert (tmp_path / "mine" / "scorecard.json").is_file() and card.name == "plugin-suite"
    """)
    pytester.runpytest("test_fixture.py", "-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_the_plugin_loads_nothing_heavy():
    """pytest imports the plugin in every session where the harness is installed."""
    code = "import sys, harness.pytest_plugin; print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout.strip() == "[]"
