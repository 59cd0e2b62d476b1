"""Runs the import-linter contracts of pyproject.toml ([tool.importlinter]) over the harness package.

Why a wrapper: attacks/ and defenses/ live at the root of the layout and install as harness.attacks
and harness.defenses (setuptools' package-dir). import-linter finds a package's modules by walking
its directory, so run plainly it never sees those two folders. This builds, in a temporary
directory, a `harness` tree of symlinks (harness/*, plus attacks/ and defenses/ where the install
puts them), puts it first on PYTHONPATH and runs lint-imports there. The exit status is
lint-imports' own: 0 when every contract holds, 1 when one is broken (it names the import chain).

    python .ci/lint_imports.py [--source ROOT] [CONFIG] [lint-imports options...]

ROOT is the layout root holding harness/, attacks/ and defenses/ (default: this repository);
CONFIG the file with the contracts (default: ROOT/pyproject.toml).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# where setuptools' package-dir mapping installs the folders outside harness/ (pyproject.toml)
MAPPED = {"attacks": "attacks", "defenses": "defenses"}


def mirror(root: Path, into: Path) -> Path:
    """`into`/harness: symlinks to every entry of root/harness and to the mapped folders."""
    pkg = into / "harness"
    pkg.mkdir(parents=True)
    for entry in (root / "harness").iterdir():
        if entry.name != "__pycache__" and entry.name not in MAPPED:
            (pkg / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for name, folder in MAPPED.items():
        (pkg / name).symlink_to((root / folder).resolve(), target_is_directory=True)
    return pkg


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    args, rest = parser.parse_known_args(argv)
    root = args.source.resolve()
    if not rest or rest[0].startswith("-"):
        rest = [str(root / "pyproject.toml"), *rest]
    with tempfile.TemporaryDirectory(prefix="lint-imports-") as tmp:
        mirror(root, Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # the mirror must be what `import harness` finds, or the check would read another tree
        found = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('harness').origin)"],
                               env=env, capture_output=True, text=True, cwd=tmp).stdout.strip()
        if not found.startswith(tmp):
            print(f"lint_imports: `import harness` resolves to {found or 'nothing'}, not the mirror in {tmp}", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
               "--no-cache", *rest]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
