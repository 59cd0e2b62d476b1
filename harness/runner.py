"""Evaluation as a function: clean accuracy, every attack x epsilon, the per-sample worst case.

The runner trusts no attack. Each adversarial batch is clipped to the input bounds, checked
against its budget (an example outside it counts as not adversarial and fails the `budget`
check) and re-scored with the runner's own forward pass. Only correctly classified samples are
attacked. Randomness comes from one generator per (attack, batch) seeded from the run's seed, so
metrics do not depend on the number of devices or on what ran before.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from attacks import BOUNDS, BUDGET_TOLERANCE, ThreatModel, attack_epsilons
from attacks.base import describe

from .config import AttackConfig, Epsilon
from .data import Data
from .devices import replicate, shard_map
from .errors import BadInput
from .metrics import metric_id, worst_groups
from .models import BoundedModel, looks_like_probabilities

__all__ = ["AttackResult", "Evaluation", "evaluate", "check_record"]


def check_record(name: str, status: str, detail: str) -> dict[str, str]:
    assert status in ("pass", "warn", "fail")
    return {"name": name, "status": status, "detail": detail}


@dataclass
class AttackResult:
    config: AttackConfig
    epsilon: Epsilon
    robust: torch.Tensor  # (n,) bool: still correctly classified under this attack (False where clean was wrong)
    distance: torch.Tensor  # (n,) float: perturbation size, NaN where not attacked
    seconds: float
    violations: int
    nonfinite: int

    def record(self, attacked: int) -> dict[str, Any]:
        robust = int(self.robust.sum())
        n = int(self.robust.numel())
        broken = attacked - robust
        d = self.distance[~torch.isnan(self.distance)]
        return {
            "id": self.config.attack_id,
            "name": self.config.name,
            "backend": self.config.backend,
            "norm": self.config.norm,
            "epsilon": self.epsilon.label,
            "epsilon_value": self.epsilon.value,
            "robust_accuracy": robust / n,
            "attack_success_rate": broken / attacked if attacked else 0.0,
            "n": n,
            "n_attacked": attacked,
            "n_broken": broken,
            "seconds": round(self.seconds, 4),
            "budget_violations": self.violations,
            "perturbation": {
                "median": float(d.median()) if d.numel() else 0.0,
                "max": float(d.max()) if d.numel() else 0.0,
            },
            "params": describe(self.config.build()),
        }


@dataclass
class Evaluation:
    n: int
    correct: torch.Tensor  # (n,) bool
    results: list[AttackResult] = field(default_factory=list)
    checks: list[dict[str, str]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        out = {"clean_accuracy": int(self.correct.sum()) / self.n}
        attacked = int(self.correct.sum())
        for r in self.results:
            rec = r.record(attacked)
            out[metric_id("robust_accuracy", rec["id"], rec["epsilon"])] = rec["robust_accuracy"]
            out[metric_id("attack_success_rate", rec["id"], rec["epsilon"])] = rec["attack_success_rate"]
        for key, robust in self.worst_case().items():
            out[key] = int(robust.sum()) / self.n
        return out

    def worst_case(self) -> dict[str, torch.Tensor]:
        """Per sample, robust only if it survived every attack of that norm and epsilon."""
        labels = worst_groups([r.config for r in self.results])
        worst: dict[str, torch.Tensor] = {}
        for r in self.results:
            key = metric_id("robust_accuracy", f"worst-{r.config.norm}", labels[(r.config.norm, r.epsilon.value)])
            worst[key] = worst.get(key, self.correct) & r.robust
        return worst


def _batches(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(indices.split(max(1, size)))


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from .progress import progress_bar

    return progress_bar(total=total, desc=desc, enabled=enabled)


def clean_pass(replicas: Sequence[BoundedModel], data: Data, batch_size: int, num_classes: Optional[int], show: Optional[bool]):
    """Predictions for every sample; checks the model's output against the data on the way."""
    batches = _batches(torch.arange(len(data)), batch_size)

    def run(i: int, idx: torch.Tensor, slot: int) -> torch.Tensor:
        model = replicas[slot]
        device = _device_of(model)
        with torch.no_grad():
            try:
                out = model(data.x[idx].to(device))
            except Exception as e:
                raise BadInput(data.source, f"the model cannot take this data: inputs of shape {tuple(data.x.shape[1:])} fail with {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(idx):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadInput("model.source", f"the model must return (batch, classes) scores, returned {shape} for a batch of {len(idx)}")
        return out.float().cpu()

    with _progress(len(batches), "clean", show) as bar:
        logits = torch.cat(shard_map(run, batches, len(replicas), on_done=lambda: bar.update(1)))
    classes = logits.shape[1]
    if num_classes is not None and classes != num_classes:
        raise BadInput("model.num_classes", f"the config says {num_classes} classes but the model returns {classes} scores")
    top = int(data.y.max())
    if top >= classes:
        raise BadInput(data.source, f"labels go up to {top} but the model has {classes} classes (valid labels: 0..{classes - 1})")
    return logits


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _batch_seed(seed: int, attack_index: int, batch_index: int) -> int:
    return (seed * 1_000_003 + attack_index * 10_007 + batch_index) % (2**63 - 1)


def run_attack(replicas: Sequence[BoundedModel], data: Data, correct: torch.Tensor, cfg: AttackConfig,
               attack_index: int, batch_size: int, seed: int, show: Optional[bool]) -> list[AttackResult]:
    """One attack entry at all its epsilons, on the correctly classified samples."""
    attack = cfg.build()
    eps_values = [e.value for e in cfg.epsilons]
    k = len(eps_values)
    targets = torch.nonzero(correct).flatten()
    batches = _batches(targets, max(1, batch_size // k))

    def run(i: int, idx: torch.Tensor, slot: int):
        model = replicas[slot]
        device = _device_of(model)
        x, y = data.x[idx].to(device), data.y[idx].to(device)
        gen = torch.Generator(device=device).manual_seed(_batch_seed(seed, attack_index, i))
        adv = attack_epsilons(attack, model, x, y, cfg.norm, eps_values, generator=gen).detach()
        adv = adv.clamp(*BOUNDS)  # the runner owns the bounds, whatever the attack returned
        robust, dist, bad, nonfinite = [], [], [], []
        with torch.no_grad():
            for j, eps in enumerate(eps_values):
                threat = ThreatModel(cfg.norm, eps)
                a = adv[j]
                finite = torch.isfinite(a).flatten(1).all(dim=1)
                a = torch.where(finite.view(-1, *([1] * (a.dim() - 1))), a, x)
                inside = threat.contains(a, x, BUDGET_TOLERANCE)
                a = torch.where(inside.view(-1, *([1] * (a.dim() - 1))), a, x)  # out of budget: not an adversarial example
                logits = model(a)
                ok = torch.isfinite(logits).all(dim=1)
                robust.append(((logits.argmax(dim=1) == y) & ok).cpu())
                dist.append(threat.distance(a, x).cpu())
                bad.append(int((~inside).sum()))
                nonfinite.append(int((~finite).sum()) + int((~ok).sum()))
        return robust, dist, bad, nonfinite

    start = time.perf_counter()
    with _progress(len(batches), cfg.attack_id, show) as bar:
        parts = shard_map(run, batches, len(replicas), on_done=lambda: bar.update(1))
    seconds = (time.perf_counter() - start) / k
    results = []
    for j, eps in enumerate(cfg.epsilons):
        robust = torch.zeros(len(data), dtype=torch.bool)
        dist = torch.full((len(data),), float("nan"))
        if parts:
            robust[targets] = torch.cat([p[0][j] for p in parts])
            dist[targets] = torch.cat([p[1][j] for p in parts])
        results.append(AttackResult(cfg, eps, robust, dist, seconds,
                                    sum(p[2][j] for p in parts), sum(p[3][j] for p in parts)))
    return results


@contextlib.contextmanager
def strict_fp32():
    """TF32 off while evaluating: a re-scored prediction must not flip on reduced-precision math."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def evaluate(model: BoundedModel, data: Data, attacks: Sequence[AttackConfig], devices: Sequence[torch.device],
             batch_size: int = 256, seed: int = 0, num_classes: Optional[int] = None,
             on_result: Optional[Callable[[Evaluation], None]] = None, show_progress: Optional[bool] = None) -> Evaluation:
    """Runs the suite; `on_result` sees the evaluation after each attack entry (to save it as it goes)."""
    with strict_fp32():
        return _evaluate(model, data, attacks, devices, batch_size, seed, num_classes, on_result, show_progress)


def _evaluate(model, data, attacks, devices, batch_size, seed, num_classes, on_result, show_progress) -> Evaluation:
    replicas = replicate(model, devices)
    logits = clean_pass(replicas, data, batch_size, num_classes, show_progress)
    checks = []
    if looks_like_probabilities(logits):
        for m in replicas:
            m.outputs_probabilities = True
        checks.append(check_record("output-logits", "warn", "the model outputs probabilities (rows sum to 1); the harness "
                                   "uses their logarithm as logits, but gradients may still vanish where the softmax saturates"))
    else:
        checks.append(check_record("output-logits", "pass", "the model outputs logits"))
    finite = bool(torch.isfinite(logits).all())
    correct = (logits.argmax(dim=1) == data.y) & torch.isfinite(logits).all(dim=1)
    ev = Evaluation(n=len(data), correct=correct, checks=checks)
    for i, cfg in enumerate(attacks):
        ev.results.extend(run_attack(replicas, data, correct, cfg, i, batch_size, seed, show_progress))
        if on_result is not None:
            on_result(ev)
    violations = sum(r.violations for r in ev.results)
    nonfinite = sum(r.nonfinite for r in ev.results) + (0 if finite else 1)
    checks.append(check_record(
        "budget", "fail" if violations else "pass",
        f"{violations} adversarial example(s) outside their budget (tolerance {BUDGET_TOLERANCE:g}); they were counted as not adversarial"
        if violations else f"every adversarial example is inside its budget (tolerance {BUDGET_TOLERANCE:g}) and the [0, 1] bounds"))
    checks.append(check_record(
        "finite", "fail" if nonfinite else "pass",
        "NaN or infinite values in model outputs or adversarial examples" if nonfinite else "no NaN or infinite values in outputs or adversarial examples"))
    return ev
