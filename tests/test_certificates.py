"""Certificates through `harness run`: config validation, the known answers at the pipeline's level
(a constant classifier's certified radius, in metrics and intervals), the soundness checks that fail
a run whose certificate an attack contradicts, refusal of a layer interval bounds cannot follow,
resume, and Gaussian augmentation under `harness harden` (the algorithms themselves:
tests/test_smoothing.py and tests/test_interval_bounds.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import harness
from harness.core.errors import BadInput
from harness.config import parse_config


class Constant(nn.Module):
    """Logits that always favour class 3, whatever the input (a Linear kept so the model has weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.arange(10.0) == 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def constant() -> nn.Module:
    return Constant()


class Squashed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x.flatten(1)))


def squashed() -> nn.Module:
    torch.manual_seed(0)
    return Squashed()


def _digits_npz(tmp_path: Path, n: int = 40, threes: int = 20) -> Path:
    """n digits-shaped points, the first `threes` labelled 3 and the rest 5."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g).numpy().astype(np.float32)
    y = np.array([3] * threes + [5] * (n - threes))
    path = tmp_path / "points.npz"
    np.savez(path, x=x, y=y)
    return path


def _cfg(tmp_path: Path, model: str, certificates: list, gates: list = (), **extra) -> dict:
    return {"name": "cert", "device": "cpu", "model": {"source": f"python:tests.test_certificates:{model}", "num_classes": 10},
            "data": {"source": f"npz:{_digits_npz(tmp_path)}", "batch_size": 64}, "attacks": [], "certificates": certificates,
            "gates": list(gates), **extra}


SMOOTH = {"name": "randomized-smoothing", "sigma": 0.5, "n0": 20, "n": 400, "alpha": 0.01, "radii": [0.5, 1.0, 1.5],
          "attack_steps": 3, "attack_eot": 2, "check_n": 50}


# --- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, where, words", [
    ({"name": "smoothing-x", "radii": [0.5]}, "certificates[0]", ["unknown certificate 'smoothing-x'", "randomized-smoothing", "interval-bounds"]),
    ({"name": "randomized-smoothing"}, "certificates[0]", ["needs `radii`"]),
    ({"name": "randomized-smoothing", "radii": [0.5], "epsilons": [0.1]}, "certificates[0]", ["takes no `epsilons`"]),
    ({"name": "interval-bounds", "radii": [0.5]}, "certificates[0]", ["takes no `radii`"]),
    ({"name": "interval-bounds", "epsilons": [-0.1]}, "certificates[0].epsilons[0]", ["is negative"]),
    ({"name": "randomized-smoothing", "radii": [0.5], "sigma": 0}, "certificates[0]", ["sigma"]),
    ({"name": "randomized-smoothing", "radii": [0.5], "alpha": 0.7}, "certificates[0]", ["alpha"]),
    ({"name": "randomized-smoothing", "radii": [0.5], "n0": 0}, "certificates[0]", ["n0"]),
    ({"name": "interval-bounds", "epsilons": [0.1], "limit": 0}, "certificates[0].limit", ["greater than or equal to 1"]),
])
def test_a_bad_certificate_entry_is_one_line_naming_its_key(entry, where, words):
    with pytest.raises(BadInput) as e:
        parse_config({"certificates": [entry]})
    text = str(e.value)
    assert where in text and "\n" not in text, text
    for w in words:
        assert w in text, text


def test_certificate_ids_are_unique_and_their_metrics_can_be_gated():
    both = [{"name": "randomized-smoothing", "radii": [0.25, "1/2"]}, {"name": "interval-bounds", "epsilons": ["2/255"]}]
    cfg = parse_config({"certificates": both, "gates": [{"metric": "certified_accuracy:smoothing@1/2", "min": 0.5},
                                                        {"metric": "certified_accuracy:ibp@2/255", "min": 0.1}]})
    ids = cfg.metric_ids()
    assert ids[-5:] == ["certified_accuracy:smoothing@0.25", "certified_accuracy:smoothing@1/2", "clean_accuracy:smoothing",
                        "abstain_rate:smoothing", "certified_accuracy:ibp@2/255"]
    with pytest.raises(BadInput, match="certificate id 'ibp' is used twice"):
        parse_config({"certificates": [both[1], both[1]]})
    with pytest.raises(BadInput, match="also a defense's or probe's id"):
        parse_config({"certificates": [{**both[0], "id": "badnets"}], "probes": [{"name": "badnets", "fractions": [0.1]}]})
    with pytest.raises(BadInput, match="unknown metric 'certified_accuracy:smoothing@0.3'"):
        parse_config({"certificates": both, "gates": [{"metric": "certified_accuracy:smoothing@0.3", "min": 0.5}]})


# --- the known answer through a run -------------------------------------------------------------

def test_a_constant_classifier_is_certified_to_its_closed_form_radius_in_the_scorecard(tmp_path):
    """A classifier that answers 3 everywhere: every draw votes 3, so p_lower = alpha**(1/n) and the
    radius is sigma * Phi^-1(alpha**(1/n)) = 0.5 * Phi^-1(0.01**(1/400)) = 1.1376 for every point. Half
    the points are labelled 3: certified accuracy is 0.5 up to that radius and 0 beyond it."""
    from scipy.stats import norm

    radius = 0.5 * norm.ppf(0.01 ** (1 / 400))
    assert 1.137 < radius < 1.138
    card = harness.run(_cfg(tmp_path, "constant", [SMOOTH], gates=[{"metric": "certified_accuracy:smoothing@1.0", "min": 0.3}]),
                       show_progress=False, out=tmp_path / "out")
    m = card.metrics
    assert m["certified_accuracy:smoothing@0.5"] == m["certified_accuracy:smoothing@1.0"] == 0.5
    assert m["certified_accuracy:smoothing@1.5"] == 0.0
    assert m["clean_accuracy:smoothing"] == 0.5 and m["abstain_rate:smoothing"] == 0.0
    rec = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    (c,) = rec["certificates"]
    assert c["n_points"] == 40 and c["alpha"] == 0.01 and c["params"]["sigma"] == 0.5
    assert c["curve"]["radius"][-1] == pytest.approx(radius, abs=1e-6) and c["curve"]["certified_accuracy"][-1] == 0.5
    # the interval is over the 40 points (Wilson on 20 of 40), alpha stated beside it
    assert rec["intervals"]["certified_accuracy:smoothing@1.0"] == pytest.approx([0.3520, 0.6480], abs=1e-3)
    assert rec["interval_methods"]["certified_accuracy:smoothing@1.0"] == {"method": "wilson", "alpha": 0.01}
    # a constant classifier cannot be attacked: empirical robust accuracy is its accuracy, no violation
    assert [lv["empirical_robust_accuracy"] for lv in c["levels"]] == [0.5, 0.5, 0.5]
    check = next(k for k in rec["checks"] if k["name"] == "certificate-soundness:smoothing")
    assert check["status"] == "pass", check
    assert rec["gates"][0]["passed"] and rec["gates"][0]["value"] == 0.5
    # the run still fails, rightly: a constant has no input gradient, which the suite's own check reports
    assert [k["name"] for k in rec["checks"] if k["status"] == "fail"] == ["vanishing-gradients"] and not card.passed


def test_an_unsound_radius_is_caught_by_the_attack_and_fails_the_run(tmp_path, monkeypatch, digits_model):
    """A certify that reports ten times the radius it proved: PGD with EOT on the smoothed classifier
    finds points certified at 1.0 that it breaks, beyond what chance allows, and the run fails."""
    from harness.defenses.smoothing import Certified, RandomizedSmoothing

    real = RandomizedSmoothing.certify_and_predict

    def inflated(self, *args, **kwargs):
        c, predicted = real(self, *args, **kwargs)
        return Certified(c.prediction, c.radius * 10 + (c.prediction >= 0) * 2.0, c.p_lower, c.top_count), predicted

    monkeypatch.setattr(RandomizedSmoothing, "certify_and_predict", inflated)
    cfg = {"name": "unsound", "device": "cpu", "data": {"limit": 30}, "attacks": [],
           "certificates": [{**SMOOTH, "sigma": 0.25, "radii": [1.0], "attack_steps": 10, "attack_eot": 4, "check_n": 200}]}
    card = harness.run(cfg, show_progress=False, out=tmp_path)
    rec = card.record
    check = next(k for k in rec["checks"] if k["name"] == "certificate-soundness:smoothing")
    assert check["status"] == "fail" and "contradicted" in check["detail"], check
    (lv,) = rec["certificates"][0]["levels"]
    assert lv["n_violations"] > lv["allowed_violations"] and lv["certified_accuracy"] > lv["empirical_robust_accuracy"]
    assert not card.passed


def test_interval_bounds_refuse_a_layer_they_cannot_follow_in_one_line(tmp_path, cli):
    cfg = _cfg(tmp_path, "squashed", [{"name": "interval-bounds", "epsilons": [0.01]}])
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    result = cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "certificates[0] (ibp)" in line and "Sigmoid" in line and "act" in line, line
    assert not (tmp_path / "out" / "run-state.json").exists()  # refused as the model loaded, before the suite ran


def test_a_proof_an_attack_breaks_fails_the_run(tmp_path, monkeypatch):
    """Interval bounds that 'prove' every point: PGD breaks some of them, each a contradiction."""
    from harness.defenses.intervals import IntervalBounds

    monkeypatch.setattr(IntervalBounds, "verified", lambda self, net, mean, std, x, y, eps: torch.ones(len(y), dtype=torch.bool))
    cfg = {"name": "unsound-ibp", "device": "cpu", "data": {"limit": 40}, "attacks": [],
           "certificates": [{"name": "interval-bounds", "epsilons": [0.3], "attack_steps": 10}]}
    card = harness.run(cfg, show_progress=False)
    (lv,) = card.record["certificates"][0]["levels"]
    assert lv["certified_accuracy"] == 1.0 and lv["empirical_robust_accuracy"] < 0.5 and lv["n_violations"] > 0
    check = next(k for k in card.record["checks"] if k["name"] == "certificate-soundness:ibp")
    assert check["status"] == "fail" and not card.passed


def test_interval_bounds_on_the_builtin_model_stay_below_pgd(tmp_path):
    cfg = {"name": "ibp", "device": "cpu", "data": {"limit": 60}, "attacks": [],
           "certificates": [{"name": "interval-bounds", "epsilons": [0.0, 0.005, 0.02, 0.1], "attack_steps": 20}]}
    card = harness.run(cfg, show_progress=False)
    (c,) = card.record["certificates"]
    acc = [lv["certified_accuracy"] for lv in c["levels"]]
    emp = [lv["empirical_robust_accuracy"] for lv in c["levels"]]
    assert acc[0] == pytest.approx(c["clean_accuracy"]) and acc[0] > 0.9  # at eps 0 the proof is the prediction
    assert all(a >= b for a, b in zip(acc, acc[1:])) and acc[-1] < acc[0]
    assert all(a <= e for a, e in zip(acc, emp)) and all(lv["n_violations"] == 0 for lv in c["levels"])
    assert card.record["checks"][-1]["status"] == "pass"


def test_a_finished_certificate_is_saved_and_a_resumed_run_reuses_it(tmp_path, monkeypatch):
    from harness.core.errors import RunFailed
    from harness.defenses.intervals import IntervalBounds
    from harness.defenses.smoothing import RandomizedSmoothing

    cfg = _cfg(tmp_path, "constant", [SMOOTH, {"name": "interval-bounds", "epsilons": [0.01]}])
    first = harness.run(cfg, show_progress=False)
    real, calls = RandomizedSmoothing.certify_and_predict, []

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(IntervalBounds, "verified", stop)
    with pytest.raises(RunFailed, match="interrupted while certifying"):
        harness.run(cfg, show_progress=False, out=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "run-state.json").read_text())["probes"]
    assert sorted(saved) == ["cert|0|smoothing"]
    monkeypatch.undo()
    monkeypatch.setattr(RandomizedSmoothing, "certify_and_predict", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    resumed = harness.run(cfg, show_progress=False, out=tmp_path / "out", resume=True)
    assert calls == [] and resumed.metrics == first.metrics


# --- Gaussian augmentation ------------------------------------------------------------------------

def test_gaussian_augmentation_trains_a_model_accurate_under_noise(tmp_path):
    """Four epochs of noise training, fine-tuning the builtin model: the log's check is accuracy under the
    training noise (not PGD), and the trained model is far more accurate under sigma 0.5 noise than
    the builtin model trained without it."""
    from harness.pipeline.harden import harden
    from harness.sources.models import load_model

    cfg = {"name": "noise", "device": "cpu", "train": {"epochs": 4, "start": "model", "defense": {"gaussian-augmentation": {"sigma": 0.5}}}}
    out = harden(cfg, "gaussian-augmentation", tmp_path / "noise.safetensors", show_progress=False)
    log = json.loads(Path(f"{out}.log.json").read_text())
    assert log["check"] == {"attack": "gaussian-noise", "sigma": 0.5, "samples": log["check"]["samples"]}
    noisy, _ = load_model("builtin:digits-cnn", str(out))
    plain, _ = load_model("builtin:digits-cnn")
    from harness.sources.data import digits_split

    x, y = digits_split("test")
    g = torch.Generator().manual_seed(1)
    xn = x + 0.5 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        acc_noisy = float((noisy(xn).argmax(1) == y).float().mean())
        acc_plain = float((plain(xn).argmax(1) == y).float().mean())
    assert acc_noisy > 0.65 and acc_noisy > acc_plain + 0.1, (acc_noisy, acc_plain)  # measured: 0.707 against 0.584
    assert log["epochs"][-1]["robust_accuracy"] == pytest.approx(acc_noisy, abs=0.15)


def test_the_builtin_model_trains_under_noise_on_request_and_caches_apart():
    from harness.sources.builtin import RECIPE, noise_recipe, weights_path
    from harness.sources.models import load_model

    assert weights_path(noise_recipe(0.25)) != weights_path(RECIPE)
    with pytest.raises(BadInput, match="model.kwargs.width"):
        load_model("builtin:digits-cnn", kwargs={"width": 3})
    with pytest.raises(BadInput, match="model.kwargs.noise_sigma"):
        load_model("builtin:digits-cnn", kwargs={"noise_sigma": -1})
    assert math.isfinite(noise_recipe(0.25)["noise_sigma"])


def test_the_provenance_of_a_noise_trained_builtin_model_names_its_own_weights(tmp_path):
    """The scorecard hashes the file the run loaded: the noise recipe's cache entry, not the plain
    model's (which an empty cache does not even hold: the run stopped with exit 2 naming it)."""
    import hashlib

    from harness.sources.builtin import RECIPE, noise_recipe, weights_path

    card = harness.run({"name": "noise-provenance", "device": "cpu", "model": {"source": "builtin:digits-cnn", "kwargs": {"noise_sigma": 0.25}},
                        "data": {"source": "builtin:digits", "split": "test", "limit": 20}, "attacks": []},
                       show_progress=False, out=tmp_path)
    weights = [a for a in card.record["provenance"]["artifacts"] if a["role"] == "weights"]
    path = weights_path(noise_recipe(0.25))
    assert [a["path"] for a in weights] == [str(path)] and path != weights_path(RECIPE)
    assert weights[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_certified_config_passes_as_ci_runs_it_and_its_certificates_are_sound(tmp_path):
    """configs/certified.yaml as CI runs it: the noise-trained builtin model; measured at seed 0,
    smoothing certifies 0.90 of the 100 points at L2 0.25 and 0.63 at 0.5 (empirical 0.95 and 0.76
    under PGD+EOT), interval bounds prove 0.94 at L-inf 0.002 and 0.61 at 0.005 (PGD breaks none)."""
    card = harness.run(str(Path(__file__).parent.parent / "configs" / "certified.yaml"), show_progress=False, out=tmp_path)
    assert card.passed, [g for g in card.record["gates"] if not g["passed"]]
    m = card.metrics
    assert m["certified_accuracy:smoothing@0.25"] == pytest.approx(0.90, abs=0.05)
    assert m["certified_accuracy:smoothing@0.5"] == pytest.approx(0.63, abs=0.08)
    assert m["certified_accuracy:ibp@0.002"] == pytest.approx(0.94, abs=0.03)
    smoothing, ibp = card.record["certificates"]
    for c in (smoothing, ibp):
        assert all(lv["certified_accuracy"] <= lv["empirical_robust_accuracy"] and lv["n_violations"] == 0 for lv in c["levels"])
    assert {k["name"]: k["status"] for k in card.record["checks"]}["certificate-soundness:smoothing"] == "pass"
    # the smoothed classifier's certified accuracy at 0.25 is no more than the base model's PGD robust accuracy there
    assert m["certified_accuracy:smoothing@0.25"] <= m["robust_accuracy:pgd-l2@0.25"] + 0.05
    assert (tmp_path / "report.html").read_text().count('id="certificate-') >= 2


def test_gaussian_augmentation_refuses_a_bad_sigma_by_name():
    from harness.defenses.training import GaussianAugmentation, build_defense

    assert build_defense("gaussian-augmentation", {"sigma": 0.5}) == GaussianAugmentation(sigma=0.5)
    for sigma in (0, -0.25, float("inf")):
        with pytest.raises(ValueError, match="sigma must be positive"):
            build_defense("gaussian-augmentation", {"sigma": sigma})


def test_a_certificate_that_crashes_is_exit_3_and_keeps_what_finished(tmp_path, monkeypatch):
    from harness.core.errors import RunFailed
    from harness.defenses.intervals import IntervalBounds

    def broken(self, *args, **kwargs):
        raise RuntimeError("bounds went wrong")

    monkeypatch.setattr(IntervalBounds, "verified", broken)
    cfg = _cfg(tmp_path, "constant", [SMOOTH, {"name": "interval-bounds", "epsilons": [0.01]}])
    with pytest.raises(RunFailed, match=r"certificates: RuntimeError: bounds went wrong; finished results are in .*--resume"):
        harness.run(cfg, show_progress=False, out=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "run-state.json").read_text())["probes"]
    assert sorted(saved) == ["cert|0|smoothing"] and saved["cert|0|smoothing"]["metrics"]["certified_accuracy:smoothing@1.0"] == 0.5


# --- CUDA (scripts/gpu_check.sh) ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_certificates_on_cuda_agree_with_the_cpu(digits_test):
    """The same certificates on the device: interval bounds are the CPU's float64 bounds (the same sums
    up to rounding), randomized smoothing draws its noise on the device (other draws than the CPU's
    generators) and certifies the same fraction within Monte Carlo noise, its radii within 0.05."""
    from harness.defenses.intervals import IntervalBounds
    from harness.defenses.smoothing import RandomizedSmoothing
    from harness.sources.builtin import digits_cnn, noise_recipe

    net, _ = digits_cnn(noise_recipe(0.25))
    x, y = digits_test[0][:64], digits_test[1][:64]
    ibp = IntervalBounds()
    on_cpu = ibp.margins(net.eval(), None, None, x, y, 0.005)
    on_gpu = ibp.margins(net.cuda().eval(), None, None, x.cuda(), y.cuda(), 0.005)
    finite = torch.isfinite(on_cpu)
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu()[finite], on_cpu[finite], rtol=1e-6, atol=1e-6)

    rs = RandomizedSmoothing(sigma=0.25, n0=100, n=2000, alpha=0.001, batch=4000)
    gpu = rs.certify(net, x.cuda(), 10, ids=range(64), seed=0)
    cpu = rs.certify(net.cpu(), x, 10, ids=range(64), seed=0)
    assert gpu.prediction.device.type == "cuda" and gpu.radius.device.type == "cuda"
    same = (gpu.prediction.cpu() == cpu.prediction) & (cpu.prediction >= 0)
    assert int(same.sum()) >= int((cpu.prediction >= 0).sum()) - 2
    assert float((gpu.radius.cpu()[same] - cpu.radius[same]).abs().median()) < 0.05
