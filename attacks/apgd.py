"""Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that tunes itself, with the
cross-entropy, DLR and targeted-DLR losses, for the L-inf and L2 norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from .base import ATTACKS, check_batch
from .gradient import _margin, succeeded
from .threat import ThreatModel

__all__ = ["APGDCE", "APGDDLR", "APGDT", "checkpoints"]

MOMENTUM = 0.75  # the paper's alpha; fixed there, as part of being "parameter-free"
_TINY = 1e-12


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j at which the step size is reviewed: w_j = ceil(p_j * steps) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).

    Kept in hundredths so that 0.22 * 100 is 22, not 22.000000000000004 rounded up to 23.
    """
    out, prev, p = [], 0, 22
    while True:
        w = -(-p * steps // 100)
        if w >= steps:
            return out
        if not out or w > out[-1]:
            out.append(w)
        prev, p = p, p + max(p - prev - 3, 6)


def _loss(kind: str, logits: torch.Tensor, y: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    """The per-sample objective ascended: ``ce``, ``dlr`` or ``dlr-t`` (apgd-t's), each towards
    ``t`` when given. DLR is shift and scale invariant in the logits, unlike cross-entropy, so
    a model cannot hide behind overconfident (saturated) outputs."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none") if t is None else -F.cross_entropy(logits, t, reduction="none")
    top = logits.topk(4 if logits.shape[1] >= 4 else 3, dim=1).values
    if t is None:
        return -_margin(logits, y) / (top[:, 0] - top[:, 2] + _TINY)
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY
    if kind == "dlr-t":
        own = logits.gather(1, y[:, None]).squeeze(1)
        return (logits.gather(1, t[:, None]).squeeze(1) - own) / scale
    # A caller's target must beat every class, not only y: the paper's numerator z_y - z_t
    # (apgd-t's, where any misclassification counts) would stop pulling once z_t passes z_y.
    return _margin(logits, t) / scale


def _broken(kind: str, logits: torch.Tensor, y: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return logits.argmax(dim=1) != y if kind == "dlr-t" else succeeded(logits, y, t)


def _value_and_grad(model, x_adv, y, t, kind):
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = _loss(kind, logits, y, t)
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), loss.detach(), grad


def _run(model, x, y, t, threat: ThreatModel, kind: str, steps: int, rho: float, early_stop: bool,
         generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start (Algorithm 1 of the paper). Returns per sample the first
    iterate that succeeds, else the best-loss point; whether it succeeded; the best loss."""
    n = x.shape[0]
    idx, xs, ys, ts, th = torch.arange(n, device=x.device), x, y, t, threat
    x_adv = th.random_start(xs, generator)
    logits, loss, grad = _value_and_grad(model, x_adv, ys, ts, kind)
    res_x, res_hit = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    res_loss = torch.full_like(loss, -float("inf"))
    hit = _broken(kind, logits, ys, ts)
    x_hit, x_prev = x_adv.clone(), x_adv
    x_max, grad_max, f_max = x_adv.clone(), grad.clone(), loss.clone()
    step = _view(2.0 * th.per_sample(xs), xs)
    # Bookkeeping for the checkpoints: loss rises since the last one, the best loss and whether
    # the step was halved at the last one (w_0 = 0 counts as a checkpoint without a halving).
    rises, f_check, halved = torch.zeros_like(f_max), f_max.clone(), torch.zeros_like(hit)
    marks = checkpoints(steps)
    lengths = dict(zip(marks, (b - a for a, b in zip([0] + marks, marks))))

    for i in range(steps):
        if early_stop and bool(hit.any()):
            res_x[idx[hit]], res_hit[idx[hit]] = x_hit[hit], True
            keep = ~hit
            if not bool(keep.any()):
                return res_x, res_hit, res_loss
            idx, xs, ys, x_adv, x_prev, grad, loss, step, x_hit, x_max, grad_max, f_max, rises, f_check, halved, hit = (
                s[keep] for s in (idx, xs, ys, x_adv, x_prev, grad, loss, step, x_hit, x_max, grad_max, f_max,
                                  rises, f_check, halved, hit)
            )
            ts = None if ts is None else ts[keep]
            th = th.subset(keep)
        # The first step has no history to carry momentum from (alpha = 1 there).
        a = 1.0 if i == 0 else MOMENTUM
        z = th.project(x_adv + step * th.normalize_grad(grad), xs)
        x_new = th.project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), xs)
        x_prev = x_adv
        prev_loss = loss
        logits, loss, grad = _value_and_grad(model, x_new, ys, ts, kind)
        x_adv = x_new.detach()
        now = _broken(kind, logits, ys, ts)
        x_hit = torch.where(_view(now & ~hit, xs), x_adv, x_hit)
        hit = hit | now
        rises = rises + (loss > prev_loss).to(rises.dtype)
        better = loss > f_max
        x_max = torch.where(_view(better, xs), x_adv, x_max)
        grad_max = torch.where(_view(better, xs), grad, grad_max)
        f_max = torch.where(better, loss, f_max)
        if i + 1 in lengths:
            # Condition 1: too few steps raised the loss; condition 2: the step size was not
            # cut last time and the best loss has not moved since. Either way the step is too
            # big for this sample: halve it and resume from its best point.
            halve = (rises < rho * lengths[i + 1]) | (~halved & (f_max <= f_check))
            step = torch.where(_view(halve, xs), step / 2, step)
            x_adv = torch.where(_view(halve, xs), x_max, x_adv)
            grad = torch.where(_view(halve, xs), grad_max, grad)
            loss = torch.where(halve, f_max, loss)
            rises, f_check, halved = torch.zeros_like(rises), f_max.clone(), halve
    res_x[idx] = torch.where(_view(hit, xs), x_hit, x_max)
    res_hit[idx], res_loss[idx] = hit, f_max
    return res_x, res_hit, res_loss


@dataclass(frozen=True)
class _APGD:
    """The shared loop: restarts (each from a random start) on the points not yet broken,
    keeping per sample the first success, else the highest loss over every run."""

    steps: int = 100
    n_restarts: int = 1
    rho: float = 0.75
    early_stop: bool = True

    loss: ClassVar[str] = "ce"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.n_restarts < 1:
            raise ValueError(f"steps and n_restarts must be at least 1, got {self.steps} and {self.n_restarts}")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None):
        with torch.enable_grad():  # callers may hold no_grad; the attack still needs input gradients
            return self._attack(model, x, y, threat, generator, target)

    def _targets(self, clean: torch.Tensor, target: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        return [target]

    def _attack(self, model, x, y, threat, generator, target):
        check_batch(x, y)
        x = x.detach()
        kind = self.loss
        with torch.no_grad():
            clean = model(x)
        min_classes = {"ce": 2, "dlr": 3 if target is None else 4, "dlr-t": 4}[kind]
        if clean.shape[1] < min_classes:
            raise ValueError(f"apgd with the {kind} loss needs at least {min_classes} classes, the model has {clean.shape[1]}")
        out = x.clone()
        best = torch.full((x.shape[0],), -float("inf"), device=x.device, dtype=clean.dtype)
        # Points already broken at x, and those with no budget, are returned as they are.
        done = _broken(kind, clean, y, target) | (threat.per_sample(x) == 0)
        for t in self._targets(clean, target):
            for _ in range(self.n_restarts):
                sel = (~done).nonzero().squeeze(1)
                if sel.numel() == 0:
                    return out
                ts = None if t is None else t[sel]
                adv, hit, loss = _run(model, x[sel], y[sel], ts, threat.subset(sel), kind, self.steps, self.rho,
                                      self.early_stop, generator)
                take = hit | (loss > best[sel])
                out[sel[take]] = adv[take]
                best[sel] = torch.maximum(best[sel], loss)
                done[sel[hit]] = True
        return out


@ATTACKS.register("apgd-ce")
@dataclass(frozen=True)
class APGDCE(_APGD):
    """Auto-PGD with the cross-entropy loss (Croce & Hein 2020, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks",
    https://arxiv.org/abs/2003.01690).

    Norms: linf, l2. Step size starts at 2 * epsilon and is halved per sample at checkpoints
    where progress stalls (the sample then resumes from its best point); momentum 0.75.
    ``target`` turns it into targeted cross-entropy. Example::

        x_adv = APGDCE(steps=100)(model, x, y, ThreatModel("linf", 8 / 255), generator=g)
    """

    loss: ClassVar[str] = "ce"


@ATTACKS.register("apgd-dlr")
@dataclass(frozen=True)
class APGDDLR(_APGD):
    """Auto-PGD with the difference-of-logits-ratio loss
    -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3), pi the logits sorted in decreasing order
    (Croce & Hein 2020, https://arxiv.org/abs/2003.01690). Needs at least 3 classes (4 with a
    ``target``, which uses the targeted DLR scale).

    Norms: linf, l2. Example::

        x_adv = APGDDLR()(model, x, y, ThreatModel("l2", 0.5), generator=g)
    """

    loss: ClassVar[str] = "dlr"


@ATTACKS.register("apgd-t")
@dataclass(frozen=True)
class APGDT(_APGD):
    """Targeted Auto-PGD over the top classes, as in AutoAttack (Croce & Hein 2020,
    https://arxiv.org/abs/2003.01690): for each of the ``n_target_classes`` most likely wrong
    classes t in turn, targeted APGD with the loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    on the points not yet broken; any misclassification counts as broken. Needs at least 4
    classes; it picks its own targets.

    Norms: linf, l2. Example::

        x_adv = APGDT(n_target_classes=9)(model, x, y, ThreatModel("linf", 8 / 255), generator=g)
    """

    n_target_classes: int = 9

    loss: ClassVar[str] = "dlr-t"
    supports_target: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_target_classes < 1:
            raise ValueError(f"n_target_classes must be at least 1, got {self.n_target_classes}")

    def _targets(self, clean: torch.Tensor, target: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        if target is not None:
            raise ValueError("apgd-t picks its own targets; use apgd-ce or apgd-dlr with a target")
        # The attacked points are classified correctly, so rank 0 is y and ranks 1.. the runners-up.
        order = clean.argsort(dim=1, descending=True)
        return [order[:, k] for k in range(1, min(self.n_target_classes, order.shape[1] - 1) + 1)]
