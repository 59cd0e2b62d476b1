"""The `probes:` section through harness.run: metrics per fraction, scans with known truth, gates,
per-fraction saves and resume, and bad entries."""

from __future__ import annotations

import json

import pytest
import yaml

import harness
from harness.evaluation import probes as probes_module
from harness.core.errors import RunFailed

SUITE = {"name": "poison", "device": "cpu", "data": {"limit": 120}, "attacks": [],
         "train": {"epochs": 5},
         "probes": [{"name": "badnets", "fractions": [0, 0.1], "fine_tune": True, "scans": ["activation-clustering"]}],
         "gates": [{"metric": "attack_success_rate:badnets@0.1", "max": 0.2}]}


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return harness.run(SUITE, show_progress=False, out=out), out


def test_badnets_backdoors_the_digits_pipeline_and_the_gate_catches_it(card):
    card, out = card
    m = card.metrics
    assert m["attack_success_rate:badnets@0.1"] > 0.8 and m["clean_accuracy:badnets@0.1"] > 0.9
    assert m["attack_success_rate:badnets@0"] < 0.1
    assert not card.passed and card.gates[0]["verdict"] == "fail" and card.gates[0]["ci95"] is not None
    rec = next(p for p in card.record["probes"] if p["fraction"] == "0.1")
    assert rec["n_poisoned"] > 0 and rec["trigger"] and rec["n_triggered"] < rec["n_test"]
    (scan,) = rec["scans"]
    assert scan["scan"] == "activation-clustering" and scan["recall"] is not None
    assert m["scan_recall:badnets/activation-clustering@0.1"] == scan["recall"]
    from harness.verdicts.metrics import wilson_interval
    from tests.test_intervals import uncovered

    assert not uncovered(card.record)  # precision and recall on their own denominators, Wilson
    recall = rec["metric_intervals"]["scan_recall:badnets/activation-clustering@0.1"]
    assert recall["n"] == rec["n_poisoned"]
    assert recall["ci95"] == [round(v, 6) for v in wilson_interval(scan["true_positives"], rec["n_poisoned"])]
    flagged = json.loads((out / scan["flagged_file"]).read_text())
    assert len(flagged["flagged_ids"]) == scan["n_flagged"]
    html = (out / "report.html").read_text()
    assert 'id="probes"' in html


def test_each_fraction_is_saved_and_a_resumed_run_skips_it(tmp_path, monkeypatch, card):
    card, _ = card
    real, calls = probes_module.evaluate_probes, []
    from harness.attacks.poisoning import PROBES

    cls = PROBES.get("badnets")
    original = cls.run

    def interrupted(self, *args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", interrupted)
    with pytest.raises(RunFailed, match="interrupted while running probes"):
        harness.run(SUITE, show_progress=False, out=tmp_path)
    assert len(json.loads((tmp_path / "run-state.json").read_text())["probes"]) == 1
    calls.clear()
    monkeypatch.setattr(cls, "run", lambda self, *a, **k: (calls.append(a[3]), original(self, *a, **k))[1])
    resumed = harness.run(SUITE, show_progress=False, out=tmp_path, resume=True)
    assert calls == [0.1]  # the 0 fraction was reused
    assert resumed.metrics == card.metrics


@pytest.mark.parametrize("probe, message", [
    ({"name": "badnet", "fractions": [0.1]}, "unknown probe 'badnet'"),
    ({"name": "badnets"}, "needs `fractions`"),
    ({"name": "neural-cleanse", "fractions": [0.1]}, "takes no `fractions`"),
    ({"name": "badnets", "fractions": [0.1], "scans": ["spectral"]}, "scans"),
])
def test_bad_probe_entries_are_one_line_exit_2(tmp_path, cli, probe, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "probes": [probe], "gates": []}))
    result = cli("validate", str(path))
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_fraction_the_training_set_cannot_hold_is_bad_input(tmp_path, cli):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "probes": [{"name": "clean-label", "fractions": [0.5]}], "gates": []}))
    result = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "probes[0].fractions" in result.stderr and "at most" in result.stderr
