"""The suite's work as lanes: what must wait on what, and what may run side by side.

Within one (norm, epsilon) group the attack entries run in config order, each on the points those
before it left robust (AutoAttack's cascade): the group is one lane, and its barriers stay here on
the driver. Different groups share nothing, so they are separate lanes. A minimal-perturbation
attack runs once on every correct point, whatever the epsilons, so its run is a lane of its own;
each group it judges waits for it at the entry's place in the group. Each corruption at each
severity is a lane too.

An engine that can take work from several lanes at once (`engine.concurrency > 1`, the Ray engine)
gets one driver thread per lane; the local engine runs the steps one after another in config
order, as the suite reads. Either way every unit's randomness comes from its own seed and the
results are put in config order as they arrive, so the evaluation is the same whichever ran what
when.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_right
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from harness.attacks import BUDGET_TOLERANCE
from harness.attacks.base import access_of, describe
from harness.config import AttackConfig, CorruptionConfig
from harness.engines.base import EXAMPLES, Engine, Unit, UnitResult
from harness.sources.data import Data

__all__ = ["Suite", "Corruption", "seed_of", "MAX_LANES"]

MAX_LANES = 32  # driver threads at most; job lanes are submitted first, so a capped pool cannot deadlock


def seed_of(seed: int, *keys: int) -> int:
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k) % (2**61 - 1)
    return h


def _params(attack: Any, cfg: AttackConfig) -> dict[str, Any]:
    try:
        return describe(attack)
    except TypeError:  # not a dataclass
        return dict(cfg.params)


def _targets(cfg: AttackConfig, logits: torch.Tensor, y: torch.Tensor, seed: int, index: int) -> Optional[torch.Tensor]:
    if not cfg.targeted:
        return None
    if cfg.target == "least-likely":
        return logits.argmin(dim=1)
    classes = logits.shape[1]
    g = torch.Generator().manual_seed(seed_of(seed, index, 7))
    return (y + torch.randint(1, classes, y.shape, generator=g)) % classes  # uniform over the other classes


@dataclass(frozen=True)
class Corruption:
    """A common corruption at one severity, in the attack signature, so it travels in a Unit like any attack."""

    kind: str
    severity: int

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Any, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        from harness.attacks.baselines import corrupt

        return corrupt(self.kind, x, self.severity, generator)


def _unit(index: int, *keys: Any) -> str:
    return "|".join(str(k) for k in (index, *keys))


class Cancelled(Exception):
    """Another lane failed or the run was interrupted: this lane stops at its next unit boundary."""


@dataclass
class _Step:
    lane: tuple
    run: Callable[[], None]


class Suite:
    """State of one evaluation: the engine, per (norm, eps) the points still robust, one progress bar.

    Each finished unit (an attack at one epsilon; a minimal attack; a corruption at one severity)
    goes to `emit` at once, in config order among those emitted, so it can be saved; a unit found in
    `done` (a saved run being resumed) is restored instead of recomputed, cascade state included.
    """

    def __init__(self, engine: Engine, data: Data, correct: torch.Tensor, logits: torch.Tensor, batch_size: int, seed: int,
                 cascade: bool, bar: Any, emit: Callable[[list[Any], list[tuple]], None],
                 done: Optional[dict[str, list[Any]]] = None, result_type: Any = None) -> None:
        self.engine, self.data, self.correct, self.logits = engine, data, correct, logits
        self.batch_size, self.seed, self.cascade, self.bar = max(1, batch_size), seed, cascade, bar
        self.alive: dict[tuple[str, float], torch.Tensor] = {}
        self.emit, self.done, self.Result = emit, done or {}, result_type
        self._lock = threading.Lock()
        self.stop = threading.Event()

    # -- the cascade state and resume -------------------------------------------------------------

    def alive_at(self, norm: str, eps: float) -> torch.Tensor:
        return self.alive.setdefault((norm, eps), self.correct.clone())

    def restored(self, unit: str, expected: int = 1) -> Optional[list[Any]]:
        """The saved results of a finished unit (all `expected` of them, else it runs again: the work is pure)."""
        saved = self.done.get(unit)
        if saved is None or len(saved) != expected:
            return None
        for r in saved:
            r.resumed = True
        return saved

    def _keep(self, r: Any) -> None:
        if r.cascade and r.norm is not None and r.value is not None and math.isfinite(r.value):
            self.alive[(r.norm, r.value)] = r.robust.clone()

    # -- units ------------------------------------------------------------------------------------

    def units(self, attack: Any, norm: str, eps: float, sample: torch.Tensor, key: int, target: Optional[torch.Tensor],
              entry: str = "", stage: int = 0) -> list[Unit]:
        """`sample` (rows) in batches, batch i seeded from (run seed, key, i)."""
        return [Unit(attack=attack, norm=norm, epsilon=float(eps), rows=tuple(rows.tolist()), seed=seed_of(self.seed, key, i),
                     batch_size=self.batch_size, targets=None if target is None else tuple(target[rows].tolist()),
                     entry=entry, stage=stage, batch=i)
                for i, rows in enumerate(sample.split(self.batch_size))] if sample.numel() else []

    def attack_points(self, attack, norm: str, eps: float, points: torch.Tensor, keys: tuple, target: Optional[torch.Tensor],
                      entry: str = "", stage: int = 0) -> tuple[torch.Tensor, torch.Tensor, UnitResult]:
        """Runs `attack` on `points` (bool mask) at one epsilon; returns (broken mask, distances, the stage's UnitResult).
        keys: (the seed key of this stage, names for the logs...)."""
        if self.stop.is_set():
            raise Cancelled()
        n = len(self.data)
        sample = torch.nonzero(points).flatten()
        units = self.units(attack, norm, eps, sample, keys[0], target, entry, stage)
        with self._lock:
            self.bar.total = (self.bar.total or 0) + len(units)
            self.bar.refresh()

        def tick(i: int, r: UnitResult) -> None:
            with self._lock:
                self.bar.update(1)

        start = time.perf_counter()
        parts = self.engine.run(units, on_done=tick)
        res = UnitResult.concat(parts, seconds=time.perf_counter() - start)  # wall time: devices work side by side
        broken = torch.zeros(n, dtype=torch.bool)
        dist = torch.full((n,), float("nan"))
        broken[sample], dist[sample] = res.broken, res.distance
        return broken, dist, res

    # -- the steps of each kind of entry ----------------------------------------------------------

    def bounded_step(self, cfg: AttackConfig, attack: Any, stages: list, target: Optional[torch.Tensor], index: int, j: int, eps) -> None:
        unit = _unit(index, cfg.attack_id, eps.label)
        saved = self.restored(unit)
        if saved is not None:
            self._keep(saved[0])
            self.emit(saved, [(index, j)])
            return
        alive = self.alive_at(cfg.norm, eps.value) if self.cascade else self.correct.clone()
        attacked = alive.clone()
        broken_all = torch.zeros_like(alive)
        dist = torch.full((len(self.data),), float("nan"))
        total, stage_recs = self.Result(cfg, cfg.attack_id, eps.label, eps.value, alive, attacked, broken_all, dist,
                                        cascade=self.cascade, params=_params(attack, cfg), unit=unit), []
        for s, (stage_name, stage_attack) in enumerate(stages):
            points = alive & ~broken_all
            broken, d, res = self.attack_points(stage_attack, cfg.norm, eps.value, points, (seed_of(index, s, j), cfg.attack_id, eps.label),
                                                target, unit, s)
            broken_all |= broken
            dist = torch.where(broken, d, dist)
            total.seconds += res.seconds
            total.violations += res.violations
            total.nonfinite += res.nonfinite
            total.queries += res.queries
            total.gradients += res.gradients
            total.target_hits += int(res.target_hit.sum())
            total.examples = (total.examples + res.examples)[:EXAMPLES]
            total.parts.append({"attack": stage_name, "access": access_of(stage_attack), "attacked": points, "broken": broken})
            stage_recs.append({"attack": stage_name, "n_attacked": int(points.sum()), "n_broken": int(broken.sum()),
                               "robust_accuracy": int((alive & ~broken_all).sum()) / len(self.data), "seconds": round(res.seconds, 4)})
        total.robust = alive & ~broken_all
        total.broken, total.distance = broken_all, torch.where(attacked, dist, torch.nan)
        if len(stages) > 1:
            total.stages = stage_recs
        if self.cascade:
            self.alive[(cfg.norm, eps.value)] = total.robust
        self.emit([total], [(index, j)])

    def minimal_run(self, cfg: AttackConfig, index: int, expected: int) -> Any:
        """The one unbounded run on every correct point (or the saved results); its steps read it."""
        saved = self.restored(_unit(index, cfg.attack_id), expected)
        if saved is not None:
            return saved
        attack = cfg.build()
        target = _targets(cfg, self.logits, self.data.y, self.seed, index)
        broken, dist, res = self.attack_points(attack, cfg.norm, math.inf, self.correct, (seed_of(index, 0, 0), cfg.attack_id), target,
                                               _unit(index, cfg.attack_id))
        # per correct point its distance, inf where never broken: the median and its interval read these
        dist = torch.where(self.correct, torch.where(broken, dist, torch.inf), torch.nan)
        sizes = dist[self.correct]
        median = float(sizes.median()) if sizes.numel() else 0.0  # inf when most points resist
        common = dict(seconds=res.seconds, violations=res.violations, nonfinite=res.nonfinite, queries=res.queries, gradients=res.gradients,
                      target_hits=int(res.target_hit.sum()), median_perturbation=median, params=_params(attack, cfg), minimal=True,
                      unit=_unit(index, cfg.attack_id))
        return attack, broken, dist, res, common

    def minimal_step(self, cfg: AttackConfig, ran: Any, index: int, j: int, eps) -> None:
        """The minimal attack's distances judged at one epsilon, in its place in that group's cascade."""
        if isinstance(ran, list):  # restored
            r = ran[j]
            self._keep(r)
            self.emit([r], [(index, j)])
            return
        attack, broken, dist, res, common = ran
        within = broken & (dist <= eps.value + BUDGET_TOLERANCE)
        before = self.alive_at(cfg.norm, eps.value) if self.cascade else self.correct
        robust = before & ~within
        if self.cascade:
            self.alive[(cfg.norm, eps.value)] = robust
        part = {"attack": cfg.name, "access": access_of(attack), "attacked": before.clone(), "broken": within & before}
        shown = [e for e in res.examples if bool(within[e[0]])]
        self.emit([self.Result(cfg, cfg.attack_id, eps.label, eps.value, robust, self.correct.clone(), within, dist,
                               cascade=self.cascade, parts=[part], examples=shown, **common)], [(index, j)])

    def minimal_alone(self, cfg: AttackConfig, ran: Any, index: int) -> None:
        """A minimal attack with no epsilon to judge at: its distances still get reported."""
        if isinstance(ran, list):
            self.emit(ran, [(index, 0)])
            return
        attack, broken, dist, res, common = ran
        self.emit([self.Result(cfg, cfg.attack_id, "inf", math.inf, self.correct & ~broken, self.correct.clone(), broken, dist,
                               cascade=False, examples=res.examples, **{**common, "violations": 0, "nonfinite": 0, "target_hits": 0})],
                  [(index, 0)])

    def corruption_step(self, cfg: CorruptionConfig, index: int, k: int, kind: str, s: int, sev: int) -> None:
        unit = _unit(index, kind, sev)
        key = (index, k * len(cfg.severities) + s)
        saved = self.restored(unit)
        if saved is not None:
            self.emit(saved, [key])
            return
        broken, dist, res = self.attack_points(Corruption(kind, sev), "linf", math.inf, self.correct,
                                               (seed_of(index, k, sev), kind, str(sev)), None, unit)
        self.emit([self.Result(cfg, kind, str(sev), None, self.correct & ~broken, self.correct.clone(), broken, dist,
                               seconds=res.seconds, nonfinite=res.nonfinite, cascade=False, unit=unit, examples=res.examples)], [key])

    # -- planning and running ---------------------------------------------------------------------

    def plan(self, attacks: list, per_entry: list) -> list[_Step]:
        """Every step in config order, each with its lane."""
        steps: list[_Step] = []
        for i, (cfg, eps_list) in enumerate(zip(attacks, per_entry)):
            if isinstance(cfg, CorruptionConfig):
                for k, kind in enumerate(cfg.kinds):
                    for s, sev in enumerate(cfg.severities):
                        steps.append(_Step(("corruption", i, kind, sev), lambda c=cfg, i=i, k=k, kind=kind, s=s, sev=sev:
                                           self.corruption_step(c, i, k, kind, s, sev)))
            elif cfg.minimal:
                ran: Future = Future()
                expected = len(eps_list or []) or 1

                def job(c=cfg, i=i, f=ran, expected=expected) -> None:
                    try:
                        f.set_result(self.minimal_run(c, i, expected))
                    except BaseException as e:
                        f.set_exception(e)
                        raise

                steps.append(_Step(("minimal", i), job))
                if not eps_list:
                    steps.append(_Step(("minimal", i), lambda c=cfg, f=ran, i=i: self.minimal_alone(c, f.result(), i)))
                for j, eps in enumerate(eps_list or []):
                    steps.append(_Step(("group", cfg.norm, eps.value), lambda c=cfg, f=ran, i=i, j=j, e=eps: self._waiting(f, lambda r:
                                       self.minimal_step(c, r, i, j, e))))
            else:
                attack = cfg.build()
                target = _targets(cfg, self.logits, self.data.y, self.seed, i)
                stages = attack.stages(cfg.norm) if hasattr(attack, "stages") else [(cfg.name, attack)]
                for j, eps in enumerate(eps_list):
                    lane = ("group", cfg.norm, eps.value) if self.cascade else ("entry", i, j)
                    steps.append(_Step(lane, lambda c=cfg, a=attack, st=stages, t=target, i=i, j=j, e=eps:
                                       self.bounded_step(c, a, st, t, i, j, e)))
        return steps

    def _waiting(self, future: Future, then: Callable[[Any], None]) -> None:
        while True:  # a lane waiting on a minimal run still notices a failure elsewhere
            if self.stop.is_set():
                raise Cancelled()
            try:
                value = future.result(timeout=0.2)
                break
            except TimeoutError:
                continue
        then(value)

    def run(self, steps: list[_Step]) -> None:
        lanes: dict[tuple, list[_Step]] = {}
        for step in steps:
            lanes.setdefault(step.lane, []).append(step)
        workers = min(MAX_LANES, int(getattr(self.engine, "concurrency", 1) or 1), len(lanes))
        if workers <= 1:
            for step in steps:  # config order, as the suite reads
                step.run()
            return
        # lanes that wait on nothing (minimal runs, corruptions) first: a capped pool then always has them running
        order = sorted(lanes, key=lambda lane: lane[0] == "group")

        def run_lane(lane: tuple) -> None:
            for step in lanes[lane]:
                step.run()

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harness-lane")
        futures = [pool.submit(run_lane, lane) for lane in order]
        try:
            while True:
                finished, pending = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)  # short waits: Ctrl-C gets through
                failed = [f for f in finished if f.exception() is not None and not isinstance(f.exception(), Cancelled)]
                if failed:
                    raise failed[0].exception()
                if not pending:
                    return
        except BaseException:
            self.stop.set()
            cancel = getattr(self.engine, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class Ordered:
    """Results kept in config order (entry, then epsilon or severity) however the lanes deliver them."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []

    def insert(self, results: list, keys: list[tuple], into: list) -> None:
        if len(keys) != len(results):
            keys = [keys[0] + (k,) for k in range(len(results))]
        for r, key in zip(results, keys):
            at = bisect_right(self.keys, key)
            self.keys.insert(at, key)
            into.insert(at, r)
