"""Gradient attacks: FGSM and PGD, for the L-inf and L2 norms, written once over ThreatModel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from .base import ATTACKS, check_batch
from .threat import ThreatModel

__all__ = ["FGSM", "PGD"]


LOSSES = ("ce", "margin")


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """z_cls - max_{j != cls} z_j, per sample."""
    own = logits.gather(1, cls[:, None]).squeeze(1)
    return own - logits.scatter(1, cls[:, None], -float("inf")).amax(dim=1)


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-sample objective an attack ascends: cross-entropy, or the margin loss
    max_{j != y} z_j - z_y (Carlini & Wagner 2017); towards ``target`` when one is given.

    Cross-entropy saturates on confident predictions: its gradient then points away from the true
    class rather than towards the nearest other one, and PGD can miss points that are breakable
    (a linear model shows it in closed form). The margin loss aims at the runner-up class.
    """
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none") if kind == "ce" else _margin(logits, target)
    return F.cross_entropy(logits, y, reduction="none") if kind == "ce" else -_margin(logits, y)


def succeeded(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    return logits.argmax(dim=1) == target if target is not None else logits.argmax(dim=1) != y


@ATTACKS.register("fgsm")
@dataclass(frozen=True)
class FGSM:
    """Fast gradient sign method (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572);
    for L2 the fast gradient method, one step along the normalized gradient.

    Norms: linf, l2. Example::

        x_adv = FGSM()(model, x, y, ThreatModel("linf", 8 / 255))
    """

    random_start: bool = False
    rel_stepsize: float = 1.0
    loss: str = "ce"

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None):
        check_batch(x, y)
        x = x.detach()
        x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # callers may hold no_grad; the attack still needs input gradients
            loss = per_sample_loss(model(x_adv), y, self.loss, target).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        step = _view(threat.per_sample(x) * self.rel_stepsize, x)
        return threat.project(x_adv.detach() + step * threat.normalize_grad(grad), x)


@ATTACKS.register("pgd")
@dataclass(frozen=True)
class PGD:
    """Projected gradient descent (Madry et al. 2018, https://arxiv.org/abs/1706.06083).

    Norms: linf, l2. Step size is ``rel_stepsize * epsilon`` (default 2.5 / steps, Madry's
    schedule) unless ``abs_stepsize`` is set; ``loss`` is ``ce`` (cross-entropy) or ``margin``.
    Per sample it returns the first iterate that fools the model, else the iterate with the
    highest loss, never simply the last one; with ``early_stop`` a sample leaves the batch once
    it is fooled. Example::

        x_adv = PGD(steps=40)(model, x, y, ThreatModel("l2", 0.5))
    """

    steps: int = 20
    rel_stepsize: Optional[float] = None
    abs_stepsize: Optional[float] = None
    random_start: bool = True
    early_stop: bool = True
    loss: str = "ce"

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def step_sizes(self, threat: ThreatModel, x: torch.Tensor) -> torch.Tensor:
        if self.abs_stepsize is not None:
            return torch.full((x.shape[0],), self.abs_stepsize, device=x.device, dtype=x.dtype)
        rel = self.rel_stepsize if self.rel_stepsize is not None else 2.5 / self.steps
        return threat.per_sample(x) * rel

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None):
        with torch.enable_grad():  # callers may hold no_grad; the attack still needs input gradients
            return self._run(model, x, y, threat, generator, target)

    def _run(self, model, x, y, threat: ThreatModel, generator: Optional[torch.Generator],
             target: Optional[torch.Tensor]) -> torch.Tensor:
        check_batch(x, y)
        x = x.detach()
        best = x.clone()
        # The active set, compacted as samples are fooled: index into the batch, and their state.
        idx = torch.arange(x.shape[0], device=x.device)
        xs, ys, th, ts = x, y, threat, target
        step = _view(self.step_sizes(threat, x), x)
        x_adv = th.random_start(xs, generator) if self.random_start else xs.clone()
        best_s = xs.clone()
        best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

        for t in range(self.steps + 1):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            loss = per_sample_loss(logits, ys, self.loss, ts)
            success = succeeded(logits, ys, ts)
            improve = ~fooled & (success | (loss > best_loss))
            best_s = torch.where(_view(improve, xs), x_adv.detach(), best_s)
            best_loss = torch.where(improve, loss.detach(), best_loss)
            fooled = fooled | success
            if t == self.steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            x_adv = th.project(x_adv.detach() + step * th.normalize_grad(grad), xs)
            if self.early_stop and bool(fooled.any()):
                best[idx[fooled]] = best_s[fooled]
                keep = ~fooled
                if not bool(keep.any()):
                    return best
                idx, xs, ys, x_adv, best_s, best_loss, step = (
                    t_[keep] for t_ in (idx, xs, ys, x_adv, best_s, best_loss, step)
                )
                th = th.subset(keep)
                ts = None if ts is None else ts[keep]
                fooled = fooled[keep]
        best[idx] = best_s
        return best
