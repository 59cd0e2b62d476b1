"""`http://` model sources against a real server on 127.0.0.1 (tests/endpoint_server.py) serving the
builtin digits CNN: the black-box suite scores it exactly as the local model, white-box attacks are
refused, credentials come from the environment and never show, failures are retried with backoff, and
the query budget and the client-side rate limit hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import harness
from harness.core.errors import BadInput, RunFailed

from .endpoint_server import serve

SQUARE = [{"name": "square", "norm": "linf", "epsilons": [0.1], "queries": 40}]


def _suite(tmp_path: Path, source: str, attacks: list = SQUARE, limit: int = 60, **model) -> Path:
    cfg = {"name": "endpoint", "seed": 0, "device": "cpu", "model": {"source": source, **model},
           "data": {"source": "builtin:digits", "split": "test", "limit": limit}, "attacks": attacks}
    path = tmp_path / f"suite-{len(list(tmp_path.glob('suite-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["list", "base64"])
def test_the_black_box_suite_scores_an_endpoint_exactly_as_the_local_model(digits_model, tmp_path, fmt):
    local = harness.run(str(_suite(tmp_path, "builtin:digits-cnn")), show_progress=False)
    with serve(digits_model) as served:
        remote = harness.run(str(_suite(tmp_path, served.url, kwargs={"format": fmt, "batch": 16})), out=tmp_path / "out",
                             show_progress=False)
    # float32 logits travel as JSON numbers and come back bit for bit: the same queries, the same answers
    assert remote.metrics == local.metrics and remote.metrics["robust_accuracy:square-linf@0.1"] < remote.metrics["clean_accuracy"]
    assert served.images > 60 * 40  # Square's queries went over the wire
    record = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    checks = {c["name"]: c for c in record["checks"]}
    assert checks["vanishing-gradients"]["status"] == "skipped" and "black box" in checks["vanishing-gradients"]["detail"]
    assert record["provenance"]["endpoint"] == served.url


def test_white_box_attacks_are_refused_before_any_query(digits_model, tmp_path, cli):
    with serve(digits_model) as served:
        result = cli("run", str(_suite(tmp_path, served.url, [{"name": "fgsm", "norm": "linf", "epsilons": [0.1]}])))
        assert result.exit_code == 2 and "attacks[0]: fgsm-linf needs gradients" in result.output and "square" in result.output
        assert served.images <= 8  # at most the load-time probe: no attack ran
        smoothing = _suite(tmp_path, served.url, SQUARE)
        cfg = yaml.safe_load(smoothing.read_text())
        smoothing.write_text(yaml.safe_dump({**cfg, "certificates": [{"name": "randomized-smoothing", "radii": [0.25]}]}))
        result = cli("run", str(smoothing))
        assert result.exit_code == 2 and "certificates[0]: randomized smoothing's soundness check attacks" in result.output


def test_credentials_come_from_the_environment_and_never_show(digits_model, tmp_path, cli, monkeypatch):
    auth = {"header": "Authorization", "env": "ENDPOINT_TOKEN", "scheme": "Bearer"}
    with serve(digits_model, token="right-token-123") as served:
        monkeypatch.setenv("ENDPOINT_TOKEN", "right-token-123")
        good = harness.run(str(_suite(tmp_path, served.url, limit=20, kwargs={"auth": auth})), out=tmp_path / "ok", show_progress=False)
        assert good.metrics["clean_accuracy"] > 0.9
        saved = "".join(p.read_text(errors="replace") for p in (tmp_path / "ok").iterdir() if p.is_file())
        assert "right-token-123" not in saved and "report.html" in {p.name for p in (tmp_path / "ok").iterdir()}

        monkeypatch.setenv("ENDPOINT_TOKEN", "wrong-secret-456")
        wrong = cli("run", str(_suite(tmp_path, served.url, limit=20, kwargs={"auth": auth})), "--out", str(tmp_path / "bad"))
        assert wrong.exit_code == 2 and "refused the credentials (HTTP 401)" in wrong.output and "wrong-secret-456" not in wrong.output

        monkeypatch.delenv("ENDPOINT_TOKEN")
        unset = cli("run", str(_suite(tmp_path, served.url, limit=20, kwargs={"auth": auth})))
        assert unset.exit_code == 2 and "environment variable ENDPOINT_TOKEN" in unset.output


def test_failures_are_retried_with_backoff_and_retry_after(digits_model, tmp_path):
    from harness.sources.models import load_model

    with serve(digits_model, fail_first=2, retry_after="0.3") as served:
        model, _ = load_model(served.url, kwargs={"retries": 3, "backoff": 0.05})
        import torch

        x = torch.rand(5, 1, 8, 8)
        assert torch.equal(model(x), digits_model(x).detach())
        gaps = [b - a for a, b in zip(served.arrivals, served.arrivals[1:])]
        # two 503s, each waited out as Retry-After said (0.3 s; arrival stamps jitter by a thread switch on a loaded machine)
        assert len(served.arrivals) == 3 and min(gaps[:2]) >= 0.25 and sum(gaps[:2]) >= 0.55
    with serve(digits_model, fail_first=5) as served:
        model, _ = load_model(served.url, kwargs={"retries": 2, "backoff": 0.01})
        with pytest.raises(RunFailed, match=r"failed 3 time\(s\), the last with HTTP 503"):
            model(torch.rand(2, 1, 8, 8))


def test_the_query_budget_stops_the_run_with_what_finished_kept(digits_model, tmp_path, cli):
    with serve(digits_model) as served:
        result = cli("run", str(_suite(tmp_path, served.url, limit=30, kwargs={"max_queries": 500})), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3 and "query budget (model.kwargs.max_queries: 500 images) would be exceeded" in result.output
    assert served.images <= 500


def test_the_client_side_rate_limit_spaces_requests(digits_model, tmp_path):
    import torch

    from harness.sources.models import load_model

    with serve(digits_model) as served:
        model, _ = load_model(served.url, kwargs={"rate": 20, "batch": 1})
        model(torch.rand(6, 1, 8, 8))
    gaps = [b - a for a, b in zip(served.arrivals, served.arrivals[1:])]
    # 20 requests per second: 50 ms apart; arrival stamps jitter by a thread switch, so the span is the measure
    assert len(gaps) == 5 and served.arrivals[-1] - served.arrivals[0] >= 0.24 and min(gaps) >= 0.025


@pytest.mark.parametrize("kwargs, where, words", [
    ({"format": "xml"}, "model.kwargs.format", "one of list, base64"),
    ({"batch": 0}, "model.kwargs.batch", "a positive number"),
    ({"auth": {"env": "X", "password": "p"}}, "model.kwargs.auth", "the secret stays in the environment variable"),
    ({"verify": False}, "model.kwargs.verify", "an endpoint takes"),
])
def test_bad_endpoint_knobs_name_the_key(kwargs, where, words):
    from harness.sources.models import load_model

    with pytest.raises(BadInput) as e:
        load_model("http://127.0.0.1:9/predict", kwargs=kwargs)
    assert e.value.where == where and words in str(e.value)


def test_a_thief_steals_from_the_endpoint_exactly_as_from_the_local_model(digits_model, tmp_path, cli):
    """Extraction against an endpoint: the victim's answers come over HTTP, bit for bit the local model's,
    so the thief (its own model source: a black box cannot be re-initialised) learns the same copy."""
    probe = {"name": "extraction", "budgets": [150], "queries": "uniform-noise", "thief": "builtin:digits-cnn", "min_steps": 150,
             "defenses": ["labels-only"]}

    def config(source: str) -> Path:
        path = _suite(tmp_path, source, attacks=[], limit=40)
        cfg = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**cfg, "probes": [probe]}))
        return path

    local = harness.run(str(config("builtin:digits-cnn")), show_progress=False)
    with serve(digits_model) as served:
        remote = harness.run(str(config(served.url)), out=tmp_path / "out", show_progress=False)
        no_thief = config(served.url)
        cfg = yaml.safe_load(no_thief.read_text())
        cfg["probes"][0].pop("thief")
        no_thief.write_text(yaml.safe_dump(cfg))
        refused = cli("validate", str(no_thief))
    assert remote.metrics == local.metrics and 0.2 < remote.metrics["fidelity:extraction@150"] <= 1.0
    assert served.images >= 150 + 40  # the thief's queries and the victim's answers on the test points went over the wire
    (rec,) = json.loads((tmp_path / "out" / "scorecard.json").read_text())["probes"]
    assert rec["thief"] == "builtin:digits-cnn" and rec["victim_queries"] == 150
    assert refused.exit_code == 2 and "probes[0].thief" in refused.output and "give a thief" in refused.output
