"""Thin adapters: foolbox's and ART's FGSM and PGD behind the native attack contract.

The libraries load only when an adapter is called; a missing one fails with the pip command
that installs it. Their outputs go through the same clipping, budget check and re-scoring as
native attacks (the runner trusts no attack).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional

import numpy as np
import torch

from harness.errors import BadInput
from harness.registry import Registry

from .threat import ThreatModel

__all__ = ["ADAPTERS", "MissingDependency", "require", "require_installed", "FoolboxAttack", "ARTAttack"]

ADAPTERS: Registry[type] = Registry("backend")


class MissingDependency(BadInput, ImportError):
    """An optional library is not installed. A BadInput (exit 2: the config asks for a backend this
    environment lacks), so the runner passes it on instead of calling it a failed run (exit 3)."""


def _install_hint(module: str) -> str:
    top = module.split(".")[0]
    extra = {"foolbox": "foolbox", "art": "art", "alibi_detect": "alibi"}.get(top, "all")
    return f"this needs the optional package {top!r}: pip install 'harness[{extra}]'"


def require(module: str):
    """Imports an optional library, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency("", f"{_install_hint(module)} ({e})") from None


def require_installed(backend: str) -> None:
    """Raises ValueError (for config validation) when a backend's library is absent; imports nothing."""
    module = {"foolbox": "foolbox", "art": "art"}[backend]
    present = sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module) is not None
    if not present:
        raise ValueError(_install_hint(module))


def _by_epsilon(threat: ThreatModel, x: torch.Tensor, run: Callable) -> torch.Tensor:
    """Libraries take one epsilon per call: run once per distinct per-sample epsilon."""
    eps = threat.per_sample(x)
    out = x.detach().clone()  # epsilon 0 leaves nothing to search (and ART refuses a zero step)
    for value in torch.unique(eps).tolist():
        if value > 0:
            mask = eps == value
            out[mask] = run(x[mask], mask, float(value))
    return out


# The libraries draw random starts from the process-wide generators, which threads sharding a run
# over devices share: one library call at a time keeps each call's draws its own.
_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def _seeded_from(generator: Optional[torch.Generator], device: torch.device) -> Iterator[None]:
    """Seeds the global torch and numpy generators from ours, and restores them afterwards."""
    seed = 0 if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with _GLOBAL_RNG, torch.random.fork_rng(devices=cuda):
        state = np.random.get_state()
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


@dataclass(frozen=True)
class _Adapter:
    """The knobs both libraries share, with native PGD's defaults (random start, 2.5 / steps)."""

    attack: str
    steps: int = 20
    rel_stepsize: Optional[float] = None
    random_start: Optional[bool] = None  # None: PGD starts at random, FGSM does not

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __post_init__(self) -> None:
        # Any registered native attack name reaches here; one the adapter cannot map must not run as PGD.
        if self.attack not in ("pgd", "fgsm"):
            raise ValueError(f"attack {self.attack!r} has no library counterpart here (valid: fgsm, pgd)")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.attack == "fgsm" and self.rel_stepsize not in (None, 1.0):
            raise ValueError("the libraries' FGSM always steps the whole epsilon (rel_stepsize 1)")

    @property
    def rel(self) -> float:
        return self.rel_stepsize if self.rel_stepsize is not None else 2.5 / self.steps


@ADAPTERS.register("foolbox")
@dataclass(frozen=True)
class FoolboxAttack(_Adapter):
    """foolbox 3's LinfPGD/L2PGD (``pgd``) and FGSM/L2FastGradientAttack (``fgsm``)."""

    def _library_attack(self, fb, norm: str):
        a = fb.attacks
        if self.attack == "fgsm":
            cls = a.LinfFastGradientAttack if norm == "linf" else a.L2FastGradientAttack
            return cls(random_start=bool(self.random_start))
        cls = a.LinfPGD if norm == "linf" else a.L2PGD
        return cls(rel_stepsize=self.rel, steps=self.steps, random_start=self.random_start is not False)

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None):
        fb = require("foolbox")
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
        attack = self._library_attack(fb, threat.norm)

        def run(xs, mask, eps):
            _, clipped, _ = attack(fmodel, xs, y[mask], epsilons=eps)
            return clipped

        with _seeded_from(generator, x.device):
            return _by_epsilon(threat, x, run)


@ADAPTERS.register("art")
@dataclass(frozen=True)
class ARTAttack(_Adapter):
    """ART's ProjectedGradientDescentPyTorch (``pgd``) and FastGradientMethod (``fgsm``)."""

    batch_size: int = 256

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None):
        require("art")
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier

        with torch.no_grad():
            n_classes = int(model(x[:1]).shape[1])
        # ART puts the model on the *current* CUDA device (moving it in place): make that x's device.
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            clf = PyTorchClassifier(
                model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=n_classes,
                clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
            )
        norm = np.inf if threat.norm == "linf" else 2

        def run(xs, mask, eps):
            if self.attack == "fgsm":
                attack = FastGradientMethod(clf, norm=norm, eps=eps, num_random_init=int(bool(self.random_start)), batch_size=self.batch_size)
            else:
                attack = ProjectedGradientDescentPyTorch(
                    clf, norm=norm, eps=eps, eps_step=self.rel * eps, max_iter=self.steps,
                    num_random_init=0 if self.random_start is False else 1, batch_size=self.batch_size, verbose=False,
                )
            adv = attack.generate(xs.detach().cpu().numpy(), y=y[mask].detach().cpu().numpy())
            return torch.from_numpy(adv).to(x.device, x.dtype)

        with _seeded_from(generator, x.device):
            return _by_epsilon(threat, x, run)
