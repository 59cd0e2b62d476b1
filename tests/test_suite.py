"""The whole attack suite through harness.run: cascade stages, minimal-perturbation attacks,
targeted mode, black-box query counting and corruptions, with numbers asserted."""

import pytest
import torch

import harness
from harness.core.errors import BadInput

BASE = {"name": "suite", "data": {"limit": 48, "batch_size": 64}}


@pytest.fixture(scope="module")
def card():
    return harness.run({**BASE, "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "standard", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 10, "n_target_classes": 3, "queries": 100},
        {"name": "deepfool", "norm": "linf", "steps": 30},
        {"name": "deepfool", "norm": "l2", "epsilons": [0.5, 1.5], "steps": 30},
        {"name": "pgd", "norm": "l2", "epsilons": [0.5, 1.5], "steps": 10, "targeted": True, "target": "least-likely"},
        {"name": "noise", "norm": "linf", "epsilons": [0.1], "draws": 10},
        {"name": "corruptions", "kinds": ["gaussian-noise", "contrast"], "severities": [1, 5]},
    ]})


def _rec(card, attack_id, eps):
    return next(a for a in card.attacks if a["id"] == attack_id and a["epsilon"] == eps)


def test_metric_ids_match_the_config(card):
    from harness.config import parse_config

    cfg = parse_config({**BASE, "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "deepfool", "norm": "linf"},
        {"name": "corruptions", "kinds": ["blur"], "severities": [2]},
    ]})
    ids = cfg.metric_ids()
    assert "median_perturbation:deepfool-linf" in ids and "robust_accuracy:deepfool-linf@0.1" in ids  # judged at the suite's epsilons
    assert "robust_accuracy:blur@2" in ids and not any(i.startswith("attack_success_rate:blur") for i in ids)
    assert set(card.metrics) >= {"median_perturbation:deepfool-linf", "median_perturbation:deepfool-l2", "robust_accuracy:contrast@5"}


def test_standard_records_each_stage(card):
    for eps in ("0.05", "0.1"):
        rec = _rec(card, "standard-linf", eps)
        stages = rec["stages"]
        assert [s["attack"] for s in stages] == ["apgd-ce", "apgd-t", "square"]
        ras = [s["robust_accuracy"] for s in stages]
        assert ras == sorted(ras, reverse=True) and ras[-1] == rec["robust_accuracy"]
        for before, after in zip(stages, stages[1:]):
            assert after["n_attacked"] == before["n_attacked"] - before["n_broken"]
        # in cascade, the ensemble only sees what FGSM left robust
        fgsm = _rec(card, "fgsm-linf", eps)
        assert stages[0]["n_attacked"] == fgsm["n_attacked"] - fgsm["n_broken"]


def test_worst_case_covers_minimal_attacks(card):
    m = card.metrics
    for eps in ("0.05", "0.1"):
        worst = m[f"robust_accuracy:worst-linf@{eps}"]
        assert worst <= m[f"robust_accuracy:standard-linf@{eps}"]
        assert worst == m[f"robust_accuracy:noise-linf@{eps}"] if eps == "0.1" else True  # noise is the last linf stage at 0.1
    assert m["robust_accuracy:worst-linf@0.1"] <= m["robust_accuracy:worst-linf@0.05"]
    df = _rec(card, "deepfool-linf", "0.1")
    assert df["minimal"] is True and df["median_perturbation"] > 0
    assert df["n_attacked"] == round(m["clean_accuracy"] * 48)  # a minimal attack sees every correct point
    assert df["perturbation"]["max"] <= 0.1 + 1e-6  # only breaks within the epsilon count there


def test_minimal_distances_imply_robustness(card):
    m = card.metrics
    assert m["robust_accuracy:deepfool-l2@1.5"] <= m["robust_accuracy:deepfool-l2@0.5"]
    df = _rec(card, "deepfool-l2", "1.5")
    assert df["attack_success_rate"] > 0.5 and 0 < df["median_perturbation"] < 1.5
    assert df["perturbation"]["max"] <= 1.5 + 1e-6


def test_targeted_mode_is_recorded_and_refused_where_the_attack_has_none(card):
    rec = _rec(card, "pgd-l2-targeted", "1.5")
    assert rec["targeted"] is True and rec["target"] == "least-likely"
    with pytest.raises(BadInput, match="no targeted mode"):
        harness.run({**BASE, "attacks": [{"name": "apgd-t", "norm": "linf", "epsilons": [0.1], "targeted": True}]})


@pytest.fixture(scope="module")
def targeted():
    """Targeted PGD-10 in L2 on its own (in the suite above deepfool leaves it nothing to attack at 1.5),
    through a registered PGD that records the targets the runner hands it and the examples it returns."""
    from harness.attacks import ATTACKS

    calls: list[dict[str, torch.Tensor]] = []

    class Recording(ATTACKS.get("pgd")):
        def __call__(self, model, x, y, threat, *, generator=None, target=None):
            adv = super().__call__(model, x, y, threat, generator=generator, target=target)
            if target is not None:  # the validity checks re-run attacks untargeted
                calls.append({"x": x.clone(), "y": y.clone(), "target": target.clone(), "adv": adv.detach().clone()})
            return adv

    ATTACKS.register("recording-pgd")(Recording)
    try:
        card = harness.run({**BASE, "cascade": False, "attacks": [
            {"name": "recording-pgd", "id": "least", "norm": "l2", "epsilons": [1.5, 3.0], "steps": 10, "targeted": True,
             "target": "least-likely"},
            {"name": "pgd", "id": "random", "norm": "l2", "epsilons": [3.0], "steps": 10, "targeted": True},
        ]}, show_progress=False)
    finally:
        ATTACKS._entries.pop("recording-pgd", None)
    return card, calls


def test_targeted_pgd_reaches_its_target(targeted):
    card, _ = targeted
    # measured on the 47 correct points of 48: least-likely at 1.5 breaks 40 and hits 33; at 3.0 every
    # point reaches its target, least-likely or random. A broken target (say, always the label) hits none.
    for attack_id in ("least", "random"):
        rec = _rec(card, attack_id, "3.0")
        assert rec["n_attacked"] == 47 and rec["target_hit_rate"] == 1.0, rec
    least = _rec(card, "least", "1.5")
    assert least["n_attacked"] == 47 and least["target_hit_rate"] >= 0.6, least
    # a point can leave its class for another than the target: those are successes, not hits
    assert least["target_hit_rate"] < least["attack_success_rate"], least


def test_least_likely_targets_are_the_argmin_of_the_clean_logits(targeted, wrapped_digits):
    _, calls = targeted
    assert len(calls) == 2  # one batch per epsilon
    for call in calls:
        with torch.no_grad():
            logits = wrapped_digits(call["x"])
        assert torch.equal(call["target"], logits.argmin(dim=1))
        assert not bool((call["target"] == call["y"]).any())  # the least-likely class of a correct point is never its label


def test_hits_are_counted_only_where_the_prediction_is_the_target(targeted, wrapped_digits):
    card, calls = targeted
    for call, eps in zip(calls, ("1.5", "3.0")):
        with torch.no_grad():
            pred = wrapped_digits(call["adv"].clamp(0, 1)).argmax(dim=1)
        hits, broken = int((pred == call["target"]).sum()), int((pred != call["y"]).sum())
        rec = _rec(card, "least", eps)
        assert rec["target_hit_rate"] == pytest.approx(hits / rec["n_attacked"]), (eps, hits, rec)
        assert rec["attack_success_rate"] == pytest.approx(broken / rec["n_attacked"]), (eps, broken, rec)


def test_queries_and_gradients_are_counted(card):
    noise = _rec(card, "noise-linf", "0.1")
    assert noise["gradients_per_point"] == 0 and 1 <= noise["queries_per_point"] <= 10 + 1
    fgsm = _rec(card, "fgsm-linf", "0.1")
    assert fgsm["gradients_per_point"] == 1.0 and fgsm["queries_per_point"] == 1.0


def test_corruptions_are_baselines_not_budgets(card):
    m = card.metrics
    assert m["robust_accuracy:gaussian-noise@5"] <= m["robust_accuracy:gaussian-noise@1"]
    assert m["robust_accuracy:contrast@5"] <= m["robust_accuracy:contrast@1"]
    rec = _rec(card, "gaussian-noise", "5")
    assert rec["norm"] is None and rec["name"] == "corruptions"
    assert not any("gaussian" in k for k in m if k.startswith("robust_accuracy:worst"))


def test_minimal_attack_without_suite_epsilons_reports_distances():
    card = harness.run({**BASE, "attacks": [{"name": "deepfool", "norm": "l2", "steps": 20}]})
    assert card.metrics["median_perturbation:deepfool-l2"] > 0
    assert [a["epsilon"] for a in card.attacks] == ["inf"]
