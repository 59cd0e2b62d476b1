"""Models built to trip the validity checks, as classes and as `python:tests.trick_models:NAME` factories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Quantized(nn.Module):
    """Input quantization to 1/4 steps before the network: its gradient is zero almost everywhere."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


class AlwaysDropout(nn.Module):
    """Dropout that stays on whatever the mode (F.dropout with training=True): a randomized model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.dropout(x, p=0.5, training=True))


class SoftmaxHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def _digits() -> nn.Module:
    from harness.sources.builtin import digits_cnn

    return digits_cnn()[0]


def quantized_digits() -> nn.Module:
    return Quantized(_digits())


def dropout_digits() -> nn.Module:
    return AlwaysDropout(_digits())


def softmax_digits() -> nn.Module:
    return SoftmaxHead(_digits())
