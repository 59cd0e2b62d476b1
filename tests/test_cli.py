"""The command line end to end: the embedded default, outputs as the SPEC says, exit codes, re-gating."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import cli as group

from .numerics import on_reference

SPEC_KEYS = {"schema_version", "name", "passed", "verdict", "metrics", "gates", "attacks", "probes", "defenses", "checks", "certificates", "provenance"}
# issue 4: inconclusive policy, 95% CIs; issue 5: per class, example images; issue 11: how each interval was made
ADDED_KEYS = {"on_inconclusive", "intervals", "classes", "examples", "interval_methods"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "out"
    result = CliRunner().invoke(group, ["run", "--out", str(out)], catch_exceptions=False)
    return result, out


def _score_interval(k: int, n: int, z: float = 1.959964) -> list[float]:
    """The ends of {p : |k/n - p| <= z sqrt(p(1-p)/n)}, found by bisection (no closed form used)."""
    inside = lambda p: abs(k / n - p) <= z * (p * (1 - p) / n) ** 0.5  # noqa: E731

    def edge(lo: float, hi: float) -> float:  # lo outside, hi inside (or the reverse): 60 halvings
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if inside(mid) == inside(hi) else (mid, hi)
        return hi if inside(hi) else lo

    p = k / n
    return [0.0 if k == 0 else edge(0.0, p), 1.0 if k == n else edge(1.0, p)]


def test_default_run_passes_honestly(default_run):
    result, out = default_run
    assert result.exit_code == 0, result.output
    card = json.loads((out / "scorecard.json").read_text())
    assert set(card) == SPEC_KEYS | ADDED_KEYS
    # 95% Wilson intervals on the 450 held-out digits, computed here outside the harness by inverting
    # the score test with bisection (z = 1.959964), for the counts the run reports
    for metric in ("clean_accuracy", "robust_accuracy:worst-linf@0.05", "robust_accuracy:pgd-linf@0.2"):
        k = round(card["metrics"][metric] * 450)
        assert card["intervals"][metric] == pytest.approx(_score_interval(k, 450), abs=2e-6), metric
    if on_reference():  # the counts themselves, on the machine the exact figures were made with (tests/numerics.py)
        counts = [round(card["metrics"][m] * 450) for m in ("clean_accuracy", "robust_accuracy:worst-linf@0.05", "robust_accuracy:pgd-linf@0.2")]
        assert counts == [442, 401, 10]
        assert card["intervals"]["robust_accuracy:pgd-linf@0.2"] == pytest.approx([0.012115, 0.040418], abs=2e-6)
    assert card["gates"][0]["ci95"] == card["intervals"]["clean_accuracy"]
    assert card["schema_version"] == 1 and card["passed"] is True and card["verdict"] == "pass"
    m = card["metrics"]
    assert card["provenance"]["samples"] == 450 and m["clean_accuracy"] == 442 / 450  # the builtin model on its held-out split
    pgd = [m[f"robust_accuracy:pgd-linf@{e}"] for e in ("0.025", "0.05", "0.1", "0.2")]
    assert pgd == sorted(pgd, reverse=True) and pgd[0] > 0.9 and pgd[-1] < 0.1  # measured 0.96 .. 0.02
    assert m["robust_accuracy:worst-linf@0.05"] >= 0.8
    assert {"attack_success_rate:fgsm-linf@0.1", "robust_accuracy:worst-linf@0.2"} <= set(m)
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_default_run_outputs(default_run):
    _, out = default_run
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "outcomes.json", "report.html", "scorecard.json", "summary.md"]
    card = json.loads((out / "scorecard.json").read_text())
    gate = card["gates"][0]
    assert set(gate) >= {"metric", "op", "threshold", "value", "ci95", "passed", "verdict", "baseline"}
    attack = card["attacks"][0]
    assert set(attack) >= {"id", "name", "backend", "norm", "epsilon", "robust_accuracy", "attack_success_rate", "n", "seconds"}
    assert attack["id"] == "fgsm-linf" and attack["epsilon"] == "0.025" and attack["backend"] == "native"
    prov = card["provenance"]
    assert all(len(prov[k]) == 64 for k in ("model_sha256", "dataset_sha256", "config_sha256", "suite_sha256"))
    assert [a["role"] for a in prov["artifacts"]] == ["weights"]  # the cached builtin model the run loaded
    assert set(prov["outputs"]) == {"report.html", "junit.xml", "summary.md", "outcomes.json"}
    assert prov["seed"] == 0 and prov["device"] == "cpu" and prov["versions"]["torch"] and prov["duration_s"] > 0
    suites = ET.parse(out / "junit.xml").getroot()
    gates_suite = suites.find("testsuite")
    assert gates_suite.get("tests") == str(len(card["gates"])) and gates_suite.get("failures") == "0"
    assert len(gates_suite.findall("testcase")) == len(card["gates"])
    md = (out / "summary.md").read_text()
    assert "| gate | value |" in md and "pass" in md
    html = (out / "report.html").read_text()
    assert "<html" in html and "digits-cnn" in html and "http://" not in html and "https://" not in html


def test_same_outputs_on_rerun(default_run, tmp_path):
    _, out = default_run
    result = CliRunner().invoke(group, ["run", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0
    a = json.loads((out / "scorecard.json").read_text())
    b = json.loads((tmp_path / "scorecard.json").read_text())
    assert a["metrics"] == b["metrics"] and a["provenance"]["model_sha256"] == b["provenance"]["model_sha256"]


def _config(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "name": "tiny",
        "data": {"limit": 60},
        "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.1], "steps": 5}],
        "gates": [{"metric": "clean_accuracy", "min": 0.9}],
        **overrides,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_failed_gate_exits_1_and_says_why(cli, tmp_path):
    cfg = _config(tmp_path, gates=[{"metric": "robust_accuracy:pgd-linf@0.1", "min": 0.99}])
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "fail" in result.stdout and "below the minimum 0.99" in result.stdout
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    failure = suite.find("testcase/failure")
    assert suite.get("failures") == "1" and "below the minimum" in failure.get("message")


def test_gate_rejudges_without_rerunning(cli, tmp_path):
    cfg = _config(tmp_path)
    assert cli("run", str(cfg), "--out", str(tmp_path / "a")).exit_code == 0
    card = tmp_path / "a" / "scorecard.json"
    assert cli("gate", str(card)).exit_code == 0
    strict = _config(tmp_path, gates=[{"metric": "clean_accuracy", "min": 0.999}])
    result = cli("gate", str(card), "--config", str(strict))
    assert result.exit_code == 1 and "clean_accuracy >= 0.999" in result.stdout
    assert json.loads(card.read_text())["passed"] is True  # re-judging never rewrites the scorecard


def test_baseline_max_drop(cli, tmp_path):
    cfg = _config(tmp_path, gates=[{"metric": "robust_accuracy:pgd-linf@0.1", "max_drop": 0.0}])
    result = cli("run", str(cfg), "--out", str(tmp_path / "a"))
    # issue 11: a missing baseline is a configuration error, a failure whatever on_inconclusive says
    assert result.exit_code == 1 and "needs a baseline value" in result.stdout, result.stdout
    base = tmp_path / "a" / "scorecard.json"
    assert json.loads(base.read_text())["gates"][0]["verdict"] == "fail"
    # against itself no sample got worse, yet 60 samples cannot show a drop of at most 0.0: the paired
    # interval widens with 1/n instead of vanishing at no discordant pair (issue 11)
    same = cli("gate", str(base), "--baseline", str(base))
    assert same.exit_code == 1 and "inconclusive" in same.stdout and "0 of 60 paired samples got worse" in same.stdout, same.stdout
    loose = _config(tmp_path, gates=[{"metric": "robust_accuracy:pgd-linf@0.1", "max_drop": 0.2}])
    assert cli("gate", str(base), "--config", str(loose), "--baseline", str(base)).exit_code == 0
    better = json.loads(base.read_text())
    better["metrics"]["robust_accuracy:pgd-linf@0.1"] += 0.1
    (tmp_path / "better.json").write_text(json.dumps(better))
    result = cli("gate", str(base), "--baseline", str(tmp_path / "better.json"))
    assert result.exit_code == 1 and "dropped 0.1000" in result.stdout


def _sample_ids(out: Path) -> list[int]:
    """The ids a run measured, read back from its outcomes.json (little-endian int64, base64)."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(json.loads((out / "outcomes.json").read_text())["ids"]), dtype="<i8").tolist()


def test_seed_draws_the_subset_and_reproduces_the_run(cli, tmp_path):
    from harness.sources.data import load_data

    cfg = _config(tmp_path)
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert cli("run", str(cfg), "--out", str(tmp_path / name), "--seed", seed).exit_code == 0
    a, b, c = (json.loads((tmp_path / n / "scorecard.json").read_text()) for n in "abc")
    assert a["provenance"]["seed"] == 3 and a["provenance"]["samples"] == 60 and c["provenance"]["seed"] == 4
    # `limit` draws its 60 of the 450 held-out digits with the seed: the subset load_data gives for that seed
    expected = load_data("builtin:digits", "test", limit=60, seed=3)
    assert _sample_ids(tmp_path / "a") == expected.ids.tolist() and a["provenance"]["dataset_sha256"] == expected.sha256()
    assert _sample_ids(tmp_path / "c") == load_data("builtin:digits", "test", limit=60, seed=4).ids.tolist()
    assert _sample_ids(tmp_path / "c") != _sample_ids(tmp_path / "a")
    assert c["provenance"]["dataset_sha256"] != a["provenance"]["dataset_sha256"]
    # the same seed: the same samples, the same metrics and the same per-sample outcomes, bit for bit
    assert _sample_ids(tmp_path / "b") == _sample_ids(tmp_path / "a") and b["metrics"] == a["metrics"]
    assert (tmp_path / "b" / "outcomes.json").read_bytes() == (tmp_path / "a" / "outcomes.json").read_bytes()


def test_user_text_is_escaped_in_html(cli, tmp_path):
    cfg = _config(tmp_path, name="<script>alert(1)</script>")
    assert cli("run", str(cfg), "--out", str(tmp_path / "o")).exit_code == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "<script>" not in (tmp_path / "o" / "junit.xml").read_text()


def test_default_output_dir_under_reports(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, name="my model/v2")
    assert cli("run", str(cfg)).exit_code == 0
    (run_dir,) = (tmp_path / "reports").iterdir()
    assert run_dir.name.startswith("my-model-v2-") and (run_dir / "scorecard.json").is_file()


def test_validate_and_list(cli, tmp_path):
    result = cli("validate", str(_config(tmp_path)))
    assert result.exit_code == 0 and "1 attack(s), 1 gate(s)" in result.stdout
    listing = cli("list", "attacks")
    assert listing.exit_code == 0 and "pgd" in listing.stdout and "fgsm" in listing.stdout and "backend: foolbox" in listing.stdout
    assert "builtin:digits" in cli("list", "datasets").stdout
    assert cli("list", "bogus").exit_code == 2


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from harness.cli import main\n"
        "sys.argv = ['harness', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Commands:" in out and out.strip().endswith("NO-TORCH")


def test_python_api_scorecard_displays_itself():
    import harness

    card = harness.run({"name": "api", "data": {"limit": 40}, "attacks": [], "gates": [{"metric": "clean_accuracy", "min": 0.5}]})
    html = card._repr_html_()
    assert card.passed and "api" in html and "clean_accuracy" in html and "<html" not in html
    assert json.loads(card.to_json())["metrics"]["clean_accuracy"] == card.metrics["clean_accuracy"]


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(cli, path):
    result = cli("validate", str(path))
    assert result.exit_code == 0, result.stderr


def test_configs_default_is_the_embedded_default():
    from harness.config import DEFAULT_CONFIG_PATH

    shipped = Path(__file__).parent.parent / "configs" / "default.yaml"
    assert shipped.read_text() == DEFAULT_CONFIG_PATH.read_text()


@pytest.mark.parametrize("args", [["run", "--bogus"], ["list", "nope"], ["run", "a.yaml", "b.yaml"]])
def test_console_script_usage_errors_are_one_line(args):
    proc = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("harness: error: ")
