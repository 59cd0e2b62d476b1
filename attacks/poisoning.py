"""Poisoning susceptibility probes: can this training pipeline be backdoored with a few poisoned samples?

A probe is a small frozen value holding its knobs (the house style of attacks/). Called per
poisoning fraction, it poisons a copy of the training set, trains the model the way the config's
`train:` recipe does (from scratch, or fine-tuning the given weights), and measures the result::

    from harness.attacks.poisoning import PROBES
    result = PROBES.get("badnets")(target=0).run(make_model, (x_tr, y_tr), (x_te, y_te), 0.1, plan, "cpu", seed=0)
    result.attack_success_rate, result.clean_accuracy

`fraction` is always of the whole training set. Triggers are plain functions (`patch`), as in ART.
Every draw (which samples, the initialisation, the batch order, the flips) comes from `seed`, so a
probe repeats exactly on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.registry import Registry
from harness.training.loop import TrainSettings, make_scaler

from .threat import ThreatModel
from .triggers import POSITIONS, Position, _pattern, patch, trigger_image

__all__ = ["PROBES", "ProbeResult", "BadNets", "CleanLabel", "LabelFlip", "patch", "trigger_image", "fit", "accuracy",
           "attack_success_rate", "POSITIONS"]

PROBES: Registry[type] = Registry("probe")

Pair = tuple[torch.Tensor, torch.Tensor]


# --- training and measuring -------------------------------------------------------------------

def _net(model: nn.Module) -> nn.Module:
    # a BoundedModel keeps itself in eval mode and owns normalization: train the network inside it
    return getattr(model, "net", model)


def _reinitialize(net: nn.Module, seed: int) -> None:
    layers = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise ValueError("training from scratch needs layers with reset_parameters(), and this model has none "
                         "(set fine_tune: true)")
    torch.manual_seed(seed)
    for m in layers:
        m.reset_parameters()


@contextlib.contextmanager
def _deterministic_cudnn(on: bool) -> Iterator[None]:
    """cuDNN's deterministic kernels while a probe trains, so a seed repeats on CUDA too; restored after."""
    if not on:
        yield
        return
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: TrainSettings, device: Union[str, torch.device], seed: int,
        epochs: Optional[int] = None) -> nn.Module:
    """Plain cross-entropy training of `model` on (x, y) with the settings' optimizer, schedule, batch
    size and epochs (`epochs` overrides how many run; the schedule still spans the settings' epochs);
    returns it on `device`, in eval mode, parameters frozen.

    `plan` is a harness.training.TrainSettings (harness.config.TrainConfig.settings() makes one). The
    loop is harness.training.train_epochs: the batch order of each epoch comes from (seed, epoch).
    """
    from harness.training.loop import train_epochs

    device = torch.device(device)
    net = _net(model)
    model.to(device)
    for p in net.parameters():
        p.requires_grad_(p.is_floating_point())

    def step(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(xb).float(), yb)

    with _deterministic_cudnn(device.type == "cuda"):
        train_epochs(net, x, y, plan, device, step, seed=seed, scaler=make_scaler(plan, device), until=epochs)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return model


def _predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(xb.to(device)).argmax(dim=1).cpu() for xb in x.split(batch)]) if len(x) else torch.zeros(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: Union[str, torch.device] = "cpu") -> float:
    return float((_predict(model, x, torch.device(device)) == y).float().mean())


def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int,
                        trigger: Callable[[torch.Tensor], torch.Tensor], device: Union[str, torch.device] = "cpu") -> float:
    """Over the samples whose true class is not `target`: the fraction classified as `target` once triggered."""
    others = y != target
    if not bool(others.any()):
        raise ValueError(f"the test set holds no sample outside the target class {target}")
    return float((_predict(model, trigger(x[others]), torch.device(device)) == target).float().mean())


# --- the probes -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ProbeResult:
    """One probe at one poisoning fraction. `poisoned_ids` index the training set, whose poisoned
    copy is `poisoned_train`; `model` is the model trained on it (eval mode), for the scans."""

    probe: str
    fraction: float
    attack_success_rate: Optional[float]
    clean_accuracy: float
    clean_accuracy_baseline: Optional[float]
    n_poisoned: int
    poisoned_ids: torch.Tensor
    target: Optional[int]
    seconds: float
    model: nn.Module
    poisoned_train: Pair
    # (test samples the unpoisoned baseline got right and the poisoned model wrong, and the reverse):
    # both models are scored on the same test points, so their accuracy difference is a paired one
    discordant: Optional[tuple[int, int]] = None

    def metrics(self, subject: Optional[str] = None, fraction: Optional[str] = None) -> dict[str, float]:
        """The scorecard's metric ids, `family:<probe>@<fraction>` (the fraction as the config wrote it)."""
        at = f"{subject or self.probe}@{fraction if fraction is not None else f'{self.fraction:g}'}"
        out = {f"clean_accuracy:{at}": self.clean_accuracy}
        if self.attack_success_rate is not None:
            out[f"attack_success_rate:{at}"] = self.attack_success_rate
        return out

    def record(self) -> dict[str, Any]:
        """The figures as plain data (no tensors, no model), for the scorecard's `probes` list."""
        cost = None if self.clean_accuracy_baseline is None else self.clean_accuracy_baseline - self.clean_accuracy
        return {"probe": self.probe, "fraction": self.fraction, "attack_success_rate": self.attack_success_rate,
                "clean_accuracy": self.clean_accuracy, "clean_accuracy_baseline": self.clean_accuracy_baseline,
                "clean_accuracy_cost": cost, "n_poisoned": self.n_poisoned, "n_train": int(self.poisoned_train[1].shape[0]),
                "target": self.target, "seconds": self.seconds}


def _count(fraction: float, n: int) -> int:
    if not 0 <= fraction <= 1:
        raise ValueError(f"a poisoning fraction must be in [0, 1], got {fraction}")
    return math.floor(fraction * n + 0.5)


def _choose(pool: torch.Tensor, k: int, fraction: float, n: int, what: str, g: torch.Generator) -> torch.Tensor:
    """k indices drawn without replacement from `pool` (a boolean mask), in increasing order."""
    candidates = pool.nonzero().flatten()
    if k > len(candidates):
        raise ValueError(f"fraction {fraction:g} asks for {k} poisoned samples but only {len(candidates)} are {what} "
                         f"(at most {len(candidates) / n:.4g} of the training set)")
    return candidates[torch.randperm(len(candidates), generator=g)[:k]].sort().values


@dataclass(frozen=True)
class Poisoning:
    """What every probe shares: how its models train. `fine_tune` starts from the weights
    `make_model()` returns; otherwise the parameters are re-initialised from the seed (the recipe
    from scratch). `epochs` overrides the plan's."""

    fine_tune: bool = False
    epochs: Optional[int] = None

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")

    def _train(self, make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, plan: Any,
               device: torch.device, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = copy.deepcopy(make_model())  # never train the caller's object
        if not self.fine_tune:
            _reinitialize(_net(model), seed)
        return fit(model, x, y, plan, device, seed, self.epochs)

    def max_fraction(self, y: torch.Tensor) -> float:
        """The largest fraction of this training set (labels `y`) the probe can poison."""
        raise NotImplementedError

    def poison(self, train: Pair, fraction: float, seed: int, model: Optional[nn.Module] = None,
               device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(poisoned x, poisoned y, poisoned ids) from the clean training set, which is left alone;
        `model` is the clean reference, for probes that craft against one."""
        raise NotImplementedError

    def _wants_baseline(self) -> bool:
        return True

    def _success(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Optional[float]:
        return None

    def run(self, make_model: Callable[[], nn.Module], train: Pair, test: Pair, fraction: float, plan: Any,
            device: Union[str, torch.device], seed: int) -> ProbeResult:
        """Poisons `fraction` of `train`, trains a model from `make_model()` on it with `plan` (a
        TrainConfig) on `device`, and measures it on `test`. The unpoisoned baseline, when there is
        one, trains with the same initialisation and batch order, so the poison is the only difference."""
        t0, device = time.perf_counter(), torch.device(device)
        (x_tr, y_tr), (x_te, y_te) = train, test
        assert x_tr.dim() == 4 and x_te.dim() == 4, "expected (n, C, H, W) training and test inputs"
        assert y_tr.shape == (len(x_tr),) and y_te.shape == (len(x_te),), "expected one label per sample"
        target = getattr(self, "target", None)
        if target is not None and target > int(max(y_tr.max(), y_te.max())):
            raise ValueError(f"target class {target} does not occur in the data")
        reference = self._train(make_model, x_tr, y_tr, plan, device, seed) if self._wants_baseline() else None
        right_before = None if reference is None else _predict(reference, x_te, device) == y_te.cpu()
        x_p, y_p, ids = self.poison(train, fraction, seed, reference, device)
        model = self._train(make_model, x_p, y_p, plan, device, seed)
        right = _predict(model, x_te, device) == y_te.cpu()
        baseline = None if right_before is None else float(right_before.float().mean())
        discordant = None if right_before is None else (int((right_before & ~right).sum()), int((~right_before & right).sum()))
        return ProbeResult(probe=self.name, fraction=fraction, attack_success_rate=self._success(model, x_te, y_te, device),
                           clean_accuracy=float(right.float().mean()), clean_accuracy_baseline=baseline,
                           n_poisoned=len(ids), poisoned_ids=ids, target=target, seconds=round(time.perf_counter() - t0, 3),
                           model=model, poisoned_train=(x_p, y_p), discordant=discordant)


@dataclass(frozen=True)
class _Backdoor(Poisoning):
    """A probe that plants a trigger and measures how often it steers test samples to `target`."""

    target: int = 0
    size: int = 3
    position: Position = "bottom-right"
    pattern: str = "checker"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target < 0:
            raise ValueError(f"target must be a class index, got {self.target}")
        if self.size < 1:
            raise ValueError(f"trigger size must be at least 1, got {self.size}")
        _pattern(self.pattern, 1, self.size)
        if not isinstance(self.position, str) and len(self.position) != 2:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)} or [row, col], got {self.position!r}")
        if isinstance(self.position, str) and self.position not in POSITIONS:
            raise ValueError(f"unknown trigger position {self.position!r} (valid: {', '.join(POSITIONS)} or [row, col])")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger as the test samples get it: stamped at full strength."""
        return patch(x, self.size, self.position, self.pattern)

    def trigger_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        return trigger_image(shape, self.size, self.position, self.pattern)

    def _success(self, model, x, y, device):
        return attack_success_rate(model, x, y, self.target, self.trigger, device)


@PROBES.register("badnets")
@dataclass(frozen=True)
class BadNets(_Backdoor):
    """BadNets (Gu et al. 2017, https://arxiv.org/abs/1708.06733): a patch trigger stamped on a
    fraction of the training samples of other classes, relabelled to `target`.

    Reports the attack success rate (triggered test samples of other classes classified as
    `target`) and the clean accuracy; `baseline: true` also trains an unpoisoned model with the
    same recipe and seed for the clean accuracy it would have had. Example::

        BadNets(target=0, size=3, pattern="checker").run(make_model, train, test, 0.1, plan, "cpu", seed=0)
    """

    baseline: bool = False

    name: ClassVar[str] = "badnets"

    def _wants_baseline(self) -> bool:
        return self.baseline

    def max_fraction(self, y):
        return float((y != self.target).float().mean())

    def poison(self, train, fraction, seed, model=None, device="cpu"):
        x, y = train
        k = _count(fraction, len(y))
        ids = _choose(y != self.target, k, fraction, len(y), f"outside the target class {self.target}",
                      torch.Generator().manual_seed(seed))
        x, y = x.clone(), y.clone()
        x[ids] = self.trigger(x[ids])
        y[ids] = self.target
        return x, y, ids


@PROBES.register("clean-label")
@dataclass(frozen=True)
class CleanLabel(_Backdoor):
    """Clean-label backdoor (Turner et al. 2019, https://arxiv.org/abs/1912.02771), native: only
    training samples of the `target` class are poisoned, and they keep their correct labels.

    To make their own content hard to learn from, each is first pushed by `steps` of L-inf PGD
    (the last iterate, within `epsilon`) to raise the loss of a reference model trained on the
    clean data with the same recipe and seed; then the trigger is stamped, blended at `amplitude`.
    The model trained on them can only fit those samples by leaning on the trigger, which the
    test samples get at full strength. The reference's clean accuracy is the baseline. Example::

        CleanLabel(target=0, epsilon=16 / 255).run(make_model, train, test, 0.1, plan, "cpu", seed=0)
    """

    epsilon: float = 16 / 255  # a float: harness.config translates "16/255" from a config
    steps: int = 10
    rel_stepsize: float = 0.25
    amplitude: float = 1.0

    name: ClassVar[str] = "clean-label"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not 0 <= self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be a non-negative finite number, got {self.epsilon!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be non-negative, got {self.steps}")
        if self.rel_stepsize <= 0:
            raise ValueError(f"rel_stepsize must be positive, got {self.rel_stepsize}")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"amplitude must be in (0, 1], got {self.amplitude}")

    def max_fraction(self, y):
        return float((y == self.target).float().mean())

    def _hard(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
        """Projected steepest ascent on the reference's cross-entropy, the last iterate (Turner et al.)."""
        eps = float(self.epsilon)
        threat, step = ThreatModel("linf", eps), self.rel_stepsize * eps
        out = []
        for xb, yb in zip(x.split(batch), y.split(batch)):
            xb, yb = xb.to(device), yb.to(device)
            adv = xb.clone()
            for _ in range(self.steps if eps > 0 else 0):
                adv.requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(F.cross_entropy(model(adv).float(), yb, reduction="sum"), adv)
                adv = threat.project(adv.detach() + step * threat.normalize_grad(grad), xb)
            out.append(adv.detach().cpu())
        return torch.cat(out) if out else x.clone()

    def poison(self, train, fraction, seed, model=None, device="cpu"):
        x, y = train
        k = _count(fraction, len(y))
        ids = _choose(y == self.target, k, fraction, len(y), f"of the target class {self.target}",
                      torch.Generator().manual_seed(seed))
        x = x.clone()
        if len(ids):
            if model is None:
                raise ValueError("clean-label poisons are crafted against a reference model: pass one")
            hard = self._hard(model, x[ids], y[ids], torch.device(device))
            x[ids] = patch(hard, self.size, self.position, self.pattern, self.amplitude)
        return x, y.clone(), ids


@PROBES.register("label-flip")
@dataclass(frozen=True)
class LabelFlip(Poisoning):
    """Label flipping: `random` relabels a fraction of the training samples each to another class
    drawn uniformly; `targeted` relabels samples of class `source` as `target`.

    Reports the clean accuracy and, as the baseline, that of an unpoisoned model trained with the
    same recipe and seed (its cost is the difference). The classes are those the labels show.
    Example::

        LabelFlip(mode="targeted", source=1, target=7).run(make_model, train, test, 0.05, plan, "cpu", seed=0)
    """

    mode: str = "random"
    source: Optional[int] = None
    target: Optional[int] = None

    name: ClassVar[str] = "label-flip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("random", "targeted"):
            raise ValueError(f"mode must be random or targeted, got {self.mode!r}")
        given = self.source is not None or self.target is not None
        if self.mode == "random" and given:
            raise ValueError("source and target apply to mode targeted only")
        if self.mode == "targeted":
            if self.source is None or self.target is None:
                raise ValueError("mode targeted needs a source and a target class")
            if self.source == self.target or min(self.source, self.target) < 0:
                raise ValueError(f"source and target must be two different class indices, got {self.source} and {self.target}")

    def max_fraction(self, y):
        return 1.0 if self.mode == "random" else float((y == self.source).float().mean())

    def poison(self, train, fraction, seed, model=None, device="cpu"):
        x, y = train
        k, g = _count(fraction, len(y)), torch.Generator().manual_seed(seed)
        y = y.clone()
        if self.mode == "random":
            ids = _choose(torch.ones_like(y, dtype=torch.bool), k, fraction, len(y), "in the training set", g)
            classes = int(y.max()) + 1
            if classes < 2:
                raise ValueError("random label flips need at least two classes")
            y[ids] = (y[ids] + torch.randint(1, classes, (len(ids),), generator=g)) % classes
        else:
            ids = _choose(y == self.source, k, fraction, len(y), f"of the source class {self.source}", g)
            y[ids] = self.target
        return x, y, ids
