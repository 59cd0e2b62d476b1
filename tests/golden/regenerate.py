"""Writes tests/golden/<suite>.json from the current code (see tests/golden/suites.py), and
tests/golden/numerics.json: the fingerprint of this machine's numerics (tests/numerics.py), on which
the golden files, the docs' printed figures and the tests' exact counts hold exactly. Regenerating
on another kind of machine moves all of those to it: check the docs' figures and the exact counts of
the tests that compare them (they say so) in the same commit."""

from __future__ import annotations

import json
import os
import sys

from ..numerics import REFERENCE_FILE, fingerprint, pin_numerics

pin_numerics()  # the tests' floating-point path (tests/numerics.py), before torch is imported

import torch  # noqa: E402

import harness  # noqa: E402

from .suites import SUITES, golden_path, snapshot


def _machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(names: list[str]) -> None:
    torch.set_num_threads(1)  # as the tests run (tests/conftest.py): float results depend on it
    REFERENCE_FILE.write_text(json.dumps({"fingerprint": fingerprint(), "machine": _machine()}, indent=1) + "\n")
    for name in names or list(SUITES):
        card = harness.run(SUITES[name], device="cpu", show_progress=False)
        golden_path(name).write_text(json.dumps(snapshot(card), indent=1, sort_keys=True) + "\n")
        print(f"wrote {golden_path(name)}: {card.verdict}, {len(card.metrics)} metrics")


if __name__ == "__main__":
    main(sys.argv[1:])
