"""Provenance hashes, `harness verify`, `harness run --resume` and clean stops on SIGINT/SIGTERM."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.core.errors import BadInput
from harness.records.provenance import (artifact, config_artifact, data_artifact, file_sha256, model_artifacts, package_versions,
                                py_tree_sha256, python_artifacts, tree_sha256, verdict_digest, verify)

REPO = Path(__file__).resolve().parent.parent
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2, "abc"
MILLION_A_SHA256 = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"  # FIPS 180-2, 10^6 x "a"


# ---- hashing -----------------------------------------------------------------------------------

def test_file_sha256_known_answers(tmp_path):
    cases = {b"": EMPTY_SHA256, b"abc": ABC_SHA256, b"a" * 1_000_000: MILLION_A_SHA256}
    for i, (data, digest) in enumerate(cases.items()):
        (tmp_path / f"f{i}").write_bytes(data)
        assert file_sha256(tmp_path / f"f{i}") == digest
    big = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB and a bit: several 1 MiB chunks and a tail
    (tmp_path / "big").write_bytes(big)
    assert file_sha256(str(tmp_path / "big")) == hashlib.sha256(big).hexdigest()


def _make_tree(root: Path, order: str = "forward") -> None:
    files = {"a/x.bin": b"\x00\x01", "a/b/y.txt": b"abc"}
    for rel, data in (files.items() if order == "forward" else reversed(files.items())):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "e").mkdir()
    os.symlink("../outside.txt", root / "link")


def _expected_tree(entries: list[tuple[str, str, str]]) -> str:
    """The documented format: sorted by path, each `path NUL kind NUL digest NUL`."""
    h = hashlib.sha256()
    for rel, kind, digest in sorted(entries):
        h.update(f"{rel}\0{kind}\0{digest}\0".encode())
    return h.hexdigest()


def test_tree_sha256_known_answer(tmp_path):
    (tmp_path / "outside.txt").write_text("secret")
    root = tmp_path / "tree"
    root.mkdir()
    _make_tree(root)
    link_digest = hashlib.sha256(b"../outside.txt").hexdigest()
    expected = _expected_tree([("a", "dir", ""), ("a/b", "dir", ""), ("a/b/y.txt", "file", ABC_SHA256),
                               ("a/x.bin", "file", hashlib.sha256(b"\x00\x01").hexdigest()), ("e", "dir", ""),
                               ("link", "link", link_digest)])
    assert tree_sha256(root) == expected
    assert tree_sha256(str(root)) == expected
    with pytest.raises(NotADirectoryError):
        tree_sha256(root / "a" / "x.bin")


def test_tree_sha256_sees_content_names_and_links_but_not_outside(tmp_path):
    (tmp_path / "outside.txt").write_text("secret")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _make_tree(one, "forward")
    _make_tree(two, "reverse")
    base = tree_sha256(one)
    assert tree_sha256(two) == base  # creation order and timestamps do not count
    os.utime(one / "a" / "x.bin", (0, 0))
    assert tree_sha256(one) == base
    (tmp_path / "outside.txt").write_text("changed")  # a link is never followed
    assert tree_sha256(one) == base
    os.unlink(one / "link")
    os.symlink("../elsewhere.txt", one / "link")
    assert tree_sha256(one) != base
    (two / "a" / "b" / "y.txt").write_bytes(b"abd")
    changed_content = tree_sha256(two)
    assert changed_content != base
    (two / "a" / "b" / "y.txt").rename(two / "a" / "b" / "z.txt")
    assert tree_sha256(two) not in (base, changed_content)
    before = tree_sha256(two)
    (two / "f").mkdir()  # an empty folder is an (empty) ImageFolder class
    assert tree_sha256(two) != before


def test_artifact_records(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"abc")
    (tmp_path / "d").mkdir()
    a = artifact("weights", tmp_path / "w.pt")
    assert a == {"role": "weights", "path": (tmp_path / "w.pt").as_posix(), "kind": "file", "sha256": ABC_SHA256}
    t = artifact("data", str(tmp_path / "d"))
    assert t["kind"] == "tree" and t["sha256"] == EMPTY_SHA256  # an empty tree hashes no entry
    with pytest.raises(BadInput, match="not found"):
        artifact("weights", tmp_path / "nope.pt")


# ---- sources ----------------------------------------------------------------------------------

def test_data_artifact_for_each_source_kind(tmp_path):
    (tmp_path / "test.npz").write_bytes(b"abc")
    folder = tmp_path / "images"
    (folder / "test" / "cat").mkdir(parents=True)
    (folder / "test" / "cat" / "1.png").write_bytes(b"png")
    (folder / "train").mkdir()
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch").write_bytes(b"x")

    npz = data_artifact("npz:test.npz", tmp_path)
    assert npz == {"role": "data", "path": (tmp_path / "test.npz").as_posix(), "kind": "file", "sha256": ABC_SHA256}
    whole = data_artifact("imagefolder:images", tmp_path)
    assert whole["kind"] == "tree" and whole["path"] == folder.as_posix() and whole["sha256"] == tree_sha256(folder)
    split = data_artifact("imagefolder:images", tmp_path, split="test")  # hashed where it is loaded from
    assert split["path"] == (folder / "test").as_posix() and split["sha256"] == tree_sha256(folder / "test")
    assert data_artifact(f"imagefolder:{folder}", Path("/nowhere"))["sha256"] == whole["sha256"]  # absolute path
    tv = data_artifact("torchvision:CIFAR10:cifar", tmp_path)
    assert tv["kind"] == "tree" and tv["path"] == (tmp_path / "cifar").as_posix()
    assert data_artifact("builtin:digits", tmp_path) is None
    assert data_artifact("python:tensors", tmp_path) is None
    with pytest.raises(BadInput):
        data_artifact("npz:missing.npz", tmp_path)


def test_model_artifacts_for_each_source_kind(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"abc")
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "w.safetensors").write_bytes(b"a" * 1_000_000)
    ts = model_artifacts("torchscript:m.pt", None, tmp_path)
    assert ts == [{"role": "model", "path": (tmp_path / "m.pt").as_posix(), "kind": "file", "sha256": ABC_SHA256}]
    both = model_artifacts("torchscript:m.pt", "w.safetensors", tmp_path)
    assert [a["role"] for a in both] == ["model", "weights"] and both[1]["sha256"] == MILLION_A_SHA256
    assert model_artifacts("onnx:m.onnx", None, tmp_path)[0]["sha256"] == EMPTY_SHA256
    assert model_artifacts("builtin:digits-cnn", None, tmp_path) == []
    assert model_artifacts("python:pkg.mod:make", None, tmp_path) == []
    assert model_artifacts("torchvision:resnet18", None, tmp_path) == []
    (tv,) = model_artifacts("torchvision:resnet18", str(tmp_path / "w.safetensors"), Path("/elsewhere"))
    assert tv["role"] == "weights" and tv["path"] == (tmp_path / "w.safetensors").as_posix()
    with pytest.raises(BadInput):
        model_artifacts("python:pkg.mod:make", "missing.pt", tmp_path)


def test_config_artifact(tmp_path):
    from harness.config import DEFAULT_CONFIG_PATH

    path = tmp_path / "suite.yaml"
    path.write_bytes(b"abc")
    assert config_artifact(path) == {"role": "config", "path": path.as_posix(), "kind": "file", "sha256": ABC_SHA256}
    assert config_artifact(str(path))["sha256"] == ABC_SHA256
    assert config_artifact(None) is None and config_artifact({"name": "x"}) is None
    assert config_artifact(DEFAULT_CONFIG_PATH) is None


def test_package_versions_read_metadata_without_importing():
    code = ("import sys, json\nfrom harness.records.provenance import package_versions\n"
            "v = package_versions(extra=['click', 'no-such-dist-xyz'])\n"
            "print(json.dumps([v, sorted(m for m in ('torch', 'numpy', 'foolbox', 'art', 'torchvision') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    versions, imported = json.loads(out)
    assert imported == []
    assert versions["torch"] == md.version("torch") and versions["numpy"] == md.version("numpy")
    # the harness package is installed by the distribution robustgate: its version, not "not installed"
    assert versions["harness"] == md.version("robustgate") and versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["click"] == md.version("click") and versions["no-such-dist-xyz"] == "not installed"
    for key, dist in (("foolbox", "foolbox"), ("art", "adversarial-robustness-toolbox")):
        try:
            assert versions[key] == md.version(dist)
        except md.PackageNotFoundError:
            assert key not in versions
    assert package_versions()["torchvision"] == md.version("torchvision")


# ---- verify -----------------------------------------------------------------------------------

def _record(**provenance) -> dict:
    """A scorecard record whose provenance carries the digest of its verdict fields, as Scorecard.save writes it."""
    rec = {"schema_version": 1, "name": "v", "passed": True, "verdict": "pass", "metrics": {"clean_accuracy": 1.0},
           "gates": [], "attacks": [], "probes": [], "defenses": [], "checks": [], "provenance": {"seed": 0, **provenance}}
    rec["provenance"].setdefault("verdict_sha256", verdict_digest(rec))
    return rec


@pytest.fixture
def run_dir(tmp_path):
    """A saved run: weights, an npz and an image folder read, four outputs written, all named in scorecard.json."""
    inputs = tmp_path / "inputs"
    (inputs / "images" / "cat").mkdir(parents=True)
    (inputs / "images" / "cat" / "1.png").write_bytes(b"png-bytes")
    (inputs / "w.safetensors").write_bytes(b"weights" * 1000)
    (inputs / "test.npz").write_bytes(b"npz")
    (inputs / "suite.yaml").write_text("name: v\n")
    out = tmp_path / "out"
    out.mkdir()
    outputs = {}
    for name, text in (("report.html", "<html></html>"), ("junit.xml", "<testsuites/>"), ("summary.md", "| gate |"),
                       ("outcomes.json", '{"schema_version": 1}')):
        (out / name).write_text(text)
        outputs[name] = file_sha256(out / name)
    artifacts = [*model_artifacts("builtin:digits-cnn", "w.safetensors", inputs),
                 data_artifact("npz:test.npz", inputs), data_artifact("imagefolder:images", inputs),
                 config_artifact(inputs / "suite.yaml")]
    (out / "scorecard.json").write_text(json.dumps(_record(artifacts=artifacts, outputs=outputs)))
    return out, inputs


def _flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_ok(run_dir, cli):
    out, inputs = run_dir
    rows = verify(out)
    assert [r["role"] for r in rows] == ["weights", "data", "data", "config"] + ["output"] * 4 + ["verdict"]
    assert all(r["status"] == "ok" and r["expected"] == r["actual"] for r in rows)
    assert rows[4]["path"] == (out / "report.html").absolute().as_posix()
    assert rows[-1]["path"] == (out / "scorecard.json").absolute().as_posix()
    assert verify(out / "scorecard.json") == rows
    result = cli("verify", str(out / "scorecard.json"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 10 and all(line.startswith("ok") for line in lines[:9])
    assert lines[8].endswith("scorecard.json: the verdict fields match their digest")
    assert lines[-1] == "verified: 4 input(s), 4 output(s) and the verdict fields; 9 ok, 0 mismatch(es), 0 missing"


def test_verify_what_scorecard_save_wrote(tmp_path, cli):
    from harness.reports.scorecard import Scorecard

    (tmp_path / "w.pt").write_bytes(b"abc")
    card = Scorecard(_record(artifacts=model_artifacts("builtin:digits-cnn", str(tmp_path / "w.pt"), tmp_path)))
    out = card.save(tmp_path / "out")
    rows = verify(out)
    assert [r["role"] for r in rows][:1] == ["weights"] and len(rows) >= 4  # weights, then report, junit, summary, ...
    assert {"report.html", "junit.xml", "summary.md"} <= {Path(r["path"]).name for r in rows}
    assert all(r["status"] == "ok" for r in rows)
    _flip_byte(out / "junit.xml", at=5)
    result = cli("verify", str(out))
    assert result.exit_code == 1 and "mismatch output" in result.stdout


# outcomes.json too: Scorecard.load refuses an altered one, verify must name it instead
@pytest.mark.parametrize("target", ["inputs/w.safetensors", "out/report.html", "out/outcomes.json"])
def test_verify_mismatch_on_one_changed_byte(run_dir, cli, target):
    out, _ = run_dir
    path = out.parent / target
    old = file_sha256(path)
    _flip_byte(path, at=3)
    rows = verify(out)
    (bad,) = [r for r in rows if r["status"] != "ok"]
    assert bad["status"] == "mismatch" and bad["path"] == path.as_posix()
    assert bad["expected"] == old and bad["actual"] == file_sha256(path) != old
    result = cli("verify", str(out))
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("mismatch")]
    assert path.as_posix() in line and old[:12] in line and bad["actual"][:12] in line
    assert "; 8 ok, 1 mismatch(es), 0 missing" in result.stdout


def test_verify_tree_mismatch_and_missing_files(run_dir, cli):
    out, inputs = run_dir
    (inputs / "images" / "cat" / "2.png").write_bytes(b"new image")
    (out / "summary.md").unlink()
    (inputs / "test.npz").unlink()
    status = {(r["role"], Path(r["path"]).name): r["status"] for r in verify(out)}
    assert status[("data", "images")] == "mismatch"
    assert status[("output", "summary.md")] == "missing" and status[("data", "test.npz")] == "missing"
    result = cli("verify", str(out))
    assert result.exit_code == 1 and "; 6 ok, 1 mismatch(es), 2 missing" in result.stdout
    assert sum(line.startswith("missing") for line in result.stdout.splitlines()) == 2


def test_verify_a_scorecard_without_artifacts(tmp_path, cli):
    (tmp_path / "scorecard.json").write_text(json.dumps(_record()))
    assert [(r["role"], r["status"]) for r in verify(tmp_path)] == [("verdict", "ok")]
    result = cli("verify", str(tmp_path))
    assert result.exit_code == 0 and "names no artifact; only its verdict fields are checked" in result.stdout


@pytest.mark.parametrize("content", [None, "{not json", json.dumps([1, 2]), json.dumps({"schema_version": 1}),
                                     json.dumps(_record(artifacts={"role": "x"})),
                                     json.dumps(_record(artifacts=[{"role": "weights", "path": "/x"}])),
                                     json.dumps(_record(outputs={"../../etc/passwd": "00"}))])
def test_verify_unreadable_scorecard_exits_2(tmp_path, content):
    path = tmp_path / "scorecard.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadInput):
        verify(path)
    proc = subprocess.run([sys.executable, "-m", "harness", "verify", str(path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("harness: error: ")


def test_help_lists_verify_and_resume(cli):
    assert "verify" in cli("--help").stdout
    assert "--resume" in cli("run", "--help").stdout


# ---- --resume: which directory ------------------------------------------------------------------

class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        from harness.reports.scorecard import Scorecard

        self.calls.append((args, kwargs))
        return Scorecard(_record())


@pytest.fixture
def fake_run(monkeypatch):
    import harness.api

    recorder = _Recorder()
    monkeypatch.setattr(harness.api, "run", recorder)
    return recorder


def _partial(directory: Path, name: str, mtime: float) -> None:
    directory.mkdir(parents=True)
    (directory / "scorecard.partial.json").write_text(json.dumps({**_record(), "name": name}))
    os.utime(directory / "scorecard.partial.json", (mtime, mtime))


def _tiny_config(tmp_path: Path, name: str = "tiny") -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": name, "attacks": [], "gates": [{"metric": "clean_accuracy", "min": 0.5}]}))
    return path


def test_resume_picks_the_newest_unfinished_run_of_this_config(tmp_path, monkeypatch, cli, fake_run):
    monkeypatch.chdir(tmp_path)
    reports = Path("reports")
    _partial(reports / "tiny-20240101-000000", "tiny", 1_000)
    _partial(reports / "tiny-20240102-000000", "tiny", 2_000)
    _partial(reports / "tiny-v2-20240105-000000", "tiny-v2", 9_000)  # matches the glob, another config's run
    _partial(reports / "other-20240106-000000", "other", 9_000)
    (reports / "tiny-20240104-000000").mkdir()  # finished: no partial left
    (reports / "tiny-20240104-000000" / "scorecard.json").write_text(json.dumps(_record()))
    (reports / "tiny-20240103-000000").mkdir()
    (reports / "tiny-20240103-000000" / "scorecard.partial.json").write_text("{torn")  # unreadable: not resumable
    result = cli("run", str(_tiny_config(tmp_path)), "--resume")
    assert result.exit_code == 0, result.output
    (args, kwargs), = fake_run.calls
    assert kwargs["resume"] is True and Path(kwargs["out"]) == reports / "tiny-20240102-000000"
    assert "resuming the run in reports/tiny-20240102-000000" in result.stderr


def test_resume_without_an_unfinished_run_starts_fresh(tmp_path, monkeypatch, cli, fake_run):
    monkeypatch.chdir(tmp_path)
    _partial(Path("reports") / "other-20240101-000000", "other", 1_000)
    result = cli("run", str(_tiny_config(tmp_path)), "--resume")
    assert result.exit_code == 0, result.output
    (_, kwargs), = fake_run.calls
    assert not kwargs.get("resume", False)
    out = Path(kwargs["out"])
    assert out.parent == Path("reports") and out.name.startswith("tiny-") and not out.exists()
    assert "no unfinished run of 'tiny'" in result.stderr and "starting a fresh run" in result.stderr


def test_resume_with_out_and_plain_runs(tmp_path, monkeypatch, cli, fake_run):
    monkeypatch.chdir(tmp_path)
    cfg = str(_tiny_config(tmp_path))
    _partial(tmp_path / "mine", "tiny", 1_000)
    assert cli("run", cfg, "--out", str(tmp_path / "mine"), "--resume").exit_code == 0
    assert fake_run.calls[-1][1]["resume"] is True and Path(fake_run.calls[-1][1]["out"]) == tmp_path / "mine"
    result = cli("run", cfg, "--out", str(tmp_path / "empty"), "--resume")
    assert fake_run.calls[-1][1]["resume"] is True and "nothing finished to reuse" in result.stderr
    _partial(Path("reports") / "tiny-20240101-000000", "tiny", 1_000)
    cli("run", cfg)  # no --resume: a fresh directory, whatever is unfinished
    assert not fake_run.calls[-1][1].get("resume", False)
    assert Path(fake_run.calls[-1][1]["out"]).name != "tiny-20240101-000000"


# ---- signals ------------------------------------------------------------------------------------

def test_sigterm_during_run_is_an_interruption(tmp_path, monkeypatch, cli):
    import harness.api

    seen = []
    safety = lambda signum, frame: seen.append("safety")  # noqa: E731 -- if the CLI installs nothing, pytest survives
    previous = signal.signal(signal.SIGTERM, safety)
    try:
        def interrupted_run(*args, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM) is not safety)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler's KeyboardInterrupt ends this at once
            seen.append("not interrupted")

        monkeypatch.setattr(harness.api, "run", interrupted_run)
        t0 = time.perf_counter()
        result = cli("run", str(_tiny_config(tmp_path)), "--out", str(tmp_path / "out"))
        assert time.perf_counter() - t0 < 4
        assert seen == [True] and signal.getsignal(signal.SIGTERM) is safety  # installed for the run, then restored
        assert result.exit_code == 3 and result.stdout == ""
        assert result.stderr.strip() == "harness: run failed: interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signal_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "sig",
        "model": {"source": "python:tests.slow_models:sleepy_digits", "kwargs": {"delay": 0.02}},
        "data": {"limit": 40, "batch_size": 40},
        # FGSM finishes at once (a partial scorecard appears); 5000 PGD steps at a budget the model
        # mostly survives keep it busy for minutes unless it is stopped
        "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.01]},
                    {"name": "pgd", "norm": "linf", "epsilons": [0.01], "steps": 5000}],
        "gates": [{"metric": "clean_accuracy", "min": 0.5}],
    }
    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_real_run_stops_cleanly_on_a_signal(tmp_path, digits_model, signum):
    out = tmp_path / "out"
    # SIGINT as a terminal delivers it, even if this test runs where SIGINT is ignored (a background job)
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(_signal_config(tmp_path)), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (out / "scorecard.partial.json").exists():
            assert proc.poll() is None, f"the run ended before it was interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial scorecard within 60 s"
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: run failed: interrupted"), stderr
    assert str(out / "scorecard.partial.json") in lines[0]
    assert not (out / "scorecard.json").exists()
    partial = json.loads((out / "scorecard.partial.json").read_text())
    assert partial["verdict"] == "inconclusive" and "attack_success_rate:fgsm-linf@0.01" in partial["metrics"]
    assert "robust_accuracy:pgd-linf@0.01" not in partial["metrics"]


# ---- what decides the result: a python: model's source, and the verdict fields ------------------

def test_py_tree_sha256_hashes_python_sources_only(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_bytes(b"")
    (pkg / "sub" / "m.py").write_bytes(b"abc")
    expected = _expected_tree([("__init__.py", "file", EMPTY_SHA256), ("sub/m.py", "file", ABC_SHA256)])
    assert py_tree_sha256(pkg) == expected
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"compiled")  # importing writes these: they must not count
    (pkg / "notes.txt").write_text("x")
    assert py_tree_sha256(pkg) == expected
    (pkg / "sub" / "m.py").write_bytes(b"abd")
    assert py_tree_sha256(pkg) != expected


def _package(tmp_path: Path, name: str) -> Path:
    """tmp/<name>/{__init__,nets,helpers}.py: a python: model inside a package, with a sibling module."""
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("WIDTH = 10\n")
    (pkg / "nets.py").write_text("import torch\nfrom .helpers import WIDTH\n\n\ndef build():\n    torch.manual_seed(0)\n"
                                 "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, WIDTH))\n")
    return pkg


def test_python_artifacts_name_the_module_and_its_package(tmp_path):
    from harness.sources.models import load_model

    pkg = _package(tmp_path, "verifypkg_a")
    try:
        load_model("python:verifypkg_a.nets:build", base=tmp_path)
        code, tree = python_artifacts("verifypkg_a.nets")
        assert code == {"role": "model-code", "path": (pkg / "nets.py").as_posix(), "kind": "file", "sha256": file_sha256(pkg / "nets.py")}
        assert tree == {"role": "model-package", "path": pkg.as_posix(), "kind": "py-tree", "sha256": py_tree_sha256(pkg)}
        assert model_artifacts("python:verifypkg_a.nets:build", None, tmp_path) == [code, tree]
        assert [a["role"] for a in python_artifacts("verifypkg_a")] == ["model-code", "model-package"]  # the package itself
        assert python_artifacts("no_such_module_loaded") == []
    finally:
        for name in ("verifypkg_a", "verifypkg_a.nets", "verifypkg_a.helpers"):
            sys.modules.pop(name, None)


def test_verify_rehashes_a_python_models_source(tmp_path, cli):
    import harness

    pkg = _package(tmp_path, "verifypkg_b")
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"name": "py", "device": "cpu", "model": {"source": "python:verifypkg_b.nets:build"},
                                   "data": {"limit": 16}, "attacks": [], "gates": []}))
    try:
        harness.run(str(cfg), out=tmp_path / "out")
    finally:
        for name in ("verifypkg_b", "verifypkg_b.nets", "verifypkg_b.helpers"):
            sys.modules.pop(name, None)
    status = lambda: {r["role"]: r["status"] for r in verify(tmp_path / "out")}  # noqa: E731
    assert status()["model-code"] == status()["model-package"] == "ok"
    (pkg / "helpers.py").write_text("WIDTH = 12\n")  # a sibling the module imports: the package changed, the module did not
    assert (status()["model-code"], status()["model-package"]) == ("ok", "mismatch")
    (pkg / "nets.py").write_text((pkg / "nets.py").read_text() + "# edited\n")
    assert status()["model-code"] == "mismatch"
    result = cli("verify", str(tmp_path / "out"))
    assert result.exit_code == 1 and "mismatch model-code" in result.stdout and "mismatch model-package" in result.stdout


def test_verdict_digest_covers_the_verdict_fields_only():
    rec = _record()
    digest = verdict_digest(rec)
    assert len(digest) == 64 and digest == rec["provenance"]["verdict_sha256"]
    for key, value in (("passed", False), ("verdict", "fail"), ("metrics", {"clean_accuracy": 0.99}),
                       ("gates", [{"metric": "clean_accuracy", "passed": True}]), ("checks", [{"name": "budget", "status": "fail"}])):
        assert verdict_digest({**rec, key: value}) != digest, key
    assert verdict_digest({**rec, "provenance": {"seed": 1}, "examples": [1]}) == digest  # not a verdict field
    # the record in memory, as saved ("inf" strings, null for NaN, lists) and as read back hash alike
    inf = {**rec, "metrics": {"median_perturbation:deepfool-l2": float("inf"), "x": float("nan")}, "gates": [{"ci95": (0.1, 0.2)}]}
    saved = {**rec, "metrics": {"median_perturbation:deepfool-l2": "inf", "x": None}, "gates": [{"ci95": [0.1, 0.2]}]}
    assert verdict_digest(inf) == verdict_digest(saved)
    # a known answer: the sha256 of the canonical JSON, written out by hand
    fields = ('{"attacks":[],"certificates":null,"checks":[],"defenses":[],"gates":[],"interval_methods":null,"intervals":null,'
              '"metrics":{"clean_accuracy":1.0},"name":"v","on_inconclusive":null,"passed":true,"probes":[],"verdict":"pass"}')
    assert digest == hashlib.sha256(fields.encode()).hexdigest()


def test_an_edited_verdict_fails_verify(tmp_path, cli):
    failed = {**_record(), "passed": False, "verdict": "fail", "gates": [{"metric": "clean_accuracy", "op": ">=", "threshold": 0.9,
                                                                       "value": 0.5, "passed": False, "verdict": "fail"}]}
    failed["provenance"]["verdict_sha256"] = verdict_digest(failed)
    path = tmp_path / "scorecard.json"
    path.write_text(json.dumps(failed, indent=2))
    assert cli("verify", str(tmp_path)).exit_code == 0
    path.write_text(path.read_text().replace('"passed": false', '"passed": true', 1))
    result = cli("verify", str(tmp_path))
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("mismatch")]
    assert "verdict" in line and "the verdict fields (passed, verdict, gates, checks, metrics, ...) do not match their digest" in line
    assert result.stdout.strip().splitlines()[-1].startswith("NOT verified")


def test_a_scorecard_without_a_verdict_digest_is_not_verified(tmp_path, cli):
    rec = _record()
    del rec["provenance"]["verdict_sha256"]
    (tmp_path / "scorecard.json").write_text(json.dumps(rec))
    assert [(r["role"], r["status"]) for r in verify(tmp_path)] == [("verdict", "missing")]
    result = cli("verify", str(tmp_path))
    assert result.exit_code == 1 and "records no digest of its verdict fields" in result.stdout


def test_scorecard_save_writes_the_verdict_digest(tmp_path, cli):
    """End to end: a saved run verifies, and an edited `"passed"` in its scorecard.json does not."""
    import harness

    harness.run({"name": "saved", "device": "cpu", "data": {"limit": 16}, "attacks": [],
                 "gates": [{"metric": "clean_accuracy", "min": 0.999}]}, out=tmp_path)
    path = tmp_path / "scorecard.json"
    record = json.loads(path.read_text())
    assert record["passed"] is False and record["provenance"]["verdict_sha256"] == verdict_digest(record)
    assert cli("verify", str(tmp_path)).exit_code == 0
    path.write_text(path.read_text().replace('"passed": false', '"passed": true', 1))
    result = cli("verify", str(tmp_path))
    assert result.exit_code == 1 and "do not match their digest" in result.stdout
