"""The `rate-limit` endpoint probe: the burst logic on a scripted clock, the config checks, and real
bursts at a server on 127.0.0.1 (tests/endpoint_server.py) with a limiter that answers 429, one that
drops the connection, and none: the count, the verdict of a `throttled_after` gate, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import harness
from harness.attacks.privacy import RateLimit, send_burst
from harness.core.errors import BadInput

from .endpoint_server import serve


class Clock:
    """A scripted monotonic clock: each request takes `step` seconds; sleeping moves it on."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.slept = 0.0, step, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _sender(clock: Clock, answers: int, outcome: str = "throttled"):
    calls = []

    def send() -> dict:
        calls.append(clock.now)
        clock.now += clock.step
        if len(calls) <= answers:
            return {"outcome": "answered", "status": 200, "retry_after": None, "detail": None}
        return {"outcome": outcome, "status": 429 if outcome == "throttled" else None, "retry_after": "7", "detail": "HTTP 429"}

    return send, calls


def test_the_burst_stops_at_the_first_throttle_and_counts_what_was_answered():
    clock = Clock(0.01)
    send, calls = _sender(clock, 37)
    res = send_burst(send, RateLimit(), 1000, clock, clock.sleep)
    assert res["answered"] == 37 and res["requests_sent"] == 38 and len(calls) == 38 and res["stopped"] == "throttled"
    assert res["first_throttle"] == {"request": 38, "status": 429, "retry_after": "7", "detail": "HTTP 429", "seconds": 0.38}
    assert res["answered_per_second"] == pytest.approx(37 / 0.38, rel=1e-3)


def test_a_burst_nobody_stops_ends_at_its_size_or_its_time_limit():
    clock = Clock(0.01)
    send, calls = _sender(clock, 10**9)
    res = send_burst(send, RateLimit(), 250, clock, clock.sleep)
    assert (res["answered"], res["stopped"], res["throttled"], res["first_throttle"]) == (250, "burst", False, None) and len(calls) == 250
    clock = Clock(0.5)
    send, calls = _sender(clock, 10**9)
    res = send_burst(send, RateLimit(within=3.0), 1000, clock, clock.sleep)
    assert res["stopped"] == "time" and res["answered"] == 6 and len(calls) == 6  # requests leave at 0, 0.5, ..., 2.5 s


def test_a_paced_burst_sends_request_k_at_k_over_rate():
    clock = Clock(0.001)
    send, calls = _sender(clock, 10**9)
    send_burst(send, RateLimit(rate=4.0), 9, clock, clock.sleep)
    assert calls == pytest.approx([k / 4.0 for k in range(9)], abs=1e-9)


def test_a_refusal_stops_the_burst_as_a_throttle_does():
    clock = Clock(0.01)
    send, _ = _sender(clock, 3, outcome="refused")
    res = send_burst(send, RateLimit(), 100, clock, clock.sleep)
    assert res["stopped"] == "refused" and res["answered"] == 3 and res["throttled"]


def _config(tmp_path: Path, source: str, probe: dict, gates: list, limit: int = 20) -> Path:
    cfg = {"name": "rate", "seed": 0, "device": "cpu", "model": {"source": source},
           "data": {"source": "builtin:digits", "split": "test", "limit": limit}, "attacks": [],
           "probes": [{"name": "rate-limit", **probe}], "gates": gates}
    path = tmp_path / f"rate-{len(list(tmp_path.glob('rate-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


GATE = [{"metric": "throttled_after:rate-limit", "max": 1000}]


@pytest.mark.parametrize("probe, gates, words", [
    ({}, GATE, "rate-limit probes an HTTP endpoint's throttling, but model.source 'builtin:digits-cnn' is not an endpoint"),
    ({"burst": 1000}, GATE, "probes[0].burst: a burst of 1000 requests cannot show"),
    ({"burst": 0}, [], "burst must be 1 to 100000"),
    ({"within": 0}, [], "within must be more than 0"),
])
def test_bad_rate_limit_entries_are_exit_2_at_validation(tmp_path, cli, probe, gates, words):
    source = "builtin:digits-cnn" if not probe else "http://127.0.0.1:9/predict"
    result = cli("validate", str(_config(tmp_path, source, probe, gates)))
    assert result.exit_code == 2 and words in result.output, result.output


def test_the_burst_left_out_is_one_past_the_gate_so_an_unthrottled_endpoint_can_fail_it(tmp_path):
    from harness.config import load_config
    from harness.config.schema import rate_limit_burst

    cfg, _, _ = load_config(_config(tmp_path, "http://127.0.0.1:9/predict", {}, [{"metric": "throttled_after:rate-limit", "max": 40},
                                                                                 {"metric": "throttled_after:rate-limit", "max": 25}]))
    assert rate_limit_burst(cfg, cfg.probes[0]) == 41 and "throttled_after:rate-limit" in cfg.metric_ids()
    cfg, _, _ = load_config(_config(tmp_path, "http://127.0.0.1:9/predict", {}, []))
    assert rate_limit_burst(cfg, cfg.probes[0]) == 1000


def test_an_endpoint_that_throttles_is_measured_and_passes_its_gate(digits_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RATE_TOKEN", "burst-secret-789")
    with serve(digits_model, token="burst-secret-789", limit=(30, 600.0)) as served:
        path = _config(tmp_path, served.url, {}, GATE)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["kwargs"] = {"auth": {"env": "RATE_TOKEN"}}
        path.write_text(yaml.safe_dump(cfg))
        card = harness.run(str(path), out=tmp_path / "out", show_progress=False)
    saved = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert "burst-secret-789" not in saved
    rec = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    (probe,) = rec["probes"]
    # the server answered 30 requests in its window, this run's own predictions among them, then said 429
    before = probe["requests_before"]
    assert served.statuses == [200] * 30 + [429] and before >= 1
    assert card.metrics["throttled_after:rate-limit"] == probe["answered"] == 30 - before and card.passed
    assert probe["first_throttle"]["status"] == 429 and probe["first_throttle"]["request"] == 31 - before
    assert int(probe["first_throttle"]["retry_after"]) >= 590  # the server's own Retry-After, passed on
    (gate,) = rec["gates"]
    assert gate["verdict"] == "pass" and gate["interval_method"] == "point" and "policy" in gate["interval_why"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"throttled at request {31 - before}" in html and "HTTP 429, Retry-After" in html


def test_a_dropped_connection_counts_as_a_refusal(digits_model, tmp_path):
    with serve(digits_model, limit=(12, 600.0), drop=True) as served:
        card = harness.run(str(_config(tmp_path, served.url, {}, GATE, limit=8)), out=tmp_path / "out", show_progress=False)
    (probe,) = json.loads((tmp_path / "out" / "scorecard.json").read_text())["probes"]
    assert served.statuses[-1] == 0 and probe["stopped"] == "refused" and probe["first_throttle"]["status"] is None
    assert card.metrics["throttled_after:rate-limit"] == 12 - probe["requests_before"] and card.passed


def test_an_endpoint_that_never_throttles_fails_the_gate_with_a_lower_bound(digits_model, tmp_path, cli):
    gate = [{"metric": "throttled_after:rate-limit", "max": 40}]
    with serve(digits_model) as served:
        result = cli("run", str(_config(tmp_path, served.url, {}, gate)), "--out", str(tmp_path / "out"))
        paced = cli("run", str(_config(tmp_path, served.url, {"within": 0.6, "rate": 10}, [{"metric": "throttled_after:rate-limit", "max": 100}])),
                    "--out", str(tmp_path / "paced"))
    assert result.exit_code == 1, result.output
    rec = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    (probe,) = rec["probes"]
    assert probe["answered"] == probe["requests_sent"] == 41 and probe["stopped"] == "burst" and not probe["throttled"]
    (g,) = rec["gates"]
    assert g["verdict"] == "fail" and g["ci95"] == [41.0, "inf"] and g["interval_method"] == "lower-bound"
    assert "at least 41 (a lower bound" in g["reason"]
    # the file keeps the infinite end as "inf", and a re-read judges the same: [41, inf] is above 40 whatever the value
    from harness.verdicts.metrics import metric_intervals

    assert metric_intervals(rec)["throttled_after:rate-limit"] == [41.0, math.inf]
    # stopped by its time limit at 10 requests a second: about 6 answered, which cannot tell a limit of 100 either way
    assert paced.exit_code == 1, paced.output
    (pg,) = json.loads((tmp_path / "paced" / "scorecard.json").read_text())["gates"]
    (pp,) = json.loads((tmp_path / "paced" / "scorecard.json").read_text())["probes"]
    assert pp["stopped"] == "time" and 4 <= pp["answered"] <= 7 and pg["verdict"] == "inconclusive" and "only a lower bound" in pg["reason"]


def test_the_burst_counts_against_the_query_budget(digits_model, tmp_path, cli):
    with serve(digits_model) as served:
        path = _config(tmp_path, served.url, {"burst": 500}, [])
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["kwargs"] = {"max_queries": 100}
        path.write_text(yaml.safe_dump(cfg))
        result = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3 and "query budget (model.kwargs.max_queries: 100 images) would be exceeded" in result.output
    assert served.images <= 100


def test_a_caller_model_object_is_no_endpoint(digits_model, tmp_path):
    path = _config(tmp_path, "http://127.0.0.1:9/predict", {}, [])
    with pytest.raises(BadInput, match="the model is not an endpoint"):
        harness.run(str(path), model=digits_model, show_progress=False)


def test_a_saved_unthrottled_burst_resumes_with_its_infinite_end(tmp_path):
    """The run's saved state holds an unthrottled burst's interval [n, inf] (JSON has no inf): a resumed
    run gets the float back, so its gate judges the same lower bound."""
    from harness.pipeline.resume import load_state, save_state

    rec = {"id": "rate-limit", "kind": "rate-limit", "metrics": {"throttled_after:rate-limit": 41},
           "metric_intervals": {"throttled_after:rate-limit": {"ci95": [41.0, math.inf], "method": "lower-bound"}}}
    save_state(tmp_path / "state.json", "print", 20, [], {"probe|0|rate-limit": rec})
    assert '"inf"' in (tmp_path / "state.json").read_text()
    _, probes, _ = load_state(tmp_path / "state.json", "print", 20, [])
    assert probes["probe|0|rate-limit"]["metric_intervals"]["throttled_after:rate-limit"]["ci95"] == [41.0, math.inf]
