"""The defense registry: preprocessing wrappers, detectors and trained defenses, by config name."""

from __future__ import annotations

from harness.core.registry import Registry

__all__ = ["DEFENSES", "CERTIFICATES"]

DEFENSES: Registry[type] = Registry("defense")

# Certificates (`certificates:` in a config): randomized smoothing, interval bounds. Each value says
# `kind = "certificate"`; harness.evaluation.certificates runs them.
CERTIFICATES: Registry[type] = Registry("certificate")
