"""What a run has finished, saved beside its outputs so `harness run --resume` continues it.

`run-state.json` in the output directory holds every finished unit (an attack at one epsilon, a
minimal attack, a corruption at one severity) with its per-sample masks, written atomically after
each unit. It is tied to a fingerprint of the config (less `device`, `engine` and `tracking`: metrics do not depend on
them), the model's and the data's hashes and the harness version; a state with another fingerprint
is set aside rather than mixed into a different run. `SavedWork` is one run's view of it: where
it saves, what it restored, what it has finished.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from harness.core.files import write_text_atomic

__all__ = ["STATE_FILE", "PARTIAL_FILE", "SavedWork", "fingerprint", "save_state", "load_state"]

STATE_FILE = "run-state.json"
PARTIAL_FILE = "scorecard.partial.json"
_SCHEMA = 1
_MASKS = ("robust", "attacked", "broken")
_SCALARS = ("seconds", "violations", "nonfinite", "queries", "gradients", "target_hits", "cascade", "minimal")


def fingerprint(config: dict[str, Any], model_sha256: str, dataset_sha256: str, version: str) -> str:
    """What a saved state must match to be reused."""
    cfg = {k: v for k, v in config.items() if k not in ("device", "engine", "tracking")}  # where it ran does not change what it measured
    blob = json.dumps({"config": cfg, "model": model_sha256, "data": dataset_sha256, "harness": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _bits(mask) -> str:
    from harness.verdicts.outcomes import pack_bits

    return pack_bits(mask)


def _unbits(text: str, n: int):
    import torch

    from harness.verdicts.outcomes import unpack_bits

    return torch.from_numpy(unpack_bits(text, n))


def _floats(t) -> str:
    return base64.b64encode(t.float().contiguous().numpy().tobytes()).decode("ascii")


def _unfloats(text: str, n: int):
    import numpy as np
    import torch

    arr = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float32)
    if arr.size != n:
        raise ValueError(f"a float vector holds {arr.size} values, expected {n}")
    return torch.from_numpy(arr.copy())


def _num(v: Optional[float]) -> Any:
    return None if v is None else (v if math.isfinite(v) else str(v))


def _unnum(v: Any) -> Optional[float]:
    return None if v is None else float(v)


def _encode(r) -> dict[str, Any]:
    return {
        "unit": r.unit, "subject": r.subject, "label": r.label, "value": _num(r.value),
        **{k: _bits(getattr(r, k)) for k in _MASKS}, "distance": _floats(r.distance),
        **{k: getattr(r, k) for k in _SCALARS},
        "median_perturbation": _num(r.median_perturbation), "stages": r.stages, "params": r.params,
        "parts": [{"attack": p["attack"], "access": p["access"], "attacked": _bits(p["attacked"]), "broken": _bits(p["broken"])} for p in r.parts],
        "examples": [{"sample": i, "prediction": pred, "shape": list(adv.shape), "input": _floats(adv.flatten())} for i, adv, pred in r.examples],
    }


def save_state(path: Path, print_: str, n: int, results: Sequence[Any], probes: Optional[dict[str, dict]] = None) -> None:
    """Every finished attack unit (`results`) and probe unit (`probes`: unit -> its plain record)."""
    from harness.records.scorecard import encode_infinities

    record = {"schema_version": _SCHEMA, "fingerprint": print_, "n": n, "results": [_encode(r) for r in results],
              "probes": encode_infinities(probes or {})}  # an unthrottled burst's interval ends at inf
    write_text_atomic(path, json.dumps(record, allow_nan=False))


def load_state(path: Path, print_: str, n: int, attacks: Sequence[Any]) -> tuple[dict[str, list[Any]], dict[str, dict], str]:
    """The finished units of a saved run ({unit: [AttackResult]}, {probe unit: record}) and a line
    saying what was found.

    A missing, unreadable or foreign state (another fingerprint) gives no units: the run starts
    over, and the line says why."""
    from harness.evaluation.runner import AttackResult

    if not path.exists():
        return {}, {}, f"nothing to resume in {path.parent}: starting from the beginning"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("schema_version") != _SCHEMA:
            raise ValueError(f"unsupported schema_version {record.get('schema_version')!r}")
        if record.get("fingerprint") != print_ or record.get("n") != n:
            return {}, {}, (f"the saved work in {path} was made with another config, model or data (fingerprint differs): "
                            "it is set aside and the run starts over")
        done: dict[str, list[Any]] = {}
        for rec in record["results"]:
            index = int(rec["unit"].split("|", 1)[0])
            r = AttackResult(attacks[index], rec["subject"], rec["label"], _unnum(rec["value"]),
                             *(_unbits(rec[k], n) for k in _MASKS), _unfloats(rec["distance"], n),
                             **{k: rec[k] for k in _SCALARS}, median_perturbation=_unnum(rec["median_perturbation"]),
                             stages=rec["stages"], params=rec["params"], unit=rec["unit"],
                             parts=[{**p, "attacked": _unbits(p["attacked"], n), "broken": _unbits(p["broken"], n)} for p in rec["parts"]],
                             examples=[(int(e["sample"]), _unfloats(e["input"], math.prod(e["shape"])).view(*e["shape"]), int(e["prediction"]))
                                       for e in rec.get("examples", [])])
            done.setdefault(r.unit, []).append(r)
        probes = record.get("probes", {})
        if not isinstance(probes, dict):
            raise ValueError("probes must be an object")
        from harness.records.scorecard import decode_infinities

        probes = decode_infinities(probes)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return {}, {}, f"the saved work in {path} cannot be read ({type(e).__name__}: {e}): the run starts over"
    units = sum(len(v) for v in done.values()) + len(probes)
    return done, probes, f"resuming from {path.parent}: {units} finished result(s) reused"


@dataclass
class SavedWork:
    """One run's saved work: run-state.json and scorecard.partial.json in `out` (nothing without one),
    the units a resumed run restored (`done`), and the probe units finished so far (`probes`)."""

    out: Optional[Path]
    fingerprint: str
    n: int  # samples in the run
    done: dict[str, list[Any]] = field(default_factory=dict)  # attack unit -> its restored AttackResults
    probes: dict[str, dict] = field(default_factory=dict)  # probe unit -> its record, restored or new

    @property
    def state(self) -> Optional[Path]:
        return None if self.out is None else self.out / STATE_FILE

    @property
    def partial(self) -> Optional[Path]:
        return None if self.out is None else self.out / PARTIAL_FILE

    def restore(self, attacks: Sequence[Any]) -> str:
        """Takes in what a run into the same `out` finished, when it matches this run; says what it found."""
        if self.state is None:
            return "resume needs an output directory (out=) holding a saved run: starting from the beginning"
        self.done, self.probes, note = load_state(self.state, self.fingerprint, self.n, attacks)
        return note

    def save(self, results: Sequence[Any], record: dict[str, Any]) -> None:
        """The finished attack units (`results`) and probe units, and `record` as a partial scorecard."""
        from harness.reports.scorecard import Scorecard

        if self.state is None or self.partial is None:
            return
        self.state.parent.mkdir(parents=True, exist_ok=True)
        save_state(self.state, self.fingerprint, self.n, results, self.probes)
        write_text_atomic(self.partial, Scorecard({**record, "passed": False, "verdict": "inconclusive"}).to_json())

    def finish(self) -> None:
        """The run is whole: scorecard.json says everything the state did."""
        if self.state is not None and self.state.exists():
            self.state.unlink()
