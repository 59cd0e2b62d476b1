"""The threat model: a norm and a budget, and all the norm math attacks need.

PGD, FGSM and friends are written once against this object (foolbox's design): it projects
into the ball and the [0, 1] box, draws random starts, turns a gradient into a steepest-ascent
direction and answers whether a point is inside the budget. Epsilon may be one number or one
value per sample, which lets a single attack call cover several epsilons at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

__all__ = ["Norm", "NORMS", "ThreatModel", "BOUNDS", "BUDGET_TOLERANCE"]

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")
BOUNDS = (0.0, 1.0)
BUDGET_TOLERANCE = 1e-6
_TINY = 1e-12


def _flat_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


@dataclass(frozen=True, eq=False)
class ThreatModel:
    """`norm` in {"linf", "l2"}; `epsilon` a float or a tensor of shape (n,), one per sample."""

    norm: str
    epsilon: Union[float, torch.Tensor]

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (valid: {', '.join(NORMS)})")
        eps = self.epsilon
        if isinstance(eps, torch.Tensor):
            if eps.dim() != 1 or bool((eps < 0).any()):
                raise ValueError("a per-sample epsilon must be a 1-D tensor of non-negative values")
        elif eps < 0:
            raise ValueError(f"epsilon must be non-negative, got {eps}")

    def per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """Epsilon as a (n,) tensor on x's device and dtype."""
        eps = self.epsilon
        if isinstance(eps, torch.Tensor):
            assert eps.shape[0] == x.shape[0], f"epsilon has {eps.shape[0]} values for {x.shape[0]} samples"
            return eps.to(device=x.device, dtype=x.dtype)
        return torch.full((x.shape[0],), float(eps), device=x.device, dtype=x.dtype)

    def subset(self, index: torch.Tensor) -> "ThreatModel":
        """The same threat for a subset of the samples (by index or boolean mask)."""
        if isinstance(self.epsilon, torch.Tensor):
            return ThreatModel(self.norm, self.epsilon[index])
        return self

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_sample(x).view(-1, *([1] * (x.dim() - 1)))

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample size of the perturbation in this norm, shape (n,)."""
        return _flat_norm(x_adv - x, self.norm)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = BUDGET_TOLERANCE) -> torch.Tensor:
        """Per-sample: inside the budget (up to `tol`) and inside the input bounds."""
        inside = self.distance(x_adv, x) <= self.per_sample(x) + tol
        lo, hi = BOUNDS
        in_box = ((x_adv >= lo - tol) & (x_adv <= hi + tol)).flatten(1).all(dim=1)
        return inside & in_box

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point (per sample) inside the ball around x, clipped to the input bounds.

        Clipping to the box after the ball keeps the point in the ball: each coordinate only
        moves towards x, which is itself inside the box.
        """
        delta = x_adv - x
        eps = self._view(x)
        if self.norm == "linf":
            delta = torch.maximum(torch.minimum(delta, eps), -eps)
        else:
            size = _flat_norm(delta, "l2").view_as(eps)
            delta = delta * torch.clamp(eps / (size + _TINY), max=1.0)
        return (x + delta).clamp(*BOUNDS)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A point drawn uniformly from the ball around x (then clipped to the box)."""
        eps = self._view(x)
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * eps
        else:
            direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction / (_flat_norm(direction, "l2").view_as(eps) + _TINY)
            d = x[0].numel()
            r = torch.rand(eps.shape, generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
            delta = direction * r * eps
        return (x + delta).clamp(*BOUNDS)

    def normalize_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size in this norm."""
        if self.norm == "linf":
            return grad.sign()
        size = _flat_norm(grad, "l2").view(-1, *([1] * (grad.dim() - 1)))
        return grad / (size + _TINY)
