"""Thin adapters: foolbox 3 and ART attacks behind the native attack contract.

``pgd``/``fgsm`` with a backend run the library's version with native knobs (FoolboxAttack,
ARTAttack); any other name is a library class whose constructor gets the entry's other keys
(FoolboxClass, ARTClass). Libraries load when a config uses them; a missing one fails with the pip
command that installs it. Results get the same clipping, budget check and re-scoring as native ones.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, get_args

import numpy as np
import torch

from harness.core.errors import BadInput
from harness.core.registry import Registry

from .threat import BOUNDS, NORMS, ThreatModel

__all__ = ["ADAPTERS", "MissingDependency", "require", "require_installed", "FoolboxAttack", "ARTAttack",
           "FoolboxClass", "ARTClass", "library_attack", "library_classes", "NAMING"]

ADAPTERS: Registry[type] = Registry("backend")

NAMING = (  # for `harness list attacks`
    "pgd and fgsm also run through foolbox or ART: add `backend: foolbox` or `backend: art` to the entry. With a backend, a name may"
    " also be a foolbox 3 attack class (LinfDeepFoolAttack, L2CarliniWagnerAttack, BoundaryAttack, ...) or an ART evasion attack"
    " class (HopSkipJump, ProjectedGradientDescent, ElasticNet, ...); the entry's other keys go to its constructor"
)


class MissingDependency(BadInput, ImportError):
    """An optional library is not installed. A BadInput (exit 2: the config asks for a backend this
    environment lacks), so the runner passes it on instead of calling it a failed run (exit 3)."""


def _install_hint(module: str) -> str:
    top = module.split(".")[0]
    extra = {"foolbox": "foolbox", "art": "art", "alibi_detect": "alibi", "timm": "timm", "onnxruntime": "onnx",
             "onnx2torch": "onnx", "onnx": "onnx", "transformers": "huggingface"}.get(top, "all")
    return f"this needs the optional package {top!r}: pip install 'robustgate[{extra}]'"


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


def _foolbox_run(attack, minimal: bool, model, x, y, threat: ThreatModel, generator, target) -> torch.Tensor:
    """Minimal: one unbounded call, the raw adversarials. Fixed-epsilon: per epsilon, the clipped ones."""
    fb = require("foolbox")
    fmodel = fb.PyTorchModel(model, bounds=BOUNDS, device=x.device)

    def criterion(mask):
        return y[mask] if target is None else fb.criteria.TargetedMisclassification(target[mask])

    with _seeded_from(generator, x.device):
        if minimal:
            return attack(fmodel, x, criterion(slice(None)), epsilons=None)[0]
        return _by_epsilon(threat, x, lambda xs, mask, eps: attack(fmodel, xs, criterion(mask), epsilons=eps)[1])


def _art_run(make: Callable, minimal: bool, model, x, y, threat: ThreatModel, generator, target, what: str) -> torch.Tensor:
    """``make(classifier, eps)`` builds the ART attack (eps None: minimal); y is the target when targeted."""
    require("art")
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    # ART puts the model on the *current* CUDA device (moving it in place): make that x's device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=n_classes, clip_values=BOUNDS, device_type="gpu" if x.is_cuda else "cpu")
    labels = (y if target is None else target).detach().cpu().numpy()

    def run(xs, mask, eps):
        try:
            attack = make(clf, eps)
        except (TypeError, ValueError) as e:  # ART checks parameter values only once it has a model
            raise BadInput("", f"{what}: {e}") from None
        adv = attack.generate(xs.detach().cpu().numpy(), y=labels[mask.cpu().numpy()])
        return torch.from_numpy(np.asarray(adv)).to(x.device, x.dtype)

    with _seeded_from(generator, x.device):
        return run(x, torch.ones(len(x), dtype=torch.bool), None) if minimal else _by_epsilon(threat, x, run)


@dataclass(frozen=True)
class _Adapter:
    """The knobs both libraries' FGSM/PGD share, with native PGD's defaults (random start, 2.5 / steps)."""

    attack: str
    steps: int = 20
    rel_stepsize: Optional[float] = None
    random_start: Optional[bool] = None  # None: PGD starts at random, FGSM does not

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # Any registered native attack name reaches here; one the adapter cannot map must not run as PGD.
        if self.attack not in ("pgd", "fgsm"):
            raise ValueError(f"attack {self.attack!r} has no library counterpart here (valid: fgsm, pgd, or a library class name: see `harness list attacks`)")
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

    def __call__(self, model, x, y, threat: ThreatModel, *, generator=None, target=None):
        a, linf = require("foolbox").attacks, threat.norm == "linf"
        if self.attack == "fgsm":
            attack = (a.LinfFastGradientAttack if linf else a.L2FastGradientAttack)(random_start=bool(self.random_start))
        else:
            attack = (a.LinfPGD if linf else a.L2PGD)(rel_stepsize=self.rel, steps=self.steps, random_start=self.random_start is not False)
        return _foolbox_run(attack, False, model, x, y, threat, generator, target)


@ADAPTERS.register("art")
@dataclass(frozen=True)
class ARTAttack(_Adapter):
    """ART's ProjectedGradientDescentPyTorch (``pgd``) and FastGradientMethod (``fgsm``)."""

    batch_size: int = 256

    def __call__(self, model, x, y, threat: ThreatModel, *, generator=None, target=None):
        evasion = require("art.attacks.evasion")
        kw = dict(norm=np.inf if threat.norm == "linf" else 2, targeted=target is not None, batch_size=self.batch_size)

        def make(clf, eps):
            if self.attack == "fgsm":
                return evasion.FastGradientMethod(clf, eps=eps, num_random_init=int(bool(self.random_start)), **kw)
            return evasion.ProjectedGradientDescentPyTorch(clf, eps=eps, eps_step=self.rel * eps, max_iter=self.steps, verbose=False,
                                                           num_random_init=0 if self.random_start is False else 1, **kw)

        return _art_run(make, False, model, x, y, threat, generator, target, f"art {self.attack}")


def library_classes(backend: str) -> dict[str, type]:
    """The attack classes a config may name with this backend (imports the library)."""
    if backend == "foolbox":
        fb = require("foolbox")
        module, base = fb.attacks, (fb.attacks.base.MinimizationAttack, fb.attacks.base.FixedEpsilonAttack)
    else:
        module, base = require("art.attacks.evasion"), require("art.attacks.attack").EvasionAttack
    return {n: c for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and not inspect.isabstract(c)}


# Library attacks that read only the model's outputs (score- or decision-based); every other
# library attack is taken as white-box (it asks the estimator for gradients).
BLACK_BOX = frozenset({
    "BoundaryAttack", "HopSkipJumpAttack", "HopSkipJump", "SquareAttack", "SimBA", "ZooAttack", "GeoDA", "SignOPTAttack",
    "PixelAttack", "ThresholdAttack", "SpatialTransformation",
})


@dataclass(frozen=True)
class _LibraryClass:
    """A library attack class named in a config, and keyword arguments for its constructor.

    ``norms``, ``minimal`` and ``supports_target`` are ClassVars in the contract but depend on the
    library class here: instance attributes, derived when the value is made (``is_minimal`` reads them).
    """

    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    norms: tuple[str, ...] = field(init=False)
    minimal: bool = field(init=False)
    supports_target: bool = field(init=False)
    access: str = field(init=False)

    backend: ClassVar[str]
    supplied: ClassVar[dict[str, str]]  # constructor arguments the adapter fills in, and from what

    def __post_init__(self) -> None:
        classes, what = library_classes(self.backend), f"{self.backend} attack {self.attack!r}"
        if self.attack not in classes:
            lower = {n.lower(): n for n in classes}
            close = [lower[n] for n in difflib.get_close_matches(self.attack.lower(), lower, n=4, cutoff=0.5)]
            raise ValueError(f"unknown {what} (close: {', '.join(close) or 'none'}; `harness list attacks` explains how to name library attacks)")
        sig = inspect.signature(classes[self.attack]).parameters
        own = [n for n in sig if n not in self.supplied]
        for key in self.params:
            if key in self.supplied:
                raise ValueError(f"{what}: {key!r} is set by the adapter from {self.supplied[key]}; remove it")
            if key not in sig:
                raise ValueError(f"unknown parameter {key!r} for {what} (valid: {', '.join(own) or 'none'})")
        missing = [n for n in own if sig[n].default is inspect.Parameter.empty and n not in self.params]
        if missing:
            raise ValueError(f"{what} needs parameter {missing[0]!r}")
        for name, value in zip(("norms", "minimal", "supports_target"), self._derive(classes[self.attack], what)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "access", "black-box" if self.attack in BLACK_BOX else "white-box")

    def _class(self, target: Optional[torch.Tensor]) -> type:
        if target is not None and not self.supports_target:
            raise ValueError(f"{self.backend} attack {self.attack!r} cannot take a target")
        return library_classes(self.backend)[self.attack]


@dataclass(frozen=True)
class FoolboxClass(_LibraryClass):
    """Any foolbox 3 attack by class name: a MinimizationAttack is minimal, a FixedEpsilonAttack
    bounded. Its norm is its ``distance``; ``distance``/``constraint`` arguments come from the entry."""

    backend: ClassVar[str] = "foolbox"
    supplied: ClassVar[dict[str, str]] = {"distance": "the entry's `norm`", "constraint": "the entry's `norm`"}

    def _make(self, cls: type, norm: str):
        fb, sig = require("foolbox"), inspect.signature(cls).parameters
        extra = {"distance": getattr(fb.distances, norm), "constraint": norm}
        return cls(**self.params, **{k: v for k, v in extra.items() if k in sig})

    def _derive(self, cls, what):
        fb = require("foolbox")
        try:
            made = {n: self._make(cls, n) for n in NORMS}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {e}") from None
        norms = tuple(n for n, a in made.items() if getattr(a.distance, "p", None) == {"linf": np.inf, "l2": 2}[n])
        criterion = inspect.signature(cls.run).parameters["criterion"].annotation  # e.g. Union[Misclassification, T]
        takes = set(get_args(criterion) or (criterion,)) & {fb.criteria.Criterion, fb.criteria.TargetedMisclassification}
        return norms, issubclass(cls, fb.attacks.base.MinimizationAttack), bool(takes)

    def __call__(self, model, x, y, threat: ThreatModel, *, generator=None, target=None):
        return _foolbox_run(self._make(self._class(target), threat.norm), self.minimal, model, x, y, threat, generator, target)


@dataclass(frozen=True)
class ARTClass(_LibraryClass):
    """Any ART evasion attack by class name: bounded if its constructor takes ``eps`` (called once per
    epsilon), else minimal. ``norm`` (np.inf or 2) and ``targeted`` come from the entry and the run.
    Without a given ``eps_step`` the step is ``eps * min(1, 2.5 / max_iter)``: native PGD's schedule."""

    backend: ClassVar[str] = "art"
    supplied: ClassVar[dict[str, str]] = {"estimator": "the run's model", "classifier": "the run's model", "eps": "the entry's `epsilons`",
                                          "norm": "the entry's `norm`", "targeted": "the entry's `targeted`"}

    def _derive(self, cls, what):
        from art.estimators.classification import PyTorchClassifier

        if not all(issubclass(PyTorchClassifier, r) for r in getattr(cls, "_estimator_requirements", ())):
            raise ValueError(f"{what} needs another kind of model than a classifier of images")
        named = re.search(r"L(0|1|2|Inf)(?![a-z])", self.attack)  # CarliniL2Method, CarliniLInfMethod
        norms = NORMS if named is None else tuple(n for n in NORMS if n == {"2": "l2", "Inf": "linf"}.get(named.group(1)))
        sig = inspect.signature(cls).parameters
        return norms, "eps" not in sig, "targeted" in sig

    def __call__(self, model, x, y, threat: ThreatModel, *, generator=None, target=None):
        cls = self._class(target)
        sig = inspect.signature(cls).parameters
        given = {"verbose": False, **self.params, "norm": np.inf if threat.norm == "linf" else 2, "targeted": target is not None}
        kw = {k: v for k, v in given.items() if k in sig}
        steps = kw.get("max_iter", sig["max_iter"].default if "max_iter" in sig else 1)
        rel = min(1.0, 2.5 / steps) if isinstance(steps, int) and steps > 0 else 1.0
        step = "eps_step" in sig and "eps_step" not in kw

        def make(clf, eps):
            return cls(clf, **kw) if eps is None else cls(clf, eps=eps, **({"eps_step": eps * rel} if step else {}), **kw)

        return _art_run(make, self.minimal, model, x, y, threat, generator, target, f"art attack {self.attack!r}")


def library_attack(backend: str, name: str, params: dict[str, Any]) -> _LibraryClass:
    """The adapter over a library class a config names; ValueError for a bad name or parameter."""
    return {"foolbox": FoolboxClass, "art": ARTClass}[backend](name, dict(params))
