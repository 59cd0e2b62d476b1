"""foolbox and ART attacks named by class: validation against the library's signature (as a
ValueError and as exit 2), bounded ones against native PGD, minimal ones, targets, and the rule that
a native-only config never imports either library."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.attacks import PGD, ThreatModel, attack_epsilons
from harness.attacks.adapters import ARTClass, FoolboxClass
from harness.attacks.base import describe, is_minimal, supports_target
from harness.attacks.config import build_attack

ROOT = Path(__file__).resolve().parents[1]


def _robust(model, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(dim=1) == y).float().mean())


BAD = [  # (backend, name, norm, params, message)
    ("foolbox", "LinfDeepFoolAtack", "linf", {}, r"unknown foolbox attack 'LinfDeepFoolAtack' \(close: LinfDeepFoolAttack.*harness list attacks"),
    ("foolbox", "L2DeepFoolAttack", "l2", {"stepz": 3}, r"unknown parameter 'stepz' .*valid: steps, candidates, overshoot, loss"),
    ("foolbox", "L2DeepFoolAttack", "l2", {"distance": "l2"}, r"'distance' is set by the adapter from the entry's `norm`"),
    ("foolbox", "VirtualAdversarialAttack", "l2", {}, r"needs parameter 'steps'"),
    ("foolbox", "L2DeepFoolAttack", "linf", {}, r"works in the l2 norm, not 'linf'"),
    ("foolbox", "BoundaryAttack", "linf", {}, r"works in the l2 norm, not 'linf'"),
    ("foolbox", "EADAttack", "l2", {}, r"measures neither linf nor l2"),
    ("art", "HopSkipJmp", "l2", {}, r"unknown art attack 'HopSkipJmp' \(close: HopSkipJump"),
    ("art", "ProjectedGradientDescent", "linf", {"maxiter": 5}, r"unknown parameter 'maxiter' .*valid: eps_step, .*max_iter"),
    ("art", "ProjectedGradientDescent", "linf", {"eps": 0.3}, r"'eps' is set by the adapter from the entry's `epsilons`"),
    ("art", "ProjectedGradientDescent", "linf", {"norm": 2}, r"'norm' is set by the adapter from the entry's `norm`"),
    ("art", "DeepFool", "l2", {"classifier": None}, r"'classifier' is set by the adapter from the run's model"),
    ("art", "CarliniL2Method", "linf", {}, r"works in the l2 norm, not 'linf'"),
    ("art", "DecisionTreeAttack", "l2", {}, r"needs another kind of model"),
]


@pytest.mark.parametrize("backend,name,norm,params,message", BAD, ids=[f"{b[0]}-{b[1]}-{b[4][:20]}" for b in BAD])
def test_bad_entries_are_value_errors(backend, name, norm, params, message):
    pytest.importorskip(backend)
    with pytest.raises(ValueError, match=message):
        build_attack(name, norm, backend, params)


@pytest.mark.parametrize("entry,message", [
    ("{name: LinfDeepFoolAtack, norm: linf, backend: foolbox}", "close: LinfDeepFoolAttack"),
    ("{name: L2DeepFoolAttack, norm: l2, backend: foolbox, stepz: 3}", "unknown parameter 'stepz'"),
    ("{name: L2DeepFoolAttack, norm: linf, epsilons: [0.1], backend: foolbox}", "works in the l2 norm"),
    ("{name: ProjectedGradientDescent, norm: linf, epsilons: [0.1], backend: art, eps: 0.3}", "'eps' is set by the adapter"),
])
def test_cli_validate_names_the_entry(entry, message, cli, tmp_path):
    pytest.importorskip("art" if "backend: art" in entry else "foolbox")
    config = tmp_path / "suite.yaml"
    config.write_text(f"name: lib\nmodel: {{source: 'builtin:digits-cnn'}}\nattacks:\n  - {entry}\n")
    result = cli("validate", str(config))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "attacks[0]" in lines[0] and message in lines[0], result.stderr


@pytest.mark.parametrize("backend,name,norm,minimal,target", [
    ("foolbox", "LinfBasicIterativeAttack", "linf", False, True),
    ("foolbox", "L2CarliniWagnerAttack", "l2", True, True),
    ("foolbox", "LinfDeepFoolAttack", "linf", True, True),
    ("foolbox", "BoundaryAttack", "l2", True, True),
    ("foolbox", "NewtonFoolAttack", "l2", True, False),  # its `run` takes Misclassification only
    ("art", "ProjectedGradientDescent", "l2", False, True),
    ("art", "SquareAttack", "linf", False, False),
    ("art", "HopSkipJump", "linf", True, True),
    ("art", "ElasticNet", "l2", True, True),
    ("art", "DeepFool", "l2", True, False),
])
def test_minimal_and_targets_come_from_the_class(backend, name, norm, minimal, target):
    pytest.importorskip(backend)
    attack = build_attack(name, norm, backend, {})
    assert is_minimal(attack) is minimal and supports_target(attack) is target
    assert describe(attack)["attack"] == name  # a plain record for the scorecard


def test_a_target_the_class_cannot_take_is_refused(wrapped_digits, correct_digits):
    pytest.importorskip("foolbox")
    x, y = correct_digits[0][:4], correct_digits[1][:4]
    with pytest.raises(ValueError, match="cannot take a target"):
        FoolboxClass("NewtonFoolAttack")(wrapped_digits, x, y, ThreatModel("l2", math.inf), target=(y + 1) % 10)


@pytest.mark.parametrize("backend,name,params", [
    ("foolbox", "LinfBasicIterativeAttack", {"steps": 10}),
    ("art", "BasicIterativeMethod", {"max_iter": 10, "batch_size": 256}),
])
def test_bounded_class_matches_native_pgd(backend, name, params, wrapped_digits, correct_digits):
    """Both walk ~2-2.5 epsilon in 10 sign steps without a random start: the same strength."""
    pytest.importorskip(backend)
    x, y = correct_digits[0][:128], correct_digits[1][:128]
    eps = [0.05, 0.1]
    attack = build_attack(name, "linf", backend, params)
    assert not is_minimal(attack)
    adv = attack_epsilons(attack, wrapped_digits, x, y, "linf", eps, generator=torch.Generator().manual_seed(0))
    native = attack_epsilons(PGD(steps=10, random_start=False), wrapped_digits, x, y, "linf", eps)
    for j, e in enumerate(eps):
        assert bool(ThreatModel("linf", e).contains(adv[j], x).all())
        library_ra, native_ra = _robust(wrapped_digits, adv[j], y), _robust(wrapped_digits, native[j], y)
        assert abs(library_ra - native_ra) <= 0.03, (e, library_ra, native_ra)
    assert native_ra < 0.8  # a real attack, not two no-ops agreeing


def test_targets_reach_the_library(wrapped_digits, correct_digits):
    pytest.importorskip("foolbox")
    x, y = correct_digits[0][:32], correct_digits[1][:32]
    target = (y + 1) % 10
    attack = build_attack("LinfBasicIterativeAttack", "linf", "foolbox", {"steps": 10})
    adv = attack(wrapped_digits, x, y, ThreatModel("linf", 0.3), target=target)
    with torch.no_grad():
        hit = float((wrapped_digits(adv).argmax(dim=1) == target).float().mean())
    assert hit >= 0.8


def _check_minimal(attack, norm, model, x, y):
    assert is_minimal(attack)
    adv = attack(model, x, y, ThreatModel(norm, math.inf), generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    adv = adv.clamp(0, 1)  # as the runner does
    with torch.no_grad():
        broken = model(adv).argmax(dim=1) != y
    assert float(broken.float().mean()) >= 0.95
    return ThreatModel(norm, math.inf).distance(adv, x)[broken]


def test_minimal_foolbox_deepfool_breaks_the_digits(wrapped_digits, correct_digits):
    pytest.importorskip("foolbox")
    x, y = correct_digits[0][:48], correct_digits[1][:48]
    sizes = _check_minimal(FoolboxClass("L2DeepFoolAttack", {"candidates": 3}), "l2", wrapped_digits, x, y)
    assert 0.2 < float(sizes.median()) < 1.5  # the scale native L2 PGD needs here (robust accuracy ~0.05 at 1.0)


@pytest.mark.slow
def test_minimal_art_deepfool_breaks_the_digits(wrapped_digits, correct_digits):
    """ART's DeepFool takes a class gradient per candidate class and step: slow on CPU."""
    pytest.importorskip("art")
    x, y = correct_digits[0][:32], correct_digits[1][:32]
    sizes = _check_minimal(ARTClass("DeepFool", {"batch_size": 32, "max_iter": 20, "nb_grads": 3}), "l2", wrapped_digits, x, y)
    assert 0.2 < float(sizes.median()) < 1.5


def test_library_results_go_through_the_runner(tmp_path):
    """Budget check and re-scoring as for native attacks: a bounded class at its epsilons, a minimal
    one judged at the same epsilons from its distances, each beside the native attack that does the
    same steps (foolbox's BIM is PGD without a random start at its relative step 0.2), all on the
    same 32 points (no cascade)."""
    pytest.importorskip("foolbox")
    import harness

    card = harness.run({
        "name": "lib", "model": {"source": "builtin:digits-cnn"}, "data": {"source": "builtin:digits", "limit": 32}, "cascade": False,
        "attacks": [{"name": "LinfBasicIterativeAttack", "norm": "linf", "epsilons": [0.1, 0.2], "backend": "foolbox", "steps": 3},
                    {"name": "pgd", "norm": "linf", "epsilons": [0.1, 0.2], "steps": 3, "random_start": False, "rel_stepsize": 0.2},
                    {"name": "LinfDeepFoolAttack", "norm": "linf", "epsilons": [0.1], "backend": "foolbox", "candidates": 3},
                    {"name": "deepfool", "norm": "linf", "epsilons": [0.1], "candidates": 3}],
    }, device="cpu", show_progress=False)
    records = {(r["id"], r["epsilon"]): r for r in card.to_dict()["attacks"]}
    assert card.metrics["clean_accuracy"] == 1.0
    # measured: foolbox and native agree point for point (0.75 at 0.1, 0.34375 at 0.2; DeepFool 0.5625,
    # medians 0.10816 and 0.10811). The tolerance is one point of 32, for float order inside the libraries.
    for eps in ("0.1", "0.2"):
        bounded, native = records[("LinfBasicIterativeAttack-linf-foolbox", eps)], records[("pgd-linf", eps)]
        assert bounded["budget_violations"] == 0 and bounded["n_attacked"] == 32
        assert abs(bounded["robust_accuracy"] - native["robust_accuracy"]) <= 1 / 32, (eps, bounded, native)
    assert records[("pgd-linf", "0.2")]["robust_accuracy"] <= 0.5  # a real attack, not two no-ops agreeing
    minimal, native = records[("LinfDeepFoolAttack-linf-foolbox", "0.1")], records[("deepfool-linf", "0.1")]
    assert minimal.get("minimal") is True and minimal["budget_violations"] == 0
    assert abs(minimal["robust_accuracy"] - native["robust_accuracy"]) <= 1 / 32, (minimal, native)
    assert native["robust_accuracy"] <= 0.7  # DeepFool breaks points within 0.1 (measured 14 of 32)
    m = card.metrics
    assert m["median_perturbation:LinfDeepFoolAttack-linf-foolbox"] == pytest.approx(m["median_perturbation:deepfool-linf"], rel=0.01)


_IMPORTED = textwrap.dedent("""
    import sys
    from click.testing import CliRunner
    from harness.cli import cli
    result = CliRunner().invoke(cli, ["validate", sys.argv[1]])
    assert result.exit_code == 0, result.output
    print(sorted({m.split(".")[0] for m in sys.modules} & {"foolbox", "art", "eagerpy"}))
""")


def test_native_only_config_imports_no_library(tmp_path):
    out = subprocess.run([sys.executable, "-c", _IMPORTED, str(ROOT / "configs" / "default.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_a_foolbox_entry_imports_foolbox_only(tmp_path):
    """The probe above can see an import: a foolbox entry loads foolbox (and eagerpy), not ART."""
    pytest.importorskip("foolbox")
    config = tmp_path / "suite.yaml"
    config.write_text("name: lib\nattacks:\n  - {name: L2DeepFoolAttack, norm: l2, epsilons: [0.5], backend: foolbox}\n")
    out = subprocess.run([sys.executable, "-c", _IMPORTED, str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['eagerpy', 'foolbox']"
