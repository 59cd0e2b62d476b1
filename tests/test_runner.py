"""The runner: it re-checks every attack, keeps finished work, and is deterministic."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import harness
from harness.attacks import ATTACKS
from harness.engines.devices import shard_map
from harness.core.errors import RunFailed

SMALL = {
    "name": "small",
    "data": {"limit": 120, "batch_size": 64},
    "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1, "1/5"], "steps": 10},
    ],
    "gates": [{"metric": "clean_accuracy", "min": 0.9}],
}


@dataclass(frozen=True)
class Overshoot:
    """A broken attack: steps twice the budget away from x."""

    norms: ClassVar = ("linf", "l2")

    def __call__(self, model, x, y, threat, *, generator=None):
        eps = threat.per_sample(x).view(-1, 1, 1, 1)
        return x + 2 * eps * torch.where(x > 0.5, -1.0, 1.0)


@dataclass(frozen=True)
class OutOfBox:
    """Inside the budget but outside [0, 1]: the runner clips, and that is no violation."""

    norms: ClassVar = ("linf",)

    def __call__(self, model, x, y, threat, *, generator=None):
        return x + threat.per_sample(x).view(-1, 1, 1, 1)


@dataclass(frozen=True)
class Explodes:
    norms: ClassVar = ("linf",)

    def __call__(self, model, x, y, threat, *, generator=None):
        raise RuntimeError("simulated crash inside an attack")


@pytest.fixture
def planted(monkeypatch):
    for name, cls in (("overshoot", Overshoot), ("outofbox", OutOfBox), ("explodes", Explodes)):
        monkeypatch.setitem(ATTACKS._entries, name, cls)


def test_metrics_are_consistent(digits_model):
    card = harness.run(SMALL)
    m = card.metrics
    n = card.provenance["samples"]
    assert n == 120
    clean = m["clean_accuracy"]
    assert clean >= 0.95
    correct = round(clean * n)
    by = {(a["id"], a["epsilon"]): a for a in card.attacks}
    for a in card.attacks:
        assert a["n"] == n and a["cascade"] is True
        assert a["robust_accuracy"] == pytest.approx((a["n_attacked"] - a["n_broken"]) / n)
        assert a["attack_success_rate"] == pytest.approx(a["n_broken"] / a["n_attacked"])
        assert a["robust_accuracy"] <= clean
        assert a["perturbation"]["max"] <= a["epsilon_value"] + 1e-6
        assert a["gradients_per_point"] > 0 and a["queries_per_point"] >= a["gradients_per_point"]
    for e in ("0.05", "0.1"):
        fgsm, pgd = by[("fgsm-linf", e)], by[("pgd-linf", e)]
        assert fgsm["n_attacked"] == correct  # the first stage sees every correct point
        assert pgd["n_attacked"] == fgsm["n_attacked"] - fgsm["n_broken"]  # the next only the survivors
        assert m[f"robust_accuracy:worst-linf@{e}"] == pgd["robust_accuracy"] <= fgsm["robust_accuracy"]
    assert by[("pgd-linf", "1/5")]["n_attacked"] == correct
    assert by[("fgsm-linf", "0.1")]["gradients_per_point"] == 1.0  # FGSM: one gradient per point
    pgd = [m[f"robust_accuracy:pgd-linf@{e}"] for e in ("0.05", "0.1", "1/5")]
    assert pgd[0] >= pgd[1] >= pgd[2]  # robust accuracy falls as epsilon grows
    assert pgd[0] > pgd[2] + 0.3
    assert m["robust_accuracy:worst-linf@1/5"] == m["robust_accuracy:pgd-linf@1/5"]
    checks = {c["name"]: c["status"] for c in card.checks}
    # an ordinary model trips none; a white-box-only suite gives gradient-masking nothing to compare
    assert checks == {**dict.fromkeys(["output-logits", "randomized-model", "vanishing-gradients", "large-epsilon", "more-steps",
                                       "epsilon-zero", "monotone-epsilon", "budget", "finite"], "pass"), "gradient-masking": "skipped"}


def test_cascade_off_runs_every_attack_on_every_point():
    card = harness.run({**SMALL, "cascade": False})
    correct = round(card.metrics["clean_accuracy"] * 120)
    assert all(a["n_attacked"] == correct and a["cascade"] is False for a in card.attacks)
    cascaded = harness.run(SMALL)
    for e in ("0.05", "0.1"):  # same worst case either way (up to the random starts the batches get)
        key = f"robust_accuracy:worst-linf@{e}"
        assert abs(card.metrics[key] - cascaded.metrics[key]) <= 0.02
        assert card.metrics[key] <= min(card.metrics[f"robust_accuracy:fgsm-linf@{e}"], card.metrics[f"robust_accuracy:pgd-linf@{e}"])


def test_worst_case_is_per_sample_not_min_of_means():
    from harness.config import AttackConfig
    from harness.evaluation.runner import AttackResult, Evaluation

    correct = torch.tensor([True, True, True, True])
    a = AttackConfig(name="pgd", norm="linf", epsilons=[0.1])
    b = AttackConfig(name="fgsm", norm="linf", epsilons=[0.1])
    nan = torch.full((4,), float("nan"))
    ra, rb = torch.tensor([True, True, False, False]), torch.tensor([False, True, True, True])
    ev = Evaluation(n=4, correct=correct, results=[
        AttackResult(a, "pgd-linf", "0.1", 0.1, ra, correct, ~ra, nan, cascade=False),
        AttackResult(b, "fgsm-linf", "0.1", 0.1, rb, correct, ~rb, nan, cascade=False),
    ])
    m = ev.metrics()
    assert m["robust_accuracy:pgd-linf@0.1"] == 0.5 and m["robust_accuracy:fgsm-linf@0.1"] == 0.75
    assert m["robust_accuracy:worst-linf@0.1"] == 0.25  # only sample 1 survives both


def test_same_seed_same_metrics():
    a, b = harness.run(SMALL), harness.run(SMALL)
    assert a.metrics == b.metrics
    assert [x["n_broken"] for x in a.attacks] == [x["n_broken"] for x in b.attacks]


def test_sharding_over_devices_gives_the_same_metrics():
    single = harness.run(SMALL, device="cpu")
    sharded = harness.run(SMALL, device=["cpu", "cpu", "cpu"])
    assert sharded.provenance["device"] == "cpu,cpu,cpu"
    assert single.metrics == sharded.metrics


def test_shard_map_keeps_order_and_slots():
    seen = []

    def fn(i, item, slot):
        seen.append((i, slot))
        return item * 10

    out = shard_map(fn, list(range(7)), 3)
    assert out == [0, 10, 20, 30, 40, 50, 60]
    assert sorted(seen) == [(i, i % 3) for i in range(7)]


def test_planted_budget_violation_fails_the_run(planted, tmp_path):
    cfg = {**SMALL, "attacks": [{"name": "overshoot", "norm": "linf", "epsilons": [0.1]}]}
    card = harness.run(cfg, out=tmp_path)
    budget = next(c for c in card.checks if c["name"] == "budget")
    attacked = card.attacks[0]["n_attacked"]
    assert budget["status"] == "fail" and f"{attacked} adversarial" in budget["detail"]
    assert card.attacks[0]["budget_violations"] == attacked
    # out-of-budget examples do not count as adversarial: robust accuracy stays at clean accuracy
    assert card.attacks[0]["robust_accuracy"] == card.metrics["clean_accuracy"]
    assert card.passed is False and card.verdict == "fail" and card.exit_code == 1
    assert all(g["verdict"] == "pass" for g in card.gates)  # the check alone fails it


def test_out_of_bounds_is_clipped_not_flagged(planted):
    cfg = {**SMALL, "attacks": [{"name": "outofbox", "norm": "linf", "epsilons": [0.1]}]}
    card = harness.run(cfg)
    assert next(c for c in card.checks if c["name"] == "budget")["status"] == "pass"
    assert card.passed


def test_crash_keeps_finished_results(planted, tmp_path):
    cfg = {**SMALL, "attacks": [SMALL["attacks"][0], {"name": "explodes", "norm": "linf", "epsilons": [0.1]}]}
    with pytest.raises(RunFailed, match="simulated crash"):
        harness.run(cfg, out=tmp_path)
    partial = harness.Scorecard.load(tmp_path / "scorecard.partial.json")
    assert [a["id"] for a in partial.attacks] == ["fgsm-linf", "fgsm-linf"]
    assert "robust_accuracy:fgsm-linf@0.1" in partial.metrics
    assert partial.verdict == "inconclusive" and not (tmp_path / "scorecard.json").exists()


def test_probability_outputs_are_turned_into_logits(digits_model):
    net = torch.nn.Sequential(digits_model, torch.nn.Softmax(dim=1))
    card = harness.run({**SMALL, "attacks": [SMALL["attacks"][1]]}, model=net)
    assert next(c for c in card.checks if c["name"] == "output-logits")["status"] == "warn"
    plain = harness.run({**SMALL, "attacks": [SMALL["attacks"][1]]}, model=digits_model)
    # log-probabilities are logits up to a constant: the attack is as strong as on the raw model
    assert abs(card.metrics["robust_accuracy:pgd-linf@0.1"] - plain.metrics["robust_accuracy:pgd-linf@0.1"]) <= 0.02


def test_crash_exits_3_through_the_cli(planted, cli, tmp_path):
    import yaml

    cfg = tmp_path / "crash.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "attacks": [SMALL["attacks"][0], {"name": "explodes", "norm": "linf", "epsilons": [0.1]}]}))
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "scorecard.partial.json" in result.stderr
    assert (tmp_path / "out" / "scorecard.partial.json").is_file()


class RowsOnly:
    """A sample source with the contract and nothing else (no `.x`): the runner must read by rows."""

    def __init__(self, data) -> None:
        self._data, self.read_rows = data, []
        self.y, self.ids, self.source, self.split, self.shape = data.y, data.ids, data.source, data.split, data.shape

    def __len__(self) -> int:
        return len(self._data)

    def read(self, rows):
        self.read_rows.append(torch.as_tensor(rows).clone())
        return self._data.read(rows)

    def sha256(self) -> str:
        return self._data.sha256()


class Recording:
    """The local engine, keeping every unit it is handed."""

    def __init__(self) -> None:
        from harness.engines.local import LocalEngine

        self.inner, self.units = LocalEngine(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, units, on_done=None):
        self.units += list(units)
        return self.inner.run(units, on_done)


def _suite_outcomes(ev):
    return [(r.subject, r.label, r.robust.tolist(), r.attacked.tolist(), r.distance.nan_to_num(-1).tolist(), r.queries) for r in ev.results]


def test_the_runner_hands_the_engine_units_and_reads_samples_by_rows(wrapped_digits):
    from harness.config import parse_config
    from harness.evaluation.runner import evaluate, seed_of as _seed
    from harness.sources.data import load_data

    data = load_data("builtin:digits", limit=90)
    attacks = parse_config({"attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.1]},
                                        {"name": "pgd", "norm": "linf", "epsilons": [0.1], "steps": 5}]}).attacks
    cpu = [torch.device("cpu")]
    plain = evaluate(wrapped_digits, data, attacks, cpu, batch_size=32, seed=7, show_progress=False)
    source, engine = RowsOnly(data), Recording()
    ev = evaluate(wrapped_digits, source, attacks, cpu, batch_size=32, seed=7, show_progress=False, engine=engine)
    assert _suite_outcomes(ev) == _suite_outcomes(plain)  # the same results through a source that only reads rows
    assert torch.equal(torch.cat(source.read_rows[:3]), torch.arange(90))  # the clean pass, in batches of 32
    fgsm, pgd = ev.results
    by_entry = {}
    for u in engine.units:
        by_entry.setdefault(u.entry, []).append(u)
    assert sorted(by_entry) == ["0|fgsm-linf|0.1", "1|pgd-linf|0.1"]
    for index, (result, units) in enumerate(zip(ev.results, by_entry.values())):
        rows = [r for u in units for r in u.rows]
        assert rows == torch.nonzero(result.attacked).flatten().tolist()  # the cascade: pgd gets fgsm's survivors only
        assert [len(u.rows) for u in units][:-1] == [32] * (len(units) - 1)
        # the seeds runs have always had: (run seed, (entry, stage, epsilon), batch)
        assert [u.seed for u in units] == [_seed(7, _seed(index, 0, 0), i) for i in range(len(units))]
        assert all(u.epsilon == 0.1 and u.norm == "linf" and u.batch_size == 32 for u in units)
    assert int(pgd.attacked.sum()) == int(fgsm.robust.sum()) < int(ev.correct.sum())
