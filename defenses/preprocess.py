"""Preprocessing defenses: an input transformation in front of the model, attacked honestly.

Each defense is a small frozen value with ``transform(x, generator=None)`` ((n, C, H, W) in [0, 1]
in, the same shape in [0, 1] out) that declares how gradients pass through it (ART's idea):

- ``exact``: autograd through ``transform`` is the true gradient, almost everywhere (median).
- ``none``: the transform is not differentiable, or its gradient is zero almost everywhere
  (rounding, JPEG). An attack that follows autograd gets no signal: the defense *looks* robust
  (gradient masking). The adaptive attack uses BPDA (Athalye, Carlini & Wagner 2018,
  https://arxiv.org/abs/1802.00420): the forward value is the transform, the backward pass goes
  through the differentiable ``approximation(x)`` -- the identity (straight-through) by default.
- ``random``: a fresh draw per call, differentiable per draw. The adaptive attack uses EOT
  (Athalye et al. 2018, https://arxiv.org/abs/1707.07397): gradients of the expectation over draws.

``defended(model, defense, mode)`` is the model the suite attacks; both modes are reported and
the gates judge the adaptive one. Example::

    robust = defended(model, BitDepth(bits=3), "adaptive")
    x_adv = PGD()(robust, x, y, ThreatModel("linf", 0.1))
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .registry import DEFENSES

__all__ = ["Preprocessing", "BitDepth", "JPEG", "Median", "GaussianNoise", "Defended", "defended", "describe",
           "GRADIENTS", "MODES"]

GRADIENTS = ("exact", "none", "random")
MODES = ("naive", "adaptive")


class Preprocessing(Protocol):
    """What ``defended`` needs of a preprocessing defense."""

    gradient: ClassVar[str]  # one of GRADIENTS

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor: ...

    def approximation(self, x: torch.Tensor) -> torch.Tensor: ...


def _check(x: torch.Tensor) -> None:
    assert x.dim() == 4, f"a preprocessing defense takes images (n, C, H, W), got shape {tuple(x.shape)}"


class _StraightThrough:
    """BPDA's default surrogate: the identity, i.e. the transform is taken as x' ~ x on the way back."""

    kind: ClassVar[str] = "preprocessing"

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        return x


@DEFENSES.register("bit-depth")
@dataclass(frozen=True)
class BitDepth(_StraightThrough):
    """Bit-depth reduction, the feature squeezer of Xu, Evans & Qi 2018 (https://arxiv.org/abs/1704.01155):
    each value is rounded to one of ``2**bits`` evenly spaced levels. Rounding has a zero gradient
    almost everywhere, so it is declared ``none``."""

    bits: int = 4
    gradient: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be between 1 and 16, got {self.bits}")

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check(x)
        levels = 2**self.bits - 1
        return torch.round(x.clamp(0, 1) * levels) / levels


@DEFENSES.register("jpeg")
@dataclass(frozen=True)
class JPEG(_StraightThrough):
    """A real JPEG round trip per image at ``quality`` (Dziugaite et al. 2016,
    https://arxiv.org/abs/1608.00853; Guo et al. 2018). Images with 1 or 3 channels are quantized
    to 8 bits, encoded and decoded by libjpeg (through Pillow, which torchvision installs; its own
    codec is deprecated) on the CPU, off the autograd graph: ``none``."""

    quality: int = 75
    gradient: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {self.quality}")

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        _check(x)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG compresses images with 1 or 3 channels, got {x.shape[1]}")
        pixels = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(pixels)
        for i, image in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="JPEG", quality=self.quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                out[i] = np.asarray(decoded).reshape(image.shape)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255


@DEFENSES.register("median")
@dataclass(frozen=True)
class Median(_StraightThrough):
    """Median smoothing over a ``kernel_size`` square window per channel (the spatial smoothing
    squeezer of Xu et al. 2018), edges padded by reflection.

    Declared ``exact``: the median is continuous and piecewise linear in its inputs (one input
    passes through), so autograd gives the true gradient almost everywhere, as for max-pooling.
    """

    kernel_size: int = 3
    gradient: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive number, got {self.kernel_size}")

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check(x)
        n, c, h, w = x.shape
        k, p = self.kernel_size, self.kernel_size // 2
        if p == 0:
            return x
        mode = "reflect" if p < min(h, w) else "replicate"  # reflection needs the padding inside the image
        patches = F.unfold(F.pad(x, (p, p, p, p), mode=mode), k)  # (n, c*k*k, h*w)
        return patches.view(n, c, k * k, h * w).median(dim=2).values.view(n, c, h, w)


@DEFENSES.register("gaussian-noise")
@dataclass(frozen=True)
class GaussianNoise(_StraightThrough):
    """Gaussian noise of standard deviation ``sigma`` added at inference, then clipped to [0, 1]
    (randomization as a defense, e.g. Xie et al. 2018; the base of randomized smoothing, Cohen et
    al. 2019). Each call draws fresh noise from ``generator``: ``random``."""

    sigma: float = 0.1
    gradient: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be non-negative, got {self.sigma}")

    def transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check(x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1)


class Defended(nn.Module):
    """``model`` behind ``defense``: [0, 1] inputs in, logits out.

    ``naive``: the logits of ``model(transform(x))`` with whatever gradient autograd finds. A
    transform off the autograd graph (JPEG) gets a zero input gradient, so a naive attack sees
    masked gradients rather than an error.

    ``adaptive``: a ``none`` transform is crossed by BPDA, ``approx + (transform(x) - approx).detach()``
    (forward value of the transform, gradient of the approximation). A ``random`` transform is
    averaged over ``eot`` draws whenever an input gradient is being taken, and drawn once
    otherwise, so predictions and queries stay those of the deployed defense. The average is of
    probabilities, returned as their logarithm (softmax of the output is the mean probability):
    that is the prediction the randomized defense makes in expectation, and, unlike a mean of
    logits, one draw with large logits cannot dominate it. Its cross-entropy is -log E[p_y].

    Draws come from a generator per device that the wrapper owns, seeded with ``seed``: the same
    calls in the same order give the same draws. An engine restarts them for every unit of work
    (``reseed``), so a unit's draws do not depend on which replica ran it or what ran there before.
    """

    def __init__(self, model: nn.Module, defense: Any, mode: str, *, eot: int = 8, seed: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if getattr(defense, "gradient", None) not in GRADIENTS:
            raise ValueError(f"{type(defense).__name__} declares no gradient (one of {', '.join(GRADIENTS)})")
        if eot < 1:
            raise ValueError(f"eot must be at least 1, got {eot}")
        self.model = model
        self.defense = defense
        self.mode = mode
        self.eot = eot
        self.seed = seed
        self._key: Optional[int] = None
        self._generators: dict[str, torch.Generator] = {}

    def reseed(self, key: int) -> None:
        """Starts the draws again from (seed, key). An engine calls this before each unit of work with
        the unit's seed, so a randomized defense's draws depend on the unit alone, not on which units
        the replica or worker happened to run before it."""
        self._key = int(key)
        self._generators = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The wrapper's generator for a device, made (seeded) on first use."""
        key = str(device)
        if key not in self._generators:
            seed = self.seed if self._key is None else (self.seed * 1_000_003 + self._key) % (2**61 - 1)
            self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = self.generator(x.device)
        gradient = self.defense.gradient
        if self.mode == "naive":
            return self.model(self._naive(x, gen))
        if gradient == "none":
            return self.model(self._bpda(x, gen))
        if gradient == "random" and self.eot > 1 and torch.is_grad_enabled() and x.requires_grad:
            return self._eot(x, gen)
        return self.model(self.defense.transform(x, generator=gen))

    def _naive(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = self.defense.transform(x, generator=gen)
        if x.requires_grad and not out.requires_grad:
            return x * 0 + out  # off the graph: a zero gradient, as a naive attack would see it
        return out

    def _bpda(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        approx = self.defense.approximation(x)
        return approx + (self.defense.transform(x, generator=gen) - approx).detach()

    def _eot(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        k, n = self.eot, x.shape[0]
        draws = self.defense.transform(x.repeat(k, *([1] * (x.dim() - 1))), generator=gen)
        log_p = F.log_softmax(self.model(draws), dim=1).view(k, n, -1)
        return torch.logsumexp(log_p, dim=0) - math.log(k)

    def extra_repr(self) -> str:
        return f"defense={self.defense!r}, mode={self.mode!r}, eot={self.eot}, seed={self.seed}"


def defended(model: nn.Module, defense: Any, mode: str, *, eot: int = 8, seed: int = 0) -> Defended:
    """``model`` behind a preprocessing ``defense``, evaluated ``naive`` or ``adaptive`` (see Defended)."""
    return Defended(model, defense, mode, eot=eot, seed=seed)


def describe(defense: Any) -> dict[str, Any]:
    """A preprocessing defense's knobs and gradient declaration as plain data, for the scorecard."""
    return {**dataclasses.asdict(defense), "gradient": defense.gradient}
