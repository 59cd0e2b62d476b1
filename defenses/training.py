"""Adversarial training (PGD-AT, TRADES, fast FGSM-AT), training under Gaussian noise, and the epoch loop they share.

A defense is a small frozen value holding its knobs (the house style of attacks/). It crafts the
training examples (`perturb`) and scores them (`objective`); the epoch loop, the per-epoch PGD check
on a slice of the training data held out of training, and the choice of the epoch to keep are shared
(`train`, on the one loop harness.training.train_epochs). Training a configured model, with
checkpoints, resume and the written files, is `harness harden` (the pipeline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from harness.attacks import FGSM, PGD, ThreatModel
from harness.training.loop import TrainSettings, optimizer_step, snapshot, train_epochs
from harness.training.loop import learning_rate as _learning_rate
from harness.training.loop import make_optimizer as _make_optimizer

from .registry import DEFENSES

__all__ = ["AdversarialTraining", "PGDAT", "TRADES", "FastAT", "GaussianAugmentation", "Check", "noise_check", "epoch_check", "build_defense", "training_defenses",
           "pgd_check", "learning_rate", "make_optimizer", "optimizer_step", "train", "TrainState", "TrainSettings"]

# (model, epoch) -> (clean accuracy, robust accuracy) on the held-out slice; epoch 0 is the starting model
Check = Callable[[torch.nn.Module, int], "tuple[float, float]"]


def _ascend(model, x: torch.Tensor, threat: ThreatModel, steps: int, step: float,
            objective: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """Projected steepest ascent on `objective(logits)`; the last iterate, as in the papers' training loops
    (the harness's PGD keeps the first fooling iterate, which makes weaker training examples)."""
    x_adv = threat.project(start.detach(), x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
        x_adv = threat.project(x_adv.detach() + step * threat.normalize_grad(grad), x)
    return x_adv.detach()


@dataclass(frozen=True)
class AdversarialTraining:
    """The knobs every training defense shares: its threat model, the per-epoch PGD check, the epoch kept."""

    norm: str = "linf"
    epsilon: float = 8 / 255  # a float: harness.config.defense_knobs translates "8/255" from a config
    check_steps: int = 10
    check_rel_stepsize: Optional[float] = None  # of epsilon per step; None: 2.5 / check_steps
    keep_best: bool = False  # write the epoch with the best robust accuracy on the check, not the last

    kind: ClassVar[str] = "training"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    craft_mode: ClassVar[str] = "train"  # the network's mode while training examples are crafted

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"norm must be one of {', '.join(self.norms)}, got {self.norm!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not 0 < self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be positive, got {self.epsilon!r}")
        if self.check_steps < 1:
            raise ValueError(f"check_steps must be at least 1, got {self.check_steps}")
        for name in ("rel_stepsize", "check_rel_stepsize"):
            value = getattr(self, name, None)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, float(self.epsilon))

    def check_attack(self) -> PGD:
        return PGD(steps=self.check_steps, rel_stepsize=self.check_rel_stepsize)

    def perturb(self, model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@DEFENSES.register("pgd-at")
@dataclass(frozen=True)
class PGDAT(AdversarialTraining):
    """PGD adversarial training (Madry et al. 2018, https://arxiv.org/abs/1706.06083).

    Minimises the cross-entropy on the last of `steps` PGD iterates from a uniform random start in
    the ball (step ``rel_stepsize * epsilon``, default 2.5 / steps). Norms: linf, l2. Example::

        harden("configs/defended.yaml", "pgd-at", "at.safetensors", epsilon=0.2, steps=10)
    """

    steps: int = 10
    rel_stepsize: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    def perturb(self, model, x, y, generator):
        threat = self.threat
        step = (self.rel_stepsize or 2.5 / self.steps) * float(threat.epsilon)
        return _ascend(model, x, threat, self.steps, step, lambda logits: F.cross_entropy(logits.float(), y, reduction="sum"),
                       threat.random_start(x, generator))

    def objective(self, model, x, x_adv, y):
        return F.cross_entropy(model(x_adv).float(), y)


@DEFENSES.register("trades")
@dataclass(frozen=True)
class TRADES(AdversarialTraining):
    """TRADES (Zhang et al. 2019, https://arxiv.org/abs/1901.08573): cross-entropy on clean inputs plus
    `beta` times the KL divergence between the clean and the adversarial predictions.

    The inner maximisation ascends that KL (not the cross-entropy) from a small Gaussian start, with
    the network in eval mode as in the paper's code. Norms: linf, l2. Example::

        harden("configs/defended.yaml", "trades", "trades.safetensors", epsilon=0.2, beta=6.0)
    """

    beta: float = 6.0
    steps: int = 10
    rel_stepsize: Optional[float] = None

    craft_mode: ClassVar[str] = "eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")

    def perturb(self, model, x, y, generator):
        threat = self.threat
        with torch.no_grad():
            clean = F.softmax(model(x).float(), dim=1)
        start = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        step = (self.rel_stepsize or 2.5 / self.steps) * float(threat.epsilon)
        kl = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), clean, reduction="sum")  # noqa: E731
        return _ascend(model, x, threat, self.steps, step, kl, start)

    def objective(self, model, x, x_adv, y):
        logits = model(x).float()
        robust = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * robust


@DEFENSES.register("fast-at")
@dataclass(frozen=True)
class FastAT(AdversarialTraining):
    """Fast adversarial training (Wong et al. 2020, https://arxiv.org/abs/2001.03994): FGSM from a
    uniform random start with step ``rel_stepsize * epsilon`` (1.25).

    Guards against catastrophic overfitting, where FGSM training suddenly stops giving PGD robustness:
    the per-epoch PGD check keeps the best epoch's weights, and training stops once robust accuracy
    falls more than `collapse_drop` below the best. Norms: linf, l2. Example::

        harden("configs/defended.yaml", "fast-at", "fast.safetensors", epsilon=0.2)
    """

    rel_stepsize: float = 1.25
    collapse_drop: float = 0.2
    keep_best: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.collapse_drop <= 1:
            raise ValueError(f"collapse_drop must be in (0, 1], got {self.collapse_drop}")

    def perturb(self, model, x, y, generator):
        return FGSM(random_start=True, rel_stepsize=self.rel_stepsize)(model, x, y, self.threat, generator=generator)

    def objective(self, model, x, x_adv, y):
        return F.cross_entropy(model(x_adv).float(), y)


@DEFENSES.register("gaussian-augmentation")
@dataclass(frozen=True)
class GaussianAugmentation(AdversarialTraining):
    """Training under Gaussian noise (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918,
    section 4 and appendix): every training batch is seen as x + N(0, sigma^2 I) in [0, 1] input space,
    not clipped, so that the base classifier is accurate under the noise a randomized-smoothing
    certificate at the same `sigma` draws, which is what makes the smoothed classifier's radii large.

    The per-epoch check is the base classifier's accuracy under that noise (`noise_check`: one draw per
    held-out sample, the same draws every epoch), recorded as the epoch's robust accuracy. Example::

        harden("configs/certified.yaml", "gaussian-augmentation", "noise.safetensors", sigma=0.25)
    """

    sigma: float = 0.25
    norm: str = "l2"
    epsilon: float = 0.25  # unused by the training; kept so the record says which L2 scale the noise stands for

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not 0 < self.sigma < float("inf"):
            raise ValueError(f"sigma must be positive, got {self.sigma!r}")

    def perturb(self, model, x, y, generator):
        return x + float(self.sigma) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def objective(self, model, x, x_adv, y):
        return F.cross_entropy(model(x_adv).float(), y)


def noise_check(defense: GaussianAugmentation, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device,
                batch_size: int = 256) -> Check:
    """Clean accuracy and accuracy under N(0, sigma^2) noise on (x, y), in eval mode; the same noise every epoch."""

    def check(model, epoch: int) -> tuple[float, float]:
        g = torch.Generator(device).manual_seed(seed)
        clean = noisy = 0
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                xb, yb = xb.to(device), yb.to(device)
                clean += int((model(xb).argmax(dim=1) == yb).sum())
                noise = float(defense.sigma) * torch.randn(xb.shape, generator=g, device=device, dtype=xb.dtype)
                noisy += int((model(xb + noise).argmax(dim=1) == yb).sum())
        return clean / len(y), noisy / len(y)

    return check


def epoch_check(defense: AdversarialTraining, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device,
                batch_size: int = 256) -> tuple[Check, dict[str, Any]]:
    """The per-epoch check `harness harden` runs for `defense` and how its log names it: PGD at the
    defense's budget, or for noise training the accuracy under the training noise."""
    if isinstance(defense, GaussianAugmentation):
        return (noise_check(defense, x, y, seed, device, batch_size),
                {"attack": "gaussian-noise", "sigma": float(defense.sigma), "samples": len(y)})
    return (pgd_check(defense, x, y, seed, device, batch_size),
            {"attack": "pgd", "steps": defense.check_steps, "norm": defense.norm, "epsilon": str(defense.epsilon), "samples": len(y)})


def training_defenses() -> list[str]:
    """The registered defenses `harness harden` can train with."""
    return [name for name, obj in DEFENSES.items() if getattr(obj, "kind", None) == "training"]


def build_defense(name: str, knobs: dict[str, Any]) -> AdversarialTraining:
    """The defense `name` with `knobs`; ValueError naming the knob and the valid choices."""
    from harness.attacks.config import validated

    if name not in training_defenses():
        raise ValueError(f"unknown training defense {name!r} (valid: {', '.join(training_defenses())})")
    return validated(DEFENSES.get(name), dict(knobs), f"defense {name!r}")


def pgd_check(defense: AdversarialTraining, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device,
              batch_size: int = 256) -> Check:
    """Clean and PGD robust accuracy on (x, y), in eval mode and full precision, the same random
    starts every epoch; every adversarial batch is re-scored by a forward pass of its own."""
    attack, threat = defense.check_attack(), defense.threat

    def check(model, epoch: int) -> tuple[float, float]:
        g = torch.Generator(device).manual_seed(seed)
        clean = robust = 0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb, yb = xb.to(device), yb.to(device)
            with torch.no_grad():
                right = model(xb).argmax(dim=1) == yb
            clean += int(right.sum())
            if bool(right.any()):
                adv = threat.project(attack(model, xb[right], yb[right], threat, generator=g), xb[right])
                with torch.no_grad():
                    robust += int((model(adv).argmax(dim=1) == yb[right]).sum())
        return clean / len(y), robust / len(y)

    return check


def _set_trainable(net: torch.nn.Module, on: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(on)


def _settings(plan: Any) -> TrainSettings:
    """A TrainSettings as given, or translated from a harness.config.TrainConfig (duck-typed: the config
    layer sits above this one and is never imported here)."""
    return plan if isinstance(plan, TrainSettings) else plan.settings()


def make_optimizer(plan: Any, net: torch.nn.Module) -> torch.optim.Optimizer:
    """harness.training.make_optimizer for a TrainSettings or a TrainConfig."""
    return _make_optimizer(_settings(plan), net)


def learning_rate(plan: Any, epoch: int, fraction: float) -> float:
    """harness.training.learning_rate for a TrainSettings or a TrainConfig."""
    return _learning_rate(_settings(plan), epoch, fraction)


@dataclass
class TrainState:
    """Everything a checkpoint holds: finished epochs, their records, and the weights kept so far."""

    epoch: int = 0  # epochs finished
    records: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, torch.Tensor]] = None
    best_epoch: Optional[int] = None
    best_robust: float = -1.0
    stopped: Optional[str] = None



def train(defense: AdversarialTraining, model, x: torch.Tensor, y: torch.Tensor, plan: Any, device: torch.device, *,
          check: Check, seed: int, state: Optional[TrainState] = None, optimizer: Optional[torch.optim.Optimizer] = None,
          scaler: Any = None, amp: bool = False, show_progress: Optional[bool] = None,
          on_epoch: Optional[Callable[[TrainState, torch.optim.Optimizer, Any], None]] = None) -> TrainState:
    """Trains `model` (a BoundedModel on `device`, so the defense sees [0, 1] inputs) with `defense`
    for the settings' epochs from `state`; calls `on_epoch` after each (checkpoints hook in there).

    `plan` is a harness.training.TrainSettings (or anything with .settings() giving one); `amp`
    turns mixed precision on (the caller decides, CUDA only). The loop is harness.training.train_epochs:
    each epoch's data order and attack randomness come from (seed, epoch) alone, so a run resumed
    from a checkpoint repeats exactly what the uninterrupted run would have done.
    """
    from harness.core.errors import RunFailed

    settings = replace(_settings(plan), amp=amp)
    net, state = model.net, state or TrainState()
    optimizer = optimizer or _make_optimizer(settings, net)
    if not state.records:
        clean, robust = check(model, 0)
        state.records.append({"epoch": 0, "loss": None, "clean_accuracy": clean, "robust_accuracy": robust, "seconds": 0.0, "lr": None})
    started = [time.perf_counter()]

    def step(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        net.train(defense.craft_mode == "train")
        _set_trainable(net, False)
        x_adv = defense.perturb(model, xb, yb, g)
        net.train(True)
        _set_trainable(net, True)
        return defense.objective(model, xb, x_adv, yb)

    def after(epoch: int, loss: float, lr: float) -> bool:
        _set_trainable(net, False)
        clean, robust = check(model, epoch)
        state.records.append({"epoch": epoch, "loss": loss, "clean_accuracy": clean, "robust_accuracy": robust,
                              "seconds": round(time.perf_counter() - started[0], 3), "lr": lr})
        state.epoch = epoch
        if robust > state.best_robust:
            state.best_robust, state.best_epoch = robust, epoch
            state.best = snapshot(net) if defense.keep_best else None
        drop = getattr(defense, "collapse_drop", None)
        if drop is not None and state.best_robust - robust > drop:
            state.stopped = (f"catastrophic overfitting: robust accuracy fell from {state.best_robust:.4f} (epoch {state.best_epoch}) "
                             f"to {robust:.4f} (epoch {epoch})")
        if on_epoch is not None:
            on_epoch(state, optimizer, scaler)
        started[0] = time.perf_counter()
        return bool(state.stopped)

    if not state.stopped:
        try:
            train_epochs(net, x, y, settings, device, step, seed=seed, first_epoch=state.epoch, optimizer=optimizer, scaler=scaler,
                         on_epoch=after, label=type(defense).__name__, show_progress=show_progress)
        except FloatingPointError as e:
            raise RunFailed(str(e)) from None
    net.eval()
    _set_trainable(net, False)
    if defense.keep_best and state.best is not None:
        net.load_state_dict(state.best)
    return state
