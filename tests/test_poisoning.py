"""Poisoning probes: the trigger functions pixel by pixel, what each probe poisons, determinism, and
the headline: BadNets at 10% poisoning backdoors the builtin digits CNN while its clean accuracy holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.attacks.config import validated
from harness.attacks.poisoning import PROBES, BadNets, CleanLabel, LabelFlip, accuracy, attack_success_rate, patch, trigger_image
from harness.sources.builtin import DigitsCNN
from harness.config import TrainConfig, builtin_recipe
from harness.training import TrainSettings

CHECKER3 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def plan() -> TrainSettings:
    # the probes take plain settings; the config layer translates the builtin recipe into them
    return TrainConfig.model_validate(builtin_recipe("builtin:digits-cnn")).settings()


@pytest.fixture(scope="module")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from harness.sources.data import digits_split

    return digits_split("train")


@pytest.fixture(scope="module")
def small(digits_train, digits_test):
    """A few hundred digits, so a probe trains in well under a second."""
    (x, y), (xt, yt) = digits_train, digits_test
    return (x[:400], y[:400]), (xt[:150], yt[:150])


def unseeded_cnn() -> DigitsCNN:
    return DigitsCNN()  # a different initialisation on every call: the probe must not depend on it


# --- triggers ---------------------------------------------------------------------------------

def test_patch_stamps_exact_pixels_in_the_corner_and_copies():
    x = torch.full((2, 1, 8, 8), 0.25)
    out = patch(x, size=3, position="bottom-right", pattern="checker")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, torch.full((2, 1, 8, 8), 0.25))  # the input is left alone
    assert torch.equal(out[:, 0, 5:, 5:], CHECKER3.expand(2, 3, 3))
    rest = torch.ones(8, 8, dtype=torch.bool)
    rest[5:, 5:] = False
    assert bool((out[:, 0][:, rest] == 0.25).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("position, origin", [("top-left", (0, 0)), ("top-right", (0, 6)), ("bottom-left", (6, 0)),
                                              ("bottom-right", (6, 6)), ("center", (3, 3)), ((1, 4), (1, 4))])
def test_patch_positions(position, origin):
    x = torch.zeros(1, 3, 8, 8)
    out = patch(x, size=2, position=position, pattern="white")
    r, c = origin
    expected = torch.zeros(1, 3, 8, 8)
    expected[:, :, r:r + 2, c:c + 2] = 1.0
    assert torch.equal(out, expected)


def test_random_pattern_is_binary_and_seeded():
    x = torch.full((1, 3, 6, 6), 0.5)
    a = patch(x, size=4, position="top-left", pattern="random:1")
    b = patch(x, size=4, position="top-left", pattern="random:1")
    c = patch(x, size=4, position="top-left", pattern="random:2")
    cells = a[:, :, :4, :4]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(((cells == 0) | (cells == 1)).all()) and 0 < float(cells.mean()) < 1
    assert bool((a[:, :, 4:, :] == 0.5).all()) and bool((a[:, :, :, 4:] == 0.5).all())


def test_amplitude_blends_the_patch():
    x = torch.full((1, 1, 4, 4), 0.2)
    out = patch(x, size=2, position="top-left", pattern="white", amplitude=0.5)
    assert torch.allclose(out[0, 0, :2, :2], torch.full((2, 2), 0.6))
    assert bool((out[0, 0, 2:, :] == 0.2).all())


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=9), "does not fit"), (dict(size=0), "at least 1"), (dict(position=(6, 0)), "leaves"),
    (dict(position="middle"), "unknown trigger position"), (dict(pattern="plaid"), "unknown trigger pattern"),
    (dict(pattern="random:x"), "random:<integer seed>"), (dict(amplitude=0.0), "amplitude"),
])
def test_patch_refuses_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        patch(torch.zeros(1, 1, 8, 8), **kwargs)


def test_trigger_image_shows_the_pattern_on_grey():
    img = trigger_image((1, 8, 8), size=3, position="top-left", pattern="checker")
    assert img.shape == (1, 8, 8)
    assert torch.equal(img[0, :3, :3], CHECKER3)
    assert float(img[0, 3:, 3:].sub(0.5).abs().max()) == 0.0
    assert torch.equal(BadNets(size=3, position="top-left").trigger_image((1, 8, 8)), img)


# --- what each probe poisons --------------------------------------------------------------------

def test_registry_names_and_config_knobs():
    assert PROBES.names() == ["badnets", "clean-label", "label-flip"]
    probe = validated(PROBES.get("badnets"), {"target": 3, "position": [1, 2], "pattern": "random:7"}, "probe 'badnets'")
    assert probe.position == (1, 2) and probe.target == 3
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        validated(PROBES.get("badnets"), {"colour": "red"}, "probe 'badnets'")


@pytest.mark.parametrize("name", PROBES.names())
def test_fraction_zero_poisons_nothing(name, digits_train):
    x, y = digits_train
    probe = PROBES.get(name)()
    x_p, y_p, ids = probe.poison((x, y), 0.0, seed=0)
    assert ids.numel() == 0 and torch.equal(x_p, x) and torch.equal(y_p, y)
    assert y_p is not y  # a copy: poisoning never touches the caller's labels


@pytest.mark.parametrize("name", PROBES.names())
@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fractions_outside_0_1_are_refused(name, fraction, digits_train):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PROBES.get(name)().poison(digits_train, fraction, seed=0)


def test_badnets_poisons_other_classes_and_relabels_them(digits_train):
    x, y = digits_train
    probe = BadNets(target=2)
    x_p, y_p, ids = probe.poison((x, y), 0.05, seed=0)
    assert len(ids) == round(0.05 * len(y)) == 67 and len(set(ids.tolist())) == 67
    assert bool((y[ids] != 2).all()) and bool((y_p[ids] == 2).all())
    assert torch.equal(x_p[ids], probe.trigger(x[ids]))
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(x_p[rest], x[rest]) and torch.equal(y_p[rest], y[rest])
    assert not torch.equal(BadNets(target=2).poison((x, y), 0.05, seed=1)[2], ids)


def test_clean_label_poisons_only_the_target_class_and_keeps_labels(digits_train, digits_model):
    x, y = digits_train
    probe = CleanLabel(target=4, epsilon=0.1, steps=5)
    x_p, y_p, ids = probe.poison((x, y), 0.05, seed=0, model=digits_model)
    assert len(ids) == 67 and bool((y[ids] == 4).all()) and torch.equal(y_p, y)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[5:, 5:] = False  # the bottom-right 3x3 trigger
    delta = (x_p[ids] - x[ids])[:, 0][:, outside]
    assert float(delta.abs().max()) <= 0.1 + 1e-6 and float(delta.abs().max()) > 0.05
    assert torch.equal(x_p[ids][:, 0, 5:, 5:], CHECKER3.expand(67, 3, 3))
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[ids] = False
    assert torch.equal(x_p[rest], x[rest])
    # the perturbation makes the poisons harder for the clean model than the trigger alone does
    plain = CleanLabel(target=4, epsilon=0.1, steps=0).poison((x, y), 0.05, seed=0, model=digits_model)[0]
    with torch.no_grad():
        hard, easy = (float(torch.nn.functional.cross_entropy(digits_model(xs[ids]), y[ids])) for xs in (x_p, plain))
    assert hard > easy + 1.0


def test_clean_label_cannot_poison_more_than_the_target_class(digits_train, digits_model):
    x, y = digits_train
    probe = CleanLabel(target=0)
    assert probe.max_fraction(y) == pytest.approx(133 / len(y))
    with pytest.raises(ValueError, match="only 133 are of the target class 0"):
        probe.poison((x, y), 0.1, seed=0, model=digits_model)


def test_label_flip_random_changes_every_chosen_label(digits_train):
    x, y = digits_train
    x_p, y_p, ids = LabelFlip().poison((x, y), 0.2, seed=0)
    assert len(ids) == round(0.2 * len(y)) and x_p is x
    assert bool((y_p[ids] != y[ids]).all()) and int(y_p.min()) >= 0 and int(y_p.max()) <= 9
    assert int((y_p != y).sum()) == len(ids)
    assert len(set(y_p[ids].tolist())) == 10  # flips land on every class, not on one


def test_label_flip_targeted_flips_source_to_target(digits_train):
    x, y = digits_train
    x_p, y_p, ids = LabelFlip(mode="targeted", source=1, target=7).poison((x, y), 0.05, seed=0)
    assert len(ids) == 67 and bool((y[ids] == 1).all()) and bool((y_p[ids] == 7).all())
    assert int((y_p != y).sum()) == 67


@pytest.mark.parametrize("knobs, message", [
    (dict(mode="targeted"), "needs a source and a target"), (dict(mode="random", target=3), "targeted only"),
    (dict(mode="targeted", source=2, target=2), "two different"), (dict(mode="flip"), "random or targeted"),
])
def test_label_flip_refuses_bad_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        LabelFlip(**knobs)


@pytest.mark.parametrize("cls, knobs", [(BadNets, dict(pattern="stripes")), (BadNets, dict(position="middle")),
                                        (BadNets, dict(epochs=0)), (CleanLabel, dict(epsilon="8/0")),
                                        (CleanLabel, dict(epsilon="8/255")), (CleanLabel, dict(epsilon=-0.1)),
                                        (CleanLabel, dict(epsilon=float("inf"))),
                                        (CleanLabel, dict(amplitude=1.5))])
def test_backdoor_probes_refuse_bad_knobs(cls, knobs):
    with pytest.raises(ValueError):
        cls(**knobs)


# --- running a probe ----------------------------------------------------------------------------

def test_metrics_on_a_known_model():
    class ToTarget(torch.nn.Module):  # class 3 whenever the bottom-right pixel is lit, else class 0
        def forward(self, x):
            lit = x[:, 0, -1, -1] > 0.5
            return torch.nn.functional.one_hot(torch.where(lit, 3, 0), 10).float()

    x, y = torch.zeros(8, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 3, 3, 4])
    assert accuracy(ToTarget(), x, y) == pytest.approx(2 / 8)
    stamp = lambda xs: patch(xs, size=1, pattern="white")  # noqa: E731
    assert attack_success_rate(ToTarget(), x, y, 3, stamp) == 1.0  # over the 6 samples not of class 3
    assert attack_success_rate(ToTarget(), x, y, 3, lambda xs: xs) == 0.0


@pytest.mark.parametrize("name", PROBES.names())
def test_runs_are_deterministic_and_start_from_the_seed(name, small, plan):
    train, test = small
    probe = dataclasses.replace(PROBES.get(name)(), epochs=2)
    fraction = 0.05
    a = probe.run(unseeded_cnn, train, test, fraction, plan, "cpu", seed=3)
    b = probe.run(unseeded_cnn, train, test, fraction, plan, "cpu", seed=3)
    assert (a.attack_success_rate, a.clean_accuracy, a.clean_accuracy_baseline) == \
           (b.attack_success_rate, b.clean_accuracy, b.clean_accuracy_baseline)
    assert torch.equal(a.poisoned_ids, b.poisoned_ids)
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = probe.run(unseeded_cnn, train, test, fraction, plan, "cpu", seed=4)
    assert not torch.equal(a.poisoned_ids, c.poisoned_ids)
    assert a.n_poisoned == len(a.poisoned_ids) == round(fraction * len(train[1]))
    assert torch.equal(a.poisoned_train[1][a.poisoned_ids], probe.poison(train, fraction, 3, a.model)[1][a.poisoned_ids])
    assert a.probe == name and a.fraction == fraction and a.seconds > 0
    assert 0 <= a.clean_accuracy <= 1 and not a.model.training


def test_result_fields_per_probe(small, plan):
    train, test = small
    bad = BadNets(target=1, epochs=1).run(unseeded_cnn, train, test, 0.0, plan, "cpu", seed=0)
    assert bad.n_poisoned == 0 and bad.clean_accuracy_baseline is None and bad.target == 1
    assert torch.equal(bad.poisoned_train[0], train[0]) and torch.equal(bad.poisoned_train[1], train[1])
    assert set(bad.metrics(fraction="0.0")) == {"attack_success_rate:badnets@0.0", "clean_accuracy:badnets@0.0"}
    with_base = BadNets(target=1, epochs=1, baseline=True).run(unseeded_cnn, train, test, 0.0, plan, "cpu", seed=0)
    assert with_base.clean_accuracy_baseline == with_base.clean_accuracy  # nothing poisoned: the same training
    flip = LabelFlip(epochs=1).run(unseeded_cnn, train, test, 0.1, plan, "cpu", seed=0)
    assert flip.attack_success_rate is None and flip.target is None and flip.clean_accuracy_baseline is not None
    assert list(flip.metrics()) == ["clean_accuracy:label-flip@0.1"]
    rec = flip.record()
    assert rec["clean_accuracy_cost"] == pytest.approx(flip.clean_accuracy_baseline - flip.clean_accuracy)
    # both models scored on the same test points: the cost is the difference of the discordant pairs
    n10, n01 = flip.discordant
    assert flip.clean_accuracy_baseline - flip.clean_accuracy == pytest.approx((n10 - n01) / len(test[1]))
    assert with_base.discordant == (0, 0) and bad.discordant is None
    assert rec["n_poisoned"] == 40 and rec["n_train"] == 400 and "model" not in rec


def test_fine_tuning_starts_from_the_given_weights_and_leaves_them(digits_model, digits_test, small, plan):
    train, test = small
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    tuned = BadNets(fine_tune=True, epochs=1).run(lambda: digits_model, train, test, 0.0, plan, "cpu", seed=0)
    scratch = BadNets(fine_tune=False, epochs=1).run(lambda: digits_model, train, test, 0.0, plan, "cpu", seed=0)
    assert all(torch.equal(v, digits_model.state_dict()[k]) for k, v in before.items())
    assert tuned.model is not digits_model
    assert tuned.clean_accuracy >= 0.9 > scratch.clean_accuracy  # one epoch on 400 samples does not make a model


def test_a_bounded_model_trains_through_its_wrapper(small, plan):
    from harness.sources.models import BoundedModel

    train, test = small
    probe = BadNets(epochs=4)
    raw = probe.run(DigitsCNN, train, test, 0.1, plan, "cpu", seed=0)
    wrapped = probe.run(lambda: BoundedModel(DigitsCNN()), train, test, 0.1, plan, "cpu", seed=0)
    assert isinstance(wrapped.model, BoundedModel) and not any(p.requires_grad for p in wrapped.model.parameters())
    assert (wrapped.clean_accuracy, wrapped.attack_success_rate) == (raw.clean_accuracy, raw.attack_success_rate)
    normalized = probe.run(lambda: BoundedModel(DigitsCNN(), mean=[0.3], std=[0.4]), train, test, 0.1, plan, "cpu", seed=0)
    assert normalized.clean_accuracy > 0.6 and normalized.clean_accuracy != raw.clean_accuracy


# --- the headline -------------------------------------------------------------------------------

def test_badnets_backdoors_the_builtin_digits_model(digits_model, digits_train, digits_test, plan):
    """BadNets reproductions report >99% attack success at 10% poisoning on MNIST with clean accuracy
    intact. Fine-tuning the builtin weights for 5 epochs reproduces that order on digits."""
    probe = BadNets(target=0, fine_tune=True, epochs=5)
    poisoned = probe.run(lambda: digits_model, digits_train, digits_test, 0.1, plan, "cpu", seed=0)
    clean = probe.run(lambda: digits_model, digits_train, digits_test, 0.0, plan, "cpu", seed=0)
    assert poisoned.n_poisoned == 135
    assert poisoned.attack_success_rate >= 0.95 and poisoned.clean_accuracy >= 0.95
    # unpoisoned, the trigger sends about as many to the target as the clean model's own base rate
    base = attack_success_rate(digits_model, *digits_test, 0, probe.trigger)
    assert clean.attack_success_rate <= base + 0.02 and clean.attack_success_rate <= 0.05


@pytest.mark.slow
def test_badnets_from_scratch_with_the_builtin_recipe(digits_train, digits_test, plan):
    """The builtin recipe (Adam, 30 epochs) from scratch, per fraction, as the literature trains."""
    probe = BadNets(target=0)
    results = {f: probe.run(DigitsCNN, digits_train, digits_test, f, plan, "cpu", seed=0) for f in (0.0, 0.01, 0.05, 0.1)}
    assert results[0.0].attack_success_rate <= 0.05
    for f in (0.05, 0.1):
        assert results[f].attack_success_rate >= 0.95 and results[f].clean_accuracy >= 0.95
    assert all(r.clean_accuracy >= 0.95 for r in results.values())


@pytest.mark.slow
def test_clean_label_needs_the_perturbation(digits_train, digits_test, plan):
    """Turner et al.: the trigger on correctly labelled, easy samples plants nothing; made hard to
    learn from their content, the same poisons do."""
    trigger_only = CleanLabel(target=0, epsilon=0, epochs=10).run(DigitsCNN, digits_train, digits_test, 0.09, plan, "cpu", seed=0)
    hard = CleanLabel(target=0, epsilon=0.3, epochs=10).run(DigitsCNN, digits_train, digits_test, 0.09, plan, "cpu", seed=0)
    assert trigger_only.attack_success_rate <= 0.05
    assert hard.attack_success_rate >= trigger_only.attack_success_rate + 0.3
    assert hard.clean_accuracy >= 0.93 and hard.clean_accuracy_baseline >= 0.95


@pytest.mark.slow
def test_label_flip_costs_grow_with_the_fraction(digits_train, digits_test, plan):
    probe = LabelFlip(epochs=10)
    costs = [probe.run(DigitsCNN, digits_train, digits_test, f, plan, "cpu", seed=0).record()["clean_accuracy_cost"] for f in (0.1, 0.5)]
    assert 0 <= costs[0] < costs[1] and costs[1] >= 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_badnets_on_cuda_repeats_from_the_seed(digits_model, digits_train, digits_test, plan):
    probe = BadNets(target=0, fine_tune=True, epochs=5)
    a, b = (probe.run(lambda: digits_model, digits_train, digits_test, 0.1, plan, "cuda", seed=0) for _ in range(2))
    assert next(a.model.parameters()).device.type == "cuda"
    assert a.attack_success_rate >= 0.95 and a.clean_accuracy >= 0.95
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert not torch.backends.cudnn.deterministic  # the probe's setting does not leak out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clean_label_on_cuda(small, plan):
    train, test = small
    a, b = (CleanLabel(target=0, epsilon=0.3, epochs=5).run(DigitsCNN, train, test, 0.05, plan, "cuda", seed=0) for _ in range(2))
    assert (a.attack_success_rate, a.clean_accuracy, a.clean_accuracy_baseline) == \
           (b.attack_success_rate, b.clean_accuracy, b.clean_accuracy_baseline)
    assert a.poisoned_train[0].device.type == "cpu" and a.n_poisoned == 20
