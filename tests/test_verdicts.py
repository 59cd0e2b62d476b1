"""Verdicts that earn their confidence (issue 11): pairing only the same samples, nothing measured is
not a pass, a missing baseline or a NaN is an error, every gated metric's interval (or why it has none),
and infinities that survive a save."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from harness.reports import render
from harness.cli import cli as group
from harness.reports.comparison import compare_records
from harness.config import GateConfig, parse_config
from harness.sources.data import load_data
from harness.core.errors import BadInput
from harness.verdicts.gates import judge_gates
from harness.verdicts.metrics import auroc_interval, interval_methods, metric_counts, metric_intervals, wilson_interval
from harness.verdicts.outcomes import Outcomes, pairing, sample_digests
from harness.reports.scorecard import Scorecard

ROBUST = "robust_accuracy:pgd-linf@0.1"


class _Evaluation:
    """What Outcomes.from_evaluation reads of a runner Evaluation: per metric, a flag per sample."""

    def __init__(self, flags: dict[str, torch.Tensor]) -> None:
        self._flags = flags

    def flags(self) -> dict[str, torch.Tensor]:
        return self._flags


def _outcomes(ds, robust_every: int = 2) -> Outcomes:
    """Outcomes of a run on `ds` whose robust points are decided by the sample's content (its label),
    so the same sample is robust in every run that scores it."""
    robust = (ds.y % robust_every == 0)
    return Outcomes.from_evaluation(_Evaluation({ROBUST: robust}), ds)


# --- pairing: the same samples, or say why not ----------------------------------------------------

def test_digests_are_per_sample_content_and_survive_outcomes_json():
    ds = load_data("builtin:digits", limit=60, seed=0)
    o = _outcomes(ds)
    assert o.digests.shape == (60, 8) and len({bytes(d) for d in o.digests}) == 60
    back = Outcomes.from_json(o.to_json(), "outcomes.json")
    assert np.array_equal(back.digests, o.digests)
    # the digest is sha256 over the image as float32 little-endian then the label as int64
    import hashlib

    first = hashlib.sha256(ds.x[0].numpy().astype("<f4").tobytes() + np.int64(ds.y[0]).astype("<i8").tobytes()).digest()[:8]
    assert bytes(o.digests[0]) == first
    old = json.loads(o.to_json())
    del old["digests"]  # a file from before digests: loads, but cannot be checked
    assert Outcomes.from_json(json.dumps(old), "old.json").digests is None
    bad = {**json.loads(o.to_json()), "digests": "AAAA"}
    with pytest.raises(BadInput, match="digests: 3 bytes, expected 480"):
        Outcomes.from_json(json.dumps(bad), "bad.json")


def test_pairing_refuses_another_limit_seed_or_shifted_folder(tmp_path):
    base = _outcomes(load_data("builtin:digits", limit=200, seed=0))
    # a smaller limit of the same seed draws a prefix of the same permutation: the same samples
    assert pairing(_outcomes(load_data("builtin:digits", limit=100, seed=0)), base) == (True, "paired")
    ok, why = pairing(_outcomes(load_data("builtin:digits", limit=300, seed=0)), base)
    assert not ok and why.startswith("only 200 of this run's 300 sample ids (66.7%) are in the baseline, below min_overlap 1")
    other_seed = _outcomes(load_data("builtin:digits", limit=200, seed=1))
    ok, why = pairing(other_seed, base)
    assert not ok and "below min_overlap 1" in why
    ok, why = pairing(other_seed, base, min_overlap=0.3)
    assert ok, why  # ids shared by the two subsets name the same digits: pairable when the gate allows it

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    from PIL import Image

    def write(name: str, cls: str) -> None:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / cls / name)

    for cls in ("cat", "dog"):
        for i in range(1, 7):
            write(f"{i}.png", cls)
    before = _outcomes(load_data(f"imagefolder:{folder}"))
    write("0.png", "cat")  # sorts first: every later id now names the next file
    after = _outcomes(load_data(f"imagefolder:{folder}"))
    ok, why = pairing(after, before)
    assert not ok and why.startswith("only 12 of this run's 13 sample ids")
    ok, why = pairing(after, before, min_overlap=0.9)
    assert not ok and why.startswith("12 of the 12 shared sample ids hold different samples") and "first: id 0" in why


def test_max_drop_gate_falls_back_to_unpaired_and_says_why():
    base_ds, now_ds = load_data("builtin:digits", limit=200, seed=0), load_data("builtin:digits", limit=200, seed=1)
    base, now = _outcomes(base_ds), _outcomes(now_ds)
    value, base_value = float(now.flags[ROBUST].mean()), float(base.flags[ROBUST].mean())
    gate = GateConfig(metric=ROBUST, max_drop=0.05)
    (g,) = judge_gates([gate], {ROBUST: value}, {ROBUST: 200}, {ROBUST: base_value}, outcomes=now, baseline_outcomes=base,
                       baseline_counts={ROBUST: 200})
    assert g["test"] == "unpaired" and g["interval_method"] == "newcombe" and g["pairing"].startswith("unpaired: only ")
    assert "unpaired (only " in g["reason"] or g["verdict"] == "pass"
    # the same gate allowing a 20% overlap pairs the shared ids (the same digits in both subsets)
    (g,) = judge_gates([GateConfig(metric=ROBUST, max_drop=0.05, min_overlap=0.2)], {ROBUST: value}, {ROBUST: 200},
                       {ROBUST: base_value}, outcomes=now, baseline_outcomes=base, baseline_counts={ROBUST: 200})
    shared = np.intersect1d(now.ids, base.ids).size
    assert g["pairing"] == "paired" and g["test"] == "mcnemar" and g["n_pairs"] == shared and g["n10"] == g["n01"] == 0
    assert g["min_overlap"] == 0.2
    # outcomes without digests (an older outcomes.json) are compared unpaired, saying so
    undigested = Outcomes(now.ids, now.flags, now.labels)
    (g,) = judge_gates([gate], {ROBUST: value}, {ROBUST: 200}, {ROBUST: value}, outcomes=undigested, baseline_outcomes=now,
                       baseline_counts={ROBUST: 200})
    assert g["test"] == "unpaired" and "has no per-sample digests" in g["pairing"]


def _attack(id_: str, epsilon: str, norm: str, n: int, n_attacked: int, **extra) -> dict:
    """An attack record with the keys the renderings read."""
    return {"id": id_, "name": id_.split("-")[0], "backend": "native", "norm": norm, "epsilon": epsilon,
            "epsilon_value": math.inf if epsilon == "inf" else float(epsilon), "robust_accuracy": 1.0 - n_attacked / max(n, 1),
            "attack_success_rate": 0.0, "n": n, "n_attacked": n_attacked, "seconds": 0.1, "perturbation": {"median": 0.0, "max": 0.0},
            **extra}


def _card(metrics: dict, attacks: list | None = None, outcomes: Outcomes | None = None, samples: int = 100, **extra) -> Scorecard:
    record = {"schema_version": 1, "name": "v", "passed": True, "verdict": "pass", "metrics": metrics, "gates": [],
              "attacks": attacks or [], "probes": [], "defenses": [], "checks": [],
              "provenance": {"samples": samples, "data_source": "builtin:digits", "split": "test"}, **extra}
    return Scorecard(record, outcomes)


def test_compare_flips_use_the_same_pairing_rule():
    base_ds = load_data("builtin:digits", limit=100, seed=0)
    shifted = load_data("builtin:digits", limit=100, seed=0)
    shifted = type(shifted)(x=shifted.x.flip(0), y=shifted.y.flip(0), ids=shifted.ids, source=shifted.source, split=shifted.split)
    a = _card({"clean_accuracy": 1.0, ROBUST: 0.5}, outcomes=_outcomes(base_ds))
    same = _card({"clean_accuracy": 1.0, ROBUST: 0.5}, outcomes=_outcomes(base_ds))
    moved = _card({"clean_accuracy": 1.0, ROBUST: 0.5}, outcomes=_outcomes(shifted))  # other samples at the same ids
    flips = compare_records([a, same, moved])["flips"]
    assert flips[0]["note"] == "" and flips[0]["metrics"][0]["n_pairs"] == 100
    assert flips[1]["metrics"] == [] and flips[1]["note"].startswith("not paired sample by sample: ")
    assert "hold different samples" in flips[1]["note"]


# --- nothing measured, missing baselines, NaN ---------------------------------------------------

def test_a_metric_on_zero_samples_is_inconclusive_with_interval_zero_one():
    # a model with no correct point: the attack attacked nothing, its success rate rests on 0 samples
    asr = "attack_success_rate:pgd-linf@0.1"
    attack = _attack("pgd-linf", "0.1", "linf", 100, 0)
    card = _card({"clean_accuracy": 0.0, ROBUST: 0.0, asr: 0.0}, attacks=[attack])
    assert metric_counts(card.record)[asr] == 0 and metric_intervals(card.record)[asr] == [0.0, 1.0]
    for gate in (GateConfig(metric=asr, max=0.05), GateConfig(metric=asr, max=1.0), GateConfig(metric=asr, min=0.0)):
        (g,) = card.rejudge([gate]).gates
        assert g["verdict"] == "inconclusive" and not g["passed"] and g["ci95"] == [0.0, 1.0], gate
        assert "nothing was measured: the metric rests on 0 samples" in g["reason"]
    assert card.rejudge([GateConfig(metric=asr, max=0.05)]).verdict == "inconclusive"
    # ... and no policy turns nothing into a pass
    lenient = card.rejudge([GateConfig(metric=asr, max=0.05, on_inconclusive="pass")])
    assert not lenient.gates[0]["passed"] and not lenient.passed and "never a pass" in lenient.gates[0]["reason"]
    assert not card.rejudge([GateConfig(metric=asr, max=0.05)], on_inconclusive="pass").passed
    # a producer's metric on no sample (a detector shown no adversarial example) is inconclusive too
    det = "detection_rate:mahal/pgd-linf@0.1"
    card.record["metrics"][det] = 0.0
    card.record["defenses"] = [{"id": "mahal", "kind": "detector", "attacks": [],
                                "metric_intervals": {det: {"ci95": [0.0, 1.0], "method": "wilson", "n": 0}}}]
    (g,) = card.rejudge([GateConfig(metric=det, max=1.0)]).gates
    assert g["verdict"] == "inconclusive" and "rests on 0 samples" in g["reason"]


def test_nan_value_fails_before_and_after_a_save(tmp_path):
    card = _card({"clean_accuracy": 0.9, ROBUST: math.nan})
    gates = [GateConfig(metric=ROBUST, min=0.1, on_inconclusive="pass"), GateConfig(metric=ROBUST, max=0.9)]
    for c in (card, None):
        if c is None:
            card.rejudge(gates).save(tmp_path)
            assert json.loads((tmp_path / "scorecard.json").read_text())["metrics"][ROBUST] is None  # NaN is null
            c = Scorecard.load(tmp_path)
        judged = c.rejudge(gates)
        assert [g["verdict"] for g in judged.gates] == ["fail", "fail"] and judged.verdict == "fail"
        assert all("is not a number" in g["reason"] and g["passed"] is False for g in judged.gates)


def test_nan_or_infinite_thresholds_are_refused_at_validation(tmp_path):
    for key, value in [("min", math.nan), ("max", math.inf), ("max_drop", math.nan), ("min", -math.inf)]:
        with pytest.raises(BadInput) as e:
            parse_config({"gates": [{"metric": "clean_accuracy", key: value}]}, "suite.yaml")
        assert e.value.where == f"suite.yaml: gates[0].{key}" and "finite number" in e.value.problem
    cfg = tmp_path / "nan.yaml"
    cfg.write_text("gates:\n  - {metric: clean_accuracy, min: .nan}\n")
    result = CliRunner().invoke(group, ["validate", str(cfg)])
    assert result.exit_code == 2 and "gates[1].min" not in result.output and f"{cfg}: gates[0].min" in result.output
    with pytest.raises(BadInput, match="min_overlap applies to max_drop gates only"):
        parse_config({"gates": [{"metric": "clean_accuracy", "min": 0.5, "min_overlap": 0.9}]})


def test_a_missing_baseline_file_is_exit_2(tmp_path):
    card = _card({"clean_accuracy": 0.9})
    card.save(tmp_path / "a")
    result = CliRunner().invoke(group, ["gate", str(tmp_path / "a"), "--baseline", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "scorecard not found" in result.output


# --- every gated metric carries an interval or says why not (the contract with the producers) ----

DET, AUC = "detection_rate:mahal/pgd-linf@0.1", "auroc:mahal/pgd-linf@0.1"
MED, ANOMALY, PREC = "median_perturbation:cw-l2", "anomaly_index:nc", "scan_precision:spectral@0.1"


def _contract_card() -> Scorecard:
    """A record as the producers write it (hand-made, following /tmp/helpers/contract.md)."""
    det_ci = [round(v, 6) for v in wilson_interval(45, 50)]
    auc_ci = [round(v, 6) for v in auroc_interval(0.95, 50, 50)]
    detector = {"id": "mahal", "kind": "detector", "attacks": [],
                "detector": {"metric_intervals": {
                    DET: {"ci95": det_ci, "method": "wilson", "n": 50},
                    AUC: {"ci95": auc_ci, "method": "auroc-score", "n": 100, "n_pos": 50, "n_neg": 50}}}}
    attack = _attack("cw-l2", "inf", "l2", 100, 100, median_perturbation=1.2,
                     metric_intervals={MED: {"ci95": [0.9, math.inf], "method": "order-statistic", "n": 100}})
    probes = [{"id": "nc", "kind": "scan", "metric_intervals": {
        ANOMALY: {"ci95": None, "method": "point", "n": None,
                  "why": "the anomaly index is a ratio of a median absolute deviation over 10 classes; no interval is computed"},
        PREC: {"ci95": [0.2, 0.7], "method": "wilson", "n": 20}}}]
    card = _card({"clean_accuracy": 0.9, DET: 0.9, AUC: 0.95, MED: 1.2, ANOMALY: 2.5, PREC: 0.45}, attacks=[attack],
                 defenses=None)
    card.record.update(defenses=[detector], probes=probes)
    return card


def test_metric_intervals_and_interval_methods_follow_the_producers():
    record = _contract_card().record
    intervals, methods = metric_intervals(record), interval_methods(record)
    assert intervals[DET] == pytest.approx(wilson_interval(45, 50), abs=1e-6)
    assert intervals[AUC] == pytest.approx(auroc_interval(0.95, 50, 50), abs=1e-6)
    assert intervals[MED] == [0.9, math.inf] and intervals[PREC] == [0.2, 0.7] and ANOMALY not in intervals
    assert intervals["clean_accuracy"] == pytest.approx(wilson_interval(90, 100), abs=1e-6)
    assert methods[DET] == {"method": "wilson"} and methods[AUC] == {"method": "auroc-score"}
    assert methods[MED] == {"method": "order-statistic"} and methods["clean_accuracy"] == {"method": "wilson"}
    assert methods[ANOMALY] == {"method": "point", "why": record["probes"][0]["metric_intervals"][ANOMALY]["why"]}


def test_gates_are_judged_on_the_producers_intervals_and_point_gates_say_so():
    card = _contract_card()
    gates = [GateConfig(metric=DET, min=0.8), GateConfig(metric=AUC, min=0.85), GateConfig(metric=MED, min=0.5),
             GateConfig(metric=MED, min=1.0), GateConfig(metric=ANOMALY, max=3.0), GateConfig(metric=PREC, min=0.3)]
    judged = card.rejudge(gates)
    g = {(x["metric"], x["threshold"]): x for x in judged.gates}
    # 45 of 50 detected: 0.9 is above 0.8, but the interval [0.786, 0.957] reaches below it
    assert g[(DET, 0.8)]["verdict"] == "inconclusive" and g[(DET, 0.8)]["interval_method"] == "wilson"
    assert g[(AUC, 0.85)]["verdict"] == "pass" and g[(AUC, 0.85)]["interval_method"] == "auroc-score"
    assert g[(AUC, 0.85)]["ci95"] == pytest.approx(auroc_interval(0.95, 50, 50), abs=1e-6)
    assert g[(MED, 0.5)]["verdict"] == "pass" and g[(MED, 1.0)]["verdict"] == "inconclusive"
    assert g[(MED, 1.0)]["ci95"] == [0.9, math.inf] and "(order-statistic)" in g[(MED, 1.0)]["reason"]
    point = g[(ANOMALY, 3.0)]
    assert point["verdict"] == "pass" and point["interval_method"] == "point" and point["ci95"] is None
    assert point["reason"] == "judged on its point value: the anomaly index is a ratio of a median absolute deviation over 10 classes; no interval is computed"
    assert g[(PREC, 0.3)]["verdict"] == "inconclusive"
    # the report and summary show the point-only gate as such
    record = judged.to_dict()
    html = render.report_html(record)
    assert "point value" in html and "ratio of a median absolute deviation" in html
    row = [line for line in render.summary_md(record).splitlines() if "anomaly" in line][0]
    assert "| point value |" in row


def test_report_and_summary_show_the_pairing_of_max_drop_gates():
    ds = load_data("builtin:digits", limit=100, seed=0)
    base = _card({"clean_accuracy": 1.0, ROBUST: 0.5}, outcomes=_outcomes(ds))
    now = _card({"clean_accuracy": 1.0, ROBUST: 0.5}, outcomes=_outcomes(ds))
    paired = now.rejudge([GateConfig(metric=ROBUST, max_drop=0.1)], base).to_dict()
    unpaired = now.rejudge([GateConfig(metric=ROBUST, max_drop=0.1)], _card({ROBUST: 0.5})).to_dict()
    assert paired["gates"][0]["pairing"] == "paired"
    assert "paired" in render.report_html(paired) and "; paired |" in render.summary_md(paired)
    assert "unpaired: no per-sample outcomes (outcomes.json) for the baseline" in render.report_html(unpaired)
    assert "; unpaired |" in render.summary_md(unpaired)


# --- infinities survive a save --------------------------------------------------------------------

def test_infinities_are_written_as_strings_and_read_back(tmp_path):
    card = _contract_card()
    card.record["metrics"]["weird"] = -math.inf
    judged = card.rejudge([GateConfig(metric=MED, min=0.5)])
    judged.record["intervals"] = metric_intervals(judged.record)
    judged.save(tmp_path)
    raw = json.loads((tmp_path / "scorecard.json").read_text())
    assert raw["metrics"]["weird"] == "-inf" and raw["intervals"][MED] == [0.9, "inf"]
    assert raw["attacks"][0]["metric_intervals"][MED]["ci95"] == [0.9, "inf"] and raw["attacks"][0]["epsilon"] == "inf"
    back = Scorecard.load(tmp_path)
    assert back.metrics["weird"] == -math.inf and back.record["intervals"][MED] == [0.9, math.inf]
    assert back.attacks[0]["epsilon"] == "inf"  # a label stays a label
    assert back.gates[0]["ci95"] == [0.9, math.inf] and back.rejudge().gates[0]["verdict"] == "pass"
    assert render._num(math.inf) == "∞" and render._num("inf") == "∞" and render._ci_text([0.9, "inf"]) == "[0.900, ∞]"


def test_an_infinite_median_perturbation_passes_again_under_harness_gate(tmp_path):
    # cw with one step of one round breaks no digit: most points resist, the median perturbation is inf
    cfg = tmp_path / "inf.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "inf-median", "device": "cpu", "data": {"source": "builtin:digits", "limit": 30, "batch_size": 64},
        "attacks": [{"name": "cw", "norm": "l2", "steps": 1, "binary_search_steps": 1}],
        "gates": [{"metric": "median_perturbation:cw-l2", "min": 0.5}]}))
    run = CliRunner().invoke(group, ["run", str(cfg), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    saved = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    assert saved["metrics"]["median_perturbation:cw-l2"] == "inf" and saved["gates"][0]["value"] == "inf"
    again = CliRunner().invoke(group, ["gate", str(tmp_path / "out")], catch_exceptions=False)
    assert again.exit_code == 0 and "median_perturbation:cw-l2 >= 0.5: inf" in again.output and "PASS" in again.output
    # the run's outcomes.json carries each sample's digest, computed from the data it scored
    outcomes = Outcomes.from_json((tmp_path / "out" / "outcomes.json").read_bytes(), "outcomes.json")
    ds = load_data("builtin:digits", limit=30, seed=0)
    assert np.array_equal(outcomes.digests, sample_digests(ds.x.numpy(), ds.y.numpy()))
    assert "∞" in (tmp_path / "out" / "summary.md").read_text()
