"""The engine contract (harness.engines.base) on the local engine: results in unit order whatever
finishes first, a unit is a pure function of its inputs, out-of-memory halving, query counting."""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from harness.attacks import PGD
from harness.core.errors import RunFailed
from harness.engines.base import Unit, UnitResult
from harness.engines.local import LocalEngine

CPU2 = [torch.device("cpu"), torch.device("cpu")]  # two replicas on two threads, as two devices would be


@pytest.fixture(scope="module")
def data(correct_digits):
    from harness.sources.data import data_from_tensors

    x, y = correct_digits
    return data_from_tensors(x[:96], y[:96])


def engine_on(model, data, devices=(torch.device("cpu"),)) -> LocalEngine:
    engine = LocalEngine()
    engine.start(model, data, list(devices))
    return engine


def pgd_unit(rows, seed: int, eps: float = 0.1, **kw) -> Unit:
    rows = tuple(rows)
    return Unit(attack=PGD(steps=5), norm="linf", epsilon=eps, rows=rows, seed=seed, batch_size=max(1, len(rows)), **kw)


def same(a: UnitResult, b: UnitResult) -> bool:
    """Bit for bit, examples included; seconds aside."""
    return (torch.equal(a.broken, b.broken) and torch.equal(a.distance, b.distance) and torch.equal(a.target_hit, b.target_hit)
            and (a.violations, a.nonfinite, a.queries, a.gradients) == (b.violations, b.nonfinite, b.queries, b.gradients)
            and [(r, p) for r, _, p in a.examples] == [(r, p) for r, _, p in b.examples]
            and all(torch.equal(ea, eb) for (_, ea, _), (_, eb, _) in zip(a.examples, b.examples)))


@dataclass(frozen=True)
class Noise:
    """Uniform noise inside the budget from the unit's generator, after `delay` seconds; one
    counted forward with a gradient and two without, so the counts are known exactly."""

    delay: float = 0.0
    norms: ClassVar = ("linf",)

    def __call__(self, model, x, y, threat, *, generator=None):
        time.sleep(self.delay)
        model(x.clone().requires_grad_(True))
        with torch.no_grad():
            model(x)
            model(x)
        eps = threat.per_sample(x).view(-1, 1, 1, 1)
        u = torch.rand(x.shape, generator=generator, device=x.device)
        return x + (2 * u - 1) * eps


@dataclass(frozen=True)
class FitsUpTo:
    """Out of device memory above `rows` rows, after one counted forward."""

    rows: int

    def __call__(self, model, x, y, threat, *, generator=None):
        with torch.no_grad():
            model(x)
        if x.shape[0] > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.rows} rows)")
        return x + 0.5 * threat.per_sample(x).view(-1, 1, 1, 1) * torch.rand(x.shape, generator=generator)


def test_results_come_back_in_unit_order_whatever_finishes_first(wrapped_digits, data):
    # unit 0 (slot 0) sleeps, so units 1 and 3 (slot 1) finish before it
    units = [Unit(Noise(0.4 if i == 0 else 0.0), "linf", 0.1, tuple(range(8 * i, 8 * i + 8)), seed=i, batch_size=8) for i in range(4)]
    finished: list[int] = []
    got = engine_on(wrapped_digits, data, CPU2).run(units, on_done=lambda i, r: finished.append(i))
    assert finished.index(1) < finished.index(0) and sorted(finished) == [0, 1, 2, 3]
    alone = engine_on(wrapped_digits, data)
    for unit, result in zip(units, got):
        assert same(result, alone.run([unit])[0])
    assert [e[0] for r in got for e in r.examples] == sorted(e[0] for r in got for e in r.examples)  # rows of the source
    assert all(8 * i <= row < 8 * i + 8 for i, r in enumerate(got) for row, _, _ in r.examples)


def test_the_same_unit_twice_gives_identical_results(wrapped_digits, data):
    unit = pgd_unit(range(0, 64, 2), seed=11)
    engine = engine_on(wrapped_digits, data)
    a, b = engine.run([unit])[0], engine.run([unit])[0]
    assert same(a, b)
    assert 0 < int(a.broken.sum()) < len(unit.rows)  # a real attack: it broke some points, not all
    assert a.broken.shape == (32,) and float(a.distance.max()) <= 0.1 + 1e-6
    other = engine.run([pgd_unit(range(0, 64, 2), seed=12)])[0]
    assert not torch.equal(a.distance, other.distance)  # the seed is what draws the random start


def test_a_unit_does_not_depend_on_the_units_around_it(wrapped_digits, data):
    unit = pgd_unit(range(40, 72), seed=5)
    alone = engine_on(wrapped_digits, data).run([unit])[0]
    crowd = [pgd_unit(range(0, 32), seed=1), pgd_unit(range(10, 20), seed=2, eps=0.3), unit, pgd_unit(range(72, 96), seed=3)]
    shared = engine_on(wrapped_digits, data, CPU2).run(crowd)
    assert same(shared[2], alone)
    # and one pickled (as another process would get it) is the same unit with the same result
    copy = pickle.loads(pickle.dumps(unit))
    assert copy == unit and same(engine_on(wrapped_digits, data).run([copy])[0], alone)


def test_queries_and_gradients_are_counted_per_unit(wrapped_digits, data):
    units = [Unit(Noise(), "linf", 0.1, tuple(range(k, k + m)), seed=k, batch_size=m) for k, m in ((0, 5), (5, 7), (12, 3), (15, 9))]
    got = engine_on(wrapped_digits, data, CPU2).run(units)
    # per row: 3 forwards through the attack's model, 1 of them with a gradient; the re-scoring pass is not counted
    assert [(r.queries, r.gradients) for r in got] == [(3 * len(u.rows), len(u.rows)) for u in units]
    total = UnitResult.concat(got)
    assert (total.queries, total.gradients, total.broken.numel()) == (72, 24, 24)
    pgd = engine_on(wrapped_digits, data).run([Unit(PGD(steps=5, early_stop=False), "linf", 0.1, tuple(range(10)), seed=0, batch_size=10)])[0]
    assert pgd.gradients == 10 * 6 and pgd.queries >= pgd.gradients  # steps + 1 gradient passes per point


def test_out_of_memory_halves_through_the_interface(wrapped_digits, data):
    engine = engine_on(wrapped_digits, data)
    first, second = engine.run([Unit(FitsUpTo(3), "linf", 0.1, tuple(range(10)), seed=4, batch_size=10),
                                Unit(FitsUpTo(3), "linf", 0.1, tuple(range(10, 20)), seed=5, batch_size=10)])
    # 10 fails, 5 fails (the size drops to 2), then pieces of 2, 2, 1 twice; the next unit starts at 2
    assert (engine.limit.retries, engine.limit.size) == (2, 2)
    assert first.broken.shape == (10,) and second.broken.shape == (10,)
    assert first.queries == 10 + 5 + 5 + 5 and second.queries == 10  # failed attempts count: they ran
    assert float(first.distance.max()) <= 0.05 + 1e-6 and float(first.distance.min()) > 0  # every row was attacked
    with pytest.raises(RunFailed, match="even with a batch of one"):
        engine.run([Unit(FitsUpTo(0), "linf", 0.1, (0, 1), seed=0, batch_size=2)])


def test_an_attack_error_reaches_the_caller(wrapped_digits, data):
    @dataclass(frozen=True)
    class Crash:
        def __call__(self, model, x, y, threat, *, generator=None):
            raise ValueError("inside the attack")

    units = [Unit(Noise(), "linf", 0.1, (0, 1), seed=0, batch_size=2), Unit(Crash(), "linf", 0.1, (2, 3), seed=1, batch_size=2)]
    with pytest.raises(ValueError, match="inside the attack"):
        engine_on(wrapped_digits, data, CPU2).run(units)


def test_the_clean_pass_gives_the_models_logits_in_order(wrapped_digits, data):
    engine = engine_on(wrapped_digits, data, CPU2)
    calls = []
    lock = threading.Lock()
    out = engine.forward([tuple(range(0, 40)), tuple(range(40, 96)), (3, 1)], on_done=lambda i: (lock.acquire(), calls.append(i), lock.release()))
    with torch.no_grad():
        want = wrapped_digits(data.read(torch.arange(96))).float()
    assert torch.allclose(torch.cat(out[:2]), want, atol=1e-5) and torch.allclose(out[2], want[[3, 1]], atol=1e-5)
    assert sorted(calls) == [0, 1, 2]


def test_a_unit_is_checked_where_it_is_made():
    with pytest.raises(ValueError, match="at most batch_size"):
        Unit(PGD(), "linf", 0.1, (0, 1, 2), seed=0, batch_size=2)
    with pytest.raises(ValueError, match="targets"):
        Unit(PGD(), "linf", 0.1, (0, 1), seed=0, batch_size=2, targets=(1,))
    with pytest.raises(ValueError, match="epsilon"):
        Unit(PGD(), "linf", -0.1, (0,), seed=0, batch_size=1)


class Shuffled(LocalEngine):
    """A local engine that takes work from many lanes at once and returns each call after a random
    delay, so lanes finish in an order unrelated to the config's: the runner must put results (and
    the cascade) together exactly as a sequential run does."""

    concurrency = 8

    def __init__(self, seed: int) -> None:
        super().__init__()
        import random

        self.rng, self.lock, self.calls = random.Random(seed), threading.Lock(), 0

    def run(self, units, on_done=None):
        with self.lock:
            delay = self.rng.random() * 0.05
            self.calls += 1
        time.sleep(delay)
        with self.lock:  # one call at a time on the replicas: their query counters are per call
            return super().run(units, on_done)


LANES_SUITE = [  # two groups with cascades, a minimal attack judged in both l2 groups, a targeted attack, corruptions
    {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
    {"name": "pgd", "norm": "linf", "epsilons": [0.1, 0.2], "params": {"steps": 5}},
    {"name": "pgd", "id": "pgd-l2", "norm": "l2", "epsilons": [0.5, 1.0], "params": {"steps": 5}},
    {"name": "deepfool", "norm": "l2", "epsilons": [0.5, 1.0]},
    {"name": "pgd", "id": "pgd-t", "norm": "linf", "epsilons": [0.2], "targeted": True, "params": {"steps": 5}},
    {"name": "corruptions", "kinds": ["gaussian-noise", "blur"], "severities": [1, 3]},
]


@pytest.mark.parametrize("cascade", [True, False])
def test_lanes_run_side_by_side_give_the_sequential_evaluation(wrapped_digits, data, cascade):
    from harness.config import Config
    from harness.evaluation.runner import evaluate

    attacks = Config.model_validate({"attacks": LANES_SUITE}).attacks
    kw = dict(batch_size=24, seed=3, cascade=cascade, show_progress=False)
    saved = []
    base = evaluate(wrapped_digits, data, attacks, [torch.device("cpu")], **kw)
    for seed in (0, 1):
        engine = Shuffled(seed)
        ev = evaluate(wrapped_digits, data, attacks, [torch.device("cpu")], engine=engine,
                      on_result=lambda e: saved.append([r.unit for r in e.results]), **kw)
        assert engine.calls > 10
        assert [(r.subject, r.label) for r in ev.results] == [(r.subject, r.label) for r in base.results]
        assert ev.metrics() == base.metrics()
        for a, b in zip(ev.results, base.results):
            assert torch.equal(a.robust, b.robust) and torch.equal(a.attacked, b.attacked) and torch.equal(a.broken, b.broken)
            assert torch.equal(a.distance.nan_to_num(-1), b.distance.nan_to_num(-1))
            assert (a.queries, a.gradients, a.violations) == (b.queries, b.gradients, b.violations)
        assert [c["status"] for c in ev.checks] == [c["status"] for c in base.checks]
    # every save saw results in config order (a prefix-free mix is fine, a shuffled one is not)
    order = [r.unit for r in base.results]
    assert all(units == sorted(units, key=order.index) for units in saved)


def test_a_failing_lane_stops_the_others_and_its_error_reaches_the_caller(wrapped_digits, data):
    from harness.config import Config
    from harness.evaluation.runner import evaluate

    class Failing(Shuffled):
        def run(self, units, on_done=None):
            if units and units[0].epsilon == 0.2 and units[0].norm == "linf":
                raise ValueError("boom in one lane")
            return super().run(units, on_done)

    attacks = Config.model_validate({"attacks": LANES_SUITE}).attacks
    with pytest.raises(ValueError, match="boom in one lane"):
        evaluate(wrapped_digits, data, attacks, [torch.device("cpu")], batch_size=24, engine=Failing(0), show_progress=False)


def test_the_engine_is_config_like_device_and_not_part_of_the_resume_fingerprint():
    from harness.config import parse_config
    from harness.core.errors import BadInput
    from harness.pipeline.resume import fingerprint

    assert parse_config({"engine": "ray"}).engine.name == "ray"
    cfg = parse_config({"engine": {"name": "ray", "address": "auto", "workers": 2, "gpus_per_worker": 0.5}})
    assert (cfg.engine.address, cfg.engine.workers, cfg.engine.gpus_per_worker) == ("auto", 2, 0.5)
    assert parse_config({}).engine.name == "local"
    with pytest.raises(BadInput, match="engine.name"):
        parse_config({"engine": "spark"})
    with pytest.raises(BadInput, match="address applies to the ray engine only"):
        parse_config({"engine": {"address": "auto"}})
    with pytest.raises(BadInput, match="engine.gpus_per_worker"):
        parse_config({"engine": {"name": "ray", "gpus_per_worker": 0}})
    local = parse_config({"device": "cpu"}).model_dump(mode="json")
    ray = parse_config({"device": "auto", "engine": {"name": "ray", "workers": 3}}).model_dump(mode="json")
    assert fingerprint(local, "m", "d", "v") == fingerprint(ray, "m", "d", "v")
    assert fingerprint(local, "m", "d", "v") != fingerprint({**local, "seed": 1}, "m", "d", "v")


def test_without_ray_the_ray_engine_is_exit_2_naming_the_pip_command(cli, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as on a machine without it
    result = cli("run", "--engine", "ray", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == ("harness: error: engine: the Ray engine needs Ray, which is not installed: "
                                                      "pip install 'robustgate[ray]'")
    assert not (tmp_path / "out" / "scorecard.json").exists()


def test_engine_options_with_the_local_engine_are_exit_2_and_alone_they_mean_ray(cli, tmp_path, monkeypatch):
    import sys

    result = cli("run", "--engine", "local", "--address", "auto", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "address applies to the ray engine only" in result.stderr
    monkeypatch.setitem(sys.modules, "ray", None)
    result = cli("run", "--workers", "2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "the Ray engine needs Ray" in result.stderr


@pytest.mark.parametrize("override", [{"seed": 4}, {"device": "cpu"}, {"engine": {"name": "ray", "workers": 2}}])
def test_an_override_keeps_what_the_config_left_unsaid(override):
    """--seed, --device or --engine re-validate the config: keys it did not write stay unwritten, so a
    partial `train:` over the builtin recipe is still that recipe (it once became the generic one)."""
    from harness.config import train_plan
    from harness.pipeline.context import RunContext, RunRequest
    from harness.pipeline.resolve import resolve

    raw = {"name": "p", "train": {"epochs": 2, "data": {"limit": 400}}, "attacks": [],
           "probes": [{"name": "label-flip", "fractions": [0.1]}]}
    plain = resolve(RunContext(RunRequest(raw))).cfg
    overridden = resolve(RunContext(RunRequest(raw, **override))).cfg
    assert train_plan(overridden) == train_plan(plain)
    assert train_plan(plain).optimizer.name == "adam"  # the builtin recipe's, not the generic default
    assert overridden.model_dump(exclude={"seed", "device", "engine"}) == plain.model_dump(exclude={"seed", "device", "engine"})


def test_one_progress_bar_ticks_for_every_batch_whichever_lane_returns_it(wrapped_digits, data, monkeypatch):
    from harness.config import Config
    from harness.evaluation import runner

    bars = []

    class Bar:
        def __init__(self, total, desc, enabled):
            self.total, self.n, self.lock = total, 0, threading.Lock()
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def refresh(self):
            pass

        def update(self, k):
            assert self.total is not None and self.n + k <= self.total  # the total is known before a tick
            self.n += k

    monkeypatch.setattr(runner, "_progress", Bar)
    attacks = Config.model_validate({"attacks": LANES_SUITE}).attacks
    engine = Shuffled(2)
    sent = []
    real_run = engine.run
    engine.run = lambda units, on_done=None: (sent.append(len(units)), real_run(units, on_done))[1]
    runner.evaluate(wrapped_digits, data, attacks, [torch.device("cpu")], batch_size=24, engine=engine, show_progress=True)
    assert len(bars) == 1
    assert bars[0].n == bars[0].total == -(-len(data) // 24) + sum(sent) and sum(sent) > 20
