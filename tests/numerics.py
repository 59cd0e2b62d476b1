"""One floating-point path for every machine the tests run on, set before torch is imported.

torch picks its CPU kernels by what the processor offers: ATen's vectorized loops (AVX2 or AVX-512),
MKL's GEMM (a different path on AMD and on Intel, on AVX2 and on AVX-512) and oneDNN's convolutions.
Each path sums in its own order, so the builtin model trains to other weights and an attack flips
other samples on another processor: measured on one AMD EPYC (AVX2), changing any one of the three
gave a different builtin model. The golden files and the figures the docs print are exact, so the
tests pin all three to AVX2 (which every x86-64 machine the project runs on has; on a processor
without it the pins are ignored) and keep the builtin model they train apart from the user's cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorized CPU kernels
    "MKL_CBWR": "AVX2,STRICT",      # MKL's conditional numerical reproducibility
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN's JIT convolutions
}


def pin_numerics() -> None:
    """Sets the pins (and a cache of the builtin model trained under them) for this process and the
    processes it starts; torch must not be imported yet, since each library reads them once."""
    if "torch" in sys.modules:
        raise RuntimeError("tests/numerics.py: torch was imported before the numeric pins were set")
    os.environ.update(PINS)
    if "HARNESS_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["HARNESS_CACHE_DIR"] = str(base / "harness" / "tests-avx2")
