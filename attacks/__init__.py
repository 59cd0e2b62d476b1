"""Evasion attacks: native torch (gradient, APGD, minimal-perturbation, score-based black-box,
baselines, the `standard` ensemble) and adapters over foolbox and ART."""

from . import apgd, baselines, ensemble, gradient, minimal, square  # noqa: F401  (registers the attacks)
from .base import ATTACKS, Attack, attack_epsilons, attack_params, is_minimal, supports_target
from .gradient import FGSM, PGD
from .threat import BOUNDS, BUDGET_TOLERANCE, NORMS, ThreatModel

__all__ = [
    "ATTACKS",
    "Attack",
    "attack_epsilons",
    "attack_params",
    "is_minimal",
    "supports_target",
    "FGSM",
    "PGD",
    "ThreatModel",
    "NORMS",
    "BOUNDS",
    "BUDGET_TOLERANCE",
]
