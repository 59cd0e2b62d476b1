"""What every attack is: a small frozen value called as ``attack(model, x, y, threat)``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, Sequence

import torch

from harness.core.registry import Registry

from .threat import ThreatModel

__all__ = ["Attack", "ATTACKS", "attack_epsilons", "check_batch", "attack_params", "is_minimal", "supports_target", "access_of",
           "ACCESS"]

# What an attack reads of the model: gradients (white-box), only outputs (black-box), or nothing
# it adapts (noise: random draws). The runner's gradient-masking check compares them.
ACCESS = ("white-box", "black-box", "noise")


class Attack(Protocol):
    """An evasion attack. It holds only its own knobs; model, device and budget come per call.

    ``model`` maps inputs in [0, 1] to logits, ``x`` is (n, C, H, W) in [0, 1], ``y`` the (n,)
    labels. It returns adversarial inputs of x's shape. The harness, not the attack, is trusted
    for the verdict: it clips, checks the budget and re-scores every returned example.

    ``minimal`` attacks (CW, DeepFool) search for the smallest perturbation instead of working
    within a budget: they are called with ``ThreatModel(norm, math.inf)`` and the runner derives
    the robust accuracy they imply at each epsilon from the per-sample perturbation sizes.
    ``supports_target``: the attack accepts ``target`` (n,) classes to reach instead of merely
    leaving ``y``. All randomness comes from ``generator`` (on x's device).
    """

    norms: ClassVar[tuple[str, ...]]
    minimal: ClassVar[bool]
    supports_target: ClassVar[bool]
    access: ClassVar[str]  # one of ACCESS; white-box when absent

    def __call__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        *,
        generator: torch.Generator | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def is_minimal(attack: object) -> bool:
    return bool(getattr(attack, "minimal", False))


def supports_target(attack: object) -> bool:
    return bool(getattr(attack, "supports_target", False))


def access_of(attack: object) -> str:
    """white-box, black-box or noise (see ACCESS); an attack that does not say is white-box."""
    return str(getattr(attack, "access", "white-box"))


ATTACKS: Registry[type] = Registry("attack")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.dim() >= 2 and y.dim() == 1 and x.shape[0] == y.shape[0], (
        f"expected x (n, ...) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
    )


def attack_params(cls: type) -> dict[str, dataclasses.Field]:
    """The knobs an attack class accepts (its dataclass fields)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def attack_epsilons(
    attack: Attack,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    epsilons: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs one attack at several epsilons in a single call; returns (n_eps, n, ...).

    The batch is repeated once per epsilon with a per-sample epsilon, so the model sees one
    larger batch instead of n_eps small ones.
    """
    k, n = len(epsilons), x.shape[0]
    eps = torch.tensor(list(epsilons), dtype=x.dtype, device=x.device).repeat_interleave(n)
    xs = x.repeat(k, *([1] * (x.dim() - 1)))
    ys = y.repeat(k)
    extra = {} if target is None else {"target": target.repeat(k)}
    adv = attack(model, xs, ys, ThreatModel(norm, eps), generator=generator, **extra)
    return adv.view(k, *x.shape)


def describe(attack: Any) -> dict[str, Any]:
    """An attack's knobs as plain data, for the scorecard."""
    return dataclasses.asdict(attack)
