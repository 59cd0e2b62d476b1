"""Notebooks and progress bars: examples/quickstart.ipynb executed by a real Jupyter kernel
(nbclient + ipykernel), and bars that show on a terminal and in a kernel but stay out of pipes."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from .numerics import same_count

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
KERNEL = "harness-tests"
BAR = re.compile(r"evaluating:\s+\d+%\|")  # how tqdm draws the runner's bar (the clean pass and the attacks)

TINY = """name: progress-probe
model: {source: "builtin:digits-cnn"}
data: {source: "builtin:digits", split: test, limit: 60, batch_size: 20}
attacks:
  - {name: fgsm, norm: linf, epsilons: [0.05]}
gates:
  - {metric: clean_accuracy, min: 0.5}
"""


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec for this interpreter: the venv's python, whatever `python3` kernel another
    Jupyter installation on the machine registers."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "harness tests", "language": "python",
        "env": {"OMP_NUM_THREADS": "1"},  # 2 shared cores: one intra-op thread, as in conftest
    }))
    return root


@pytest.fixture
def kernel(kernel_dir, monkeypatch) -> str:
    pytest.importorskip("nbclient", reason="nbclient is in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.delenv("CI", raising=False)  # bars are judged as on a user's machine
    return KERNEL


def _execute(nb: Any, kernel: str, timeout: int, cwd: Path) -> Any:
    from nbclient import NotebookClient

    NotebookClient(nb, kernel_name=kernel, timeout=timeout, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb: Any, needle: str) -> list[dict]:
    """The outputs of the one code cell whose source contains `needle`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, f"expected one cell containing {needle!r}, found {len(cells)}"
    return cells[0].outputs


def _html(outputs: list[dict]) -> str:
    html = [o["data"]["text/html"] for o in outputs if o.output_type in ("execute_result", "display_data") and "text/html" in o.get("data", {})]
    assert html, f"no text/html output; got {[o.output_type for o in outputs]}"
    return "\n".join(html)


# ---- the example notebook ------------------------------------------------------------------------

def test_quickstart_is_stored_valid_and_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "store the notebook without outputs"
    for c in code:
        compile(c.source, f"{NOTEBOOK.name} cell {c.get('id')}", "exec")
    source = "\n".join(c.source for c in code)
    assert "harness.run()" in source and "harness.compare(" in source
    assert '"limit": 200' in source, "the epsilon step runs on 200 samples to stay quick"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, "each step is explained in Markdown"


@pytest.mark.slow
def test_quickstart_runs_in_a_jupyter_kernel(kernel, digits_model):
    import nbformat

    nb = _execute(nbformat.read(NOTEBOOK, as_version=4), kernel, timeout=600, cwd=NOTEBOOK.parent)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []

    # the embedded default on the 450 held-out digits: 442 correct, 401 robust at 0.05, both gates pass
    assert ast.literal_eval(_outputs(nb, "card.verdict")[0]["data"]["text/plain"]) == ("pass", 442 / 450, 401 / 450)
    card = _html(_outputs(nb, "card = harness.run()"))
    assert re.search(r"\bPASS\b", card) and "2 of 2 gate(s) passed" in card, "the scorecard HTML does not show its pass"
    assert not re.search(r"\b(FAIL|INCONCLUSIVE)\b", card)
    for metric, value in (("clean_accuracy", "0.9822"), ("robust_accuracy:worst-linf@0.05", "0.8911")):  # the default gates
        assert re.search(rf"{re.escape(metric)}.*?{value}", card, re.S), (metric, value)
    assert "<svg" in card

    # larger budgets on 200 digits: PGD-20 leaves 31 robust at 0.15 (0.155; under tests/numerics.py, on the machine
    # the exact figures were made with: 32 on an AMD EPYC), below the gate's 0.5
    larger = _html(_outputs(nb, "harness.run(config)"))
    shown = re.search(r"robust_accuracy:worst-linf@0.15.*?(0\.\d{4})", larger, re.S)
    assert re.search(r"\bFAIL\b", larger) and shown and same_count(round(float(shown.group(1)) * 200), 31), shown and shown.group(1)
    assert "<svg" in larger

    # the 3-epoch model fails the clean gate (0.9289 of 450, 0.0533 below the reference's 0.9822)
    compared = _html(_outputs(nb, "harness.compare("))
    assert "digits-cnn" in compared and "digits-cnn-3-epochs" in compared
    assert re.search(r"clean_accuracy.*?0\.9822.*?0\.9289.*?\u22120\.0533", compared, re.S)
    assert re.search(r"\bPASS\b.*?\bFAIL\b", compared, re.S)  # the reference passes, the quick model fails


# ---- progress bars -------------------------------------------------------------------------------

def test_bar_shows_in_a_jupyter_kernel(kernel, tmp_path):
    """Inside a kernel stderr is no TTY, yet the frontend shows a bar: a widget, or a text bar
    when ipywidgets is missing. enabled=False keeps it silent there too."""
    import nbformat

    source = ("from harness.core.progress import interactive, progress_bar\n"
              "print('interactive:', interactive())\n"
              "with progress_bar(3, 'probe-shown') as bar:\n    for _ in range(3): bar.update(1)\n"
              "with progress_bar(3, 'probe-hidden', enabled=False) as bar:\n    for _ in range(3): bar.update(1)\n")
    nb = _execute(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), kernel, timeout=120, cwd=tmp_path)
    outputs = nb.cells[0].outputs
    assert [o for o in outputs if o.output_type == "error"] == []
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "interactive: True" in text
    widget = any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert widget or re.search(r"probe-shown:\s+\d+%\|", text), f"no bar in the kernel's output: {outputs}"
    assert "probe-hidden" not in text + json.dumps([o.get("data", {}) for o in outputs])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return {**env, "TERM": "xterm", "OMP_NUM_THREADS": "1"}


def _run_tiny(tmp_path: Path) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    return [sys.executable, "-m", "harness", "run", str(config), "--out", str(tmp_path / "out")]


def test_piped_run_draws_no_bar(tmp_path, digits_model):
    """CI logs and pipes: stderr is no terminal, so no bar and no carriage returns."""
    proc = subprocess.run(_run_tiny(tmp_path), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    assert (tmp_path / "out" / "scorecard.json").is_file()
    assert "\r" not in proc.stderr + proc.stdout
    assert not BAR.search(proc.stderr) and "batch/s" not in proc.stderr


def test_terminal_run_draws_a_bar(tmp_path, digits_model):
    """The same run with stderr on a pseudo-terminal draws the bar (so the test above can fail)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(_run_tiny(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=_env())
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=10) in (0, 1)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    out = b"".join(chunks).decode("utf-8", errors="replace")
    assert BAR.search(out), f"no bar on the terminal: {out[-500:]!r}"
