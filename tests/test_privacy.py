"""Privacy probes: membership inference and extraction, checked against answers known in closed form.

The metric code on synthetic scores (members N(2, 1), non-members N(0, 1)); a null case whose gates
never fail; LiRA on synthetic shadow confidences (and without the bias a plug-in Gaussian has when
the target is left out); a model made to memorize its training set is caught; a linear victim whose
probabilities give its copy away; then the probes through `harness run`: records, intervals, gates,
the keep masks, resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.attacks.privacy import (Extraction, MembershipInference, OutputDefense, answer, keep_masks, lira_scores,
                                     query_set, sample_patches, soft_targets, train_thief)
from harness.core.stats import auc_score, best_advantage_threshold, roc_points, threshold_at_fpr
from harness.evaluation.privacy import clustered_wilson, membership_metrics
from harness.training.loop import OptimizerSettings, ScheduleSettings, TrainSettings


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _metrics(pos: np.ndarray, neg: np.ndarray, seed: int = 0, fprs=(0.01, 0.001)) -> dict:
    scores = torch.from_numpy(np.concatenate([pos, neg]))
    member = torch.cat([torch.ones(len(pos), dtype=torch.bool), torch.zeros(len(neg), dtype=torch.bool)])
    return membership_metrics(scores, member, torch.arange(len(scores)), fprs, 0.5, seed, "mia")


# --- the metric code, in closed form --------------------------------------------------------------

def test_gaussian_scores_give_the_closed_form_tpr_auc_and_advantage():
    """Members N(2, 1) against non-members N(0, 1): TPR at 1% FPR is 1 - Phi(z_0.99 - 2) = 0.372,
    the AUROC Phi(2 / sqrt 2) = 0.921, the advantage max TPR - FPR = 2 Phi(1) - 1 = 0.683."""
    rng = np.random.default_rng(0)
    rec = _metrics(rng.normal(2, 1, 40_000), rng.normal(0, 1, 40_000))
    m, iv = rec["metrics"], rec["metric_intervals"]
    truth = {"tpr_at_fpr:mia@0.01": 1 - _phi(2.326348 - 2), "auc:mia": _phi(2 / math.sqrt(2)), "advantage:mia": 2 * _phi(1) - 1}
    assert [round(v, 3) for v in truth.values()] == [0.372, 0.921, 0.683]
    for k, v in truth.items():
        assert abs(m[k] - v) < 0.02, (k, m[k], v)
        lo, hi = iv[k]["ci95"]
        assert lo <= v <= hi, (k, lo, v, hi)
    # 20,000 non-member trials per part resolve 0.001 as well: TPR there is 1 - Phi(3.090 - 2) = 0.138
    assert abs(m["tpr_at_fpr:mia@0.001"] - (1 - _phi(3.090232 - 2))) < 0.03
    level = rec["levels"][0]
    assert level["resolved"] and abs(level["fpr_measured"] - 0.01) < 0.003  # measured on trials that did not choose it


def test_the_threshold_is_chosen_on_other_trials_than_it_is_measured_on():
    """With about 120 non-members per part the FPR is measured, not tuned: over many draws, the measured FPR
    averages the level (here 0.01) rather than sitting on it every time."""
    rng = np.random.default_rng(1)
    measured = [_metrics(rng.normal(0, 1, 240), rng.normal(0, 1, 240), seed=s, fprs=(0.01,))["levels"][0]["fpr_measured"]
                for s in range(200)]
    assert 0.0 < np.mean(measured) < 0.03 and np.std(measured) > 0.003


def test_null_membership_auc_interval_holds_one_half_and_a_max_gate_never_fails():
    from harness.config.schema import GateConfig
    from harness.verdicts.gates import judge_gates

    gates = [GateConfig(metric="tpr_at_fpr:mia@0.01", max=0.03), GateConfig(metric="advantage:mia", max=0.1),
             GateConfig(metric="auc:mia", max=0.6)]
    verdicts = []
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        scores = rng.normal(0, 1, 4000)
        member = rng.random(4000) < 0.5  # membership drawn at random: nothing to infer
        rec = membership_metrics(torch.from_numpy(scores), torch.from_numpy(member), torch.arange(4000), (0.01,), 0.5, seed, "mia")
        lo, hi = rec["metric_intervals"]["auc:mia"]["ci95"]
        assert lo <= 0.5 <= hi, (seed, lo, hi)
        judged = judge_gates(gates, rec["metrics"], {}, intervals={k: v["ci95"] for k, v in rec["metric_intervals"].items()},
                             interval_methods={k: {"method": v["method"]} for k, v in rec["metric_intervals"].items()})
        verdicts += [g["verdict"] for g in judged]
    assert "fail" not in verdicts and verdicts.count("pass") > len(verdicts) // 2


def test_an_unresolvable_fpr_is_absent_and_its_gate_inconclusive_with_the_reason():
    from harness.config.schema import GateConfig
    from harness.verdicts.gates import judge_gates
    from harness.verdicts.metrics import interval_methods

    rng = np.random.default_rng(2)
    rec = _metrics(rng.normal(1, 1, 600), rng.normal(0, 1, 600))  # 300 non-members per part: 0.01 yes, 0.001 no
    assert "tpr_at_fpr:mia@0.01" in rec["metrics"] and "tpr_at_fpr:mia@0.001" not in rec["metrics"]
    assert rec["levels"][1] == {**rec["levels"][1], "resolved": False} and "1000 non-member trials" in rec["levels"][1]["why"]
    card = {"metrics": rec["metrics"], "probes": [rec]}
    judged = judge_gates([GateConfig(metric="tpr_at_fpr:mia@0.001", max=0.5)], rec["metrics"], {},
                         interval_methods=interval_methods(card))[0]
    assert judged["verdict"] == "inconclusive" and not judged["passed"] and "1000 non-member trials" in judged["reason"]


def test_roc_auc_and_thresholds_on_small_known_cases():
    assert auc_score([3, 2], [1, 2]) == 0.875  # 3 of 4 pairs above, one tie
    assert threshold_at_fpr(list(range(1, 11)), 0.1) == 9.0  # calls only 10 positive: 1 of 10 non-members
    assert best_advantage_threshold([3, 4, 5], [1, 2, 3.5]) == 3.5  # TPR 2/3, FPR 0
    fpr, tpr = roc_points([3, 2], [1, 2])
    assert (fpr, tpr) == ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    rng = np.random.default_rng(3)
    fpr, tpr = roc_points(rng.normal(1, 1, 5000), rng.normal(0, 1, 5000), max_points=100)
    assert len(fpr) <= 102 and fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert all(a <= b for a, b in zip(fpr, fpr[1:])) and all(a <= b for a, b in zip(tpr, tpr[1:]))
    assert sum(f < 0.01 for f in fpr) > 20  # the low-FPR end keeps its detail


def test_clustered_trials_count_their_examples_not_their_trials():
    hits = torch.tensor([True, False] * 50).repeat_interleave(8)  # 100 examples, each 8 identical trials
    groups = torch.arange(100).repeat_interleave(8)
    entry = clustered_wilson(hits, groups)
    assert entry["n"] == 800 and entry["n_effective"] == 100.0
    from harness.core.stats import wilson_interval

    assert entry["ci95"] == [round(v, 6) for v in wilson_interval(50, 100)]
    independent = clustered_wilson(hits[torch.randperm(800, generator=torch.Generator().manual_seed(0))], torch.arange(800))
    assert independent["method"] == "wilson" and independent["ci95"] == [round(v, 6) for v in wilson_interval(400, 800)]


# --- LiRA -----------------------------------------------------------------------------------------

def _synthetic_shadows(m: int, n: int, gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, confidences): a model's confidence on an example is N(mu_i + gap, 1) when it trained on
    it and N(mu_i, 1) when not, mu_i an example's own difficulty."""
    g = torch.Generator().manual_seed(seed)
    keep = keep_masks(m, n, seed)
    mu = torch.randn(n, generator=g, dtype=torch.float64) * 3
    return keep, mu + gap * keep.double() + torch.randn(m, n, generator=g, dtype=torch.float64)


def _pooled_lira(keep, conf, variant, variance):
    m, n = keep.shape
    rows = [lira_scores(conf[t], conf[torch.arange(m) != t], keep[torch.arange(m) != t], variant, variance) for t in range(m)]
    return membership_metrics(torch.stack(rows).flatten(), keep.flatten(), torch.arange(n).expand(m, n).flatten(), (0.01,), 0.5, 0, "mia")


@pytest.mark.parametrize("variant,variance", [("online", "fixed"), ("online", "per-example"), ("offline", "fixed")])
def test_lira_separates_shifted_gaussians_as_the_likelihood_ratio_should(variant, variance):
    """A gap of 1 standard deviation between IN and OUT: the optimal test's AUROC is Phi(1 / sqrt 2) =
    0.760 (online). Per-example difficulty (mu_i spread by 3) hides it from a global threshold, which
    LiRA's per-example fits remove."""
    keep, conf = _synthetic_shadows(32, 1500, 1.0, seed=4)
    auc = _pooled_lira(keep, conf, variant, variance)["metrics"]["auc:mia"]
    assert abs(auc - _phi(1 / math.sqrt(2))) < 0.03, auc
    raw = membership_metrics(conf.flatten(), keep.flatten(), torch.arange(1500).expand(32, 1500).flatten(), (0.01,), 0.5, 0, "x")
    assert raw["metrics"]["auc:x"] < auc - 0.1  # the same confidences without LiRA's per-example fits


def test_lira_with_few_shadow_models_is_not_biased_against_members():
    """No signal (IN and OUT alike) and 6 shadow models: the target left out gives its own side one
    model fewer. A plug-in Gaussian fit then scores members low (AUROC well under 0.5); LiRA's
    predictive fit must not: its AUROC interval holds 0.5."""
    keep, conf = _synthetic_shadows(6, 6000, 0.0, seed=5)
    rec = _pooled_lira(keep, conf, "online", "per-example")
    lo, hi = rec["metric_intervals"]["auc:mia"]["ci95"]
    assert lo <= 0.5 <= hi, (lo, rec["auc"], hi)


def test_lira_refuses_a_fit_without_enough_models_on_a_side():
    keep, conf = _synthetic_shadows(4, 50, 1.0, seed=6)
    with pytest.raises(ValueError, match="fewer than 2 shadow model"):
        lira_scores(conf[0], conf[1:], keep[1:], "online", "per-example")


def test_keep_masks_put_every_example_in_exactly_half_the_models():
    keep = keep_masks(16, 500, seed=7)
    assert keep.shape == (16, 500) and bool((keep.sum(0) == 8).all())
    assert 200 < int(keep[0].sum()) < 300 and not torch.equal(keep, keep_masks(16, 500, seed=8))
    assert torch.equal(keep, keep_masks(16, 500, seed=7))


def test_probe_knobs_are_checked():
    with pytest.raises(ValueError, match="shadow_models must be at least 6"):
        MembershipInference(shadow_models=4)
    with pytest.raises(ValueError, match="shadow_models must be at least 4"):
        MembershipInference(shadow_models=3, target="model")
    assert MembershipInference(method="loss", target="model", shadow_models=0).uses_shadows() is False
    with pytest.raises(ValueError, match="fprs"):
        MembershipInference(fprs=(0.0,))
    assert Extraction(answers={"rounded": 3}).answer_kind() == "rounded:3"
    with pytest.raises(ValueError, match="listed twice"):
        Extraction(defenses=("top-k", {"name": "top-k", "k": 1}))
    assert [d.label for d in Extraction(defenses=("labels-only", {"name": "top-k", "k": 3}, "rounding")).output_defenses()] == \
        ["labels-only", "top-3", "rounding-1"]


# --- a model that memorizes -------------------------------------------------------------------------

MEMORIZER = '''
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
'''


def _write_memorizer(tmp_path: Path) -> None:
    """Random labels on 300 digits (nothing to generalize): an MLP trained 300 epochs memorizes them;
    1000 other digits with random labels are the non-members."""
    import importlib
    import sys

    from safetensors.torch import save_file

    from harness.sources.data import digits_split

    (tmp_path / "memo.py").write_text(MEMORIZER)
    x, _ = digits_split("train")
    g = torch.Generator().manual_seed(0)
    y_train = torch.randint(10, (300,), generator=g)
    y_test = torch.randint(10, (1000,), generator=g)
    np.savez(tmp_path / "members.npz", x=x[:300].numpy(), y=y_train.numpy())
    np.savez(tmp_path / "outsiders.npz", x=x[300:1300].numpy(), y=y_test.numpy())
    sys.path.insert(0, str(tmp_path))
    try:
        net = importlib.import_module("memo").mlp()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("memo", None)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:300]), y_train).backward()
        opt.step()
    assert float((net(x[:300]).argmax(1) == y_train).float().mean()) == 1.0
    save_file(net.state_dict(), str(tmp_path / "memo.safetensors"))


def test_a_model_that_memorizes_its_training_set_is_caught(tmp_path):
    import harness

    _write_memorizer(tmp_path)
    cfg = {"name": "memorizer", "model": {"source": "python:memo:mlp", "weights": "memo.safetensors"},
           "data": {"source": "npz:outsiders.npz"}, "train": {"data": {"source": "npz:members.npz"}},
           "attacks": [], "probes": [{"name": "membership-inference", "id": "mia", "method": "loss", "target": "model",
                                      "shadow_models": 0}],
           "gates": [{"metric": "tpr_at_fpr:mia@0.01", "max": 0.03}, {"metric": "auc:mia", "max": 0.6}]}
    (tmp_path / "memo.yaml").write_text(json.dumps(cfg))
    card = harness.run(str(tmp_path / "memo.yaml"), out=tmp_path / "out")
    assert card.metrics["auc:mia"] > 0.95 and card.metrics["tpr_at_fpr:mia@0.01"] > 0.1  # chance is 0.01
    assert [g["verdict"] for g in card.record["gates"]] == ["fail", "fail"] and not card.passed
    rec = card.record["probes"][0]
    assert rec["n_members"] == 300 and rec["n_nonmembers"] == 1000 and rec["target"] == "model"


# --- extraction -------------------------------------------------------------------------------------

def _plan(epochs: int = 20, batch: int = 64, lr: float = 0.05) -> TrainSettings:
    return TrainSettings(epochs=epochs, batch_size=batch, optimizer=OptimizerSettings("adam", lr, 0.9, 0.0),
                         schedule=ScheduleSettings("none"))


def test_a_linear_victim_answering_probabilities_is_copied_exactly():
    """Softmax regression answering its probabilities: the thief's cross-entropy against them is
    convex and minimal at the victim's own function, so a thief of the same form agrees with it
    everywhere (fidelity 1) once trained; with labels only, it has less to go on."""
    torch.manual_seed(0)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        victim[1].weight.mul_(8)
    queries = query_set("uniform-noise", 2000, (1, 4, 4), seed=1)
    test = query_set("uniform-noise", 1000, (1, 4, 4), seed=2)
    with torch.no_grad():
        probs, truth = victim(queries).softmax(1), victim(test).argmax(1)
    make = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))  # noqa: E731
    thief = train_thief(make, queries, answer(probs, "probabilities"), _plan(), "cpu", seed=3, min_steps=2000)
    with torch.no_grad():
        fidelity = float((thief(test).argmax(1) == truth).float().mean())
    assert fidelity >= 0.98, fidelity
    assert not any(p.requires_grad for p in thief.parameters())


def test_a_constant_victim_is_stolen_with_fidelity_one_and_the_class_share_as_accuracy():
    torch.manual_seed(0)
    queries = query_set("uniform-noise", 200, (1, 4, 4), seed=1)
    labels = answer(torch.tensor([[0.1, 0.7, 0.2]]).expand(200, 3), "labels")  # always class 1
    make = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))  # noqa: E731
    thief = train_thief(make, queries, labels, _plan(), "cpu", seed=2, min_steps=200)
    test = query_set("uniform-noise", 500, (1, 4, 4), seed=3)
    y = torch.randint(3, (500,), generator=torch.Generator().manual_seed(4))
    pred = thief(test).argmax(1)
    assert bool((pred == 1).all())
    assert float((pred == y).float().mean()) == float((y == 1).float().mean())


def test_answers_and_output_defenses():
    probs = torch.tensor([[0.62, 0.27, 0.11], [0.05, 0.15, 0.80]])
    assert answer(probs, "labels").tolist() == [[1, 0, 0], [0, 0, 1]]
    assert torch.allclose(answer(probs, "rounded", 1), torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.2, 0.8]]))
    assert torch.allclose(OutputDefense("top-k", k=2).apply(probs), torch.tensor([[0.62, 0.27, 0.0], [0.0, 0.15, 0.80]]))
    assert torch.equal(OutputDefense("labels-only").apply(probs), answer(probs, "labels"))
    assert torch.allclose(soft_targets(torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.0]])),
                          torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_query_sets():
    patches = sample_patches(64, (1, 8, 8), seed=0)
    assert patches.shape == (64, 1, 8, 8) and float(patches.min()) >= 0 and float(patches.max()) <= 1
    assert torch.equal(patches, sample_patches(64, (1, 8, 8), seed=0))
    assert float(patches.std(dim=(1, 2, 3)).mean()) > 0.02  # photographs have structure, not flat grey
    assert sample_patches(4, (3, 16, 16), seed=1).shape == (4, 3, 16, 16)
    holdout = torch.rand(50, 1, 8, 8)
    q = query_set("holdout", 20, (1, 8, 8), seed=0, holdout=holdout)
    assert any(torch.equal(q[0], h) for h in holdout)
    with pytest.raises(ValueError, match="fewer than the budget"):
        query_set("holdout", 60, (1, 8, 8), seed=0, holdout=holdout)


# --- through a run ----------------------------------------------------------------------------------

RUN_CFG = {"name": "privacy-run", "seed": 0, "model": {"source": "builtin:digits-cnn"},
           "data": {"source": "builtin:digits", "split": "test", "limit": 200}, "attacks": [],
           "train": {"epochs": 4, "data": {"limit": 400}},
           "probes": [{"name": "membership-inference", "id": "mia", "shadow_models": 6},
                      {"name": "extraction", "id": "steal", "queries": "holdout", "budgets": [100, 300], "min_steps": 60,
                       "defenses": ["labels-only"]}],
           "gates": [{"metric": "auc:mia", "max": 0.9}, {"metric": "tpr_at_fpr:mia@0.001", "max": 0.5},
                     {"metric": "fidelity:steal@300", "min": 0.2}]}


@pytest.fixture(scope="module")
def run_card(tmp_path_factory):
    import harness

    out = tmp_path_factory.mktemp("privacy")
    return harness.run(RUN_CFG, show_progress=False, out=out), out


def test_privacy_probes_through_a_run_write_records_intervals_gates_and_masks(run_card):
    from harness.config.schema import parse_config

    card, out = run_card
    assert parse_config(RUN_CFG).metric_ids()[1:8] == [
        "tpr_at_fpr:mia@0.01", "tpr_at_fpr:mia@0.001", "auc:mia", "advantage:mia", "fidelity:steal@100",
        "stolen_accuracy:steal@100", "fidelity:steal/labels-only@100"]
    rec = card.record
    mia = next(p for p in rec["probes"] if p["kind"] == "membership")
    assert mia["n_trials"] == 6 * 400 and mia["shadow_models"] == 6 and mia["n_examples"] == 400
    assert mia["calibration"]["n_examples"] + mia["evaluation"]["n_examples"] == 400
    for m in ("auc:mia", "advantage:mia", "tpr_at_fpr:mia@0.01"):
        lo, hi = mia["metric_intervals"][m]["ci95"]
        assert lo <= card.metrics[m] <= hi
    assert "tpr_at_fpr:mia@0.001" not in card.metrics  # 400 non-member trials per part cannot resolve 0.001
    gates = {g["metric"]: g for g in rec["gates"]}
    assert gates["tpr_at_fpr:mia@0.001"]["verdict"] == "inconclusive" and "non-member trials" in gates["tpr_at_fpr:mia@0.001"]["reason"]
    assert gates["auc:mia"]["ci95"] == mia["metric_intervals"]["auc:mia"]["ci95"]
    keep = json.loads((out / mia["keep_file"]).read_text())
    assert len(keep["keep"]) == 6 and len(keep["pool"]) == 400 and all(sum(col) == 3 for col in zip(*keep["keep"]))
    assert keep["member"] == keep["keep"]  # each shadow model in turn is the target
    steals = [p for p in rec["probes"] if p["kind"] == "extraction"]
    assert [p["budget"] for p in steals] == [100, 300]
    for p in steals:
        d = p["defenses"][0]
        assert d["defense"] == "labels-only" and d["clean_accuracy_cost"] == 0.0  # labels keep the argmax
        assert abs(d["fidelity_drop"] - (p["fidelity"] - d["fidelity"])) < 1e-6
        lo, hi = p["metric_intervals"][f"fidelity_drop:steal/labels-only@{p['budget']}"]["ci95"]
        assert lo <= d["fidelity_drop"] <= hi and p["metric_intervals"][f"fidelity:steal@{p['budget']}"]["n"] == 200
    assert steals[1]["fidelity"] > 0.5  # 300 holdout digits and their probabilities copy most of the model
    assert 'id="privacy"' in (out / "report.html").read_text()


def test_each_shadow_model_and_budget_is_saved_and_a_resumed_run_reuses_them(run_card, tmp_path, monkeypatch):
    import harness
    import harness.attacks.privacy as privacy
    from harness.core.errors import RunFailed

    card, _ = run_card
    real_shadow, real_thief, calls = privacy.train_shadow, privacy.train_thief, []

    def shadow_then_stop(*args, **kwargs):
        calls.append("shadow")
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_shadow(*args, **kwargs)

    monkeypatch.setattr(privacy, "train_shadow", shadow_then_stop)
    with pytest.raises(RunFailed, match="interrupted while running probes"):
        harness.run(RUN_CFG, show_progress=False, out=tmp_path)
    saved = json.loads((tmp_path / "run-state.json").read_text())["probes"]
    assert sorted(saved) == ["probe|0|mia|shadow-0", "probe|0|mia|shadow-1"]
    calls.clear()
    monkeypatch.setattr(privacy, "train_shadow", lambda *a, **k: (calls.append("shadow"), real_shadow(*a, **k))[1])
    monkeypatch.setattr(privacy, "train_thief", lambda *a, **k: (calls.append("thief"), real_thief(*a, **k))[1])
    resumed = harness.run(RUN_CFG, show_progress=False, out=tmp_path, resume=True)
    assert calls == ["shadow"] * 4 + ["thief"] * 4  # shadows 2 to 5; two budgets x two answers
    assert resumed.metrics == card.metrics


@pytest.mark.parametrize("probe, message", [
    ({"name": "membership-inference", "shadow_models": 2}, "shadow_models must be at least 6"),
    ({"name": "membership-inference", "method": "lira", "variant": "sideways"}, "variant"),
    ({"name": "membership-inference", "fractions": [0.1]}, "takes no `fractions`"),
    ({"name": "membership-inference", "shadows": 8}, "unknown parameter 'shadows'"),
    ({"name": "extraction", "queries": "imagenet"}, "queries"),
    ({"name": "extraction", "budgets": [0]}, "budgets must be positive"),
    ({"name": "extraction", "defenses": [{"name": "top-k", "k": 0}]}, "top-k keeps at least one"),
    ({"name": "extraction", "thief": "nosuch:thing"}, "thief: unknown model source 'nosuch:thing'"),
])
def test_bad_privacy_entries_are_exit_2_naming_the_entry(tmp_path, probe, message):
    from click.testing import CliRunner

    from harness.cli import cli

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"attacks": [], "probes": [probe]}))
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert "probes[0]" in res.output and message in res.output, res.output


def test_a_gate_on_a_privacy_metric_the_config_does_not_make_is_refused():
    from harness.core.errors import BadInput
    from harness.config.schema import parse_config

    with pytest.raises(BadInput, match="unknown metric 'fidelity:steal@500'"):
        parse_config({"probes": [{"name": "extraction", "id": "steal", "budgets": [100]}],
                      "gates": [{"metric": "fidelity:steal@500", "max": 0.5}]})


@pytest.mark.slow
def test_the_shipped_privacy_suite_finds_what_its_page_says(tmp_path):
    """configs/privacy.yaml as CI runs it (about a minute): LiRA on 8 shadow models finds a little
    leakage in the builtin CNN (AUROC above chance, TPR at 1% FPR above 1%), a thief copies most of it
    from photo patches, and answering labels only costs a thief agreement; every gate passes."""
    import harness

    card = harness.run(str(Path(__file__).parent.parent / "configs" / "privacy.yaml"), show_progress=False, out=tmp_path)
    m = card.metrics
    iv = {k: v["ci95"] for p in card.record["probes"] for k, v in p["metric_intervals"].items() if v.get("ci95")}
    assert card.passed and [g["verdict"] for g in card.record["gates"]] == ["pass"] * 4
    assert iv["auc:mia"][0] > 0.5 and 0.01 < m["tpr_at_fpr:mia@0.01"] < 0.06
    assert "tpr_at_fpr:mia@0.001" in m  # 8 models x 1347 digits: ~2,700 non-member trials per part resolve 0.001
    assert m["fidelity:steal@1000"] > 0.7 and iv["fidelity_drop:steal/labels-only@1000"][0] > 0.1
    assert m["clean_accuracy_cost:steal/labels-only"] == 0.0
