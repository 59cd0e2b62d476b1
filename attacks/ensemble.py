"""The `standard` ensemble: APGD-CE, then targeted APGD-DLR, then Square, in cascade.

After AutoAttack's standard version (Croce & Hein 2020, https://arxiv.org/abs/2003.01690), less
FAB-T: each stage runs only on the points the stages before it left robust, and the runner records
robust accuracy after every stage. Norms: linf, l2. Example config entry::

    {name: standard, norm: linf, epsilons: ["8/255"]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import ATTACKS, attack_params
from .threat import ThreatModel

__all__ = ["Standard"]


def _make(name: str, **knobs):
    cls = ATTACKS.get(name)
    fields = attack_params(cls)
    return cls(**{k: v for k, v in knobs.items() if k in fields})


@ATTACKS.register("standard")
@dataclass(frozen=True)
class Standard:
    """APGD-CE -> APGD-T -> Square in cascade (AutoAttack's standard ensemble without FAB-T)."""

    steps: int = 100
    n_restarts: int = 1
    n_target_classes: int = 9
    queries: int = 5000

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.queries < 1 or self.n_restarts < 1 or self.n_target_classes < 1:
            raise ValueError("steps, queries, n_restarts and n_target_classes must be at least 1")

    def stages(self, norm: str) -> list[tuple[str, object]]:
        return [
            ("apgd-ce", _make("apgd-ce", steps=self.steps, n_restarts=self.n_restarts)),
            ("apgd-t", _make("apgd-t", steps=self.steps, n_restarts=self.n_restarts, n_target_classes=self.n_target_classes)),
            ("square", _make("square", queries=self.queries)),
        ]

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None, target=None):
        """The stages in cascade on one batch (the runner runs them itself, to record each stage)."""
        adv = x.clone()
        todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _, attack in self.stages(threat.norm):
            idx = torch.nonzero(todo).flatten()
            if idx.numel() == 0:
                break
            out = attack(model, x[idx], y[idx], threat.subset(idx), generator=generator)
            with torch.no_grad():
                fooled = model(out).argmax(dim=1) != y[idx]
            adv[idx[fooled]] = out[fooled]
            todo[idx[fooled]] = False
        return adv
