"""Defenses, by name: adversarial training (`harness harden`), input transformations and detectors.

One registry for all of them (`harness list defenses`); each entry says its `kind`.
"""

from . import training  # noqa: F401  (registers pgd-at, trades, fast-at)
from .registry import CERTIFICATES, DEFENSES

for _name in ("preprocess", "detectors", "smoothing", "intervals"):  # written alongside; imported once they exist
    try:
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_name}":
            raise

__all__ = ["DEFENSES", "CERTIFICATES"]
