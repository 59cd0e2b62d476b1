"""Baselines an attack must beat: random noise inside the budget, and common corruptions.

Random noise is the floor of any evaluation: an attack that does no better than ``noise`` at the
same epsilon is not attacking. The corruptions (Hendrycks & Dietterich 2019,
https://arxiv.org/abs/1903.12261) have no norm budget, so they are plain functions
``corrupt(kind, x, severity, generator) -> x`` rather than registered attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from .base import ATTACKS, check_batch
from .gradient import per_sample_loss, succeeded
from .threat import ThreatModel

__all__ = ["Noise", "CORRUPTIONS", "SEVERITIES", "corrupt", "gaussian_noise", "blur", "brightness", "contrast"]


@ATTACKS.register("noise")
@dataclass(frozen=True)
class Noise:
    """Uniform random noise in the budget ball: ``draws`` tries per sample, no gradients.

    Norms: linf (uniform in the cube), l2 (uniform in the ball), both through
    ``ThreatModel.random_start`` and so clipped to [0, 1]. Per sample it returns the first draw
    that fools the model, else the draw with the highest margin loss; a fooled sample takes no
    further query. Example::

        x_adv = Noise(draws=100)(model, x, y, ThreatModel("linf", 0.1), generator=g)
    """

    draws: int = 100

    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    minimal: ClassVar[bool] = False
    supports_target: ClassVar[bool] = True
    access: ClassVar[str] = "noise"

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws must be at least 1, got {self.draws}")

    def __call__(self, model, x, y, threat: ThreatModel, *, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_batch(x, y)
        x = x.detach()
        best = x.clone()
        with torch.no_grad():
            idx = (threat.per_sample(x) > 0).nonzero().squeeze(1)  # a zero budget has nothing to draw
            xs, ys, th = x[idx], y[idx], threat.subset(idx)
            ts = None if target is None else target[idx]
            x_best = xs.clone()
            best_loss = torch.full((xs.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
            for _ in range(self.draws):
                if idx.numel() == 0:
                    break
                x_new = th.random_start(xs, generator)
                logits = model(x_new)
                loss = per_sample_loss(logits, ys, "margin", ts)
                fooled = succeeded(logits, ys, ts)
                improve = fooled | (loss > best_loss)
                x_best = torch.where(improve.view(-1, *([1] * (x.dim() - 1))), x_new, x_best)
                best_loss = torch.where(improve, loss, best_loss)
                best[idx[fooled]] = x_best[fooled]
                keep = ~fooled
                idx, xs, ys, x_best, best_loss = (t[keep] for t in (idx, xs, ys, x_best, best_loss))
                th = th.subset(keep)
                ts = None if ts is None else ts[keep]
            best[idx] = x_best
        return best


# Severity 1..5 as in ImageNet-C; 0 is the clean input, so a curve can start there.
SEVERITIES = (0, 1, 2, 3, 4, 5)
_NOISE_STD = (0.0, 0.08, 0.12, 0.18, 0.26, 0.38)
_BLUR_SIGMA = (0.0, 0.4, 0.6, 0.7, 0.8, 1.0)  # pixels at 32 px and below; scaled with size above
_BRIGHTNESS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST = (1.0, 0.4, 0.3, 0.2, 0.1, 0.05)


def gaussian_noise(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adds N(0, std^2) per pixel and channel."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + _NOISE_STD[severity] * noise).clamp(0, 1)


def blur(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian blur, separable, edges extended (skimage's ``mode="nearest"``, as ImageNet-C).

    ImageNet-C's sigmas (1..6 px at 224 px) shrink below a pixel on small images, where a blur
    then does nothing, so the sigmas are those of CIFAR-10-C at 32 px (0.4..1 px), kept for
    smaller images and scaled by side / 32 for larger ones (224 px: 2.8..7 px).
    """
    sigma = _BLUR_SIGMA[severity] * max(1.0, min(x.shape[-2:]) / 32)
    if sigma == 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = x.shape
    out = x.reshape(n * c, 1, h, w)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Raises the HSV value channel by a constant, keeping hue and saturation (ImageNet-C).

    With hue and saturation fixed every RGB channel is proportional to the value V = max over
    channels, so the shift is a per-pixel rescaling; a black pixel becomes grey; a grey image
    simply gets the constant added.
    """
    value = x.amax(dim=1, keepdim=True)
    shifted = (value + _BRIGHTNESS[severity]).clamp(0, 1)
    scaled = torch.where(value > 0, x * shifted / value.clamp_min(1e-12), shifted)
    return scaled.clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shrinks each channel towards its mean over the image by a factor (ImageNet-C)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * _CONTRAST[severity] + mean).clamp(0, 1)


Corruption = Callable[[torch.Tensor, int, Optional[torch.Generator]], torch.Tensor]
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian-noise": gaussian_noise,
    "blur": blur,
    "brightness": brightness,
    "contrast": contrast,
}


def corrupt(kind: str, x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A common corruption of images x (n, C, H, W) in [0, 1]; the result stays in [0, 1].

    Parameters per severity (1..5 from Hendrycks & Dietterich's ImageNet-C code; 0 is identity):

    ================  =============================  ==================================
    kind              parameter                      severity 0 / 1 / 2 / 3 / 4 / 5
    ================  =============================  ==================================
    gaussian-noise    noise std (any image size)     0 / .08 / .12 / .18 / .26 / .38
    blur              Gaussian sigma, pixels, for    0 / .4 / .6 / .7 / .8 / 1.0
                      side <= 32 px; x side/32 above (CIFAR-10-C's; see :func:`blur`)
    brightness        added to the HSV value         0 / .1 / .2 / .3 / .4 / .5
    contrast          factor towards channel mean    1 / .4 / .3 / .2 / .1 / .05
    ================  =============================  ==================================

    Only gaussian-noise draws randomness, from ``generator``. Example::

        x_c = corrupt("blur", x, 3)
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r} (valid: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    assert x.dim() == 4, f"corruptions need images (n, C, H, W), got {tuple(x.shape)}"
    return CORRUPTIONS[kind](x, severity, generator)
