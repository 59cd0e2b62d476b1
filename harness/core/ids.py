"""Metric ids: `family:subject@parameter` (robust_accuracy:pgd-linf@8/255)."""

from __future__ import annotations

from typing import Optional

__all__ = ["metric_id"]


def metric_id(family: str, subject: Optional[str] = None, parameter: Optional[str] = None) -> str:
    out = family
    if subject is not None:
        out += f":{subject}"
    if parameter is not None:
        out += f"@{parameter}"
    return out
