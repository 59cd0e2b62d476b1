"""Adversarial training: PGD-AT, TRADES and fast FGSM-AT, and the epoch loop they share.

A defense is a small frozen value holding its knobs (the house style of attacks/). It crafts the
training examples (`perturb`) and scores them (`objective`); the epoch loop, the per-epoch PGD check
on a slice of the training data held out of training, and the choice of the epoch to keep are shared
(`train`). Training a configured model, with checkpoints, resume and the written files, is
defenses.hardening.harden.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F

from harness.attacks import FGSM, PGD, ThreatModel
from harness.config import TrainConfig, parse_epsilon

from .registry import DEFENSES

__all__ = ["AdversarialTraining", "PGDAT", "TRADES", "FastAT", "Check", "build_defense", "training_defenses",
           "pgd_check", "learning_rate", "make_optimizer", "optimizer_step", "train", "TrainState"]

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
    epsilon: Union[int, float, str] = "8/255"
    check_steps: int = 10
    check_rel_stepsize: Optional[float] = None  # of epsilon per step; None: 2.5 / check_steps
    keep_best: bool = False  # write the epoch with the best robust accuracy on the check, not the last

    kind: ClassVar[str] = "training"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    craft_mode: ClassVar[str] = "train"  # the network's mode while training examples are crafted

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ValueError(f"norm must be one of {', '.join(self.norms)}, got {self.norm!r}")
        if isinstance(self.epsilon, bool) or parse_epsilon(self.epsilon).value <= 0:
            raise ValueError(f"epsilon must be positive, got {self.epsilon!r}")
        if self.check_steps < 1:
            raise ValueError(f"check_steps must be at least 1, got {self.check_steps}")
        for name in ("rel_stepsize", "check_rel_stepsize"):
            value = getattr(self, name, None)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, parse_epsilon(self.epsilon).value)

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


def training_defenses() -> list[str]:
    """The registered defenses `harness harden` can train with."""
    return [name for name, obj in DEFENSES.items() if getattr(obj, "kind", None) == "training"]


def build_defense(name: str, knobs: dict[str, Any]) -> AdversarialTraining:
    """The defense `name` with `knobs`; ValueError naming the knob and the valid choices."""
    from harness.attacks.config import validated

    if name not in training_defenses():
        raise ValueError(f"unknown training defense {name!r} (valid: {', '.join(training_defenses())})")
    return validated(DEFENSES.get(name), dict(knobs), f"defense {name!r}")


def learning_rate(plan: TrainConfig, epoch: int, fraction: float) -> float:
    """The learning rate `fraction` of the way through epoch `epoch` (0-based): a function of the
    position alone, so a resumed run needs no scheduler state."""
    s, lr, epochs = plan.schedule, plan.optimizer.lr, plan.epochs
    t = (epoch + fraction) / epochs
    if s.name == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    if s.name == "step":
        milestones = s.milestones or [max(1, epochs // 2), max(1, 3 * epochs // 4)]
        return lr * s.gamma ** sum(epoch >= m for m in milestones)
    if s.name == "onecycle":  # linear up to lr at pct_start, then down to 0 (Wong et al.'s cyclic schedule)
        return lr * (t / s.pct_start if t < s.pct_start else (1 - t) / (1 - s.pct_start))
    return lr


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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def _set_trainable(net: torch.nn.Module, on: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(on)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler: Any = None) -> None:
    """One update from `loss`, through the gradient scaler when mixed precision uses one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def make_optimizer(plan: TrainConfig, net: torch.nn.Module) -> torch.optim.Optimizer:
    o = plan.optimizer
    params = [p for p in net.parameters() if p.is_floating_point()]
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


@dataclass
class TrainState:
    """Everything a checkpoint holds: finished epochs, their records, and the weights kept so far."""

    epoch: int = 0  # epochs finished
    records: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, torch.Tensor]] = None
    best_epoch: Optional[int] = None
    best_robust: float = -1.0
    stopped: Optional[str] = None


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def train(defense: AdversarialTraining, model, x: torch.Tensor, y: torch.Tensor, plan: TrainConfig, device: torch.device, *,
          check: Check, seed: int, state: Optional[TrainState] = None, optimizer: Optional[torch.optim.Optimizer] = None,
          scaler: Any = None, amp: bool = False, show_progress: Optional[bool] = None,
          on_epoch: Optional[Callable[[TrainState, torch.optim.Optimizer, Any], None]] = None) -> TrainState:
    """Trains `model` (a BoundedModel on `device`, so the defense sees [0, 1] inputs) with `defense`
    for the plan's epochs from `state`; calls `on_epoch` after each (checkpoints hook in there).

    Each epoch draws its data order and attack randomness from seeds of (seed, epoch) alone, so a run
    resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
    """
    from harness.core.progress import progress_bar

    net, state = model.net, state or TrainState()
    optimizer = optimizer or make_optimizer(plan, net)
    batch = plan.data.batch_size or plan.batch_size
    n_batches = math.ceil(len(y) / batch)
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    if not state.records:
        clean, robust = check(model, 0)
        state.records.append({"epoch": 0, "loss": None, "clean_accuracy": clean, "robust_accuracy": robust, "seconds": 0.0, "lr": None})
    for epoch in range(state.epoch, plan.epochs if not state.stopped else state.epoch):
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(seed, epoch))  # dropout and other global draws
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
        g = torch.Generator(device).manual_seed(_epoch_seed(seed, epoch) + 1)
        total, lr = 0.0, plan.optimizer.lr
        with progress_bar(n_batches, f"{type(defense).__name__} epoch {epoch + 1}/{plan.epochs}", enabled=show_progress) as bar:
            for i, idx in enumerate(order.split(batch)):
                xb, yb = x[idx].to(device), y[idx].to(device)
                lr = learning_rate(plan, epoch, i / n_batches)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    net.train(defense.craft_mode == "train")
                    _set_trainable(net, False)
                    x_adv = defense.perturb(model, xb, yb, g)
                    net.train(True)
                    _set_trainable(net, True)
                    loss = defense.objective(model, xb, x_adv, yb)
                if not bool(torch.isfinite(loss)):
                    from harness.core.errors import RunFailed

                    raise RunFailed(f"the training loss became {float(loss)} in epoch {epoch + 1} (lower train.optimizer.lr)")
                optimizer_step(optimizer, loss, scaler)
                total += loss.item() * len(idx)
                bar.update(1)
        net.eval()
        _set_trainable(net, False)
        clean, robust = check(model, epoch + 1)
        state.records.append({"epoch": epoch + 1, "loss": total / len(y), "clean_accuracy": clean, "robust_accuracy": robust,
                              "seconds": round(time.perf_counter() - t0, 3), "lr": lr})
        state.epoch = epoch + 1
        if robust > state.best_robust:
            state.best_robust, state.best_epoch = robust, epoch + 1
            state.best = _snapshot(net) if defense.keep_best else None
        drop = getattr(defense, "collapse_drop", None)
        if drop is not None and state.best_robust - robust > drop:
            state.stopped = (f"catastrophic overfitting: robust accuracy fell from {state.best_robust:.4f} (epoch {state.best_epoch}) "
                             f"to {robust:.4f} (epoch {epoch + 1})")
        if on_epoch is not None:
            on_epoch(state, optimizer, scaler)
        if state.stopped:
            break
    if defense.keep_best and state.best is not None:
        net.load_state_dict(state.best)
    return state
