"""The one training loop: epochs, optimizer, learning-rate schedule, mixed precision, and the hooks
checkpoints and resume hang on. `harness harden` (adversarial training) and the poisoning probes
(plain cross-entropy on poisoned data) both train through `train_epochs`.

API (what callers use; harness.config.TrainConfig.settings() makes the TrainSettings)::

    from harness.training.loop import (TrainSettings, OptimizerSettings, ScheduleSettings,
                                       make_optimizer, make_scaler, learning_rate, train_epochs)

    settings = TrainSettings(epochs=10, batch_size=128, amp=False,
                             optimizer=OptimizerSettings("sgd", lr=0.01, momentum=0.9, weight_decay=5e-4),
                             schedule=ScheduleSettings("cosine"))
    optimizer = make_optimizer(settings, net)            # before restoring a checkpoint into it
    scaler = make_scaler(settings, device)               # a GradScaler for float16 AMP on CUDA, else None

    def step(xb, yb, generator) -> torch.Tensor:         # one batch's loss (a defense perturbs here)
        return F.cross_entropy(model(xb).float(), yb)

    def on_epoch(epoch: int, mean_loss: float, lr: float) -> bool:   # epoch: 1-based, just finished
        save_checkpoint(...)                              # optimizer.state_dict(), scaler.state_dict()
        return False                                      # True stops training (e.g. a collapse)

    train_epochs(net, x, y, settings, device, step, seed=seed, first_epoch=resumed_epochs,
                 optimizer=optimizer, scaler=scaler, on_epoch=on_epoch, label="PGDAT", show_progress=None)

For `harness harden` (HA): harness.defenses.training.train(defense, model, x, y, settings, device, check=...,
seed=..., state=TrainState(), optimizer=make_optimizer(settings, model.net), scaler=make_scaler(settings, dev),
amp=..., show_progress=..., on_epoch=lambda state, optimizer, scaler: ...) keeps its signature and runs on
train_epochs; `settings` is a TrainSettings (a TrainConfig is still accepted: it is translated with its
.settings()). `harness.config.train_plan(cfg, epochs)` and `builtin_recipe(source)` make the TrainConfig;
`harness.config.defense_knobs(knobs, defense_name)` turns epsilon strings ("8/255") into the floats
build_defense takes. harness.training.snapshot copies weights to the CPU (the kept epoch, checkpoints).

Reproducibility: each epoch's data order, global torch seed (dropout) and the `generator` handed to
`step` come from (seed, epoch) alone, and the learning rate is a function of the position in
training alone, so a run resumed at `first_epoch` repeats exactly what the uninterrupted run did.
A non-finite loss raises FloatingPointError naming the epoch (callers turn it into their error).
`step` runs under autocast when AMP is on; `net` is in train mode on entry to `step` (a step that
crafts examples in eval mode switches and switches back) and in eval mode after the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["OptimizerSettings", "ScheduleSettings", "TrainSettings", "Step", "EpochHook", "epoch_seed", "learning_rate",
           "make_optimizer", "make_scaler", "amp_dtype", "optimizer_step", "train_epochs", "snapshot"]

# (inputs on the device, labels on the device, the epoch's generator on the device) -> the batch loss
Step = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
# (epochs finished, mean training loss of that epoch, its last learning rate) -> stop now?
EpochHook = Callable[[int, float, float], Optional[bool]]


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class ScheduleSettings:
    name: str = "cosine"  # "none", "cosine", "step" or "onecycle"
    milestones: tuple[int, ...] = ()  # step: epochs after which lr is multiplied by gamma; () = half and three quarters
    gamma: float = 0.1
    pct_start: float = 0.4  # onecycle: the fraction of training spent rising to lr

    def __post_init__(self) -> None:
        if self.name not in ("none", "cosine", "step", "onecycle"):
            raise ValueError(f"schedule must be none, cosine, step or onecycle, got {self.name!r}")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: plain values, so attacks and defenses need nothing of the config layer."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    amp: bool = False  # mixed precision, honoured on CUDA only

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def learning_rate(settings: TrainSettings, epoch: int, fraction: float) -> float:
    """The learning rate `fraction` of the way through epoch `epoch` (0-based): a function of the
    position alone, so a resumed run needs no scheduler state."""
    s, lr, epochs = settings.schedule, settings.optimizer.lr, settings.epochs
    t = (epoch + fraction) / epochs
    if s.name == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    if s.name == "step":
        milestones = list(s.milestones) or [max(1, epochs // 2), max(1, 3 * epochs // 4)]
        return lr * s.gamma ** sum(epoch >= m for m in milestones)
    if s.name == "onecycle":  # linear up to lr at pct_start, then down to 0 (Wong et al.'s cyclic schedule)
        return lr * (t / s.pct_start if t < s.pct_start else (1 - t) / (1 - s.pct_start))
    return lr


def make_optimizer(settings: TrainSettings, net: torch.nn.Module) -> torch.optim.Optimizer:
    o = settings.optimizer
    params = [p for p in net.parameters() if p.is_floating_point()]
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def amp_dtype() -> torch.dtype:
    """bfloat16 where the GPU has it (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def make_scaler(settings: TrainSettings, device: torch.device) -> Any:
    """The gradient scaler float16 mixed precision needs; None without AMP, off CUDA, or with bfloat16."""
    if settings.amp and torch.device(device).type == "cuda" and amp_dtype() == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


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


def snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (the epoch a defense keeps, a checkpoint's tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def train_epochs(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, device: torch.device,
                 step: Step, *, seed: int, first_epoch: int = 0, optimizer: Optional[torch.optim.Optimizer] = None,
                 scaler: Any = None, on_epoch: Optional[EpochHook] = None, label: str = "training",
                 show_progress: Optional[bool] = False, until: Optional[int] = None) -> torch.optim.Optimizer:
    """Trains `net` (the parameters `step`'s loss reaches) on (x, y) for epochs first_epoch .. epochs-1;
    returns the optimizer. `x` may live on the CPU: each batch moves to `device` on its own.

    `until` stops after that many epochs while the schedule still spans `settings.epochs` (a probe
    that overrides the epochs keeps the plan's learning-rate curve)."""
    from harness.core.progress import progress_bar

    device = torch.device(device)
    optimizer = optimizer or make_optimizer(settings, net)
    amp = settings.amp and device.type == "cuda"
    dtype = amp_dtype() if amp else torch.float16
    n_batches = math.ceil(len(y) / settings.batch_size)
    for epoch in range(first_epoch, settings.epochs if until is None else until):
        torch.manual_seed(epoch_seed(seed, epoch))  # dropout and other global draws
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        g = torch.Generator(device).manual_seed(epoch_seed(seed, epoch) + 1)
        total, lr = 0.0, settings.optimizer.lr
        with progress_bar(n_batches, f"{label} epoch {epoch + 1}/{settings.epochs}", enabled=show_progress) as bar:
            for i, idx in enumerate(order.split(settings.batch_size)):
                xb, yb = x[idx].to(device), y[idx].to(device)
                lr = learning_rate(settings, epoch, i / n_batches)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                net.train(True)
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = step(xb, yb, g)
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"the training loss became {float(loss.detach())} in epoch {epoch + 1} (lower train.optimizer.lr)")
                optimizer_step(optimizer, loss, scaler)
                total += loss.item() * len(idx)
                bar.update(1)
        net.eval()
        if on_epoch is not None and on_epoch(epoch + 1, total / max(1, len(y)), lr):
            break
    net.eval()
    return optimizer
