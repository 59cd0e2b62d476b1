"""The scorecard record: the run's result as plain data (scorecard.json), its schema version, the
files a run writes, and the JSON spelling of infinities. The Scorecard object around it (save,
rejudge, display) is harness.reports.scorecard: it renders and judges, two layers above this one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from harness.core.errors import BadInput

__all__ = ["SCHEMA_VERSION", "OUTPUT_FILES", "OUTCOMES_FILE", "REQUIRED_KEYS", "read_record", "encode_infinities", "decode_infinities"]

SCHEMA_VERSION = 1
OUTCOMES_FILE = "outcomes.json"  # as harness.verdicts.outcomes names it; repeated so loading this module stays free of numpy
OUTPUT_FILES = ("scorecard.json", "report.html", "junit.xml", "summary.md", OUTCOMES_FILE)
_SAVE_HASHES = ("outputs", "verdict_sha256")  # what save() itself writes into provenance
REQUIRED_KEYS = ("schema_version", "name", "passed", "verdict", "metrics", "gates", "attacks", "probes", "defenses", "checks", "provenance")


def _clean(obj: Any) -> Any:
    """JSON has no NaN or infinity: inf becomes the string "inf" ("-inf"), which `decode_infinities` reads back
    (an unbroken median perturbation is a real, passing value), and NaN becomes null (never a pass)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


encode_infinities = _clean  # the public name


_INF = {"inf": math.inf, "-inf": -math.inf}
# fields that hold names, never numbers: a label spelled "inf" stays a string
_NAMES = frozenset({"id", "name", "label", "epsilon", "norm", "metric", "op", "kind", "status", "verdict", "test", "pairing",
                    "reason", "detail", "why", "method", "interval_method", "source", "backend", "fraction"})


def decode_infinities(obj: Any, key: Optional[str] = None) -> Any:
    """The inverse of `_clean` for infinities: "inf"/"-inf" in a numeric field is a float again (a
    record from scorecard.json or `Scorecard.to_dict()` becomes one that renders and gates as run)."""
    if isinstance(obj, str):
        return _INF.get(obj, obj) if key not in _NAMES else obj
    if isinstance(obj, dict):
        return {k: (v if k == "provenance" else decode_infinities(v, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_infinities(v, key) for v in obj]
    return obj


def read_record(path: Union[str, Path]) -> tuple[dict[str, Any], Path]:
    """A scorecard.json (or the directory holding one) as a dict of this schema version, and its path;
    BadInput naming the file when it is missing, unreadable, not an object or of another version.
    Infinities written as "inf" come back as float inf."""
    p = Path(path)
    if p.is_dir():
        p = p / "scorecard.json"
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(str(p), "scorecard not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(str(p), f"not a readable scorecard JSON ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise BadInput(str(p), "not a scorecard: the JSON is not an object")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise BadInput(str(p), f"unsupported scorecard schema_version {record.get('schema_version')!r} (valid: {SCHEMA_VERSION})")
    return decode_infinities(record), p
