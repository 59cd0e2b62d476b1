"""MLflow tracking (harness/reports/tracking.py, the `track` stage): the metric-id mapping, params and
tags as pure functions; then, under the `mlflow` marker, real round trips: a sqlite tracking store and
an MLflow server started here on 127.0.0.1, read back with MlflowClient."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import harness
from harness.core.errors import BadInput
from harness.reports.tracking import flat_params, metric_rows, mlflow_name, redact_uri, run_tags

GOLDEN = Path(__file__).parent / "golden"
MLFLOW_NAME = re.compile(r"^[/\w.\- ]*$")  # what MLflow accepts in a metric, param or tag name


def _suite(path: Path, **extra) -> Path:
    cfg = {"name": "tracked", "seed": 0, "device": "cpu", "data": {"source": "builtin:digits", "split": "test", "limit": 60},
           "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.05, "2/255"]}],
           "gates": [{"metric": "clean_accuracy", "min": 0.5}, {"metric": "robust_accuracy:worst-linf@0.05", "min": 0.99}], **extra}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# --- the mapping, params, tags -----------------------------------------------------------------------

@pytest.mark.parametrize("metric_id, name", [
    ("clean_accuracy", "clean_accuracy"),
    ("robust_accuracy:pgd-linf@8/255", "robust_accuracy/pgd-linf at 8/255"),
    ("robust_accuracy:bit-depth/worst-linf@0.1", "robust_accuracy/bit-depth/worst-linf at 0.1"),
    ("tpr_at_fpr:mia@0.01", "tpr_at_fpr/mia at 0.01"),
    ("median_perturbation:deepfool-l2", "median_perturbation/deepfool-l2"),
    ("odd:a+b@1e-3", "odd/a_b at 1e-3"),
])
def test_metric_ids_map_to_the_documented_mlflow_names(metric_id, name):
    assert mlflow_name(metric_id) == name


@pytest.mark.parametrize("suite", ["default", "ci-gate", "composite"])
def test_every_metric_of_the_golden_suites_has_a_valid_distinct_mlflow_name(suite):
    ids = list(json.loads((GOLDEN / f"{suite}.json").read_text())["metrics"])
    names = [mlflow_name(i) for i in ids]
    assert len(ids) > 10 and len(set(names)) == len(ids)
    for n in names:
        assert MLFLOW_NAME.match(n) and "//" not in n and not n.startswith("/") and not n.endswith("/"), n


def test_metric_rows_carry_each_interval_and_skip_what_was_not_measured():
    record = {"metrics": {"clean_accuracy": 0.9, "robust_accuracy:pgd-linf@0.1": float("nan"), "auc:mia": 0.5},
              "intervals": {"clean_accuracy": [0.85, 0.94]}}
    values, names = metric_rows(record)
    assert values == {"clean_accuracy": 0.9, "clean_accuracy ci95_low": 0.85, "clean_accuracy ci95_high": 0.94, "auc/mia": 0.5}
    assert names == {"clean_accuracy": "clean_accuracy", "auc/mia": "auc:mia"}


def test_params_flatten_the_config_and_tags_carry_the_verdict_and_hashes():
    params = flat_params({"name": "x", "attacks": [{"name": "pgd", "epsilons": ["8/255"]}], "data": {"limit": 10}, "long": "y" * 900})
    assert params == {"name": "x", "attacks.0.name": "pgd", "attacks.0.epsilons.0": "8/255", "data.limit": "10",
                      "long": "y" * 497 + "..."}
    tags = run_tags({"verdict": "fail", "passed": False, "name": "n", "gates": [{"metric": "clean_accuracy", "passed": False}],
                     "provenance": {"model_sha256": "ab", "seed": 0, "versions": {"harness": "0.1.0"}}})
    assert tags == {"harness.verdict": "fail", "harness.passed": "false", "harness.name": "n", "harness.seed": "0",
                    "harness.version": "0.1.0", "harness.model_sha256": "ab", "harness.failed_gates": "clean_accuracy"}


def test_a_password_in_a_tracking_uri_is_never_printed():
    assert redact_uri("https://ci:s3cret@mlflow.example:8443/path") == "https://ci:***@mlflow.example:8443/path"
    assert redact_uri("sqlite:///m.db") == "sqlite:///m.db"


def test_tracking_without_mlflow_is_bad_input_before_any_work(tmp_path, monkeypatch, cli):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(BadInput, match=r"tracking.mlflow.*pip install 'robustgate\[mlflow\]'"):
        harness.run(str(_suite(tmp_path / "s.yaml")), out=tmp_path / "out", mlflow="sqlite:///x.db", show_progress=False)
    assert not (tmp_path / "out" / "scorecard.json").exists()
    result = cli("run", str(_suite(tmp_path / "t.yaml", tracking={"mlflow": ""})), "--out", str(tmp_path / "o2"))
    assert result.exit_code == 2 and "robustgate[mlflow]" in result.output


def test_a_config_after_a_bare_mlflow_flag_is_named_not_run_as_the_default(cli, tmp_path):
    result = cli("run", "--mlflow", str(_suite(tmp_path / "s.yaml")), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "looks like a config, not a tracking URI" in result.output and not (tmp_path / "o").exists()


def test_the_tracking_section_is_validated_and_does_not_change_the_resume_fingerprint(tmp_path, cli):
    bad = _suite(tmp_path / "bad.yaml", tracking={"mlflow": "sqlite:///x.db", "experimnt": "e"})
    result = cli("validate", str(bad))
    assert result.exit_code == 2 and "tracking.experimnt" in result.output
    from harness.pipeline.resume import fingerprint

    a = yaml.safe_load(_suite(tmp_path / "a.yaml").read_text())
    assert fingerprint({**a, "tracking": {"mlflow": "sqlite:///x.db"}}, "m", "d", "v") == fingerprint(a, "m", "d", "v")


# --- real stores ---------------------------------------------------------------------------------------

@pytest.fixture
def mlflow_client():
    pytest.importorskip("mlflow", reason="pip install -e '.[dev,mlflow]'")
    from mlflow import MlflowClient

    return MlflowClient


def _read_back(client, experiment: str, card_dir: Path) -> None:
    """The run holds what the scorecard in card_dir says: every metric under its mapped name with its
    interval, the config as params, the verdict and hashes as tags, and the files as artifacts."""
    card = json.loads((card_dir / "scorecard.json").read_text())
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    data = run.data
    values, names = metric_rows(card)
    assert data.metrics == pytest.approx(values) and len(names) == len(card["metrics"])
    assert data.metrics["robust_accuracy/fgsm-linf at 2/255"] == pytest.approx(card["metrics"]["robust_accuracy:fgsm-linf@2/255"])
    assert data.params["attacks.0.name"] == "fgsm" and data.params["attacks.0.epsilons.1"] == "2/255" and data.params["data.limit"] == "60"
    assert data.tags["harness.verdict"] == card["verdict"] == "fail" and data.tags["harness.passed"] == "false"
    assert data.tags["harness.model_sha256"] == card["provenance"]["model_sha256"]
    assert data.tags["harness.failed_gates"] == "robust_accuracy:worst-linf@0.05" and run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"scorecard.json", "report.html", "summary.md", "junit.xml", "mlflow-metric-names.json"}
    local = Path(client.download_artifacts(run.info.run_id, "scorecard.json", str(card_dir.parent / "back")))
    assert local.read_bytes() == (card_dir / "scorecard.json").read_bytes()
    mapping = json.loads(Path(client.download_artifacts(run.info.run_id, "mlflow-metric-names.json", str(card_dir.parent / "back"))).read_text())
    assert mapping == names


@pytest.mark.mlflow
def test_a_run_logged_to_a_sqlite_store_reads_back_whole(tmp_path, cli, mlflow_client, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow keeps a sqlite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli("run", str(_suite(tmp_path / "s.yaml")), "--out", str(tmp_path / "out"), "--mlflow", uri)
    assert result.exit_code == 1, result.output  # one gate fails; tracking does not change the verdict
    assert re.search(r"mlflow: run [0-9a-f]{32} in experiment 'harness' at sqlite:///", result.output)
    _read_back(mlflow_client(tracking_uri=uri), "harness", tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.mlflow
def test_a_run_logged_to_an_mlflow_server_on_localhost_reads_back_whole(tmp_path, mlflow_client):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)
        cfg = _suite(tmp_path / "s.yaml", tracking={"mlflow": uri, "experiment": "robustness"})
        card = harness.run(str(cfg), out=tmp_path / "out", show_progress=False)
        assert card.tracking["experiment"] == "robustness" and len(card.tracking["mlflow_run_id"]) == 32
        _read_back(mlflow_client(tracking_uri=uri), "robustness", tmp_path / "out")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.mlflow
def test_a_tracking_server_that_fails_is_exit_3_keeping_the_results_and_the_password_unsaid(tmp_path, cli, mlflow_client, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://ci:hunter2-secret@127.0.0.1:{_free_port()}"  # nothing listens there
    result = cli("run", str(_suite(tmp_path / "s.yaml")), "--out", str(tmp_path / "out"), "--mlflow", uri)
    assert result.exit_code == 3 and "hunter2" not in result.output
    assert f"the results are in {tmp_path / 'out'}; logging them to MLflow at http://ci:***@127.0.0.1" in result.output
    assert json.loads((tmp_path / "out" / "scorecard.json").read_text())["verdict"] == "fail"
    assert os.environ.get("MLFLOW_TRACKING_URI") is None
