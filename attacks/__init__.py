"""Evasion attacks (native torch, adapters over foolbox and ART) and, later, poisoning probes."""

from .base import ATTACKS, Attack, attack_epsilons, attack_params
from .gradient import FGSM, PGD
from .threat import BOUNDS, BUDGET_TOLERANCE, NORMS, ThreatModel

__all__ = [
    "ATTACKS",
    "Attack",
    "attack_epsilons",
    "attack_params",
    "FGSM",
    "PGD",
    "ThreatModel",
    "NORMS",
    "BOUNDS",
    "BUDGET_TOLERANCE",
]
