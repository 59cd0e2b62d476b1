"""The scorecard: the run's result as a plain record (scorecard.json), and the object around it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import BadInput
from .files import write_text_atomic

__all__ = ["Scorecard", "SCHEMA_VERSION", "OUTPUT_FILES"]

SCHEMA_VERSION = 1
OUTPUT_FILES = ("scorecard.json", "report.html", "junit.xml", "summary.md")
REQUIRED_KEYS = ("schema_version", "name", "passed", "verdict", "metrics", "gates", "attacks", "probes", "defenses", "checks", "provenance")


def _clean(obj: Any) -> Any:
    """JSON has no NaN: a non-finite float becomes null rather than an invalid file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class Scorecard:
    """A run's result. Displays itself in Jupyter; `save(dir)` writes every output of a run."""

    def __init__(self, record: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"a scorecard record needs the keys {', '.join(missing)}")
        self.record = record

    name = property(lambda self: self.record["name"])
    passed = property(lambda self: bool(self.record["passed"]))
    verdict = property(lambda self: self.record["verdict"])
    metrics = property(lambda self: self.record["metrics"])
    gates = property(lambda self: self.record["gates"])
    attacks = property(lambda self: self.record["attacks"])
    checks = property(lambda self: self.record["checks"])
    provenance = property(lambda self: self.record["provenance"])

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return _clean(self.record)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    def save(self, directory: Union[str, Path]) -> Path:
        """Writes scorecard.json, report.html, junit.xml and summary.md, each atomically."""
        from . import render

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        record = self.to_dict()
        write_text_atomic(out / "report.html", render.report_html(record))
        write_text_atomic(out / "junit.xml", render.junit_xml(record))
        write_text_atomic(out / "summary.md", render.summary_md(record))
        write_text_atomic(out / "scorecard.json", self.to_json())  # last: its presence means the run is whole
        partial = out / "scorecard.partial.json"
        if partial.exists():
            partial.unlink()
        return out

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Scorecard":
        p = Path(path)
        if p.is_dir():
            p = p / "scorecard.json"
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInput(str(p), "scorecard not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(str(p), f"not a readable scorecard JSON ({type(e).__name__}: {e})") from None
        if not isinstance(record, dict):
            raise BadInput(str(p), "not a scorecard: the JSON is not an object")
        if record.get("schema_version") != SCHEMA_VERSION:
            raise BadInput(str(p), f"unsupported scorecard schema_version {record.get('schema_version')!r} (valid: {SCHEMA_VERSION})")
        try:
            return cls(record)
        except ValueError as e:
            raise BadInput(str(p), str(e)) from None

    def rejudge(self, gates: Optional[Sequence] = None, baseline: Optional["Scorecard"] = None) -> "Scorecard":
        """The same results judged again, with other gates and/or against a baseline; no re-run."""
        from .gates import gates_from_records, judge_gates, overall_verdict
        from .metrics import metric_counts

        gate_cfgs = list(gates) if gates is not None else gates_from_records(self.gates)
        judged = judge_gates(gate_cfgs, self.metrics, metric_counts(self.record), None if baseline is None else baseline.metrics)
        passed, verdict = overall_verdict(judged, self.checks)
        return Scorecard({**self.record, "gates": judged, "passed": passed, "verdict": verdict})

    def _repr_html_(self) -> str:
        from .render import compact_html

        return compact_html(self.to_dict())

    def __repr__(self) -> str:
        return f"<Scorecard {self.name!r} {self.verdict}: {len(self.gates)} gate(s), {len(self.attacks)} attack result(s)>"
