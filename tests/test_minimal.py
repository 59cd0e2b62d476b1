"""Minimal-perturbation attacks (CW L2, DeepFool): exact distances on linear models, strength on the
digits model, the contract, and (slow) foolbox's and ART's implementations side by side."""

from __future__ import annotations

import math

import pytest
import torch

from harness.attacks import ATTACKS, ThreatModel
from harness.attacks.minimal import CarliniWagner, DeepFool
from tests.conftest import LinearNet

UNBOUNDED = {norm: ThreatModel(norm, math.inf) for norm in ("l2", "linf")}

# On the 8x8 digits, half the pixels are exactly 0 and a tenth exactly 1: tanh holds them still
# (atanh of 0.999999 is 7.25, 700 Adam steps of 0.01 away from moving), and at the default 0.01
# the 100 steps of a round do not travel far enough: measured 95% of points broken, median L2 0.73
# against DeepFool's 0.55 (64 points). A step of 0.1 travels there (100%, 0.55); the default stays
# Carlini's 0.01, which larger images with small perturbations need (see CarliniWagner's docstring).
DIGITS_CW = CarliniWagner(stepsize=0.1)
# For the fast tests, 5 rounds from c = 0.01 instead of 9 from 0.001: the rounds at c <= 0.01 find
# nothing on this model; the same median on 32 points (0.5455) at half the cost.
DIGITS_CW_FAST = CarliniWagner(stepsize=0.1, binary_search_steps=5, initial_const=1e-2)


def _distance(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    return ThreatModel(norm, math.inf).distance(adv, x)


def _predict(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


# --- closed-form truth on linear models ---------------------------------------------------------


def _linear(num_classes: int, n: int = 300):
    """A linear model and points in [0.3, 0.7]^64, labelled by the model (all correctly classified)."""
    torch.manual_seed(0)
    model = LinearNet(64, num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, _predict(model, x)


def _linear_truth(model: LinearNet, x: torch.Tensor, y: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact minimal perturbation size, min over j of (z_y - z_j) / ||w_y - w_j||_* (dual norm),
    and whether the box leaves it alone (x plus 1.1 times that perturbation stays in [0, 1])."""
    w, b = model.fc.weight, model.fc.bias
    xf = x.flatten(1)
    logits = xf @ w.T + b
    margins = logits.gather(1, y[:, None]) - logits
    diff = w[y][:, None, :] - w[None]  # (n, k, d): w_y - w_j
    dual = diff.norm(dim=2) if norm == "l2" else diff.abs().sum(dim=2)
    dist = (margins / dual).scatter(1, y[:, None], math.inf)
    truth, j = dist.min(dim=1)
    u = diff[torch.arange(len(y)), j]
    delta = -truth[:, None] * (u / u.norm(dim=1, keepdim=True) if norm == "l2" else u.sign())
    end = xf + 1.1 * delta
    return truth, ((end >= 0) & (end <= 1)).all(dim=1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_exact_on_a_binary_linear_model(norm):
    model, x, y = _linear(2)
    truth, free = _linear_truth(model, x, y, norm)
    assert bool(free.all())
    attack = DeepFool()
    adv = attack(model, x, y, UNBOUNDED[norm])
    assert bool((_predict(model, adv) != y).all())
    d = _distance(adv, x, norm)
    assert bool((d >= truth - 1e-5).all())  # nothing below the truth: the harness re-checks
    assert bool((d <= (1 + attack.overshoot) * truth + 1e-4).all())  # one linearized step, exact


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_near_exact_on_a_multiclass_linear_model(norm):
    model, x, y = _linear(10)
    truth, free = _linear_truth(model, x, y, norm)
    assert float(free.float().mean()) > 0.9
    adv = DeepFool()(model, x, y, UNBOUNDED[norm])
    assert bool((_predict(model, adv) != y).all())
    d, truth = _distance(adv, x, norm)[free], truth[free]
    assert bool((d >= truth - 1e-5).all())
    # A linear model is its own linearization: the first step lands on the nearest boundary.
    assert float((d <= 1.1 * truth).float().mean()) >= 0.9  # measured: all within 1.0207x


def test_cw_close_to_the_truth_on_linear_models():
    for k in (2, 10):
        model, x, y = _linear(k)
        truth, free = _linear_truth(model, x, y, "l2")
        adv = CarliniWagner()(model, x, y, UNBOUNDED["l2"])
        fooled = _predict(model, adv) != y
        assert bool(fooled.all())
        d = _distance(adv, x, "l2")
        assert bool((d >= truth - 1e-5).all())
        # Adam's first steps move every coordinate by about the step size (0.01 in tanh space,
        # 0.04 in L2 here), so a boundary much closer than that is overshot and 100 steps do not
        # settle back: measured ratio 1.87 at truth 0.0005, 1.58 at 0.02, <= 1.02 from 0.05 up.
        judged = free & (truth >= 0.05)
        assert int(judged.sum()) >= 200
        close = (d[judged] - truth[judged]).abs() <= 0.05 * truth[judged]
        assert float(close.float().mean()) >= 0.95, k


def test_cw_targeted_on_a_linear_model():
    model, x, y = _linear(10, n=100)
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(2))) % 10
    adv = CarliniWagner()(model, x, y, UNBOUNDED["l2"], target=target)
    assert float((_predict(model, adv) == target).float().mean()) >= 0.95
    # Reaching the target means at least crossing its boundary with y: a lower bound on the distance.
    w, b = model.fc.weight, model.fc.bias
    z = x.flatten(1) @ w.T + b
    bound = (z.gather(1, y[:, None]) - z.gather(1, target[:, None])).squeeze(1) / (w[y] - w[target]).norm(dim=1)
    assert bool((_distance(adv, x, "l2") >= bound - 1e-5).all())


# --- the digits model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_points(correct_digits):
    x, y = correct_digits
    return x[:32], y[:32]


@pytest.fixture(scope="module")
def digits_runs(digits_points, wrapped_digits):
    """Each attack once on the same points, shared by the tests below (CW is the costly one)."""
    x, y = digits_points
    return {
        "cw-l2": DIGITS_CW_FAST(wrapped_digits, x, y, UNBOUNDED["l2"]),
        "deepfool-l2": DeepFool()(wrapped_digits, x, y, UNBOUNDED["l2"]),
        "deepfool-linf": DeepFool()(wrapped_digits, x, y, UNBOUNDED["linf"]),
    }


@pytest.mark.parametrize("run", ["cw-l2", "deepfool-l2", "deepfool-linf"])
def test_digits_breaks_nearly_everything_and_rescores(run, digits_runs, digits_points, wrapped_digits):
    x, y = digits_points
    adv = digits_runs[run]
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    fooled = _predict(wrapped_digits, adv) != y
    assert float(fooled.float().mean()) >= 0.99
    # Points sit just past a boundary: a forward pass over another batch must agree on every one.
    one_by_one = torch.cat([_predict(wrapped_digits, adv[i : i + 1]) for i in range(len(adv))])
    assert bool((one_by_one != y)[fooled].all())


def test_cw_at_least_as_tight_as_deepfool_on_digits(digits_runs, digits_points, wrapped_digits):
    x, y = digits_points
    medians = {}
    for run in ("cw-l2", "deepfool-l2"):
        adv = digits_runs[run]
        fooled = _predict(wrapped_digits, adv) != y
        medians[run] = float(_distance(adv, x, "l2")[fooled].median())
    print(f"median L2 on {len(x)} digits: {medians}")
    # measured 0.5455 / 0.5610 here; 0.5620 / 0.5610 on 128 points: on this small model DeepFool is
    # nearly as tight as CW (1,000 steps of CW: 0.5434 / 0.5522 on 64)
    assert medians["cw-l2"] <= 1.05 * medians["deepfool-l2"], medians


# --- the contract -----------------------------------------------------------------------------------


def test_registered_as_minimal():
    assert ATTACKS.get("cw") is CarliniWagner and ATTACKS.get("deepfool") is DeepFool
    assert CarliniWagner.minimal and DeepFool.minimal
    assert CarliniWagner.supports_target and not DeepFool.supports_target
    assert CarliniWagner.norms == ("l2",) and DeepFool.norms == ("l2", "linf")


@pytest.mark.parametrize("attack", [CarliniWagner(binary_search_steps=3, steps=20), DeepFool()])
def test_deterministic_inside_no_grad(attack, digits_points, wrapped_digits):
    x, y = digits_points[0][:8], digits_points[1][:8]
    with torch.no_grad():  # the attacks turn gradients back on themselves
        a = attack(wrapped_digits, x, y, UNBOUNDED["l2"], generator=torch.Generator().manual_seed(0))
    b = attack(wrapped_digits, x, y, UNBOUNDED["l2"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("attack", [CarliniWagner(binary_search_steps=2, steps=5), DeepFool()])
def test_misclassified_points_come_back_unchanged(attack):
    model, x, y = _linear(10, n=20)
    wrong = (y + 1) % 10
    assert torch.equal(attack(model, x, wrong, UNBOUNDED["l2"]), x)


def test_finite_epsilon_keeps_only_what_fits(digits_runs, digits_points, wrapped_digits):
    x, y = digits_points
    d = _distance(digits_runs["deepfool-l2"], x, "l2")
    eps = float(d.median())
    adv = DeepFool()(wrapped_digits, x, y, ThreatModel("l2", eps))
    fits = d <= eps
    assert torch.equal(adv[fits], digits_runs["deepfool-l2"][fits])
    assert torch.equal(adv[~fits], x[~fits])
    assert torch.equal(DeepFool()(wrapped_digits, x, y, ThreatModel("l2", 0.0)), x)


def test_bad_arguments():
    model, x, y = _linear(10, n=4)
    with pytest.raises(ValueError, match="l2"):
        CarliniWagner()(model, x, y, UNBOUNDED["linf"])
    with pytest.raises(ValueError, match="target"):
        DeepFool()(model, x, y, UNBOUNDED["l2"], target=y)
    for bad in (dict(steps=0), dict(binary_search_steps=0), dict(stepsize=0.0), dict(confidence=-1.0)):
        with pytest.raises(ValueError):
            CarliniWagner(**bad)
    for bad in (dict(steps=0), dict(candidates=1), dict(overshoot=-0.1)):
        with pytest.raises(ValueError):
            DeepFool(**bad)


# --- against foolbox and ART (slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_64(correct_digits):
    x, y = correct_digits
    return x[:64], y[:64]


def _median_l2(model, adv, x, y, norm="l2") -> tuple[float, float]:
    fooled = _predict(model, adv) != y
    fooled &= adv.flatten(1).any(dim=1)  # foolbox hands back an all-zero image where it found nothing
    return float(_distance(adv, x, norm)[fooled].median()), float(fooled.float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("attack", [CarliniWagner(), DIGITS_CW], ids=["defaults", "stepsize-0.1"])
def test_cw_against_foolbox(attack, digits_64, wrapped_digits):
    fb = pytest.importorskip("foolbox")
    x, y = digits_64
    ours = _median_l2(wrapped_digits, attack(wrapped_digits, x, y, UNBOUNDED["l2"]), x, y)
    theirs = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=attack.binary_search_steps, steps=attack.steps,
                                              stepsize=attack.stepsize, initial_const=attack.initial_const)
    theirs = _median_l2(wrapped_digits, theirs(fb.PyTorchModel(wrapped_digits, bounds=(0, 1)), x, y, epsilons=None)[0], x, y)
    print(f"CW median L2 / success: ours {ours}, foolbox {theirs}")
    # measured: defaults 0.7282 / 0.953 for both; stepsize 0.1 0.5455 / 1.0 against 0.5438 / 1.0 (foolbox
    # ends a round when the whole batch's loss stalls, the harness per sample: a few steps fewer)
    assert ours[1] >= theirs[1]
    assert ours[0] <= 1.05 * theirs[0]


@pytest.mark.slow
def test_cw_against_art(digits_64, wrapped_digits):
    pytest.importorskip("art")
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    x, y = digits_64
    cw = DIGITS_CW_FAST  # both with 5 rounds from c = 0.01 (9 from 0.001 took ART 100 s here, for the same verdict)
    ours = _median_l2(wrapped_digits, cw(wrapped_digits, x, y, UNBOUNDED["l2"]), x, y)
    clf = PyTorchClassifier(wrapped_digits, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                            clip_values=(0.0, 1.0))
    attack = CarliniL2Method(clf, binary_search_steps=cw.binary_search_steps, max_iter=cw.steps,
                             learning_rate=cw.stepsize, initial_const=cw.initial_const, batch_size=64, verbose=False)
    theirs = _median_l2(wrapped_digits, torch.from_numpy(attack.generate(x.numpy(), y=y.numpy())), x, y)
    print(f"CW median L2 / success: ours {ours}, ART {theirs}")
    # measured 0.5482 / 1.0 against 0.7257 / 0.8281 (ART: gradient steps with a line search, not Adam); with
    # 9 rounds from 0.001, 0.5455 / 1.0 against 0.7260 / 0.9375
    assert ours[1] >= theirs[1]
    assert ours[0] <= 1.05 * theirs[0]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_against_foolbox(norm, digits_64, wrapped_digits):
    fb = pytest.importorskip("foolbox")
    x, y = digits_64
    ours = _median_l2(wrapped_digits, DeepFool()(wrapped_digits, x, y, UNBOUNDED[norm]), x, y, norm)
    attack = (fb.attacks.L2DeepFoolAttack if norm == "l2" else fb.attacks.LinfDeepFoolAttack)(steps=50, candidates=10,
                                                                                              overshoot=0.02)
    theirs = _median_l2(wrapped_digits, attack(fb.PyTorchModel(wrapped_digits, bounds=(0, 1)), x, y, epsilons=None)[0],
                        x, y, norm)
    print(f"DeepFool {norm} median / success: ours {ours}, foolbox {theirs}")
    assert ours[1] >= theirs[1]
    assert ours[0] <= 1.01 * theirs[0]  # the same steps, with a 1e-5 push where foolbox adds 1e-4
