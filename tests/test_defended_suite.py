"""The `defenses:` section: the undefended model and its defended variants in one run, side by side."""

from __future__ import annotations

import json

import pytest
import yaml

import harness

BASE = {"name": "defended", "device": "cpu", "data": {"limit": 100},
        "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.2], "steps": 10}]}


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    from safetensors.torch import save_file

    from harness.builtin import digits_cnn

    weights = tmp_path_factory.mktemp("w") / "variant.safetensors"
    save_file(digits_cnn()[0].state_dict(), str(weights))  # a stand-in for `harness harden` output
    cfg = {**BASE, "defenses": [{"name": "bit-depth", "bits": 2}, {"name": "mahalanobis", "fpr": 0.1},
                                {"name": "pgd-at", "id": "retrained", "weights": str(weights)}],
           "gates": [{"metric": "robust_accuracy:bit-depth/worst-linf@0.2", "max": 0.5}]}
    return harness.run(cfg, show_progress=False, out=tmp_path_factory.mktemp("out"))


def test_a_non_differentiable_defense_looks_robust_naively_and_falls_adaptively(card):
    m = card.metrics
    assert m["robust_accuracy:pgd-linf@0.2"] < 0.1  # the undefended model
    assert m["robust_accuracy:bit-depth-naive/pgd-linf@0.2"] > 0.8  # gradients hidden: PGD cannot move it
    assert m["robust_accuracy:bit-depth/pgd-linf@0.2"] < 0.2  # BPDA breaks it
    assert m["clean_accuracy:bit-depth"] == m["clean_accuracy:bit-depth-naive"]
    # the gate reads the adaptive number, and the naive run's masked gradients are warnings, not failures
    assert card.gates[0]["value"] == m["robust_accuracy:bit-depth/worst-linf@0.2"] and card.passed
    status = {c["name"]: c["status"] for c in card.checks}
    assert status["bit-depth-naive: vanishing-gradients"] == "warn" and status["bit-depth: vanishing-gradients"] == "pass"


def test_variants_are_side_by_side_in_the_scorecard_and_report(card, tmp_path):
    by = {d["id"]: d for d in card.record["defenses"]}
    assert [d["mode"] for d in card.record["defenses"] if d["name"] == "bit-depth"] == ["naive", "adaptive"]
    adaptive = by["bit-depth"]
    assert adaptive["gain"]["robust_accuracy:worst-linf@0.2"] == pytest.approx(
        adaptive["robust_accuracy"]["robust_accuracy:worst-linf@0.2"] - card.metrics["robust_accuracy:worst-linf@0.2"])
    assert adaptive["clean_accuracy_cost"] == pytest.approx(card.metrics["clean_accuracy"] - adaptive["clean_accuracy"])
    # the retrained variant here has the same weights as the model: nothing changes
    assert by["retrained"]["kind"] == "trained" and by["retrained"]["clean_accuracy_cost"] == 0
    assert card.metrics["robust_accuracy:retrained/pgd-linf@0.2"] == card.metrics["robust_accuracy:pgd-linf@0.2"]
    html = card.save(tmp_path).joinpath("report.html").read_text()
    assert 'id="defenses"' in html and "bit-depth (adaptive)" in html and "detection rate" in html
    roles = [a["role"] for a in card.provenance["artifacts"]]
    assert "weights:retrained" in roles


def test_a_detector_reports_detection_rate_at_its_false_positive_rate(card):
    det = next(d for d in card.record["defenses"] if d["kind"] == "detector")
    (res,) = det["results"]
    assert res["fpr"] == 0.1 and res["n_adv"] > 10 and isinstance(res["n_adv"], int)
    assert 0.0 <= res["clean_fpr"] <= 0.2 and 0.5 < res["auroc"] <= 1.0
    assert card.metrics["detection_rate:mahalanobis/pgd-linf@0.2"] == res["detection_rate"]


@pytest.mark.parametrize("defense, message", [
    ({"name": "no-such-defense"}, "unknown defense 'no-such-defense'"),
    ({"name": "pgd-at"}, "give the `weights`"),
    ({"name": "jpeg", "weights": "w.safetensors"}, "takes no `weights`"),
    ({"name": "bit-depth", "bitz": 3}, "unknown parameter 'bitz'"),
    ({"name": "mahalanobis", "fpr": 1.5}, "fpr"),
])
def test_bad_defense_entries_are_one_line_exit_2(tmp_path, cli, defense, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "defenses": [defense]}))
    result = cli("validate", str(path))
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_gates_may_name_variant_metrics_but_not_made_up_ones(tmp_path, cli):
    path = tmp_path / "c.yaml"
    ok = {**BASE, "defenses": [{"name": "jpeg"}], "gates": [{"metric": "robust_accuracy:jpeg/worst-linf@0.2", "min": 0.1}]}
    path.write_text(yaml.safe_dump(ok))
    assert cli("validate", str(path)).exit_code == 0
    bad = {**ok, "gates": [{"metric": "robust_accuracy:jpeg/worst-linf@0.3", "min": 0.1}]}
    path.write_text(yaml.safe_dump(bad))
    assert cli("validate", str(path)).exit_code == 2
