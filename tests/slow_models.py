"""A model that takes its time, so a test can interrupt a real `harness run` while it attacks."""

from __future__ import annotations

import time

import torch
from torch import nn


class Sleepy(nn.Module):
    """The builtin digits CNN, pausing `delay` seconds in every forward pass."""

    def __init__(self, net: nn.Module, delay: float) -> None:
        super().__init__()
        self.net = net
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.net(x)


def sleepy_digits(delay: float = 0.02) -> nn.Module:
    """A python:tests.slow_models:sleepy_digits factory (the trained digits CNN, slowed down)."""
    from harness.sources.builtin import digits_cnn

    return Sleepy(digits_cnn()[0], delay)
