"""Provenance: sha256 of what a run read (weights, data, config, a python: model's code) and wrote,
of the scorecard's own verdict fields, and checking them again.

An artifact is a plain record, ``{"role", "path", "kind": "file"|"tree"|"py-tree", "sha256"}``. A
tree's hash covers every entry under it, so a renamed, added or removed image changes it too; a
py-tree's covers the *.py files under it only (compiled caches come and go). Standard library only:
the CLI imports this module at startup, and `harness verify` never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional, Union

from harness.core.errors import BadInput
from harness.core.files import sha256_file

__all__ = ["file_sha256", "tree_sha256", "py_tree_sha256", "artifact", "data_artifact", "model_artifacts", "python_artifacts",
           "config_artifact", "package_versions", "verdict_digest", "VERDICT_FIELDS", "verify", "VerifyRow"]

VerifyRow = dict[str, Optional[str]]
PathLike = Union[str, "os.PathLike[str]"]

# Distribution names probed by package_versions, keyed as they appear in the scorecard.
_CORE = {"harness": "robustgate",  # the distribution that installs the harness package
         "torch": "torch", "torchvision": "torchvision", "numpy": "numpy"}
_OPTIONAL = {"foolbox": "foolbox", "art": "adversarial-robustness-toolbox"}


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, streamed in 1 MiB chunks."""
    return sha256_file(Path(path))


def _tree_entries(root: Path) -> Iterable[tuple[str, str, str]]:
    """(relative posix path, kind, digest) for every directory, file and symlink under root."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():  # its target as written: never followed, so a tree cannot reach outside itself
                yield rel, "link", hashlib.sha256(os.fsencode(os.readlink(p))).hexdigest()
            elif p.is_dir():
                yield rel, "dir", ""  # kept: an empty class folder still changes ImageFolder's labels
            elif p.is_file():
                yield rel, "file", file_sha256(p)


def tree_sha256(directory: PathLike) -> str:
    """A deterministic hash of a directory tree.

    Entries are sorted by relative posix path; each contributes ``path NUL kind NUL digest NUL``
    (UTF-8, surrogate escapes kept) where kind is ``dir`` (empty digest), ``file`` (the file's sha256)
    or ``link`` (the sha256 of the link's target string). Timestamps and permissions do not count.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    h = hashlib.sha256()
    for rel, kind, digest in sorted(_tree_entries(root)):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + kind.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


def py_tree_sha256(directory: PathLike) -> str:
    """tree_sha256's format over the *.py files under `directory` only (``path NUL file NUL digest NUL``,
    sorted): the source of a package, without the __pycache__ that importing it writes."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    h = hashlib.sha256()
    for rel, kind, digest in sorted(e for e in _tree_entries(root) if e[1] == "file" and e[0].endswith(".py")):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + kind.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


def artifact(role: str, path: PathLike) -> dict[str, str]:
    """The record of one input: a file hashed by its bytes, a directory as a tree."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        return {"role": role, "path": p.as_posix(), "kind": "tree", "sha256": tree_sha256(p)}
    if p.is_file():
        return {"role": role, "path": p.as_posix(), "kind": "file", "sha256": file_sha256(p)}
    raise BadInput(str(p), f"{role} not found (nothing to hash)")


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base) / p


def data_artifact(source: str, base: Path, split: Optional[str] = None) -> Optional[dict[str, str]]:
    """The artifact a data source string reads, resolved like harness.sources.data does; None for builtin data.

    ``npz:PATH`` is a file; ``imagefolder:PATH`` and ``torchvision:NAME:ROOT`` are trees. With
    `split`, an image folder that holds a ``<split>/`` subfolder is hashed there, as it is loaded.
    """
    scheme, _, arg = source.partition(":")
    if scheme == "npz":
        return artifact("data", _resolve(arg, base))
    if scheme == "imagefolder":
        root = _resolve(arg, base)
        if split is not None and (root / split).is_dir():
            root = root / split
        return artifact("data", root)
    if scheme == "torchvision":
        _, _, root = arg.partition(":")
        return artifact("data", _resolve(root, base)) if root else None
    return None  # builtin:*, python:tensors: nothing on disk of the user's


def python_artifacts(module_name: str) -> list[dict[str, str]]:
    """The source of an imported module: its file ("model-code") and, when it belongs to a package, the
    *.py files of that package's top-level directory as one py-tree ("model-package"). [] when the
    module is not imported or has no file (built in, or made in memory)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file or not Path(file).is_file():
        return []
    found = [artifact("model-code", file)]
    parts = module_name.split(".")
    here = Path(file).absolute().parent  # the directory of parts[-1] for a package's __init__, else of parts[-2]
    climb = len(parts) - 1 if Path(file).name == "__init__.py" else len(parts) - 2
    if climb >= 0:
        top = here.parents[climb - 1] if climb else here
        if top.name == parts[0]:  # a loader that keeps files elsewhere: the module's file is all there is to hash
            found.append({"role": "model-package", "path": top.as_posix(), "kind": "py-tree", "sha256": py_tree_sha256(top)})
    return found


def model_artifacts(source: str, weights: Optional[str], base: Path) -> list[dict[str, str]]:
    """The model file (torchscript:, onnx:) or directory (huggingface:, as a tree), the source of a
    python: model's module (once imported) and the weights file a model reads; [] when it reads none."""
    scheme, _, arg = source.partition(":")
    found = []
    if scheme in ("torchscript", "onnx", "huggingface") and arg:
        found.append(artifact("model", _resolve(arg, base)))
    if scheme == "python" and ":" in arg:
        found += python_artifacts(arg.rpartition(":")[0])
    if weights is not None:
        found.append(artifact("weights", _resolve(weights, base)))
    return found


def config_artifact(path: Any) -> Optional[dict[str, str]]:
    """The config file's artifact; None for the embedded default, a dict or an already parsed Config."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    from harness.config import DEFAULT_CONFIG_PATH  # no torch behind it; only needed when there is a path

    p = Path(path)
    if p.absolute() == DEFAULT_CONFIG_PATH.absolute():
        return None
    return artifact("config", p)


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions from installed metadata, never by importing: python, harness, torch, torchvision,
    numpy; foolbox and ART (key "art") when installed; and each distribution named in `extra`."""
    import importlib.metadata as md

    def version(dist: str) -> Optional[str]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    out = {"python": platform.python_version()}
    for key, dist in _CORE.items():
        out[key] = version(dist) or "not installed"
    for key, dist in _OPTIONAL.items():
        v = version(dist)
        if v is not None:
            out[key] = v
    for dist in extra:
        out.setdefault(dist, version(dist) or "not installed")
    return out


# The fields of a scorecard that state or decide its result; provenance (which holds the digest, and
# the outputs' hashes written after it) and the pictures (examples, classes) are not among them.
VERDICT_FIELDS = ("name", "passed", "verdict", "on_inconclusive", "metrics", "intervals", "interval_methods", "gates",
                  "checks", "attacks", "probes", "defenses", "certificates")


def _json_form(obj: Any) -> Any:
    """A value as scorecard.json holds it: NaN null, an infinity the string "inf" or "-inf", a tuple a
    list, keys strings. The record in memory, as saved and as read back then hash alike."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_form(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_form(v) for v in obj]
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def verdict_digest(record: dict[str, Any]) -> str:
    """The sha256 of a scorecard's VERDICT_FIELDS as canonical JSON (keys sorted, no spaces, ASCII).
    Without a key it catches an edit of scorecard.json, not a forgery: whoever edits the file can
    recompute the digest too."""
    canonical = json.dumps(_json_form({k: record.get(k) for k in VERDICT_FIELDS}), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _rehash(path: Path, kind: str) -> Optional[str]:
    if kind == "tree":
        return tree_sha256(path) if path.is_dir() else None
    if kind == "py-tree":
        return py_tree_sha256(path) if path.is_dir() else None
    return file_sha256(path) if path.is_file() else None


def _row(role: str, path: Path, expected: str, kind: str) -> VerifyRow:
    actual = _rehash(path, kind)
    status = "missing" if actual is None else "ok" if actual == expected else "mismatch"
    return {"role": role, "path": path.as_posix(), "expected": expected, "actual": actual, "status": status}


def _load_record(scorecard_path: PathLike) -> tuple[dict[str, Any], Path]:
    """The scorecard's record and its file. Read here rather than by Scorecard.load, which also
    parses outcomes.json and refuses an altered one: verify must report that file, not stop at it."""
    from harness.records.scorecard import REQUIRED_KEYS, read_record

    record, p = read_record(scorecard_path)
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise BadInput(str(p), f"not a scorecard: it lacks the keys {', '.join(missing)}")
    return record, p.absolute()


def verify(scorecard_path: PathLike) -> list[VerifyRow]:
    """Re-hashes every artifact a scorecard names and every output file beside it, and checks its
    verdict fields against provenance.verdict_sha256.

    One row per item, in the scorecard's order (artifacts, then outputs, then the verdict row, role
    ``verdict``): ``{"role", "path", "expected", "actual", "status"}`` with status ``ok``, ``mismatch``
    or ``missing`` (actual None for a file; expected None for a scorecard that records no digest).
    A scorecard that cannot be read, or whose provenance lists are malformed, raises BadInput.
    """
    record, card_file = _load_record(scorecard_path)
    directory = card_file.parent
    where = str(scorecard_path)
    prov = record.get("provenance")
    if not isinstance(prov, dict):
        raise BadInput(where, "provenance must be an object")
    artifacts = prov.get("artifacts") or []
    outputs = prov.get("outputs") or {}
    if not isinstance(artifacts, list):
        raise BadInput(where, "provenance.artifacts must be a list of {role, path, kind, sha256}")
    if not isinstance(outputs, dict):
        raise BadInput(where, "provenance.outputs must map file names to sha256")
    rows = []
    for i, a in enumerate(artifacts):
        if not isinstance(a, dict) or not all(isinstance(a.get(k), str) for k in ("role", "path", "sha256")):
            raise BadInput(where, f"provenance.artifacts[{i}] needs string role, path and sha256")
        kind = a.get("kind", "file")
        if kind not in ("file", "tree", "py-tree"):
            raise BadInput(where, f"provenance.artifacts[{i}].kind is {kind!r} (valid: file, tree, py-tree)")
        rows.append(_row(a["role"], Path(a["path"]), a["sha256"], kind))
    for name, digest in outputs.items():
        rel = PurePosixPath(name)
        if not isinstance(digest, str) or rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BadInput(where, f"provenance.outputs[{name!r}] must be a file beside the scorecard with a sha256 string")
        rows.append(_row("output", directory.joinpath(*rel.parts), digest, "file"))
    recorded = prov.get("verdict_sha256")
    if recorded is not None and not isinstance(recorded, str):
        raise BadInput(where, "provenance.verdict_sha256 must be a sha256 string")
    actual = verdict_digest(record)
    status = "missing" if recorded is None else "ok" if recorded == actual else "mismatch"
    rows.append({"role": "verdict", "path": card_file.as_posix(), "expected": recorded, "actual": actual,
                 "status": status})
    return rows
