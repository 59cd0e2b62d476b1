"""One run per output directory (and one training per weights file) at a time: a second refuses with
exit 2 naming the holder; a lock left by a killed run blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import harness
from harness.core.errors import BadInput
from harness.core.files import LOCK_FILE, exclusive, output_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time\nfrom pathlib import Path\nfrom harness.core.files import exclusive\n"
        "with exclusive(Path(sys.argv[1]), 'it', 'it'):\n    print('held', flush=True)\n    time.sleep(120)\n")
CHEAP = {"name": "locked", "device": "cpu", "data": {"limit": 20}, "attacks": [], "gates": [{"metric": "clean_accuracy", "min": 0.1}]}


@pytest.fixture
def holder():
    """Starts a real second process that takes the lock at a path and keeps it until killed."""
    procs: list[subprocess.Popen] = []

    def start(lock: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def config(tmp_path: Path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(CHEAP))
    return path


def test_a_second_run_into_a_held_directory_exits_2_naming_the_holder(tmp_path, holder, cli):
    out = tmp_path / "out"
    out.mkdir()
    proc = holder(out / LOCK_FILE)
    info = json.loads((out / LOCK_FILE).read_text())
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
    result = cli("run", str(config(tmp_path)), "--out", str(out))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"harness: error: {out}: another run holds this output directory")
    assert f"pid {proc.pid} on {socket.gethostname()}, started {info['started_at']}" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written over the holder's files
    with pytest.raises(BadInput, match=f"pid {proc.pid}"):
        harness.run(CHEAP, out=out)


def test_a_lock_left_by_a_killed_run_blocks_nobody(tmp_path, holder, cli):
    out = tmp_path / "out"
    out.mkdir()
    proc = holder(out / LOCK_FILE)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no cleanup runs, the file stays
    proc.wait()
    stale = json.loads((out / LOCK_FILE).read_text())
    assert stale["pid"] == proc.pid  # the dead run's name is still in the file ...
    result = cli("run", str(config(tmp_path)), "--out", str(out))
    assert result.exit_code == 0, result.output  # ... but its flock went with it
    assert (out / "scorecard.json").is_file() and not (out / LOCK_FILE).exists()  # released and removed on exit


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadInput):
        harness.run({**CHEAP, "data": {"source": "npz:missing.npz"}}, out=out)
    assert not out.exists()  # created for the run, left empty, removed
    card = harness.run(CHEAP, out=out)
    assert card.passed and not (out / LOCK_FILE).exists()


def test_the_same_directory_twice_in_one_process_is_refused(tmp_path):
    with output_lock(tmp_path / "out"):
        with pytest.raises(BadInput, match=f"pid {os.getpid()}"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released: free again
        pass


def test_a_lock_file_removed_between_open_and_flock_is_not_trusted(tmp_path, monkeypatch):
    """The holder removes the file on release: a run that opened the old file just before, and then got
    its flock, must not trust a lock on a file nobody else can see; it locks the file at the path."""
    import harness.core.files as files

    lock = tmp_path / "x.lock"
    first = exclusive(lock, "it", "it")
    first.__enter__()
    real, seen = files.fcntl.flock, []

    def racing(fd, op):
        seen.append(fd)
        if len(seen) == 1:
            first.__exit__(None, None, None)  # the holder finishes between this run's open and its flock
        return real(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", racing)
    with exclusive(lock, "it", "it"):
        assert len(seen) == 2  # locked the unlinked file, saw it gone, and started again on the path
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_harden_refuses_weights_another_training_holds(tmp_path, holder, cli):
    weights = tmp_path / "hard.safetensors"
    proc = holder(tmp_path / "hard.safetensors.lock")
    result = cli("harden", str(config(tmp_path)), "--defense", "pgd-at", "--out", str(weights), "--epochs", "1")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"another run holds {weights}" in line and f"pid {proc.pid}" in line
    assert not weights.exists() and not Path(f"{weights}.ckpt").exists()
