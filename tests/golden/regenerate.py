"""Writes tests/golden/<suite>.json from the current code (see tests/golden/suites.py)."""

from __future__ import annotations

import json
import sys

from ..numerics import pin_numerics

pin_numerics()  # the tests' floating-point path (tests/numerics.py), before torch is imported

import torch  # noqa: E402

import harness  # noqa: E402

from .suites import SUITES, golden_path, snapshot


def main(names: list[str]) -> None:
    torch.set_num_threads(1)  # as the tests run (tests/conftest.py): float results depend on it
    for name in names or list(SUITES):
        card = harness.run(SUITES[name], device="cpu", show_progress=False)
        golden_path(name).write_text(json.dumps(snapshot(card), indent=1, sort_keys=True) + "\n")
        print(f"wrote {golden_path(name)}: {card.verdict}, {len(card.metrics)} metrics")


if __name__ == "__main__":
    main(sys.argv[1:])
