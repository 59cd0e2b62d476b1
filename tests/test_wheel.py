"""The wheel installs cleanly: one top-level import package, `harness`, under the distribution `robustgate`.

The wheel is built from a copy of what a clone holds (git's tracked and untracked-but-not-ignored
files), not from the working tree, so a stale build/ folder cannot put into it what the sources no
longer have. It is then installed with pip into an empty folder and imported from there, with only
the dependencies' folders beside it (no editable install, no source tree on the path), the way a
user's environment would see it.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"harness": "harness", "harness/attacks": "attacks", "harness/defenses": "defenses"}  # wheel path -> source folder


def _source_files() -> list[Path]:
    """The files a fresh clone of this tree holds (with what is not committed yet but not ignored)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return [ROOT / p for p in listed if p and (ROOT / p).is_file()]  # a deleted, not yet staged file is listed too
    skip = {".git", ".venv", "build", "dist", "reports", "__pycache__", ".pytest_cache"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
            and ".egg-info" not in str(p)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for f in _source_files():
        dest = src / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q", "--disable-pip-version-check"]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.append("--no-build-isolation")  # offline, with this environment's setuptools; else pip fetches the build backend
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    built = list(out.glob("*.whl"))
    assert len(built) == 1, built
    return built[0]


def _dist_info(z: zipfile.ZipFile) -> str:
    infos = {n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info")}
    assert len(infos) == 1, infos
    return infos.pop()


def test_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        info = _dist_info(z)
        tops = {n.split("/")[0] for n in z.namelist()} - {info}
        assert tops == {"harness"}, f"the wheel installs {sorted(tops)} into site-packages"
        if f"{info}/top_level.txt" in z.namelist():
            assert z.read(f"{info}/top_level.txt").decode().split() == ["harness"]


def test_distribution_name_version_and_console_script(wheel: Path) -> None:
    import harness

    with zipfile.ZipFile(wheel) as z:
        info = _dist_info(z)
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert meta["Name"] == "robustgate"  # `harness` on PyPI is an unrelated project
    assert meta["Version"] == harness.__version__, "pyproject.toml's version and harness.__version__ disagree"
    assert wheel.name.startswith(f"robustgate-{harness.__version__}-")
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.replace(" ", "").startswith("torch>=2.6") for r in requires), requires  # CVE-2025-32434
    lines = [line.strip() for line in entry_points.splitlines()]
    assert "[console_scripts]" in lines and "harness = harness.cli:main" in lines, entry_points


def test_every_module_and_data_file_is_inside(wheel: Path) -> None:
    """Each .py of harness/, attacks/ and defenses/ lands where it imports from, with the templates and
    the embedded default: pyproject.toml lists packages by hand, so a new sub-package is easy to miss."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    wanted = set()
    for target, folder in PACKAGE_DIRS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts and not (target == "harness" and rel.parts[0] in ("attacks", "defenses")):
                wanted.add(f"{target}/{rel.as_posix()}")
    for f in (ROOT / "harness" / "reports" / "templates").glob("*.j2"):
        wanted.add(f"harness/reports/templates/{f.name}")
    wanted.add("harness/default.yaml")
    assert any(n.startswith("harness/attacks/") for n in wanted) and any(n.startswith("harness/defenses/") for n in wanted)
    assert any(n.endswith(".j2") for n in wanted)
    missing = sorted(wanted - names)
    assert not missing, f"the wheel lacks {missing}"
    stray = sorted(n for n in names if n.startswith(("tests/", "configs/", "benchmarks/", "docs/")) or "__pycache__" in n)
    assert not stray, stray


def _dependency_folder(tmp: Path) -> Path:
    """site-packages as a fresh environment with the dependencies only would have it: every entry but
    this project's own (its editable finders, .pth files and metadata), as symlinks."""
    deps = tmp / "deps"
    deps.mkdir()
    own = ("harness", "robustgate", "__editable__", "attacks", "defenses")
    for site in dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")):
        for entry in site.iterdir():
            if not entry.name.lower().endswith(".pth") and not entry.name.lower().startswith(own) and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    return deps


def test_installed_wheel_imports_on_its_own(wheel: Path, tmp_path: Path) -> None:
    """Installed into an empty folder, every module imports from there, `attacks` and `defenses` are
    not top-level names, and the console script's entry point answers --version, list and validate."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--disable-pip-version-check",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    deps = _dependency_folder(tmp_path)
    probe = f"""
import importlib, importlib.util, pkgutil, sys
sys.path[:0] = [{str(target)!r}, {str(deps)!r}]
import harness
assert harness.__file__.startswith({str(target)!r}), harness.__file__
for top in ("attacks", "defenses"):
    assert importlib.util.find_spec(top) is None, f"{{top}} is importable as a top-level package"
names = [m.name for m in pkgutil.walk_packages(harness.__path__, "harness.") if not m.name.endswith("__main__")]  # that one runs the CLI
for name in names:
    mod = importlib.import_module(name)
    assert mod.__file__.startswith({str(target)!r}), (name, mod.__file__)
print(len(names), "modules")
from harness.cli import main
for args in sys.argv[1:]:
    sys.argv = ["harness", *args.split("|")]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), f"harness {{args}}: exit {{e.code}}"
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    default = target / "harness" / "default.yaml"
    commands = ["--version", "list|defenses", f"validate|{default}"]
    # -S: no site-packages, so no editable finder and no metadata of a development install; -I: neither
    # the working directory nor PYTHON* variables on the path
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, *commands], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, f"the installed wheel:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert int(done.stdout.split(" modules")[0].split()[-1]) >= 60, done.stdout
    for expect in ("version 0.1.0", "pgd-at", "valid (2 attack(s), 2 gate(s)"):
        assert expect in done.stdout, done.stdout
