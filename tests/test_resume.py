"""Nothing finished is lost: per-unit saves, --resume to the same metrics, a changed run set aside,
and out-of-memory batches halved and retried."""

from __future__ import annotations

import json

import pytest
import torch

import harness
from harness.evaluation import runner
from harness.core.errors import RunFailed
from harness.engines.stage import BatchLimit, halving

SUITE = {
    "name": "resume", "device": "cpu", "seed": 3,
    "data": {"source": "builtin:digits", "limit": 120, "batch_size": 64},
    "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 5},
        {"name": "noise", "norm": "linf", "epsilons": [0.1], "draws": 5},
    ],
    "gates": [{"metric": "clean_accuracy", "min": 0.5}],
}
UNITS = 5  # fgsm x 2, pgd x 2, noise x 1


class Interrupt:
    """Counts attack runs (one per unit and stage here) and raises KeyboardInterrupt at the k-th."""

    def __init__(self, monkeypatch, at: int | None) -> None:
        self.calls, self.at = 0, at
        real = runner._Suite.attack_points

        def counted(suite, *args, **kwargs):
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                raise KeyboardInterrupt
            return real(suite, *args, **kwargs)

        monkeypatch.setattr(runner._Suite, "attack_points", counted)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return harness.run(SUITE, out=tmp_path_factory.mktemp("whole"), show_progress=False)


def test_interrupt_keeps_each_finished_unit_then_resume_gives_the_same_metrics(tmp_path, monkeypatch, uninterrupted):
    stop = Interrupt(monkeypatch, at=4)
    with pytest.raises(RunFailed, match="interrupted.*--resume"):
        harness.run(SUITE, out=tmp_path, show_progress=False)
    partial = json.loads((tmp_path / "scorecard.partial.json").read_text())
    assert len(partial["attacks"]) == 3  # saved as each attack x epsilon finished, not per entry
    assert not (tmp_path / "scorecard.json").exists()
    assert json.loads((tmp_path / "run-state.json").read_text())["results"]

    stop.calls, stop.at = 0, None
    card = harness.run(SUITE, out=tmp_path, show_progress=False, resume=True)
    assert stop.calls == UNITS - 3  # only what had not finished ran again
    assert card.metrics == uninterrupted.metrics
    assert [a.get("resumed", False) for a in card.attacks] == [True, True, True, False, False]
    assert "3 finished result(s) reused" in card.provenance["resume"]
    assert (tmp_path / "scorecard.json").exists()
    assert not (tmp_path / "run-state.json").exists() and not (tmp_path / "scorecard.partial.json").exists()


def test_a_changed_config_sets_the_saved_work_aside(tmp_path, monkeypatch):
    stop = Interrupt(monkeypatch, at=2)
    with pytest.raises(RunFailed):
        harness.run(SUITE, out=tmp_path, show_progress=False)
    stop.calls, stop.at = 0, None
    changed = {**SUITE, "seed": 4}
    card = harness.run(changed, out=tmp_path, show_progress=False, resume=True)
    assert stop.calls == UNITS
    assert "fingerprint differs" in card.provenance["resume"]
    assert not any(a.get("resumed") for a in card.attacks)


def test_resume_with_nothing_saved_runs_everything(tmp_path, monkeypatch, uninterrupted):
    stop = Interrupt(monkeypatch, at=None)
    card = harness.run(SUITE, out=tmp_path, show_progress=False, resume=True)
    assert stop.calls == UNITS
    assert card.metrics == uninterrupted.metrics
    assert "nothing to resume" in card.provenance["resume"]


def test_a_corrupt_state_file_is_not_trusted(tmp_path, monkeypatch):
    (tmp_path / "run-state.json").write_text('{"schema_version": 1, "fingerprint": "x", "n": 1, "results": [')
    stop = Interrupt(monkeypatch, at=None)
    card = harness.run(SUITE, out=tmp_path, show_progress=False, resume=True)
    assert stop.calls == UNITS and "cannot be read" in card.provenance["resume"]


def _oom(limit_rows: int):
    """fn(rows, seed) that runs out of memory above `limit_rows` rows, else returns the rows."""
    seen = []

    def fn(rows, seed):
        if rows.numel() > limit_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(rows.numel())
        return rows

    return fn, seen


def test_halving_splits_until_it_fits_and_remembers_the_size():
    fn, seen = _oom(3)
    limit = BatchLimit()
    out = halving(fn, torch.arange(10), 0, limit, "a test")
    assert torch.equal(torch.cat(out), torch.arange(10))  # every row once, in order
    assert max(seen) <= 3 and limit.size <= 3 and limit.retries >= 2
    retries = limit.retries
    halving(fn, torch.arange(10, 20), 0, limit, "a test")  # the next batch starts at the known size
    assert limit.retries == retries


def test_halving_gives_up_at_one_sample_and_passes_other_errors_through():
    fn, _ = _oom(0)
    with pytest.raises(RunFailed, match="out of device memory on a test even with a batch of one"):
        halving(fn, torch.arange(4), 0, BatchLimit(), "a test")

    def broken(rows, seed):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        halving(broken, torch.arange(4), 0, BatchLimit(), "a test")


def test_an_attack_that_runs_out_of_memory_still_finishes_with_a_memory_warning(digits_test):
    from harness.attacks import ATTACKS

    pgd = ATTACKS.get("pgd")

    class Hungry(pgd):  # out of memory on more than 16 samples at once, like a big model on a small GPU
        def __call__(self, model, x, *args, **kwargs):
            if x.shape[0] > 16:
                raise torch.OutOfMemoryError("CUDA out of memory.")
            return super().__call__(model, x, *args, **kwargs)

    ATTACKS.register("hungry-pgd")(Hungry)
    try:
        cfg = {**SUITE, "attacks": [{"name": "hungry-pgd", "norm": "linf", "epsilons": [0.1], "steps": 5}], "gates": []}
        card = harness.run(cfg, show_progress=False)
    finally:
        ATTACKS._entries.pop("hungry-pgd", None)
    memory = [c for c in card.checks if c["name"] == "memory"]
    assert memory and memory[0]["status"] == "warn" and "16 sample(s)" in memory[0]["detail"]
    assert card.attacks[0]["n_attacked"] == round(card.metrics["clean_accuracy"] * 120)


def test_results_get_the_mode_a_new_file_would(tmp_path):
    import os

    from harness.core.files import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
