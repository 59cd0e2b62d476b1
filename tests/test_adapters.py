"""The foolbox and ART adapters: the native attack contract, their strength against native PGD,
and the one-line "pip install" failure when a library is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from harness.attacks import PGD, ThreatModel, attack_epsilons
from harness.attacks.adapters import ADAPTERS, MissingDependency

# backend name -> (module to import, extra that installs it)
LIBRARIES = {"foolbox": ("foolbox", "foolbox"), "art": ("art", "art")}
BACKENDS = [name for name, _ in ADAPTERS.items()]
EPSILONS = {"linf": [0.0, 0.05, 0.1], "l2": [0.0, 0.25, 0.5]}


def _require(backend: str) -> None:
    pytest.importorskip(LIBRARIES[backend][0])


def _adapter(backend: str, **knobs):
    return ADAPTERS.get(backend)(**knobs)


def _robust_accuracy(model, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(dim=1) == y).float().mean())


def test_every_backend_has_a_library():
    assert set(BACKENDS) == set(LIBRARIES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_contract_per_sample_epsilons(backend, attack, norm, wrapped_digits, correct_digits):
    _require(backend)
    x, y = correct_digits[0][:48], correct_digits[1][:48]
    eps = EPSILONS[norm]
    adv = attack_epsilons(_adapter(backend, attack=attack, steps=5), wrapped_digits, x, y, norm, eps,
                          generator=torch.Generator().manual_seed(0))
    assert adv.shape == (len(eps), *x.shape) and adv.dtype == x.dtype and adv.device == x.device
    assert torch.equal(adv[0], x)  # epsilon 0: nothing may move
    accuracies = []
    for j, e in enumerate(eps):
        threat = ThreatModel(norm, e)
        assert bool(threat.contains(adv[j], x).all()), f"outside the {norm} budget {e}"
        accuracies.append(_robust_accuracy(wrapped_digits, adv[j], y))
    assert accuracies[0] == 1.0  # only correctly classified points were attacked
    assert accuracies[2] <= accuracies[1] <= 1.0
    assert accuracies[2] < 0.9  # the largest budget breaks a sizeable share of this model's points


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_decides_and_global_rng_is_untouched(backend, wrapped_digits, correct_digits):
    _require(backend)
    x, y = correct_digits[0][:16], correct_digits[1][:16]
    attack, threat = _adapter(backend, attack="pgd", steps=3), ThreatModel("l2", 0.5)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = attack(wrapped_digits, x, y, threat, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    b = attack(wrapped_digits, x, y, threat, generator=torch.Generator().manual_seed(1))
    c = attack(wrapped_digits, x, y, threat, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_native_pgd_is_at_least_as_strong(backend, norm, eps, wrapped_digits, correct_digits):
    """Without random starts both walk the same path; native keeps the first fooling iterate, the
    libraries the last, so native may only be stronger."""
    _require(backend)
    x, y = correct_digits[0][:120], correct_digits[1][:120]
    threat = ThreatModel(norm, eps)
    native = PGD(steps=20, rel_stepsize=2.5 / 20, random_start=False)(wrapped_digits, x, y, threat)
    library = _adapter(backend, attack="pgd", steps=20, rel_stepsize=2.5 / 20, random_start=False)(wrapped_digits, x, y, threat)
    assert bool(threat.contains(library, x).all())
    native_ra, library_ra = _robust_accuracy(wrapped_digits, native, y), _robust_accuracy(wrapped_digits, library, y)
    assert library_ra >= native_ra - 0.01
    assert native_ra < 0.8  # a real attack, not two no-ops agreeing


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_native_pgd_is_at_least_as_strong_with_random_starts(backend, norm, eps, wrapped_digits, correct_digits):
    """The whole test set, mean over seeds: a single seed's random starts move robust accuracy by
    about +-0.01 on 442 points, as much as the margin under test. Eight seeds, not four: over four,
    ART's L2 PGD once came out 0.0102 stronger (0.5950 vs 0.6052) where twelve seeds put the two
    0.0026 apart (0.5982 vs 0.6009), noise; eight put the mean's noise near 0.003, well inside 0.01."""
    _require(backend)
    x, y = correct_digits
    threat = ThreatModel(norm, eps)
    native, library = PGD(steps=20, rel_stepsize=2.5 / 20), _adapter(backend, attack="pgd", steps=20, rel_stepsize=2.5 / 20)
    seeds = range(8)
    native_ra = np.mean([_robust_accuracy(wrapped_digits, native(wrapped_digits, x, y, threat, generator=torch.Generator().manual_seed(s)), y) for s in seeds])
    library_ra = np.mean([_robust_accuracy(wrapped_digits, library(wrapped_digits, x, y, threat, generator=torch.Generator().manual_seed(s)), y) for s in seeds])
    assert library_ra >= native_ra - 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_library_names_the_pip_command(backend, monkeypatch, wrapped_digits, digits_test):
    module, extra = LIBRARIES[backend]
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    x, y = digits_test[0][:4], digits_test[1][:4]
    with pytest.raises(MissingDependency, match=r"pip install 'robustgate\[" + extra + r"\]'") as info:
        _adapter(backend, attack="pgd", steps=1)(wrapped_digits, x, y, ThreatModel("linf", 0.1))
    assert isinstance(info.value, ImportError)


def test_cli_run_with_missing_library_exits_2(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)
    config = tmp_path / "suite.yaml"
    config.write_text(
        "name: missing-foolbox\n"
        "model: {source: 'builtin:digits-cnn'}\n"
        "data: {source: 'builtin:digits', limit: 16}\n"
        "attacks:\n"
        "  - {name: pgd, norm: linf, epsilons: [0.1], steps: 2, backend: foolbox}\n"
    )
    result = cli("run", str(config), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pip install 'robustgate[foolbox]'" in lines[0]
    assert "attacks[0]" in lines[0]  # found while validating the config, before any work
    assert not (tmp_path / "out").exists()
    assert "Traceback" not in result.output


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("knobs,message", [
    ({"attack": "deepfool"}, "no library counterpart"),  # must not silently run as PGD
    ({"attack": "pgd", "steps": 0}, "at least 1"),
    ({"attack": "fgsm", "rel_stepsize": 0.5}, "whole epsilon"),  # the libraries would ignore it
])
def test_knobs_the_library_cannot_honour_are_refused(backend, knobs, message):
    with pytest.raises(ValueError, match=message):
        _adapter(backend, **knobs)
