"""The Scorecard: the object around a run's record (harness.records.scorecard), which writes every
output of a run (`save`), judges it again (`rejudge`) and displays itself in Jupyter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from harness.core.errors import BadInput
from harness.core.files import atomic_path, sha256_bytes, write_text_atomic
from harness.records.scorecard import (_SAVE_HASHES, OUTCOMES_FILE, OUTPUT_FILES, REQUIRED_KEYS, SCHEMA_VERSION, decode_infinities,
                                       encode_infinities, read_record)

if TYPE_CHECKING:  # pragma: no cover
    from harness.verdicts.outcomes import Outcomes

__all__ = ["Scorecard", "SCHEMA_VERSION", "OUTPUT_FILES", "decode_infinities", "read_record"]


def _write_bytes_atomic(path: Path, data: bytes) -> str:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return sha256_bytes(data)


class Scorecard:
    """A run's result. Displays itself in Jupyter; `save(dir)` writes every output of a run.

    `outcomes` (harness.verdicts.outcomes.Outcomes), when given, are the per-sample results behind the
    metrics; they are saved as outcomes.json and make max_drop gates a paired test.
    """

    def __init__(self, record: dict[str, Any], outcomes: Optional["Outcomes"] = None) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"a scorecard record needs the keys {', '.join(missing)}")
        self.record = decode_infinities(record)  # a record as saved (inf spelled "inf") gates like the run's
        self.outcomes = outcomes
        self.tracking: Optional[dict[str, str]] = None  # where the run was logged (MLflow run id); not part of the record

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
        return encode_infinities(self.record)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    def save(self, directory: Union[str, Path]) -> Path:
        """Writes report.html, junit.xml, summary.md, outcomes.json (when there are outcomes) and
        scorecard.json, each atomically; scorecard.json last, naming the others' sha256 in
        provenance.outputs and the digest of its verdict fields in provenance.verdict_sha256 (see
        harness.records.provenance.verdict_digest) so they can be verified."""
        from harness.reports import render
        from harness.records.provenance import verdict_digest

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        clean = self.to_dict()
        prov = {k: v for k, v in clean["provenance"].items() if k not in _SAVE_HASHES}
        record = decode_infinities({**clean, "provenance": prov})  # renderings never show a previous save's hashes; inf shows as ∞
        texts = {"report.html": render.report_html(record), "junit.xml": render.junit_xml(record), "summary.md": render.summary_md(record)}
        if self.outcomes is not None:
            texts[OUTCOMES_FILE] = self.outcomes.to_json()
        else:  # a stale file from another run must not be paired with this card
            (out / OUTCOMES_FILE).unlink(missing_ok=True)
        outputs = {name: _write_bytes_atomic(out / name, text.encode("utf-8")) for name, text in texts.items()}
        own = {k: v for k, v in self.record["provenance"].items() if k not in _SAVE_HASHES}
        self.record = {**self.record, "provenance": {**own, "outputs": outputs, "verdict_sha256": verdict_digest(self.record)}}
        write_text_atomic(out / "scorecard.json", self.to_json())  # last: its presence means the run is whole
        partial = out / "scorecard.partial.json"
        if partial.exists():
            partial.unlink()
        return out

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Scorecard":
        record, p = read_record(path)
        try:
            card = cls(record)
        except ValueError as e:
            raise BadInput(str(p), str(e)) from None
        card.outcomes = _load_outcomes(p.parent / OUTCOMES_FILE, record)
        return card

    def rejudge(self, gates: Optional[Sequence] = None, baseline: Optional["Scorecard"] = None,
                on_inconclusive: Optional[str] = None) -> "Scorecard":
        """The same results judged again, with other gates and/or against a baseline; no re-run.

        max_drop gates are paired over per-sample outcomes when harness.verdicts.outcomes.pairing finds both
        cards scored the same samples. `on_inconclusive` overrides the policy the card was judged with
        (record["on_inconclusive"]).
        """
        from harness.verdicts.gates import gates_from_records, judge_gates, overall_verdict
        from harness.verdicts.metrics import interval_methods, metric_counts, metric_intervals

        policy = on_inconclusive or self.record.get("on_inconclusive") or "fail"
        gate_cfgs = list(gates) if gates is not None else gates_from_records(self.gates)
        judged = judge_gates(gate_cfgs, self.metrics, metric_counts(self.record), None if baseline is None else baseline.metrics,
                             outcomes=self.outcomes, baseline_outcomes=None if baseline is None else baseline.outcomes,
                             baseline_counts=None if baseline is None else metric_counts(baseline.record), on_inconclusive=policy,
                             intervals=metric_intervals(self.record), interval_methods=interval_methods(self.record))
        passed, verdict = overall_verdict(judged, self.checks)
        record = {**self.record, "gates": judged, "passed": passed, "verdict": verdict}
        if on_inconclusive is not None:
            record["on_inconclusive"] = on_inconclusive
        return Scorecard(record, self.outcomes)

    def _repr_html_(self) -> str:
        from harness.reports.render import compact_html

        return compact_html(decode_infinities(self.to_dict()))

    def __repr__(self) -> str:
        return f"<Scorecard {self.name!r} {self.verdict}: {len(self.gates)} gate(s), {len(self.attacks)} attack result(s)>"


def _load_outcomes(path: Path, record: dict[str, Any]) -> Optional["Outcomes"]:
    """outcomes.json beside a scorecard, if it belongs to it: a file the scorecard's provenance.outputs
    leaves out is another run's and is ignored; one whose sha256 differs from the listed one is an error."""
    if not path.is_file():
        return None
    from harness.verdicts.outcomes import Outcomes

    prov = record["provenance"] if isinstance(record.get("provenance"), dict) else {}
    listed = prov.get("outputs")
    if isinstance(listed, dict) and OUTCOMES_FILE not in listed:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(str(path), f"cannot read the per-sample outcomes ({e.strerror})") from None
    if isinstance(listed, dict) and listed[OUTCOMES_FILE] != sha256_bytes(data):
        raise BadInput(str(path), "does not match the sha256 its scorecard.json records: the file was altered or belongs to another run")
    outcomes = Outcomes.from_json(data, str(path))
    samples = prov.get("samples")
    if isinstance(samples, int) and outcomes.n != samples:
        raise BadInput(str(path), f"holds {outcomes.n} samples but its scorecard was run on {samples}")
    return outcomes
