"""Randomized smoothing against answers known in closed form: a constant classifier's radius, a
linear binary classifier's true class probability under noise and true distance to its boundary,
the exact binomial bounds, determinism by sample id, abstention at a tie, and the attack that tests
a certificate (it crosses a boundary it can reach and catches a radius that claims too much)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from harness.core.stats import binomial_two_sided_p, clopper_pearson_interval, clopper_pearson_lower, clopper_pearson_upper
from harness.defenses.smoothing import Certified, RandomizedSmoothing, noise_counts, point_seeds


class Constant(nn.Module):
    def __init__(self, cls: int = 3, k: int = 10) -> None:
        super().__init__()
        self.cls, self.k = cls, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), self.cls), self.k).float() * 5


class Halfspace(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, on flattened inputs: logits (0, w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


# --- exact binomial bounds ------------------------------------------------------------------------

def test_the_clopper_pearson_bounds_are_the_beta_quantiles():
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(0, 50, 0.05) == 0.0 and clopper_pearson_upper(50, 50, 0.05) == 1.0
    assert clopper_pearson_lower(37, 80, 0.01) == pytest.approx(beta.ppf(0.01, 37, 44), rel=1e-12)
    assert clopper_pearson_upper(37, 80, 0.01) == pytest.approx(beta.ppf(0.99, 38, 43), rel=1e-12)
    # the textbook case: 5 of 20, exact 95% interval [0.0866, 0.4910]
    lo, hi = clopper_pearson_interval(5, 20)
    assert (round(lo, 4), round(hi, 4)) == (0.0866, 0.4910)
    assert clopper_pearson_interval(0, 0) == (0.0, 1.0)
    got = clopper_pearson_lower(np.array([0, 10, 100]), 100, 0.05)
    assert got[0] == 0.0 and got[1] == pytest.approx(beta.ppf(0.05, 10, 91)) and got[2] == pytest.approx(0.05 ** 0.01)


def test_the_binomial_test_matches_scipy_and_coverage_holds():
    for k, n in [(60, 100), (50, 100), (70, 100), (3, 4), (0, 0)]:
        want = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
        assert binomial_two_sided_p(k, n) == pytest.approx(want, rel=1e-9)
    assert binomial_two_sided_p(7, 20, 0.2) == pytest.approx(binomtest(7, 20, 0.2).pvalue)
    # coverage of the one-sided lower bound at p = 0.9, n = 200, alpha = 0.05: exactly computable
    ks = np.arange(201)
    covered = clopper_pearson_lower(ks, 200, 0.05) <= 0.9
    assert binom.pmf(ks, 200, 0.9)[covered].sum() >= 0.95


# --- CERTIFY and PREDICT in closed form -------------------------------------------------------------

@pytest.mark.parametrize("sigma, n, alpha", [(0.25, 1000, 0.001), (0.5, 500, 0.01), (1.0, 10_000, 0.001)])
def test_a_constant_classifier_is_certified_to_sigma_times_the_normal_quantile_of_alpha_to_the_one_over_n(sigma, n, alpha):
    rs = RandomizedSmoothing(sigma=sigma, n0=10, n=n, alpha=alpha, batch=4000)
    x = torch.rand(3, 1, 4, 4)
    cert = rs.certify(Constant(), x, 10, [0, 1, 2], seed=0)
    want = sigma * norm.ppf(alpha ** (1 / n))
    assert cert.prediction.tolist() == [3, 3, 3]
    assert cert.radius.tolist() == pytest.approx([want] * 3, rel=1e-9)
    assert cert.top_count.tolist() == [n] * 3
    assert rs.predict(Constant(), x, 10, [0, 1, 2], seed=0).tolist() == [3, 3, 3]


def _halfspace_points(count: int, seed: int = 0) -> tuple[Halfspace, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    x = torch.rand(count, 1, 4, 4, generator=g)
    b = -float((x.flatten(1) @ w).median())  # the boundary through the middle of the points
    return Halfspace(w, b), x, w


def test_a_linear_classifier_is_never_certified_beyond_its_true_distance_to_the_boundary():
    """For f = sign(w.x + b), P(f(x + d) = f(x)) = Phi(|w.x + b| / (sigma ||w||)) exactly, and Cohen's
    radius with that true probability is the true distance |w.x + b| / ||w||. The certified radius
    (from a lower bound of the probability) may exceed the distance only where the bound fails, at
    rate at most alpha; and with n = 20,000 it comes close to the distance."""
    net, x, w = _halfspace_points(300)
    sigma, alpha, n = 0.5, 0.01, 20_000
    rs = RandomizedSmoothing(sigma=sigma, n0=50, n=n, alpha=alpha, batch=20_000)
    cert = rs.certify(net, x, 2, list(range(len(x))), seed=1)
    s = x.flatten(1) @ w + net.b
    distance = (s.abs() / w.norm()).double()
    p_true = torch.from_numpy(norm.cdf(distance.numpy() / sigma))
    truth = (s > 0).long()
    certified = cert.prediction >= 0
    assert bool((cert.prediction[certified] == truth[certified]).all())  # a wrong certified class: a failure too
    over = int((cert.radius[certified] > distance[certified] + 1e-12).sum())
    assert over <= binom.ppf(1 - 1e-4, int(certified.sum()), alpha), over
    assert int((cert.p_lower[certified] > p_true[certified]).sum()) == over  # the same event: the bound failed
    mid = certified & (p_true > 0.7) & (p_true < 0.99)
    assert int(mid.sum()) > 50
    ratio = cert.radius[mid] / distance[mid]
    assert float(ratio.median()) > 0.95 and float(ratio.min()) > 0.9  # measured: median 0.969, least 0.914


def test_the_noise_counts_of_a_point_depend_on_its_seed_and_not_on_its_neighbours():
    net, x, _ = _halfspace_points(6)
    seeds = point_seeds(0, range(6), "estimate")
    together = noise_counts(net, x, 0.5, 700, 2, seeds, batch=1400)
    alone = torch.cat([noise_counts(net, x[i:i + 1], 0.5, 700, 2, seeds[i:i + 1], batch=1400) for i in range(6)])
    assert torch.equal(together, alone) and together.sum(dim=1).tolist() == [700] * 6
    other = noise_counts(net, x, 0.5, 700, 2, point_seeds(1, range(6), "estimate"), batch=1400)
    assert not torch.equal(together, other)  # another seed, other draws


def test_a_points_certificate_is_the_same_alone_in_a_batch_and_under_any_batch_size_that_keeps_its_chunks():
    """n = 700 draws go in one chunk of 700 under batch 700, 1400 or 2800 (one, two or four points a
    pass): the counts, and so CERTIFY's answer, cannot change; the ids, not the positions, seed the draws."""
    net, x, _ = _halfspace_points(6, seed=3)
    seeds = point_seeds(0, [10, 11, 12, 13, 14, 15], "estimate")
    by_batch = [noise_counts(net, x, 0.5, 700, 2, seeds, batch=b) for b in (700, 1400, 2800)]
    assert torch.equal(by_batch[0], by_batch[1]) and torch.equal(by_batch[0], by_batch[2])
    rs = RandomizedSmoothing(sigma=0.5, n0=30, n=700, alpha=0.01, batch=2800)
    cert = rs.certify(net, x, 2, [10, 11, 12, 13, 14, 15], seed=0)
    assert torch.equal(cert.top_count, by_batch[0].gather(1, cert.prediction.clamp(min=0).unsqueeze(1)).squeeze(1)) or \
        bool((cert.prediction < 0).any())
    alone = [RandomizedSmoothing(sigma=0.5, n0=30, n=700, alpha=0.01, batch=700).certify(net, x[i:i + 1], 2, [10 + i], seed=0)
             for i in range(6)]
    assert torch.equal(cert.prediction, torch.cat([a.prediction for a in alone]))
    assert torch.equal(cert.radius, torch.cat([a.radius for a in alone]))
    shuffled = rs.certify(net, x.flip(0), 2, [15, 14, 13, 12, 11, 10], seed=0)
    assert torch.equal(shuffled.radius.flip(0), cert.radius)


def test_a_tie_abstains():
    """A classifier that answers by the sign of the first noise coordinate alone: a fair coin between
    two classes. PREDICT abstains (the binomial test cannot reject a tie) and CERTIFY abstains
    (p_lower < 1/2) at every point, far more often than alpha allows."""

    class Coin(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.flatten(1)[:, 0] - 0.5
            return torch.stack([s, -s], dim=1)

    x = torch.full((20, 1, 2, 2), 0.5)
    rs = RandomizedSmoothing(sigma=0.5, n0=50, n=1000, alpha=0.001, batch=4000)
    cert = rs.certify(Coin(), x, 2, list(range(20)), seed=0)
    assert cert.prediction.tolist() == [-1] * 20 and cert.radius.tolist() == [0.0] * 20
    assert rs.predict(Coin(), x, 2, list(range(20)), seed=0).tolist() == [-1] * 20
    both, predicted = rs.certify_and_predict(Coin(), x, 2, list(range(20)), seed=0)
    assert torch.equal(both.prediction, cert.prediction) and predicted.tolist() == [-1] * 20


# --- the attack that tests a certificate ----------------------------------------------------------

def test_the_attack_crosses_a_linear_boundary_within_reach_and_stays_in_its_budget():
    net, x, w = _halfspace_points(40, seed=2)
    s = x.flatten(1) @ w + net.b
    distance = s.abs() / w.norm()
    y = (s > 0).long()
    rs = RandomizedSmoothing(sigma=0.25, n0=50, n=2000, alpha=0.001, attack_steps=20, attack_eot=8, check_n=500, batch=4000)
    radius = float(distance.median())
    adv = rs.attack(net, x, y, radius, list(range(40)), seed=0)
    moved = (adv - x).flatten(1).norm(dim=1)
    assert float(moved.max()) <= radius + 1e-5 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    cert = rs.certify(net, x, 2, list(range(40)), seed=0)
    emp = rs.empirical(net, x, y, cert, radius, list(range(40)), seed=0)
    near = distance < 0.5 * radius  # well within reach: the smoothed class at the attacked point flips
    assert int(near.sum()) >= 5 and not bool(emp.robust[near].any())
    assert int(emp.violation.sum()) == 0  # a sound certificate: no attacked point contradicts it
    # a certificate that claims three times the radius it proved is contradicted at the points it over-claims
    bold = Certified(cert.prediction, cert.radius * 3 + (cert.prediction >= 0) * radius, cert.p_lower, cert.top_count)
    caught = rs.empirical(net, x, y, bold, radius, list(range(40)), seed=0)
    assert int(caught.violation.sum()) >= int(near.sum()) - 1


def test_a_point_whose_certified_clean_class_is_wrong_is_not_robust_and_a_sound_radius_is_not_violated():
    """A constant classifier (class 3 everywhere): at any attacked point all check draws say 3, so with
    y = 3 every point is robust and, p_y being 1, never a violation at a radius inside the certified
    sigma * Phi^-1(alpha ** (1 / n)). A certificate naming class 7 makes its clean class wrong: not robust."""
    rs = RandomizedSmoothing(sigma=0.25, n0=10, n=1000, alpha=0.001, attack_steps=3, attack_eot=4, check_n=200, batch=4000)
    x, y = torch.rand(5, 1, 4, 4), torch.full((5,), 3)
    cert = rs.certify(Constant(), x, 10, range(5), seed=0)
    r = 0.25 * norm.ppf(0.001 ** (1 / 1000))  # 0.6465...
    emp = rs.empirical(Constant(), x, y, cert, 0.9 * r, range(5), seed=0)
    assert emp.robust.tolist() == [True] * 5 and emp.violation.tolist() == [False] * 5
    wrong = Certified(torch.full((5,), 7), cert.radius, cert.p_lower, cert.top_count)
    assert rs.empirical(Constant(), x, y, wrong, 0.9 * r, range(5), seed=0).robust.tolist() == [False] * 5


@pytest.mark.parametrize("knob, value", [("sigma", 0), ("sigma", -1.0), ("n0", 0), ("n", 0), ("alpha", 0.6), ("alpha", 0.0),
                                         ("batch", 0), ("attack_steps", 0), ("check_n", True)])
def test_a_bad_knob_is_refused_by_name(knob, value):
    with pytest.raises(ValueError, match=knob):
        RandomizedSmoothing(**{knob: value})


def test_the_paper_default_and_its_large_n_are_allowed():
    assert RandomizedSmoothing().n == 10_000 and RandomizedSmoothing().n0 == 100 and RandomizedSmoothing().alpha == 0.001
    assert RandomizedSmoothing(n=100_000).n == 100_000
    assert math.isfinite(RandomizedSmoothing(sigma=1.0).sigma)
