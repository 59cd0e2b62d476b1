"""What the probe modules of this layer share: a sample source's images as one tensor, and a
proportion's entry in a record's `metric_intervals`."""

from __future__ import annotations

from typing import Any

import torch

from harness.core.stats import wilson_interval

__all__ = ["whole", "wilson_entry"]


def whole(data: Any) -> torch.Tensor:
    """All of a sample source's images: probes train and score on whole sets in memory. A slice, so
    the in-memory kind gives a view rather than a copy."""
    return data.read(slice(None))


def wilson_entry(successes: int, n: int) -> dict[str, Any]:
    """A proportion's interval entry (Wilson's); on no trial at all [0, 1], since nothing was measured."""
    return {"ci95": [round(v, 6) for v in wilson_interval(successes, n)], "method": "wilson", "n": int(n)}
