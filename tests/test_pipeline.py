"""A run is a pipeline: ordered stages, each a plain function over one RunContext that fills its own
fields; partial saves belong to the context, and a run stopped after the suite resumes from them.
`harness harden` has the same shape."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from harness.evaluation import runner
from harness.pipeline.context import RunContext, RunRequest
from harness.pipeline.resolve import resolve_config
from harness.pipeline.stages import STAGES, run_stages

ORDER = ["resolve", "load", "provenance", "suite", "defended", "probed", "certified", "judge", "write", "track"]
UNITS = 8  # the default suite: fgsm and pgd at four epsilons each
# what each stage fills, in order
FILLS = {
    "resolve": {"cfg", "base", "label", "baseline", "started", "t0"},
    "load": {"devices", "engine", "data", "model", "model_info"},
    "provenance": {"provenance", "saved"},
    "suite": {"evaluation"},
    "defended": {"defended"},
    "probed": {"probed"},
    "certified": {"certified"},
    "judge": {"card"},
    "write": set(),
    "track": set(),  # nothing to track here: no `tracking:` and no mlflow= (tests/test_tracking.py)
}


def small_default(limit: int = 40) -> dict:
    """The embedded default suite on its first `limit` test digits, on the CPU."""
    cfg = resolve_config(None)[0].model_dump(mode="json")
    return {**cfg, "device": "cpu", "data": {**cfg["data"], "limit": limit}}


class Counted:
    """Counts the suite's attack runs (one per unit here)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = runner._Suite.attack_points

        def counted(suite, *args, **kwargs):
            self.calls += 1
            return real(suite, *args, **kwargs)

        monkeypatch.setattr(runner._Suite, "attack_points", counted)


def test_the_stages_run_in_order_and_each_is_a_plain_function_of_the_context():
    assert [s.__name__ for s in STAGES] == ORDER
    for stage in STAGES:
        assert inspect.isfunction(stage) and stage.__module__ == f"harness.pipeline.{stage.__name__}"
        assert list(inspect.signature(stage).parameters) == ["ctx"]


def test_each_stage_fills_its_own_fields_and_the_last_writes_the_run(tmp_path, monkeypatch):
    counted = Counted(monkeypatch)
    out = tmp_path / "run"
    ctx = RunContext(RunRequest(small_default(), out=out, show_progress=False))
    with pytest.raises(AttributeError, match="evaluation"):
        ctx.evaluation  # noqa: B018  (a field no stage has filled yet is missing, not None)
    assert ctx.filled() == ["request"]
    for stage in STAGES:
        before = set(ctx.filled())
        assert stage(ctx) is ctx
        assert set(ctx.filled()) - before == FILLS[stage.__name__], stage.__name__
        if stage.__name__ == "load":
            assert len(ctx.data) == 40 and ctx.data.shape == (1, 8, 8) and [str(d) for d in ctx.devices] == ["cpu"]
        elif stage.__name__ == "provenance":
            assert ctx.provenance["samples"] == 40 and ctx.saved.out == out and ctx.saved.n == 40
            assert not out.exists()  # nothing is written before the suite finishes a unit
        elif stage.__name__ == "suite":
            assert len(ctx.evaluation.results) == UNITS and counted.calls == UNITS
            saved = json.loads((out / "run-state.json").read_text())  # saved after each unit, by the context
            assert len(saved["results"]) == UNITS and saved["fingerprint"] == ctx.saved.fingerprint
            assert len(json.loads((out / "scorecard.partial.json").read_text())["attacks"]) == UNITS
        elif stage.__name__ in ("defended", "probed"):
            assert getattr(ctx, stage.__name__) is None  # the default suite has neither
        elif stage.__name__ == "judge":
            assert ctx.card.metrics == ctx.evaluation.metrics() and ctx.card.outcomes.n == 40
            assert not (out / "scorecard.json").exists()
    assert (out / "scorecard.json").is_file() and (out / "outcomes.json").is_file()
    assert not (out / "run-state.json").exists() and not (out / "scorecard.partial.json").exists()
    assert json.loads((out / "scorecard.json").read_text())["metrics"] == ctx.card.metrics


def test_a_run_stopped_after_the_suite_resumes_from_the_context_saved_state(tmp_path, monkeypatch):
    import harness

    counted = Counted(monkeypatch)
    out = tmp_path / "run"
    first = RunContext(RunRequest(small_default(), out=out, show_progress=False))
    run_stages(first, STAGES[:ORDER.index("suite") + 1])  # stopped here: no judge, no scorecard.json
    assert counted.calls == UNITS and not (out / "scorecard.json").exists()

    counted.calls = 0
    again = run_stages(RunContext(RunRequest(small_default(), out=out, show_progress=False, resume=True)))
    assert counted.calls == 0  # every unit came from the saved state
    assert f"{UNITS} finished result(s) reused" in again.provenance["resume"]
    assert all(a.get("resumed") for a in again.card.attacks)
    assert again.card.metrics == first.evaluation.metrics()
    assert (out / "scorecard.json").is_file() and not (out / "run-state.json").exists()
    # and the same as a run never stopped
    assert harness.run(small_default(), show_progress=False).metrics == again.card.metrics


def test_harden_is_the_same_shape(tmp_path):
    from harness.pipeline.harden import HARDEN_STAGES, HardenContext, HardenRequest

    assert [s.__name__ for s in HARDEN_STAGES] == ["resolve", "load", "train", "write"]
    cfg = {"name": "p", "train": {"data": {"limit": 60, "holdout": 12}, "start": "model", "epochs": 1}}
    checked: list[int] = []

    def check(model, epoch: int) -> tuple[float, float]:  # cheap: the test is of the stages, not of PGD
        checked.append(epoch)
        return 1.0, 0.5

    weights = tmp_path / "w.safetensors"
    ctx = HardenContext(HardenRequest(cfg, "pgd-at", weights, device="cpu", show_progress=False, check=check,
                                      knobs={"epsilon": 0.1, "steps": 1}))
    for stage in HARDEN_STAGES:
        assert inspect.isfunction(stage) and stage(ctx) is ctx
        if stage.__name__ == "load":
            held, kept = set(ctx.held.tolist()), set(ctx.kept.tolist())
            assert len(held) == 12 and not held & kept and held | kept == set(range(60))
        if stage.__name__ == "train":
            assert ctx.state.epoch == 1 and checked == [0, 1] and Path(f"{weights}.ckpt").is_file()
    assert ctx.weights == weights and weights.is_file() and not Path(f"{weights}.ckpt").exists()
    assert json.loads(Path(f"{weights}.log.json").read_text())["data"] == {
        "source": "builtin:digits", "split": "train", "samples": 48, "holdout": 12, "sha256": ctx.data.sha256()}
