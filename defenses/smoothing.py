"""Randomized smoothing: an L2 certificate that holds for any base classifier.

The smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), is robust within
sigma * Phi^-1(p_A) of x when its top class has probability p_A (Cohen, Rosenfeld & Kolter 2019,
"Certified Adversarial Robustness via Randomized Smoothing", https://arxiv.org/abs/1902.02918). p_A
is estimated by Monte Carlo, so every answer holds with probability at least 1 - alpha:

- CERTIFY: n0 draws choose the class, n further draws bound its probability from below (one-sided
  Clopper-Pearson); below 1/2 it abstains.
- PREDICT: n draws; the top class is returned when a two-sided binomial test of the top two counts
  rejects a tie at level alpha, else it abstains. It reuses CERTIFY's estimation draws: each
  procedure's guarantee concerns its own draws alone.

The certificate is then tested against an attack on the smoothed classifier (Salman et al. 2019,
"Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers": L2 PGD on the
soft smoothed classifier with EOT through the noise): a point certified at radius r whose attacked
point's class probability is, with confidence, below what the certificate implies is a violation.

Noise is added in [0, 1] input space (the model owns its normalization) and never clipped, as in
the paper. Each point's draws come from its own generator, seeded from the run's seed and the
sample's id, so a point's answer does not depend on which points share its batch. Example::

    rs = RandomizedSmoothing(sigma=0.25, n=10_000, alpha=0.001)
    cert = rs.certify(model, x, num_classes=10, ids=range(len(x)), seed=0)
    certified = (cert.prediction == y) & (cert.radius >= 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from harness.attacks.privacy import derived_seed
from harness.attacks.threat import ThreatModel
from harness.core.stats import binomial_two_sided_p, clopper_pearson_lower, clopper_pearson_upper

from .registry import CERTIFICATES

__all__ = ["RandomizedSmoothing", "Certified", "Empirical", "noise_counts", "point_seeds"]


@dataclass(frozen=True)
class Certified:
    """CERTIFY's answer per point: the class (-1: abstain), the L2 radius (0 where it abstains), the
    lower confidence bound of the class's probability, and the estimation draws that voted for it."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    top_count: torch.Tensor


@dataclass(frozen=True)
class Empirical:
    """The attack on the smoothed classifier at one radius, per point: whether the smoothed
    classifier still gives the label at the attacked point (False where CERTIFY's clean class is
    already wrong), whether that contradicts the certificate with confidence, and the L2 distance
    the attack moved."""

    robust: torch.Tensor
    violation: torch.Tensor
    distance: torch.Tensor


def point_seeds(seed: int, ids: Sequence[int], stream: str) -> list[int]:
    """One seed per point for one stream of draws ("select", "estimate", "predict", "attack", "check")."""
    return [derived_seed(seed, "smoothing", stream, int(i)) for i in ids]


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def noise_counts(model, x: torch.Tensor, sigma: float, num: int, num_classes: int, seeds: Sequence[int],
                 batch: int) -> torch.Tensor:
    """(B, K) counts of the base classifier's class over `num` Gaussian draws per point.

    A point's draws come from its own generator in chunks of min(num, batch), and points share a
    forward pass up to `batch` images: its counts depend on its seed, sigma, num and batch only."""
    assert x.dim() >= 2 and len(seeds) == len(x), (tuple(x.shape), len(seeds))
    counts = torch.zeros(len(x), num_classes, dtype=torch.long, device=x.device)
    if len(x) == 0 or num <= 0:
        return counts
    gens = _generators(seeds, x.device)
    chunk = min(num, batch)
    per_pass = max(1, batch // chunk)
    with torch.no_grad():
        for start in range(0, len(x), per_pass):
            rows = range(start, min(start + per_pass, len(x)))
            left = num
            while left > 0:
                take = min(chunk, left)
                noisy = torch.cat([x[i].unsqueeze(0) + sigma * torch.randn((take, *x.shape[1:]), generator=gens[i], device=x.device,
                                                                           dtype=x.dtype) for i in rows])
                votes = model(noisy).argmax(dim=1).view(len(rows), take)
                counts[start:start + len(rows)] += F.one_hot(votes, num_classes).sum(dim=1)
                left -= take
    return counts


@CERTIFICATES.register("randomized-smoothing")
@dataclass(frozen=True)
class RandomizedSmoothing:
    """Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): CERTIFY and PREDICT of the smoothed
    classifier under N(0, `sigma`^2) noise, with the per-point failure probability `alpha`.

    Norm: L2. `n0` draws select the class, `n` estimate its probability (10,000 by default; the
    paper's 100,000 allowed), `batch` images per forward pass. The soundness attack: `attack_steps`
    of L2 PGD with `attack_eot` draws per gradient, judged with `check_n` draws. Example::

        certificates: [{name: randomized-smoothing, sigma: 0.25, radii: [0.25, 0.5]}]
    """

    sigma: float = 0.25
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    batch: int = 1000
    attack_steps: int = 20
    attack_eot: int = 16
    check_n: int = 1000

    kind: ClassVar[str] = "certificate"
    norm: ClassVar[str] = "l2"
    default_id: ClassVar[str] = "smoothing"

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not 0 < self.sigma < math.inf:
            raise ValueError(f"sigma must be a positive number, got {self.sigma!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha!r}")
        limits = {"n0": (1, 1_000_000), "n": (1, 1_000_000), "batch": (1, 10_000_000), "attack_steps": (1, 10_000),
                  "attack_eot": (1, 10_000), "check_n": (1, 1_000_000)}
        for name, (lo, hi) in limits.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

    def certify(self, model, x: torch.Tensor, num_classes: int, ids: Sequence[int], seed: int) -> Certified:
        """CERTIFY on every point of x (B, C, H, W) in [0, 1]."""
        return self._certified(self._counts(model, x, num_classes, ids, seed, "select", self.n0),
                               self._counts(model, x, num_classes, ids, seed, "estimate", self.n), x.device)

    def predict(self, model, x: torch.Tensor, num_classes: int, ids: Sequence[int], seed: int) -> torch.Tensor:
        """PREDICT on every point: the smoothed class, or -1 where a tie cannot be ruled out at level alpha.
        Its n draws are CERTIFY's estimation draws (each procedure's guarantee is about its own draws
        alone, so the two may share them; `certify_and_predict` pays for them once)."""
        return self._predicted(self._counts(model, x, num_classes, ids, seed, "estimate", self.n))

    def certify_and_predict(self, model, x: torch.Tensor, num_classes: int, ids: Sequence[int], seed: int) -> tuple[Certified, torch.Tensor]:
        """certify and predict, as each alone would answer, from one set of estimation draws."""
        counts = self._counts(model, x, num_classes, ids, seed, "estimate", self.n)
        return self._certified(self._counts(model, x, num_classes, ids, seed, "select", self.n0), counts, x.device), self._predicted(counts)

    def _counts(self, model, x: torch.Tensor, num_classes: int, ids: Sequence[int], seed: int, stream: str, num: int) -> torch.Tensor:
        return noise_counts(model, x, self.sigma, num, num_classes, point_seeds(seed, ids, stream), self.batch)

    def _certified(self, select: torch.Tensor, counts: torch.Tensor, device: torch.device) -> Certified:
        top = select.argmax(dim=1)
        k = counts.gather(1, top.unsqueeze(1)).squeeze(1)
        p_lower = torch.as_tensor(clopper_pearson_lower(k.cpu().numpy(), self.n, self.alpha), dtype=torch.float64).reshape(-1)
        certified = p_lower >= 0.5
        z = torch.special.ndtri(p_lower.clamp(min=0.5))  # Phi^-1, in float64
        radius = torch.where(certified, self.sigma * z, torch.zeros_like(z))
        prediction = torch.where(certified.to(device), top, torch.full_like(top, -1))
        return Certified(prediction, radius.to(device), p_lower.to(device), k)

    def _predicted(self, counts: torch.Tensor) -> torch.Tensor:
        top2 = counts.topk(min(2, counts.shape[1]), dim=1)
        n_a = top2.values[:, 0]
        n_b = top2.values[:, 1] if counts.shape[1] > 1 else torch.zeros_like(n_a)
        p = torch.as_tensor(binomial_two_sided_p(n_a.cpu().numpy(), (n_a + n_b).cpu().numpy(), 0.5), device=counts.device).reshape(-1)
        return torch.where(p <= self.alpha, top2.indices[:, 0], torch.full_like(n_a, -1))

    def attack(self, model, x: torch.Tensor, y: torch.Tensor, radius: float, ids: Sequence[int], seed: int) -> torch.Tensor:
        """L2 PGD at `radius` on the smoothed soft classifier: ascends -log of the mean softmax of the
        label over `attack_eot` noise draws; keeps each point's iterate with the lowest such mean."""
        assert y.shape == (len(x),), (tuple(x.shape), tuple(y.shape))
        if radius <= 0 or len(x) == 0:
            return x.clone()
        threat = ThreatModel("l2", float(radius))
        gens = _generators(point_seeds(seed, ids, "attack"), x.device)
        step = 2.5 * float(radius) / self.attack_steps
        per_pass = max(1, self.batch // self.attack_eot)
        out = x.clone()
        for start in range(0, len(x), per_pass):
            rows = slice(start, min(start + per_pass, len(x)))
            xb, yb, gb = x[rows], y[rows], gens[rows]
            adv, best, best_p = xb.clone(), xb.clone(), torch.full((len(xb),), math.inf, device=x.device)
            for _ in range(self.attack_steps + 1):
                adv.requires_grad_(True)
                noise = torch.stack([self.sigma * torch.randn((self.attack_eot, *xb.shape[1:]), generator=g, device=x.device,
                                                              dtype=x.dtype) for g in gb])
                with torch.enable_grad():
                    noisy = (adv.unsqueeze(1) + noise).flatten(0, 1)
                    probs = F.softmax(model(noisy).float(), dim=1).view(len(xb), self.attack_eot, -1).mean(dim=1)
                    p_y = probs.gather(1, yb.unsqueeze(1)).squeeze(1)
                    loss = -torch.log(p_y.clamp_min(1e-12)).sum()
                    # a model whose logits ignore the input (a constant one) gives no gradient: nothing to ascend
                    grad = torch.autograd.grad(loss, adv, allow_unused=True)[0] if loss.requires_grad else None
                    grad = torch.zeros_like(adv) if grad is None else grad
                with torch.no_grad():
                    better = p_y.detach() < best_p
                    best[better], best_p[better] = adv.detach()[better], p_y.detach()[better]
                    adv = threat.project(adv.detach() + step * threat.normalize_grad(grad), xb)
            out[rows] = best
        return out

    def empirical(self, model, x: torch.Tensor, y: torch.Tensor, cert: Certified, radius: float, ids: Sequence[int],
                  seed: int) -> Empirical:
        """The attack at `radius`, then the smoothed classifier at the attacked points (`check_n` draws)."""
        num_classes = int(model(x[:1]).shape[1]) if len(x) else 1
        adv = self.attack(model, x, y, radius, ids, seed)
        distance = (adv - x).flatten(1).double().norm(dim=1) if len(x) else torch.zeros(0, dtype=torch.float64)
        if bool((distance > radius + 1e-6).any()):
            raise RuntimeError(f"the attack on the smoothed classifier left its L2 budget {radius} ({float(distance.max()):.6f})")
        counts = noise_counts(model, adv, self.sigma, self.check_n, num_classes, point_seeds(seed, ids, "check"), self.batch)
        # x itself lies in the ball: where CERTIFY's confident clean class is already wrong the point is
        # not robust, whatever the attacked point's draws say
        clean_wrong = (cert.prediction >= 0) & (cert.prediction != y)
        robust = (counts.argmax(dim=1) == y) & ~clean_wrong
        k_y = counts.gather(1, y.unsqueeze(1)).squeeze(1)
        upper = torch.tensor(clopper_pearson_upper(k_y.cpu().numpy(), self.check_n, self.alpha), dtype=torch.float64, device=x.device)
        # the least probability of y at distance d that a radius R claims: Phi((R - d) / sigma), which is
        # Phi(Phi^-1(p_lower) - d / sigma) for the radius CERTIFY computes, and at least 1/2 inside it
        implied = torch.special.ndtr((cert.radius.double() - distance) / self.sigma)
        certified = (cert.prediction == y) & (cert.radius >= radius)
        return Empirical(robust, certified & (upper < implied), distance)
