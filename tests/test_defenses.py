"""Preprocessing defenses (naive vs BPDA/EOT) and detectors, on the builtin digits model."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from harness.attacks import PGD, ThreatModel
from harness.defenses import detectors, preprocess  # noqa: F401  (registers the defenses)
from harness.defenses.detectors import AlibiDetector, MahalanobisDetector, auroc, evaluate_detector, threshold_at_fpr
from harness.defenses.preprocess import JPEG, BitDepth, GaussianNoise, Median, defended
from harness.defenses.registry import DEFENSES
from harness.core.errors import BadInput

PREPROCESSING = [n for n, cls in DEFENSES.items() if getattr(cls, "kind", None) == "preprocessing"]


def _images(n: int = 6, c: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> float:
    with torch.no_grad():
        return sum(float((model(x).argmax(dim=1) == y).float().mean()) for _ in range(draws)) / draws


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def test_registry_has_the_defenses():
    assert set(PREPROCESSING) == {"bit-depth", "jpeg", "median", "gaussian-noise"}
    assert {"mahalanobis", "alibi"} <= set(DEFENSES.names())
    for name in PREPROCESSING:
        assert DEFENSES.get(name).gradient in preprocess.GRADIENTS


# ---- transforms: the contract, over the registry ------------------------------------------------

@pytest.mark.parametrize("name", PREPROCESSING)
@pytest.mark.parametrize("channels", [1, 3])
def test_transform_keeps_shape_and_bounds(name, channels):
    defense = DEFENSES.get(name)()
    x = _images(c=channels)
    out = defense.transform(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert defense.approximation(x).shape == x.shape


@pytest.mark.parametrize("name", PREPROCESSING)
def test_randomness_is_as_declared(name):
    defense = DEFENSES.get(name)()
    x = _images()
    gen = torch.Generator().manual_seed(0)
    first, second = defense.transform(x, generator=gen), defense.transform(x, generator=gen)
    if defense.gradient == "random":
        assert not torch.equal(first, second)  # fresh draws per call
        again = defense.transform(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(first, again)  # and reproducible from the seed
    else:
        assert torch.equal(first, second)
        assert torch.equal(first, defense.transform(x))


def test_bit_depth_rounds_to_levels():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.8, 1.0]).view(1, 1, 2, 3)
    assert BitDepth(bits=1).transform(x).flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # 0.5 rounds to even
    out = BitDepth(bits=2).transform(x).flatten()
    assert torch.allclose(out * 3, (out * 3).round())  # levels 0, 1/3, 2/3, 1
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 2 / 3, 1.0]))  # 1.5 rounds to even: 2
    with pytest.raises(ValueError, match="bits"):
        BitDepth(bits=0)


def test_jpeg_is_a_real_lossy_round_trip(digits_test):
    x = digits_test[0][:16]
    low, high = JPEG(quality=10).transform(x), JPEG(quality=100).transform(x)
    assert not low.requires_grad
    err_low, err_high = float((low - x).abs().mean()), float((high - x).abs().mean())
    assert err_high < 0.01 < err_low  # quality 100 is nearly lossless, quality 10 is not
    with pytest.raises(ValueError, match="1 or 3 channels"):
        JPEG().transform(_images(c=2))


def test_median_removes_a_spike_and_keeps_a_constant():
    x = torch.full((1, 1, 5, 5), 0.25)
    assert torch.equal(Median(3).transform(x), x)
    x[0, 0, 2, 2] = 1.0
    assert torch.equal(Median(3).transform(x), torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="odd"):
        Median(kernel_size=2)


def test_median_gradient_is_exact():
    x = _images(n=2).requires_grad_(True)
    out = Median(3).transform(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # each output is one input passed through: the gradients count how often a pixel is chosen
    assert float(grad.sum()) == pytest.approx(out.numel())


# ---- the wrapper: naive, BPDA, EOT ---------------------------------------------------------------

def test_naive_jpeg_masks_gradients_and_bpda_passes_them(wrapped_digits, correct_digits):
    x, y = correct_digits[0][:8], correct_digits[1][:8]
    naive = _input_grad(defended(wrapped_digits, JPEG(), "naive"), x, y)
    assert float(naive.abs().max()) == 0.0  # masked, not a crash
    bpda = _input_grad(defended(wrapped_digits, JPEG(), "adaptive"), x, y)
    # straight-through: the gradient is the model's own, taken at the compressed input
    reference = _input_grad(wrapped_digits, JPEG().transform(x), y)
    torch.testing.assert_close(bpda, reference)
    assert float(reference.abs().max()) > 0


def test_naive_bit_depth_follows_autograd_to_zero(wrapped_digits, correct_digits):
    x, y = correct_digits[0][:8], correct_digits[1][:8]
    assert float(_input_grad(defended(wrapped_digits, BitDepth(3), "naive"), x, y).abs().max()) == 0.0
    assert float(_input_grad(defended(wrapped_digits, BitDepth(3), "adaptive"), x, y).abs().max()) > 0.0


@pytest.mark.parametrize("defense", [BitDepth(bits=3), JPEG(quality=75)], ids=["bit-depth", "jpeg"])
def test_non_differentiable_defense_looks_robust_naively_and_breaks_adaptively(defense, wrapped_digits, correct_digits):
    """The issue's test: gradient masking inflates a naive evaluation; BPDA removes it."""
    x, y = correct_digits[0][:200], correct_digits[1][:200]
    threat = ThreatModel("linf", 0.2)
    robust = {}
    for mode in ("naive", "adaptive"):
        adv = PGD(steps=20)(defended(wrapped_digits, defense, mode), x, y, threat, generator=torch.Generator().manual_seed(0))
        assert bool(threat.contains(adv, x).all())
        robust[mode] = _accuracy(defended(wrapped_digits, defense, mode), adv, y)
    clean = _accuracy(defended(wrapped_digits, defense, "adaptive"), x, y)
    assert clean >= 0.95
    assert robust["naive"] >= clean - 0.05  # zero gradients: PGD never leaves its random start
    assert robust["adaptive"] <= 0.2  # measured: bit-depth 0.095, jpeg 0.03
    assert robust["naive"] - robust["adaptive"] >= 0.7


def test_eot_breaks_randomized_defense_at_least_as_much(wrapped_digits, correct_digits):
    x, y = correct_digits[0][:200], correct_digits[1][:200]
    threat, noise = ThreatModel("linf", 0.2), GaussianNoise(sigma=0.2)
    robust = {}
    for mode in ("naive", "adaptive"):  # naive: one draw per gradient; adaptive: EOT over 8
        adv = PGD(steps=20)(defended(wrapped_digits, noise, mode), x, y, threat, generator=torch.Generator().manual_seed(0))
        # the deployed defense, the same draws for both: mean accuracy over 5 draws
        robust[mode] = _accuracy(defended(wrapped_digits, noise, "adaptive", seed=99), adv, y, draws=5)
    assert robust["adaptive"] <= robust["naive"] + 0.02  # measured: 0.41 vs 0.62
    assert robust["adaptive"] < _accuracy(defended(wrapped_digits, noise, "adaptive", seed=99), x, y, draws=5) - 0.3


def test_eot_wrapper_draws_once_without_grad_and_averages_with_grad(wrapped_digits, correct_digits):
    x = correct_digits[0][:5]
    noise, k = GaussianNoise(sigma=0.3), 4
    with torch.no_grad():
        single = defended(wrapped_digits, noise, "adaptive", eot=k, seed=7)(x)
        expected_single = wrapped_digits(noise.transform(x, generator=torch.Generator().manual_seed(7)))
        draws = noise.transform(x.repeat(k, 1, 1, 1), generator=torch.Generator().manual_seed(7))
        probs = torch.softmax(wrapped_digits(draws), dim=1).view(k, 5, -1)
    torch.testing.assert_close(single, expected_single)
    averaged = defended(wrapped_digits, noise, "adaptive", eot=k, seed=7)(x.clone().requires_grad_(True))
    assert averaged.requires_grad
    torch.testing.assert_close(torch.softmax(averaged, dim=1), probs.mean(dim=0))  # log of the mean probability
    assert not torch.allclose(torch.softmax(single, dim=1), probs.mean(dim=0), atol=1e-3)
    # naive mode draws once, gradient or not
    naive = defended(wrapped_digits, noise, "naive", eot=k, seed=7)(x.clone().requires_grad_(True))
    torch.testing.assert_close(naive.detach(), expected_single)


def test_wrapper_draws_are_reproducible_and_fresh(wrapped_digits, correct_digits):
    x = correct_digits[0][:5]
    a, b = (defended(wrapped_digits, GaussianNoise(0.3), "adaptive", seed=3) for _ in range(2))
    with torch.no_grad():
        a1, a2, b1 = a(x), a(x), b(x)
    assert torch.equal(a1, b1) and not torch.equal(a1, a2)


def test_wrapper_refuses_bad_arguments(wrapped_digits):
    with pytest.raises(ValueError, match="mode"):
        defended(wrapped_digits, JPEG(), "clever")
    with pytest.raises(ValueError, match="eot"):
        defended(wrapped_digits, GaussianNoise(), "adaptive", eot=0)
    with pytest.raises(ValueError, match="gradient"):
        defended(wrapped_digits, object(), "adaptive")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", PREPROCESSING)
def test_wrapper_runs_on_cuda(name, digits_model, correct_digits):
    import copy

    from harness.sources.models import BoundedModel

    model = BoundedModel(copy.deepcopy(digits_model)).to("cuda")  # the session's CPU model stays on the CPU
    x, y = correct_digits[0][:64], correct_digits[1][:64]
    defense = DEFENSES.get(name)()
    for mode in ("naive", "adaptive"):
        net = defended(model, defense, mode, seed=5)
        out = net(x.cuda().requires_grad_(True))
        assert out.device.type == "cuda" and out.shape == (64, 10)
        adv = PGD(steps=5)(net, x.cuda(), y.cuda(), ThreatModel("linf", 0.1), generator=torch.Generator(device="cuda").manual_seed(0))
        assert adv.device.type == "cuda" and bool(ThreatModel("linf", 0.1).contains(adv, x.cuda()).all())
        with torch.no_grad():
            again = defended(model, defense, mode, seed=5)
            torch.testing.assert_close(again(x.cuda()), defended(model, defense, mode, seed=5)(x.cuda()))  # seeded on the GPU too
    if defense.gradient != "random":  # the same transform on either device
        torch.testing.assert_close(defense.transform(x.cuda()).cpu(), defense.transform(x))


# ---- detectors -------------------------------------------------------------------------------------

class _Fixed:
    """A detector whose scores are given by hand: the row's first value."""

    kind = "detector"

    def fit(self, model, x, y=None):
        return self

    def score(self, model, x):
        return x[:, 0].clone()


def _col(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64).view(-1, 1)


def _evaluate_scores(clean, adv, fpr=0.05, calib=None):
    """The arithmetic on given scores; the threshold is set on `calib` (the clean scores themselves
    unless given, which is what these reference cases spell out)."""
    calib = clean if calib is None else calib
    return evaluate_detector(_Fixed(), nn.Identity(), _col(clean), None, _col(clean), _col(adv), fpr=fpr, x_calib=_col(calib))


def test_auroc_on_known_scores():
    assert _evaluate_scores([0, 1, 2, 3], [4, 5])["auroc"] == 1.0
    assert _evaluate_scores([4, 5], [0, 1, 2, 3])["auroc"] == 0.0
    assert _evaluate_scores([1, 1, 1], [1, 1])["auroc"] == 0.5  # all tied
    # by hand: adv 1 beats two clean scores and ties one (2.5), adv 3 beats all four: 6.5 / 8
    assert _evaluate_scores([0, 0, 1, 2], [1, 3])["auroc"] == pytest.approx(0.8125)
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0, 1.0, 2.0])) == pytest.approx(0.1875)


def test_auroc_matches_pairwise_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 6, (50,), generator=g).double(), torch.randint(2, 8, (30,), generator=g).double()
    pairs = (b[None, :] > a[:, None]).double() + 0.5 * (b[None, :] == a[:, None]).double()
    assert auroc(a, b) == pytest.approx(float(pairs.mean()))


def test_threshold_at_a_fixed_false_positive_rate():
    r = _evaluate_scores(list(range(100)), [96, 50, 99, 200], fpr=0.05)
    assert r["threshold"] == 94 and r["clean_fpr"] == 0.05  # 95..99 flagged
    assert r["detection_rate"] == 0.75 and (r["n_clean"], r["n_adv"]) == (100, 4)
    tied = _evaluate_scores([1.0] * 20, [1.0, 2.0], fpr=0.05)
    assert tied["clean_fpr"] == 0.0 and tied["detection_rate"] == 0.5  # ties stay below the threshold
    assert threshold_at_fpr(torch.arange(10.0), 0.0) == 9.0


def test_the_false_positive_rate_is_measured_on_points_the_threshold_never_saw():
    # the threshold comes from the calibration scores; the judged clean points sit higher, and the
    # rate they reach (not the target) is what is reported, with its Wilson interval
    r = _evaluate_scores([float(v) for v in range(50, 150)], [200.0, 0.0], fpr=0.05, calib=list(range(100)))
    assert r["threshold"] == 94 and r["n_false_positives"] == 55 and r["clean_fpr"] == 0.55
    assert r["clean_fpr_ci95"] == pytest.approx([0.452446, 0.643855], abs=1e-5)  # Wilson 55 of 100, by hand
    assert (r["n_detected"], r["n_adv"]) == (1, 2) and r["detection_rate_ci95"] == pytest.approx([0.094531, 0.905469], abs=1e-5)
    # without calibration points the clean inputs split: even positions set the threshold, odd ones are judged
    split = evaluate_detector(_Fixed(), nn.Identity(), None, None, _col(list(range(100))), _col([96, 50, 99, 200]), fpr=0.05)
    assert (split["n_calib"], split["n_clean"]) == (50, 50) and split["threshold"] == 94  # 98, 96 flagged of the evens
    assert split["n_false_positives"] == 3 and split["clean_fpr"] == 0.06  # 95, 97, 99 of the odds
    with pytest.raises(ValueError, match="judge"):
        evaluate_detector(_Fixed(), nn.Identity(), None, None, _col([1.0]), _col([2.0]))


def test_auroc_interval_of_a_detector_rests_on_both_counts():
    r = _evaluate_scores(list(range(20)), [float(v) for v in range(100, 120)])
    assert r["auroc"] == 1.0 and r["auroc_ci95"][1] == 1.0
    assert r["auroc_ci95"][0] == pytest.approx(0.899, abs=1e-3)  # perfect separation on 20 + 20 is not a point


def test_non_finite_scores_count_as_suspicious_and_are_counted():
    r = _evaluate_scores([0.0, 1.0, 2.0, 3.0], [float("nan"), 0.5, float("-inf")], fpr=0.25)
    assert r["n_nonfinite"] == 2 and r["threshold"] == 2.0
    assert r["detection_rate"] == pytest.approx(2 / 3)  # the two non-finite scores are flagged
    broken = _evaluate_scores([float("nan")] * 4, [float("nan")] * 2)
    assert broken["threshold"] is None and broken["detection_rate"] == 0.0 and broken["auroc"] == 0.5
    assert threshold_at_fpr(torch.arange(10.0), 1.0) < 0.0


def test_mahalanobis_distance_reference():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    y = torch.arange(2).repeat(4000)
    x = centres[y] + torch.randn(8000, 2, generator=g)  # unit covariance around each centre
    det = MahalanobisDetector(shrinkage=0.0).fit(nn.Identity(), x, y)
    s = det.score(nn.Identity(), torch.tensor([[0.0, 0.0], [10.0, 3.0], [5.0, 0.0], [0.0, -2.0]]))
    torch.testing.assert_close(s, torch.tensor([0.0, 3.0, 5.0, 2.0]), atol=0.1, rtol=0.05)


def test_mahalanobis_detects_pgd_examples(wrapped_digits, correct_digits):
    x, y = correct_digits
    fit, held = slice(0, None, 2), slice(1, None, 2)
    adv = PGD(steps=20)(wrapped_digits, x[held], y[held], ThreatModel("linf", 0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        broken = wrapped_digits(adv).argmax(dim=1) != y[held]
    assert int(broken.sum()) > 100
    r = evaluate_detector(MahalanobisDetector(), wrapped_digits, x[fit], y[fit], x[held], adv[broken], fpr=0.05)
    assert r["auroc"] > 0.75  # measured 0.86
    # measured on clean points the threshold never saw (0.073: 8 of 110), so only near the target
    lo, hi = r["clean_fpr_ci95"]
    assert r["n_clean"] == 110 and lo <= 0.05 <= hi and r["clean_fpr"] < 0.15
    assert r["detection_rate"] > 0.15  # measured 0.30, six times the false-positive rate
    unlabelled = evaluate_detector(MahalanobisDetector(), wrapped_digits, x[fit], None, x[held], adv[broken])
    assert unlabelled["auroc"] > 0.75  # the model's own predictions stand in for labels


def test_mahalanobis_refuses_to_score_unfitted(wrapped_digits, correct_digits):
    with pytest.raises(RuntimeError, match="fit"):
        MahalanobisDetector().score(wrapped_digits, correct_digits[0][:2])
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisDetector(shrinkage=1.5)


def test_alibi_missing_is_bad_input_naming_pip(monkeypatch):
    monkeypatch.setitem(sys.modules, "alibi_detect", None)  # as if not installed
    with pytest.raises(BadInput, match=r"pip install 'robustgate\[alibi\]'"):
        AlibiDetector()
    with pytest.raises(ValueError, match="method"):
        AlibiDetector(method="Nope")


def test_alibi_knn_detects_pgd_examples(wrapped_digits, correct_digits):
    pytest.importorskip("alibi_detect")
    x, y = correct_digits
    fit, held = slice(0, None, 2), slice(1, None, 2)
    adv = PGD(steps=20)(wrapped_digits, x[held], y[held], ThreatModel("linf", 0.3), generator=torch.Generator().manual_seed(0))
    r = evaluate_detector(AlibiDetector(method="KNN", options={"k": 5}), wrapped_digits, x[fit], y[fit], x[held], adv)
    lo, hi = r["clean_fpr_ci95"]
    assert r["auroc"] > 0.6 and lo <= 0.05 <= hi  # a rate measured on held-out clean points
    assert math.isfinite(r["threshold"])


def test_an_attack_that_knows_the_detector_evades_it(wrapped_digits, correct_digits):
    """Carlini & Wagner's point about detectors, measured: PGD that also descends the Mahalanobis score
    fools the model as often as plain PGD and is flagged far less often, at the same threshold."""
    from harness.evaluation.variants import adversarial_examples

    x, y = correct_digits
    fit, calib, judged = slice(0, None, 3), slice(1, None, 3), slice(2, None, 3)
    det = MahalanobisDetector().fit(wrapped_digits, x[fit], y[fit])
    scale = float(det.score(wrapped_digits, x[calib]).median())
    naive_adv, naive_broken, out = adversarial_examples(wrapped_digits, PGD(steps=20), x[judged], y[judged], "linf", 0.2, 0, 512)
    aware = detectors.DetectorAware(det.differentiable_score, scale=scale, steps=20)
    adv, broken, outside = adversarial_examples(wrapped_digits, aware, x[judged], y[judged], "linf", 0.2, 1, 512)
    # the harness's re-checks hold for it: inside the budget and the bounds, and broken by the model's own prediction
    assert outside == 0 and float((adv - x[judged]).abs().amax()) <= 0.2 + 1e-6 and 0.0 <= float(adv.min()) <= float(adv.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(broken, wrapped_digits(adv).argmax(dim=1) != y[judged])
    naive = evaluate_detector(det, wrapped_digits, None, None, x[judged], naive_adv[naive_broken], fpr=0.05, x_calib=x[calib])
    adaptive = evaluate_detector(det, wrapped_digits, None, None, x[judged], adv[broken], fpr=0.05, x_calib=x[calib])
    assert adaptive["n_adv"] >= naive["n_adv"] > 130  # 144 and 140 of 147 judged points
    assert naive["detection_rate"] > 0.3 and adaptive["detection_rate"] < 0.1  # measured 0.414 and 0.028
    assert adaptive["detection_rate_ci95"][1] < naive["detection_rate_ci95"][0]
    assert adaptive["auroc"] < 0.5 < naive["auroc"]  # measured 0.354 against 0.872: the adaptive examples look cleaner than clean


def test_an_example_outside_its_budget_is_not_counted_as_broken(wrapped_digits, correct_digits):
    from harness.evaluation.variants import adversarial_examples

    x, y = correct_digits[0][:8], correct_digits[1][:8]
    cheat = lambda model, xb, yb, threat, generator=None: torch.zeros_like(xb)  # noqa: E731  (far outside 0.1)
    adv, broken, outside = adversarial_examples(wrapped_digits, cheat, x, y, "linf", 0.1, 0, 4)
    assert outside == 8 and not bool(broken.any()) and torch.equal(adv, x)


def test_mahalanobis_differentiable_score_is_its_score_with_a_gradient(wrapped_digits, correct_digits):
    x, y = correct_digits
    det = MahalanobisDetector().fit(wrapped_digits, x[:200], y[:200])
    xs = x[200:210].clone().requires_grad_(True)
    s = det.differentiable_score(wrapped_digits, xs)
    torch.testing.assert_close(s.detach(), det.score(wrapped_digits, x[200:210]))
    (grad,) = torch.autograd.grad(s.sum(), xs)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
