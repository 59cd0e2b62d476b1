"""Evaluation validity checks: each against a model or input built to trip it, and against the
builtin digits model (or a tiny one) that must not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from harness.attacks import ATTACKS, FGSM, PGD, ThreatModel
from harness.evaluation import checks
from harness.verdicts.metrics import curves
from harness.sources.models import BoundedModel
from tests.trick_models import AlwaysDropout, Quantized, SoftmaxHead


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def survivors(model, x, y, eps: float, suite) -> tuple[torch.Tensor, torch.Tensor]:
    """The correct points no attack of `suite` broke at L-inf eps (the runner's cascade, re-scored)."""
    with torch.no_grad():
        alive = model(x).argmax(1) == y
    threat = ThreatModel("linf", eps)
    for i, attack in enumerate(suite):
        idx = alive.nonzero().flatten()
        g = torch.Generator(device=x.device).manual_seed(i)
        broken = checks._broken(model, attack(model, x[idx], y[idx], threat, generator=g), x[idx], y[idx], threat)
        alive[idx[broken]] = False
    return x[alive], y[alive]


def test_record_rejects_an_unknown_status():
    assert checks.STATUSES == ("pass", "warn", "fail", "skipped")  # the SPEC's four
    assert checks.record("x", "warn", "d") == {"name": "x", "status": "warn", "detail": "d"}
    assert checks.record("x", "skipped", "d")["status"] == "skipped"
    with pytest.raises(AssertionError):
        checks.record("x", "ok", "d")


# randomized-model

def test_randomness_passes_a_deterministic_model(wrapped_digits, digits_test):
    rec = checks.randomness(wrapped_digits, digits_test[0])
    assert (rec["name"], rec["status"]) == ("randomized-model", "pass")
    assert "3 forward passes on 64 points agree" in rec["detail"]


def test_randomness_fails_a_model_with_dropout_left_on(digits_model, digits_test):
    model = BoundedModel(AlwaysDropout(digits_model))
    rec = checks.randomness(model, digits_test[0])
    assert rec["status"] == "fail"
    assert "EOT" in rec["detail"] and "of 64" in rec["detail"]
    assert not model.training and not digits_model.training  # the check does not touch the mode


def test_randomness_keeps_a_module_in_training_mode_and_flags_it(digits_test):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10)).train()
    assert checks.randomness(net, digits_test[0])["status"] == "fail"
    assert net.training and net[3].training  # restored/unchanged: the check never switches modes
    assert checks.randomness(net.eval(), digits_test[0])["status"] == "pass"


def test_randomness_warns_on_logit_noise_that_keeps_predictions(wrapped_digits, digits_test):
    class Jitter(nn.Module):
        def forward(self, x):
            out = wrapped_digits(x)
            return out + 1e-2 * torch.rand_like(out)  # far below the digits model's logit margins

    rec = checks.randomness(Jitter(), digits_test[0], passes=2)
    assert rec["status"] == "warn", rec
    assert "predictions agree" in rec["detail"]


# output-logits

def test_output_logits(wrapped_digits, digits_model, digits_test):
    x = digits_test[0][:32]
    with torch.no_grad():
        logits, probs = wrapped_digits(x), SoftmaxHead(digits_model)(x)
    assert checks.output_logits(logits) == checks.record("output-logits", "pass", "the model outputs logits")
    rec = checks.output_logits(probs)
    assert rec["status"] == "warn" and "outputs probabilities" in rec["detail"] and "saturates" in rec["detail"]


# vanishing-gradients

def test_gradients_pass_on_the_digits_model(wrapped_digits, digits_test):
    rec = checks.gradients(wrapped_digits, *digits_test)
    assert rec["status"] == "pass"
    assert rec["detail"].startswith("0 of 64 (0.0%)")
    median = float(rec["detail"].split("median gradient L2 norm ")[1].rstrip(")"))
    assert median > 1.0  # measured 18.7: nowhere near the 1e-8 threshold


def test_gradients_fail_behind_input_quantization(digits_model, digits_test):
    rec = checks.gradients(BoundedModel(Quantized(digits_model)), *digits_test)
    assert rec["status"] == "fail"
    assert rec["detail"].startswith("64 of 64 (100.0%)") and "64 zero or vanishing, 0 non-finite" in rec["detail"]
    assert "BPDA" in rec["detail"]


def test_gradients_count_non_finite_ones(wrapped_digits, digits_test):
    class Sqrt(nn.Module):  # d sqrt(x)/dx is infinite at the digits' many zero pixels
        def forward(self, x):
            return wrapped_digits(torch.sqrt(x))

    x, y = digits_test
    rec = checks.gradients(Sqrt(), x, y, sample=16)
    assert rec["status"] == "fail" and "0 zero or vanishing, 16 non-finite" in rec["detail"]


def test_gradients_warn_when_a_few_points_have_none(wrapped_digits, digits_test):
    x, y = digits_test

    class Partly(nn.Module):
        """Detaches the output of one chosen input: its gradient is exactly zero."""

        def forward(self, inp):
            out = wrapped_digits(inp)
            frozen = (inp - x[7]).flatten(1).abs().amax(dim=1) == 0
            return torch.where(frozen[:, None], out.detach(), out)

    xs, ys = x[:40], y[:40]
    rec = checks.gradients(Partly(), xs, ys, sample=40)
    assert rec["status"] == "warn", rec  # 1 of ~40 points: under 10%
    assert "1 zero or vanishing" in rec["detail"]


def test_checks_without_correct_points_are_skipped_not_passed(wrapped_digits, digits_test):
    x, y = digits_test
    wrong = (y + 1) % 10  # the digits model is right on these, so every label here is wrong
    grad = checks.gradients(wrapped_digits, x[:20], wrong[:20])
    assert grad == checks.record("vanishing-gradients", "skipped", "no correctly classified point to take gradients at")
    large = checks.large_epsilon(wrapped_digits, x[:20], wrong[:20], generator=gen())
    assert large == checks.record("large-epsilon", "skipped", "no correctly classified point to attack")


def test_checks_without_any_input_are_skipped(wrapped_digits, digits_test):
    x, y = digits_test[0][:0], digits_test[1][:0]
    assert checks.randomness(wrapped_digits, x)["status"] == "skipped"
    rec = checks.zero_epsilon(wrapped_digits, PGD(steps=2), x, y, generator=gen())
    assert rec == checks.record("epsilon-zero", "skipped", "no input to attack at epsilon 0")
    assert checks.output_logits(torch.zeros(0, 10))["status"] == "skipped"


# gradient-masking

def part(attack: str, kind: str, attacked: list[int], broken: list[int], n: int = 100, norm: str = "linf", eps: str = "8/255"):
    a, b = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    a[attacked], b[broken] = True, True
    return {"attack": attack, "kind": kind, "norm": norm, "epsilon": eps, "attacked": a, "broken": b}


def test_masking_fails_when_black_box_breaks_what_white_box_missed():
    parts = [part("fgsm", "white-box", list(range(90)), list(range(10))),
             part("pgd", "white-box", list(range(10, 90)), list(range(10, 40))),
             part("square", "black-box", list(range(40, 90)), [40, 41, 42, 50, 60])]
    rec = checks.masking(parts, 100)
    assert rec["status"] == "fail"
    assert "at linf@8/255, 5 of 100 (5.0%) points were broken by square after fgsm, pgd" in rec["detail"]


def test_masking_warns_on_a_single_point_and_names_the_worst_group():
    parts = [part("pgd", "white-box", list(range(50)), list(range(10))),
             part("noise", "noise", list(range(10, 50)), [11]),
             part("pgd", "white-box", list(range(50)), list(range(20)), eps="16/255"),
             part("square", "black-box", list(range(20, 50)), [], eps="16/255")]
    rec = checks.masking(parts, 100)
    assert rec["status"] == "warn" and "at linf@8/255, 1 of 100" in rec["detail"] and "broken by noise" in rec["detail"]
    # two points but under 1% of n: still a warning
    many = [part("pgd", "white-box", list(range(500)), [], n=500), part("square", "black-box", list(range(500)), [1, 2], n=500)]
    assert checks.masking(many, 500)["status"] == "warn"


def test_masking_has_nothing_to_compare_in_a_white_box_cascade():
    parts = [part("fgsm", "white-box", list(range(90)), list(range(10))),
             part("pgd", "white-box", list(range(10, 90)), list(range(10, 40))),
             part("square", "black-box", list(range(90)), list(range(30)), norm="l2", eps="0.5")]
    rec = checks.masking(parts, 100)
    assert rec["status"] == "skipped" and rec["detail"].startswith("nothing to compare")
    assert "linf@8/255" in rec["detail"] and "l2@0.5" in rec["detail"]
    assert checks.masking([], 100) == checks.record("gradient-masking", "skipped", "nothing to compare: no (norm, epsilon) ran "
                                                    "both a white-box and a black-box or noise attack (no attack ran)")


def test_masking_passes_when_the_black_box_part_came_first():
    # noise first, then pgd only on what noise left: no point pgd failed on was broken by noise
    parts = [part("noise", "noise", list(range(90)), list(range(5))), part("pgd", "white-box", list(range(5, 90)), list(range(5, 50)))]
    rec = checks.masking(parts, 100)
    assert rec["status"] == "pass" and "1 group(s) compared" in rec["detail"]


# monotone-epsilon

def test_monotone_on_hand_made_curves():
    good = {"linf": {"pgd-linf": [(0.05, 0.9), (0.1, 0.6), (0.2, 0.1)], "worst": [(0.05, 0.9), (0.1, 0.6), (0.2, 0.1)]}}
    assert checks.monotone(good, 450)["status"] == "pass"
    rising = {"linf": {"pgd-linf": [(0.05, 0.9), (0.1, 0.5), (0.2, 0.55), (0.3, 0.7)]}}
    rec = checks.monotone(rising, 450)
    assert rec["status"] == "fail"
    assert "pgd-linf rises from 0.5 at epsilon 0.1 to 0.7 at 0.3 (+0.2; tolerance 0.01)" in rec["detail"]
    small = {"l2": {"worst": [(0.25, 0.8), (0.5, 0.5), (1.0, 0.505)]}}
    rec = checks.monotone(small, 1000)
    assert rec["status"] == "warn" and "worst-l2" in rec["detail"]
    # with few points the tolerance is 3/n: a one-sample rise of 1/100 is noise
    assert checks.monotone({"linf": {"pgd-linf": [(0.1, 0.5), (0.2, 0.51)]}}, 100)["status"] == "warn"
    assert checks.monotone({"linf": {"pgd-linf": [(0.1, 0.5), (0.2, 0.54)]}}, 100)["status"] == "fail"
    assert "2 curve(s)" in checks.monotone(good, 450)["detail"]


def test_monotone_with_one_epsilon_per_curve_is_skipped():
    single = {"linf": {"pgd-linf": [(0.1, 0.5)], "worst": [(0.1, 0.5)]}, "l2": {"deepfool-l2": [(0.5, 0.4)]}}
    for curves_ in (single, {}):
        rec = checks.monotone(curves_, 100)
        assert rec["status"] == "skipped" and "two or more epsilons" in rec["detail"], rec
    # a one-epsilon line beside a real curve is left out of the count, not passed
    mixed = {**single, "linf": {**single["linf"], "fgsm-linf": [(0.1, 0.6), (0.2, 0.3)]}}
    rec = checks.monotone(mixed, 100)
    assert rec["status"] == "pass" and "(1 curve(s) of two or more epsilons)" in rec["detail"]


def test_monotone_reads_curves_of_a_scorecard_record():
    card = {
        "attacks": [
            {"id": "pgd-linf", "norm": "linf", "epsilon": "0.1", "epsilon_value": 0.1, "robust_accuracy": 0.3},
            {"id": "pgd-linf", "norm": "linf", "epsilon": "0.05", "epsilon_value": 0.05, "robust_accuracy": 0.2},
        ],
        "metrics": {"robust_accuracy:worst-linf@0.05": 0.2, "robust_accuracy:worst-linf@0.1": 0.3},
    }
    rec = checks.monotone(curves(card), 200)
    assert rec["status"] == "fail" and "rises from 0.2 at epsilon 0.05 to 0.3 at 0.1" in rec["detail"]


# large-epsilon

def test_large_epsilon_passes_the_digits_model(wrapped_digits, digits_test):
    rec = checks.large_epsilon(wrapped_digits, *digits_test, generator=gen())
    assert rec["status"] == "pass" and "robust accuracy 0.000 (0 of 64" in rec["detail"]


def test_large_epsilon_fails_behind_input_quantization(digits_model, digits_test):
    rec = checks.large_epsilon(BoundedModel(Quantized(digits_model)), *digits_test, generator=gen(), sample=32)
    assert rec["status"] == "fail" and "robust accuracy 1.000 (32 of 32" in rec["detail"]


# more-steps

@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_more_steps_passes_the_default_suite(wrapped_digits, digits_test, eps):
    """The default suite (FGSM, then PGD-20) on the builtin model: doubling PGD's steps finds
    (almost) nothing new among the survivors (measured 0 of 64 at 0.05, 0-1 of 64 at 0.1)."""
    xs, ys = survivors(wrapped_digits, *digits_test, eps, [FGSM(), PGD(steps=20)])
    rec = checks.more_steps(wrapped_digits, PGD(steps=20), xs, ys, ThreatModel("linf", eps), generator=gen(1))
    assert rec["status"] == "pass", rec
    assert "PGD with 40 steps instead of 20 newly breaks" in rec["detail"] and "of 64" in rec["detail"]


def test_more_steps_flags_an_attack_stopped_too_early(wrapped_digits, digits_test):
    short = PGD(steps=2, rel_stepsize=0.2)  # measured: 11 of 64 newly broken by 4 steps
    xs, ys = survivors(wrapped_digits, *digits_test, 0.1, [short])
    rec = checks.more_steps(wrapped_digits, short, xs, ys, ThreatModel("linf", 0.1), generator=gen(1))
    assert rec["status"] in ("warn", "fail"), rec
    newly = int(rec["detail"].split("newly breaks ")[1].split(" of ")[0])
    assert newly / 64 >= checks.MORE_STEPS_WARN and "has not converged" in rec["detail"]


def test_more_steps_uses_per_sample_budgets_and_skips_what_it_cannot_double(wrapped_digits, digits_test):
    x, y = digits_test[0][:8], digits_test[1][:8]
    threat = ThreatModel("linf", torch.zeros(8))  # zero budgets: nothing can be broken
    rec = checks.more_steps(wrapped_digits, PGD(steps=2), x, y, threat, generator=gen())
    assert rec["status"] == "pass" and "newly breaks 0 of 8" in rec["detail"]
    fgsm = checks.more_steps(wrapped_digits, FGSM(), x, y, threat, generator=gen())
    assert fgsm == checks.record("more-steps", "skipped", "not applicable: FGSM has no steps to double")
    none = checks.more_steps(wrapped_digits, PGD(), x[:0], y[:0], threat.subset(torch.zeros(8, dtype=torch.bool)), generator=gen())
    assert none == checks.record("more-steps", "skipped", "no point survived the suite: nothing to attack longer")


@dataclasses.dataclass(frozen=True)
class OverBudget:
    """Breaks points at any number of steps, but only by leaving the budget it is given."""

    steps: int = 1

    def __call__(self, model, x, y, threat, *, generator=None):
        return PGD(steps=self.steps * 5)(model, x, y, ThreatModel(threat.norm, 0.5), generator=generator)


def test_more_steps_rescores_within_the_budget(wrapped_digits, digits_test):
    x, y = digits_test[0][:16], digits_test[1][:16]
    rec = checks.more_steps(wrapped_digits, OverBudget(), x, y, ThreatModel("linf", 0.01), generator=gen())
    assert rec["status"] == "pass" and "newly breaks 0 of 16" in rec["detail"]
    assert "same random start breaks 0" in rec["detail"]


# epsilon-zero

def _cheap(name: str):
    cls = ATTACKS.get(name)
    knobs = {"steps": 5, "queries": 50, "draws": 5}
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in knobs.items() if k in fields})


@pytest.mark.parametrize("name", [n for n, cls in ATTACKS.items() if not cls.minimal])
def test_every_native_attack_reproduces_clean_accuracy_at_epsilon_zero(wrapped_digits, digits_test, name):
    for norm in ATTACKS.get(name).norms:
        rec = checks.zero_epsilon(wrapped_digits, _cheap(name), *digits_test, generator=gen(), sample=32, norm=norm)
        assert rec["status"] == "pass", rec
        assert "0 prediction(s) changed" in rec["detail"]


def test_zero_epsilon_fails_an_attack_that_ignores_its_budget():
    class Edge(nn.Module):
        """Class 0 when the mean pixel passes 0.5, else class 1: inputs just below the edge."""

        def forward(self, x):
            m = x.flatten(1).mean(dim=1)
            return torch.stack([100 * m, torch.full_like(m, 50.0)], dim=1)

    def unprojected(model, x, y, threat, *, generator=None):
        return x + 0.01  # not projected into the (zero) budget

    x = torch.full((10, 1, 8, 8), 0.495)
    x[5:] = 0.2
    y = torch.ones(10, dtype=torch.long)
    rec = checks.zero_epsilon(Edge(), unprojected, x, y, generator=gen())
    assert rec["status"] == "fail"
    assert "accuracy 0.5 against clean accuracy 1 on 10 points; 5 prediction(s) changed" in rec["detail"]
    assert "largest linf perturbation returned 0.01" in rec["detail"]


def test_zero_epsilon_fails_a_randomized_model(digits_model, digits_test):
    rec = checks.zero_epsilon(BoundedModel(AlwaysDropout(digits_model)), PGD(steps=2), *digits_test, generator=gen())
    assert rec["status"] == "fail" and "prediction(s) changed" in rec["detail"]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_every_check_runs_on_the_tensors_device(digits_model, digits_test, device):
    """Devices come from the tensors: generators, indices and budgets follow them (CPU budgets included)."""
    import copy

    dev = torch.device(device)
    model = BoundedModel(copy.deepcopy(digits_model)).to(dev)
    quantized = BoundedModel(Quantized(copy.deepcopy(digits_model))).to(dev)
    x, y = (t.to(dev) for t in digits_test)
    g = torch.Generator(device=dev).manual_seed(0)
    assert checks.randomness(model, x)["status"] == "pass"
    with torch.no_grad():
        assert checks.output_logits(model(x))["status"] == "pass"
    assert checks.gradients(model, x, y)["status"] == "pass"
    assert checks.gradients(quantized, x, y)["status"] == "fail"
    assert checks.large_epsilon(model, x, y, generator=g)["status"] == "pass"
    assert checks.large_epsilon(quantized, x, y, generator=g)["status"] == "fail"
    xs, ys = survivors(model, x, y, 0.05, [FGSM(), PGD(steps=20)])
    eps = torch.full((xs.shape[0],), 0.05)  # a per-sample budget on the CPU, as the runner holds it
    assert checks.more_steps(model, PGD(steps=20), xs, ys, ThreatModel("linf", eps), generator=g)["status"] == "pass"
    assert checks.zero_epsilon(model, PGD(steps=5), x, y, generator=g)["status"] == "pass"
    assert checks.masking([part("pgd", "white-box", [0, 1], [0]), part("square", "black-box", [1], [1])], 100)["status"] == "warn"


# the runner: checks the suite cannot feed are recorded as skipped, and shown as such

def test_a_suite_without_what_a_check_needs_records_it_as_skipped(tmp_path):
    """FGSM at one epsilon: no steps to double or to run at epsilon 0, one epsilon for a curve, no
    black-box attack to compare with. Those four are skipped with the reason; the run still passes."""
    import xml.etree.ElementTree as ET

    import harness

    cfg = {"name": "fgsm-only", "device": "cpu", "data": {"limit": 60, "batch_size": 60},
           "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.1]}], "gates": [{"metric": "clean_accuracy", "min": 0.5}]}
    card = harness.run(cfg, out=tmp_path, show_progress=False)
    status = {c["name"]: c["status"] for c in card.checks}
    skipped = sorted(k for k, v in status.items() if v == "skipped")
    assert skipped == ["epsilon-zero", "gradient-masking", "monotone-epsilon", "more-steps"], status
    assert {status[k] for k in ("randomized-model", "vanishing-gradients", "large-epsilon", "budget", "finite")} == {"pass"}
    detail = {c["name"]: c["detail"] for c in card.checks}
    assert detail["more-steps"].startswith("the suite has no white-box attack with steps")
    assert card.passed and card.verdict == "pass" and card.exit_code == 0  # a skipped check fails nothing
    n, k = len(card.checks), len(skipped)
    tally = f"{n} check(s): {n - k} pass, 0 warn, 0 fail, {k} skipped"
    summary = (tmp_path / "summary.md").read_text()
    assert tally in summary and "- more-steps: the suite has no white-box attack" in summary
    report = (tmp_path / "report.html").read_text()
    assert tally in report and report.count('<tr class="row-skipped">') == k
    suite = next(s for s in ET.parse(tmp_path / "junit.xml").getroot() if s.get("name") == "checks.fgsm-only")
    marked = sorted(c.get("name") for c in suite if c.find("skipped") is not None)
    assert marked == skipped and suite.get("skipped") == str(k) and suite.get("failures") == "0"


def test_a_suite_with_no_attack_skips_every_attack_check():
    import harness

    card = harness.run({"device": "cpu", "data": {"limit": 40}, "attacks": [], "gates": []}, show_progress=False)
    status = {c["name"]: c["status"] for c in card.checks}
    for name in ("large-epsilon", "more-steps", "epsilon-zero", "gradient-masking", "monotone-epsilon", "budget"):
        assert status[name] == "skipped", (name, status)
    # what the clean pass alone examines is still judged
    assert status["randomized-model"] == status["vanishing-gradients"] == status["finite"] == "pass"
    assert "40 sample(s)" in next(c["detail"] for c in card.checks if c["name"] == "finite")


def test_budget_and_finite_say_what_they_examined():
    assert checks.budget(3, 40, 1e-6) == checks.record(
        "budget", "fail", "3 adversarial example(s) outside their budget (tolerance 1e-06); they were counted as not adversarial")
    assert checks.budget(0, 0, 1e-6)["status"] == "skipped"  # nothing attacked under a finite budget: nothing vouched for
    assert checks.budget(0, 40, 1e-6)["detail"].startswith("every adversarial example of 40 attacked point(s)")
    assert checks.finite(1, 40)["status"] == "fail"
    assert checks.finite(0, 40) == checks.record("finite", "pass", "no NaN or infinite values in the clean outputs of 40 sample(s) "
                                                 "or in the adversarial examples")
