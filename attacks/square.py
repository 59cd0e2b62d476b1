"""Square Attack: score-based black-box random search over square-shaped updates."""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import ATTACKS, check_batch
from .gradient import LOSSES, per_sample_loss, succeeded
from .threat import ThreatModel

__all__ = ["Square", "p_schedule"]

_TINY = 1e-12
# The reference halves p after these iterations of a 10,000-iteration run; a run of another
# length visits the same fractions of its own budget (AutoAttack's ``resc_schedule``).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the pixels a square covers at iteration ``it`` of ``n_iters``."""
    scaled = int(it / n_iters * 10000)
    return p_init / 2 ** bisect.bisect_left(_HALVINGS, scaled)


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def _signs(shape: tuple[int, ...], g: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g, device=like.device).to(like.dtype) * 2 - 1


def _windows(n: int, h: int, w: int, s: int, g: Optional[torch.Generator], device: torch.device):
    """One s x s window per sample at a uniform position: a (n, 1, h, w) mask and its corner."""
    top = torch.randint(0, h - s + 1, (n,), generator=g, device=device)
    left = torch.randint(0, w - s + 1, (n,), generator=g, device=device)
    rows = torch.arange(h, device=device)[None] - top[:, None]  # (n, h): row inside the window
    cols = torch.arange(w, device=device)[None] - left[:, None]
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    return inside[:, None], rows.clamp(0, s - 1), cols.clamp(0, s - 1)


def _bump(a: int, b: int, device: torch.device) -> torch.Tensor:
    """Nested rectangles around the centre of an a x b patch, the k-th weighted 1/(k+1)^2, unit norm.

    A pixel at Chebyshev distance d from the centre lies in rectangles d..K, so its value is a
    tail sum of the weights: a discrete stand-in for a Gaussian bump.
    """
    if a == 0 or b == 0:
        return torch.zeros(a, b, device=device)
    d = torch.maximum((torch.arange(a, device=device) - a // 2).abs()[:, None],
                      (torch.arange(b, device=device) - b // 2).abs()[None, :])
    weights = 1.0 / (torch.arange(max(a // 2, b // 2) + 1, device=device, dtype=torch.float64) + 1) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)
    bump = tail[d]
    return (bump / bump.norm()).float()


@functools.lru_cache(maxsize=32)  # a handful of sizes per run, rebuilt otherwise at every query
def _eta(s: int, device: torch.device) -> torch.Tensor:
    """The reference's L2 update: a positive bump over a negative one, unit norm, (s, s)."""
    eta = torch.cat([_bump(s // 2, s, device), -_bump(s - s // 2, s, device)])
    return eta / eta.norm()


@ATTACKS.register("square")
@dataclass(frozen=True)
class Square:
    """Square Attack (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049).

    Score-based black-box: it reads only the model's outputs, under ``torch.no_grad``. Each query
    changes one random square window per sample and keeps it only if the loss improves (margin
    by default, or ``ce``). The window covers a fraction p of the pixels, halved on the
    reference's schedule rescaled to ``queries`` (see :func:`p_schedule`). ``p_init`` is 0.8 for
    both norms, as AutoAttack runs it and as the reference runs adversarially trained MNIST; the
    reference's defaults for standard models, 0.05 (linf) and 0.1 (l2), were set on 224-299 px
    ImageNet, where 5% of the pixels is still a large square (on 8 x 8 digits p_init between
    0.05 and 0.8 moved robust accuracy by at most 0.03).

    Norms: linf (vertical-stripes start, windows set to +-epsilon per channel) and l2 (the
    reference's grid of bumps as start; a window takes a fresh bump plus its old content, the
    budget freed by zeroing a second window, then the whole perturbation is rescaled to
    epsilon). ``queries`` counts every forward pass a sample takes part in, the start included;
    a sample leaves the batch as soon as it is misclassified. Example::

        x_adv = Square(queries=1000)(model, x, y, ThreatModel("linf", 0.1), generator=g)
    """

    queries: int = 5000
    p_init: float = 0.8
    loss: str = "margin"

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True
    access: ClassVar[str] = "black-box"

    def __post_init__(self) -> None:
        if self.queries < 1:
            raise ValueError(f"queries must be at least 1, got {self.queries}")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_batch(x, y)
        assert x.dim() == 4, f"the square attack needs images (n, C, H, W), got {tuple(x.shape)}"
        with torch.no_grad():
            return self._run(model, x.detach(), y, threat, generator, target)

    def _run(self, model, x, y, threat: ThreatModel, g, target) -> torch.Tensor:
        best = x.clone()
        # A zero budget has nothing to search: those samples take no query at all.
        idx = (threat.per_sample(x) > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return best
        xs, ys, th = x[idx], y[idx], threat.subset(idx)
        ts = None if target is None else target[idx]
        eps = _view(th.per_sample(xs), xs)
        n, c, h, w = xs.shape

        if threat.norm == "linf":
            x_best = (xs + eps * _signs((n, c, 1, w), g, xs)).clamp(0, 1)
        else:
            x_best = xs + eps * _unit(self._l2_start(xs, g))
        x_best = th.project(x_best, xs)
        logits = model(x_best)
        best_loss = per_sample_loss(logits, ys, self.loss, ts)
        fooled = succeeded(logits, ys, ts)

        step = self._linf_step if threat.norm == "linf" else self._l2_step
        for it in range(1, self.queries):
            if bool(fooled.any()):
                best[idx[fooled]] = x_best[fooled]
                keep = ~fooled
                if not bool(keep.any()):
                    return best
                idx, xs, ys, x_best, best_loss, eps = (t[keep] for t in (idx, xs, ys, x_best, best_loss, eps))
                th = th.subset(keep)
                ts = None if ts is None else ts[keep]
            p = p_schedule(self.p_init, it - 1, self.queries)
            x_new = th.project(step(xs, x_best, eps, p, g), xs)
            logits = model(x_new)
            loss = per_sample_loss(logits, ys, self.loss, ts)
            fooled = succeeded(logits, ys, ts)
            improve = fooled | (loss > best_loss)
            x_best = torch.where(_view(improve, xs), x_new, x_best)
            best_loss = torch.where(improve, loss, best_loss)
        best[idx] = x_best
        return best

    @staticmethod
    def _side(p: float, h: int, w: int, smallest: int) -> int:
        return min(max(int(round(math.sqrt(p * h * w))), smallest), h, w)

    def _linf_step(self, xs, x_best, eps, p, g) -> torch.Tensor:
        n, c, h, w = xs.shape
        inside, _, _ = _windows(n, h, w, self._side(p, h, w, 1), g, xs.device)
        signs = _signs((n, c, 1, 1), g, xs)
        cand = torch.where(inside, (xs + eps * signs).clamp(0, 1), x_best)
        # A window already at these signs would spend a query on the same point. The reference
        # redraws until something changes; flipping every channel is one such draw (the only
        # one for grey images) and needs no loop.
        same = (cand == x_best).flatten(1).all(dim=1)
        signs = torch.where(_view(same, xs), -signs, signs)
        return torch.where(inside, (xs + eps * signs).clamp(0, 1), x_best)

    def _l2_start(self, xs, g) -> torch.Tensor:
        """A grid of s x s bumps (s = side / 5), each with a random sign per channel."""
        n, c, h, w = xs.shape
        s = max(min(h, w) // 5, 1)
        rows, cols = h // s, w // s
        eta = _eta(s, xs.device)
        grid = eta.repeat(rows, cols)[None, None] * _signs((n, c, rows, cols), g, xs).repeat_interleave(
            s, dim=2).repeat_interleave(s, dim=3)
        delta = torch.zeros_like(xs)
        top, left = (h - rows * s) // 2, (w - cols * s) // 2  # centred, as in the reference
        delta[:, :, top:top + rows * s, left:left + cols * s] = grid
        return delta

    def _l2_step(self, xs, x_best, eps, p, g) -> torch.Tensor:
        n, c, h, w = xs.shape
        s = self._side(p, h, w, 3)
        s = s + 1 if s % 2 == 0 and s < min(h, w) else s  # odd, so the bump has a centre pixel
        win1, r1, c1 = _windows(n, h, w, s, g, xs.device)
        win2, _, _ = _windows(n, h, w, s, g, xs.device)
        delta = x_best - xs
        both = win1 | win2
        old = torch.where(win1, delta, 0.0)
        old = old / (_hw_norm(old) + _TINY)
        # Per sample the bump may be transposed; its content is pasted at the window's corner.
        eta = _eta(s, xs.device)
        eta = torch.where(_signs((n, 1, 1), g, xs) > 0, eta, eta.T)
        bump = torch.where(win1, eta[torch.arange(n, device=xs.device)[:, None, None], r1[:, :, None],
                                     c1[:, None, :]][:, None], 0.0)
        new = bump * _signs((n, c, 1, 1), g, xs) + old
        # The window gets what it held in both windows, plus the budget still unused (shared
        # across channels), so the final rescaling to epsilon mostly moves mass into it.
        unused = (eps ** 2 - _flat_sq(delta)).clamp_min(0) / c
        size = (unused + _hw_norm(torch.where(both, delta, 0.0)) ** 2).sqrt()
        new = new / (_hw_norm(new) + _TINY) * size
        delta = torch.where(win1, new, torch.where(win2, 0.0, delta))
        return (xs + eps * _unit(delta)).clamp(0, 1)


def _hw_norm(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()


def _flat_sq(t: torch.Tensor) -> torch.Tensor:
    return _view(t.flatten(1).pow(2).sum(1), t)


def _unit(delta: torch.Tensor) -> torch.Tensor:
    return delta / (_flat_sq(delta).sqrt() + _TINY)
