"""The layers point down: the import-linter contracts of pyproject.toml hold, and they really check.

The contracts run through .ci/lint_imports.py (as .ci/run runs them): it shows import-linter the
harness package with harness.attacks and harness.defenses where the install puts them. Each
"really checks" case copies the layout into a temporary directory, adds one forbidden import
(lazily, inside a function: those count too) and expects the contract to name exactly that import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "lint_imports.py"


def lint(source: Path = ROOT, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--source", str(source), str(ROOT / "pyproject.toml"), *args],
                          capture_output=True, text=True, timeout=600)


def test_the_contracts_hold():
    res = lint()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_the_check_sees_attacks_and_defenses():
    # they live outside harness/ in the layout: a check that missed them would pass vacuously
    res = lint(ROOT)
    analyzed = next(line for line in res.stdout.splitlines() if line.startswith("Analyzed"))
    n_files = int(analyzed.split()[1])
    in_layout = sum(1 for d in ("harness", "attacks", "defenses") for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    assert n_files == in_layout, (analyzed, in_layout)


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    """A copy of the layout root (harness/, attacks/, defenses/), to break on purpose."""
    for d in ("harness", "attacks", "defenses"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


# (file, a forbidden import added inside a function, the contract, the chain lint-imports must print)
BREAKS = [
    ("attacks/base.py", "from harness.api import run", "layers", "harness.attacks.base -> harness.api"),
    ("attacks/poisoning.py", "from harness.config import parse_epsilon", "plain-values", "harness.attacks.poisoning -> harness.config"),
    ("defenses/training.py", "from harness.config import TrainConfig", "plain-values", "harness.defenses.training -> harness.config"),
    ("harness/training/loop.py", "from harness.defenses import DEFENSES", "layers", "harness.training.loop -> harness.defenses"),
    ("harness/records/provenance.py", "from harness.verdicts.gates import judge_gates", "layers",
     "harness.records.provenance -> harness.verdicts.gates"),
    ("harness/verdicts/gates.py", "from harness.evaluation.probes import SCANS", "layers",
     "harness.verdicts.gates -> harness.evaluation.probes"),
    ("harness/config/schema.py", "from harness.evaluation.variants import defense_kind", "layers",
     "harness.config.schema -> harness.evaluation.variants"),
    ("harness/core/stats.py", "from harness.reports.render import report_html", "layers", "harness.core.stats -> harness.reports.render"),
]


@pytest.mark.parametrize("path, line, contract, chain", BREAKS, ids=[b[0] for b in BREAKS])
def test_an_import_against_the_layers_breaks_a_contract(layout: Path, path: str, line: str, contract: str, chain: str):
    before = lint(layout, "--contract", contract)
    assert chain not in before.stdout
    target = layout / path
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _upward():\n    {line}  # noqa: F401\n", encoding="utf-8")
    res = lint(layout, "--contract", contract)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    assert "BROKEN" in res.stdout and chain in res.stdout, res.stdout[-4000:]


def test_evaluation_leaves_pixels_and_reporting_encodes_them():
    # probes record raw pixels; harness.reports.images turns them into the PNG the scorecard shows,
    # byte for byte what encoding the tensor gives
    import copy

    import harness.evaluation.probes as probes
    from harness.attacks.poisoning import trigger_image
    from harness.reports.images import encode_probe_images, png_base64

    image = trigger_image((3, 8, 8), 3, "bottom-right", "checker")
    mask = torch_rand((1, 8, 8))
    records = [{"id": "badnets", "kind": "probe", "trigger_pixels": probes._pixels(image),
                "scans": [{"scan": "neural-cleanse", "mask_pixels": probes._pixels(mask), "anomaly_index": 2.5}]},
               {"id": "spectral-signatures", "kind": "data-scan", "n": 3}]
    before = copy.deepcopy(records)
    out = encode_probe_images(records)
    assert records == before  # new records; the evaluation's are left as they were
    assert out[0]["trigger"] == png_base64(image) and "trigger_pixels" not in out[0]
    assert out[0]["scans"][0]["mask"] == png_base64(mask) and out[0]["scans"][0]["anomaly_index"] == 2.5
    assert out[1] == records[1] and encode_probe_images(out) == out


def torch_rand(shape: tuple[int, ...]):
    import torch

    return torch.rand(shape, generator=torch.Generator().manual_seed(0))
