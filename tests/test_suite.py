"""The whole attack suite through harness.run: cascade stages, minimal-perturbation attacks,
targeted mode, black-box query counting and corruptions, with numbers asserted."""

import pytest

import harness
from harness.errors import BadInput

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


def test_targeted_mode(card):
    rec = _rec(card, "pgd-l2-targeted", "1.5")
    assert rec["targeted"] is True and rec["target"] == "least-likely"
    assert 0.0 <= rec["target_hit_rate"] <= rec["attack_success_rate"]
    with pytest.raises(BadInput, match="no targeted mode"):
        harness.run({**BASE, "attacks": [{"name": "apgd-t", "norm": "linf", "epsilons": [0.1], "targeted": True}]})


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
