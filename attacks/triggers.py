"""Backdoor triggers: a patch stamped into images (`patch`), and the trigger pictured on grey for
the report (`trigger_image`). Plain functions of tensors, as in ART; the probes are harness.attacks.poisoning."""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["POSITIONS", "Position", "patch", "trigger_image"]

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
Position = Union[str, tuple[int, int]]


def _pattern(pattern: str, channels: int, size: int) -> torch.Tensor:
    """The (C, size, size) pixels of a trigger: all ones, a checkerboard with a lit top-left corner,
    or a binary pattern drawn from `random:<seed>`."""
    if pattern == "white":
        return torch.ones(channels, size, size)
    if pattern == "checker":
        i = torch.arange(size)
        return ((i[:, None] + i[None, :]) % 2 == 0).float().expand(channels, size, size).clone()
    if pattern.startswith("random:"):
        try:
            seed = int(pattern.removeprefix("random:"))
        except ValueError:
            raise ValueError(f"pattern {pattern!r}: write random:<integer seed>") from None
        return torch.randint(0, 2, (channels, size, size), generator=torch.Generator().manual_seed(seed)).float()
    raise ValueError(f"unknown trigger pattern {pattern!r} (valid: checker, white, random:<seed>)")


def _origin(position: Position, height: int, width: int, size: int) -> tuple[int, int]:
    if size > height or size > width:
        raise ValueError(f"a {size}x{size} trigger does not fit in {height}x{width} images")
    if isinstance(position, str):
        corners = {"top-left": (0, 0), "top-right": (0, width - size), "bottom-left": (height - size, 0),
                   "bottom-right": (height - size, width - size), "center": ((height - size) // 2, (width - size) // 2)}
        if position not in corners:
            raise ValueError(f"unknown trigger position {position!r} (valid: {', '.join(POSITIONS)} or [row, col])")
        return corners[position]
    row, col = (int(v) for v in position)
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"a {size}x{size} trigger at ({row}, {col}) leaves the {height}x{width} image")
    return row, col


def patch(x: torch.Tensor, size: int = 3, position: Position = "bottom-right", pattern: str = "checker",
          amplitude: float = 1.0) -> torch.Tensor:
    """Stamps a size x size trigger on (n, C, H, W) inputs in [0, 1]; returns a new tensor.

    `position` is a corner, ``center`` or a (row, col) of the patch's top-left pixel; `pattern` is
    ``checker``, ``white`` or ``random:<seed>``. With `amplitude` below 1 the patch is blended into
    the image (Turner et al.'s less visible trigger). BadNets (Gu et al. 2017) stamps a small
    pattern in a corner::

        x_triggered = patch(x, size=3, position="bottom-right", pattern="checker")
    """
    assert x.dim() == 4, f"expected (n, C, H, W) inputs, got {tuple(x.shape)}"
    if size < 1:
        raise ValueError(f"trigger size must be at least 1, got {size}")
    if not 0 < amplitude <= 1:
        raise ValueError(f"trigger amplitude must be in (0, 1], got {amplitude}")
    r, c = _origin(position, x.shape[2], x.shape[3], size)
    pixels = _pattern(pattern, x.shape[1], size).to(device=x.device, dtype=x.dtype)
    out = x.clone()
    region = out[:, :, r:r + size, c:c + size]
    out[:, :, r:r + size, c:c + size] = (1 - amplitude) * region + amplitude * pixels
    return out


def trigger_image(shape: tuple[int, int, int] = (1, 8, 8), size: int = 3, position: Position = "bottom-right",
                  pattern: str = "checker", background: float = 0.5) -> torch.Tensor:
    """The trigger as it sits in a (C, H, W) image of flat `background` (grey shows both the lit
    and the dark cells), for the report."""
    return patch(torch.full((1, *shape), float(background)), size, position, pattern)[0]
