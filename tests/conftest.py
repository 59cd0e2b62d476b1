"""Shared fixtures: the builtin digits model and data (trained once, cached), a tiny model factory,
and a CLI runner that reports exit codes like the console script."""

from __future__ import annotations

from .numerics import pin_numerics

pin_numerics()  # before torch is imported: see tests/numerics.py

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

# Tiny models on 2 cores: one intra-op thread is faster, and keeps timings stable under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_model() -> nn.Module:
    from harness.sources.builtin import digits_cnn

    return digits_cnn()[0]


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    from harness.sources.data import digits_split

    return digits_split("test")


@pytest.fixture(scope="session")
def wrapped_digits(digits_model):
    from harness.sources.models import BoundedModel

    return BoundedModel(digits_model)


@pytest.fixture(scope="session")
def correct_digits(wrapped_digits, digits_test) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits the builtin model gets right (the points the runner attacks), in order."""
    x, y = digits_test
    with torch.no_grad():
        keep = wrapped_digits(x).argmax(dim=1) == y
    return x[keep], y[keep]


class LinearNet(nn.Module):
    """A tiny model whose behaviour is known in closed form (used by reference-value tests)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def tiny_linear(num_classes: int = 10) -> nn.Module:
    """A python:tests.conftest:tiny_linear factory for configs in tests."""
    torch.manual_seed(0)
    return LinearNet(64, num_classes)


@pytest.fixture
def cli():
    from harness.cli import cli as group

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(group, list(args), catch_exceptions=False)

    return invoke
