"""Evaluation as a function: clean accuracy, then every attack entry in cascade, then the worst case.

Within one norm and epsilon, attacks run in config order, each only on the points still robust
after the ones before it (AutoAttack's cascade), so an attack's robust accuracy is the one after
its stage and the last stage's is the exact per-sample worst case. `cascade: false` runs every
attack on every correctly classified point instead. Minimal-perturbation attacks (no budget) see
every correct point: their per-sample distances imply a robust accuracy at each epsilon.

The work itself goes to an engine (`harness.engines.base`) as units: one batch of sample rows of
one attack stage at one epsilon, with its seed. Randomness comes from one generator per unit
(attack, stage, epsilon, batch) seeded from the run's seed, so metrics do not depend on the number
of devices or on the engine. The runner reads samples through `data.read(rows)` only.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from harness.attacks import BUDGET_TOLERANCE
from harness.attacks.base import access_of
from harness.config import AttackConfig
from harness.config.metric_ids import entry_epsilons, worst_groups
from harness.core.curves import curves
from harness.core.errors import BadInput
from harness.core.ids import metric_id
from harness.engines.base import Engine
from harness.engines.local import LocalEngine
from harness.engines.stage import BatchLimit, device_of, strict_fp32
from harness.evaluation import checks as validity
from harness.evaluation.cascade import Corruption, Ordered, Suite, seed_of
from harness.evaluation.checks import record
from harness.sources.data import Data
from harness.sources.models import BoundedModel, looks_like_probabilities

_Suite = Suite  # the suite's state and lanes (harness.evaluation.cascade), by the name tests patch

__all__ = ["AttackResult", "Evaluation", "evaluate", "check_record", "Corruption"]


check_record = record  # the runner's own checks (budget, finite, memory) use the same record shape


@dataclass
class AttackResult:
    """One attack entry at one epsilon (or one corruption at one severity)."""

    entry: Any  # AttackConfig | CorruptionConfig
    subject: str  # the metric subject: attack id, or corruption kind
    label: str  # epsilon as written, or the severity
    value: Optional[float]  # epsilon value; None for corruptions
    robust: torch.Tensor  # (n,) bool: correct and not broken (after this stage, in cascade)
    attacked: torch.Tensor  # (n,) bool: points this attack ran on
    broken: torch.Tensor  # (n,) bool: points this attack broke
    distance: torch.Tensor  # (n,) float: perturbation size where attacked, NaN elsewhere
    seconds: float = 0.0
    violations: int = 0
    nonfinite: int = 0
    queries: int = 0
    gradients: int = 0
    target_hits: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)
    median_perturbation: Optional[float] = None
    cascade: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    minimal: bool = False
    # per stage that ran: {"attack", "access" (white-box|black-box|noise), "attacked", "broken"} with
    # (n,) bool masks, for the gradient-masking check
    parts: list[dict[str, Any]] = field(default_factory=list)
    unit: str = ""  # what finished, for --resume: "<entry index>|<attack id>|<epsilon or kind/severity>"
    examples: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (sample, adversarial input, prediction)
    resumed: bool = False  # restored from a saved run, not recomputed

    @property
    def norm(self) -> Optional[str]:
        return getattr(self.entry, "norm", None)

    def median_interval(self) -> dict[str, Any]:
        """The distribution-free 95% interval of a minimal attack's median perturbation, over the
        correctly classified points it ran on (a point it never broke counts as inf)."""
        from harness.core.stats import median_interval

        sizes = self.distance[self.attacked]
        lo, hi = median_interval(sizes.tolist())
        return {"ci95": [max(0.0, lo), hi], "method": "order-statistic", "n": int(sizes.numel())}  # a distance is never negative

    def record(self) -> dict[str, Any]:
        n = int(self.robust.numel())
        attacked, broken = int(self.attacked.sum()), int((self.broken & self.attacked).sum())
        d = self.distance[self.broken & self.attacked]
        rec: dict[str, Any] = {
            "id": self.subject, "name": self.entry.name, "backend": getattr(self.entry, "backend", "native"),
            "norm": self.norm, "epsilon": self.label, "epsilon_value": self.value,
            "robust_accuracy": int(self.robust.sum()) / n,
            "attack_success_rate": broken / attacked if attacked else 0.0,
            "n": n, "n_attacked": attacked, "n_broken": broken, "seconds": round(self.seconds, 4),
            "queries_per_point": round(self.queries / attacked, 2) if attacked else 0.0,
            "gradients_per_point": round(self.gradients / attacked, 2) if attacked else 0.0,
            "budget_violations": self.violations,
            "perturbation": {"median": float(d.median()) if d.numel() else 0.0, "max": float(d.max()) if d.numel() else 0.0},
            "cascade": self.cascade,
        }
        if isinstance(self.entry, AttackConfig):
            rec["params"] = self.params
            rec["minimal"] = self.minimal
            if self.minimal:
                rec["median_perturbation"] = self.median_perturbation
                rec["metric_intervals"] = {metric_id("median_perturbation", self.subject): self.median_interval()}
            if self.entry.targeted:
                rec.update(targeted=True, target=self.entry.target, target_hit_rate=self.target_hits / attacked if attacked else 0.0)
        if self.stages:
            rec["stages"] = self.stages
        if self.resumed:
            rec["resumed"] = True
        return rec


@dataclass
class Evaluation:
    n: int
    correct: torch.Tensor  # (n,) bool
    results: list[AttackResult] = field(default_factory=list)
    checks: list[dict[str, str]] = field(default_factory=list)
    groups: dict[tuple[str, float], str] = field(default_factory=dict)  # (norm, eps) -> label
    ids: Optional[torch.Tensor] = None  # (n,) each sample's index in its full split (a stable id)

    def flags(self) -> dict[str, torch.Tensor]:
        """Per-sample outcome of every accuracy metric: True where correct (clean) or robust."""
        out = {"clean_accuracy": self.correct}
        for r in self.results:
            out[metric_id("robust_accuracy", r.subject, r.label)] = r.robust
        out.update(self.worst_case())
        return out

    def metrics(self) -> dict[str, float]:
        out: dict[str, Any] = {"clean_accuracy": int(self.correct.sum()) / self.n}
        for r in self.results:
            rec = r.record()
            out[metric_id("robust_accuracy", r.subject, r.label)] = rec["robust_accuracy"]
            if r.norm is not None:
                out[metric_id("attack_success_rate", r.subject, r.label)] = rec["attack_success_rate"]
            if r.median_perturbation is not None:
                out[metric_id("median_perturbation", r.subject)] = r.median_perturbation
        for key, robust in self.worst_case().items():
            out[key] = int(robust.sum()) / self.n
        return out

    def worst_case(self) -> dict[str, torch.Tensor]:
        """Per sample, robust only if it survived every attack of that norm and epsilon."""
        worst: dict[str, torch.Tensor] = {}
        for r in self.results:
            if r.norm is None:
                continue
            key = metric_id("robust_accuracy", f"worst-{r.norm}", self.groups.get((r.norm, r.value), r.label))
            worst[key] = worst.get(key, self.correct) & r.robust
        return worst


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from harness.core.progress import progress_bar

    return progress_bar(total=total, desc=desc, enabled=enabled)


def clean_pass(engine: Engine, data: Data, batch_size: int, num_classes: Optional[int], bar: Any) -> torch.Tensor:
    """Logits for every sample; checks the model's output against the data on the way. `bar` ticks per batch."""
    batches = [tuple(b.tolist()) for b in torch.arange(len(data)).split(max(1, batch_size))]
    bar.total = (bar.total or 0) + len(batches)
    bar.refresh()
    logits = torch.cat(engine.forward(batches, on_done=lambda i: bar.update(1)))
    classes = logits.shape[1]
    if num_classes is not None and classes != num_classes:
        raise BadInput("model.num_classes", f"the config says {num_classes} classes but the model returns {classes} scores")
    top = int(data.y.max())
    if top >= classes:
        raise BadInput(data.source, f"labels go up to {top} but the model has {classes} classes (valid labels: 0..{classes - 1})")
    return logits


_CHECK_POINTS = 512  # the validity checks sample at most 64 of these, spread over the data


def _strongest(attacks: Sequence[Any]) -> Optional[tuple[Any, Any, Any]]:
    """(config entry, attack, largest epsilon) of the white-box attack (or ensemble stage) with the most
    steps, for the more-steps and epsilon-zero checks; None when the suite has no such attack."""
    best, most = None, -1
    for cfg in attacks:
        if not isinstance(cfg, AttackConfig) or cfg.minimal or not cfg.epsilons:
            continue
        attack = cfg.build()
        for _, stage in attack.stages(cfg.norm) if hasattr(attack, "stages") else [(cfg.name, attack)]:
            steps = getattr(stage, "steps", None)
            if access_of(stage) == "white-box" and isinstance(steps, int) and steps > most:  # the first of equals: apgd-ce before apgd-t
                best, most = (cfg, stage, max(cfg.epsilons, key=lambda e: e.value)), steps
    return best


def validity_checks(model: BoundedModel, data: Data, ev: Evaluation, attacks: Sequence[Any], seed: int,
                    limit: Optional[BatchLimit] = None) -> list[dict[str, str]]:
    """The checks that say whether this evaluation can be trusted (see harness.evaluation.checks), on one device.
    Their samples stay within the batch size known to fit in device memory."""
    from harness.attacks import ThreatModel

    sample = min(64, limit.size) if limit is not None and limit.size else 64
    dev = device_of(model)
    reseed = getattr(model, "reseed", None)
    if callable(reseed):  # a randomized defense: the checks' draws start from the run's seed, whatever ran on it before
        reseed(seed_of(seed, 0xC4EC))
    gen = lambda k: torch.Generator(device=dev).manual_seed(seed_of(seed, 0xC4EC, k))
    pick = torch.linspace(0, len(data) - 1, min(len(data), _CHECK_POINTS)).round().long().unique()
    x, y = data.read(pick).to(dev), data.y[pick].to(dev)
    black_box = getattr(model, "black_box", None)  # a model without gradients (an ONNX graph run by onnxruntime)
    no_gradients = f"the model is a black box ({black_box}): it has no gradients to check, and only black-box attacks ran"
    out = [validity.randomness(model, x, sample=sample),
           validity.gradients(model, x, y, sample=sample) if not black_box else validity.record("vanishing-gradients", "skipped", no_gradients)]
    bounded = [r for r in ev.results if r.norm is not None and r.parts]
    strongest = _strongest(attacks) if bounded else None
    if bounded and black_box:
        out.append(validity.record("large-epsilon", "skipped", no_gradients))
    elif bounded:
        out.append(validity.large_epsilon(model, x, y, generator=gen(1), sample=sample))
    else:
        out.append(record("large-epsilon", "skipped", "the suite ran no attack at an epsilon: no robust accuracy for it to vouch for"))
    if strongest is not None:
        cfg, attack, eps = strongest
        key = metric_id("robust_accuracy", f"worst-{cfg.norm}", ev.groups.get((cfg.norm, eps.value), eps.label))
        alive = ev.worst_case().get(key, ev.correct)
        idx = torch.nonzero(alive).flatten()
        # more_steps looks at `sample` survivors spread over them: read only those (it spreads an
        # already-spread set onto itself, so it sees the same points)
        idx = idx[validity._spread(len(idx), sample, idx.device)]
        out.append(validity.more_steps(model, attack, data.read(idx).to(dev), data.y[idx].to(dev), ThreatModel(cfg.norm, eps.value),
                                       generator=gen(2), sample=sample))
        out.append(validity.zero_epsilon(model, attack, x, y, generator=gen(3), norm=cfg.norm, sample=sample))
    else:
        why = ("the suite has no white-box attack with steps (pgd, apgd-ce, ...) at an epsilon" if bounded
               else "the suite ran no attack at an epsilon")
        out += [record("more-steps", "skipped", f"{why}: no iterations to double"),
                record("epsilon-zero", "skipped", f"{why}: no attack to run at epsilon 0")]
    parts = [{"attack": p["attack"], "kind": p["access"], "norm": r.norm, "epsilon": r.label, "attacked": p["attacked"], "broken": p["broken"]}
             for r in bounded for p in r.parts]
    out.append(validity.masking(parts, ev.n))
    record_like = {"attacks": [r.record() for r in ev.results], "metrics": ev.metrics()}
    out.append(validity.monotone(curves(record_like), ev.n))
    return out


def checks_job(view: Any, model_ref: Any, data_ref: Any, ev: Evaluation, attacks: list, seed: int, size: Optional[int]) -> list:
    """validity_checks on an engine's worker (harness.engines.cluster.RayEngine.on_worker), on the
    model and data the engine was started with, from the run's batch limit."""
    limit = BatchLimit()
    limit.size = size
    with strict_fp32():
        return validity_checks(view.model(model_ref), view.data(data_ref), ev, attacks, seed, limit)


def evaluate(model: BoundedModel, data: Data, attacks: Sequence[Any], devices: Sequence[torch.device],
             batch_size: int = 256, seed: int = 0, num_classes: Optional[int] = None,
             on_result: Optional[Callable[[Evaluation], None]] = None, show_progress: Optional[bool] = None,
             cascade: bool = True, done: Optional[dict[str, list[AttackResult]]] = None,
             engine: Optional[Engine] = None) -> Evaluation:
    """Runs the suite; `on_result` sees the evaluation after each finished unit (an attack at one
    epsilon), to save it as it goes; units in `done` (from a saved run) are restored, not rerun.
    The work runs on `engine` (default: a LocalEngine over `devices`, closed at the end; an engine
    handed in is started here and left open for the caller)."""
    own = engine is None
    engine = LocalEngine() if engine is None else engine
    try:
        # one bar for the whole evaluation, ticking as batches return, whichever lane or worker sent them
        with strict_fp32(), _progress(0, "evaluating", show_progress) as bar:
            engine.start(model, data, devices)
            logits = clean_pass(engine, data, batch_size, num_classes, bar)
            checks = [validity.output_logits(logits)]
            if looks_like_probabilities(logits):
                model.outputs_probabilities = True
                engine.update(model)
            finite = bool(torch.isfinite(logits).all())
            correct = (logits.argmax(dim=1) == data.y) & torch.isfinite(logits).all(dim=1)
            per_entry = entry_epsilons(attacks)
            ev = Evaluation(n=len(data), correct=correct, checks=checks, groups=worst_groups(attacks, per_entry), ids=data.ids)

            order, lock = Ordered(), threading.Lock()

            def emit(results: list[AttackResult], keys: list[tuple]) -> None:
                with lock:  # lanes finish in any order: results go in config order, and each save sees a whole state
                    order.insert(results, keys, ev.results)
                    if on_result is not None:
                        on_result(ev)

            suite = Suite(engine, data, correct, logits, batch_size, seed, cascade, bar, emit, done, AttackResult)
            suite.run(suite.plan(list(attacks), per_entry))
            if callable(getattr(engine, "on_worker", None)):
                # where the model runs fast (a GPU worker), not on a driver that may have only a CPU
                checks += engine.on_worker(checks_job, ev, list(attacks), seed, engine.limit.size)
            else:  # in this process, on the first device: model.to is a no-op where the engine put it there
                checks += validity_checks(model.to(devices[0]), data, ev, attacks, seed, engine.limit)
    finally:
        if own:
            engine.close()
    limit = engine.limit
    violations = sum(r.violations for r in ev.results)
    nonfinite = sum(r.nonfinite for r in ev.results) + (0 if finite else 1)
    # examples made under a finite budget: a minimal attack's and a corruption's have none to keep to
    budgeted = sum(int(r.attacked.sum()) for r in ev.results
                   if r.norm is not None and not r.minimal and r.value is not None and math.isfinite(r.value))
    checks += [validity.budget(violations, budgeted, BUDGET_TOLERANCE), validity.finite(nonfinite, ev.n)]
    if limit.retries:
        checks.append(check_record("memory", "warn", f"out of device memory {limit.retries} time(s): batches were halved down to "
                                   f"{limit.size} sample(s) and retried (the results are whole; random draws differ from a full-batch run)"))
    return ev
