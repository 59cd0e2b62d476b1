"""The defense registry: preprocessing wrappers, detectors and trained defenses, by config name."""

from __future__ import annotations

from harness.core.registry import Registry

__all__ = ["DEFENSES"]

DEFENSES: Registry[type] = Registry("defense")
