"""Per-sample outcomes, stored compactly beside a scorecard (outcomes.json).

For each fraction metric whose samples are the whole run (clean accuracy, robust accuracy per attack
and epsilon, the worst case per norm and epsilon), one bit per sample: True when the sample counted
as correct or robust. Samples are keyed by a stable id (their index in the full split), so two runs
can be paired sample by sample: a paired test (McNemar) says whether a drop is real, and the ids
that flipped say where. An id is only a position, so each sample also carries a digest of its
content (`sample_digests`), and two runs are paired only when `pairing` finds the same samples.

    {"schema_version": 1, "n": N, "ids": <base64 of little-endian int64>,
     "flags": {"<metric id>": <base64 of numpy.packbits(flags)>, ...},
     "labels": <base64 of little-endian int64, each sample's true class; optional>,
     "digests": <base64 of 8 bytes per sample, see sample_digests; optional (files before it lack it)>}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Mapping, Optional

import numpy as np

from harness.core.errors import BadInput

__all__ = ["Outcomes", "OUTCOMES_FILE", "OUTCOMES_SCHEMA_VERSION", "pack_bits", "unpack_bits", "sample_digests", "pairing",
           "DIGEST_BYTES"]

OUTCOMES_FILE = "outcomes.json"
OUTCOMES_SCHEMA_VERSION = 1
DIGEST_BYTES = 8  # of each sample's sha256: a chance collision among 10^6 samples has odds ~ 3e-8


class Outcomes:
    """Sample ids (int64, unique) and, per metric id, a bool per sample aligned with them."""

    def __init__(self, ids: Any, flags: Mapping[str, Any], labels: Any = None, digests: Any = None) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} of {ids.dtype}")
        ids = ids.astype(np.int64)
        problem = _ids_problem(ids)
        if problem:
            raise ValueError(problem)
        checked: dict[str, np.ndarray] = {}
        for metric, f in flags.items():
            f = np.asarray(f)
            if f.dtype != np.bool_ or f.shape != ids.shape:
                raise ValueError(f"flags[{metric!r}] must be a bool array of shape {ids.shape}, got {f.dtype} {f.shape}")
            checked[str(metric)] = f.copy()
        self.ids = ids
        self.flags = checked
        self.labels = None  # optional true labels, aligned with ids (for flips by class)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != ids.shape or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
                raise ValueError(f"labels must be integers of shape {ids.shape}, got {labels.dtype} {labels.shape}")
            self.labels = labels.astype(np.int64)
        self.digests: Optional[np.ndarray] = None  # (n, DIGEST_BYTES) uint8, what each sample holds
        if digests is not None:
            digests = np.asarray(digests)
            if digests.dtype != np.uint8 or digests.shape != (ids.shape[0], DIGEST_BYTES):
                raise ValueError(f"digests must be uint8 of shape ({ids.shape[0]}, {DIGEST_BYTES}), got {digests.dtype} {digests.shape}")
            self.digests = digests.copy()

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def __contains__(self, metric: object) -> bool:
        return metric in self.flags

    def __repr__(self) -> str:
        return f"<Outcomes {self.n} sample(s), {len(self.flags)} metric(s)>"

    @classmethod
    def from_evaluation(cls, ev: Any, data: Any) -> "Outcomes":
        """From a runner Evaluation and the sample source it scored (harness.sources.data.Data): clean
        accuracy, robust accuracy per attack entry and epsilon (or corruption and severity), and the worst
        case, keyed by the data's ids, with its labels and each sample's digest (see sample_digests),
        read a batch at a time."""
        flags = {k: _bools(v) for k, v in ev.flags().items()}
        labels = np.asarray(data.y.detach().cpu().numpy())
        parts = [sample_digests(x.numpy(), labels[rows.numpy()]) for rows, x in data.batches()]
        digests = np.concatenate(parts) if parts else np.empty((0, DIGEST_BYTES), dtype=np.uint8)
        return cls(np.asarray(data.ids.detach().cpu().numpy()), flags, labels, digests)

    def to_json(self) -> str:
        flags = {m: pack_bits(f) for m, f in self.flags.items()}
        body = {"schema_version": OUTCOMES_SCHEMA_VERSION, "n": self.n, "ids": _b64(self.ids.astype("<i8")), "flags": flags}
        if self.labels is not None:
            body["labels"] = _b64(self.labels.astype("<i8"))
        if self.digests is not None:
            body["digests"] = _b64(self.digests)
        return json.dumps(body, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Outcomes":
        """Parses outcomes.json; anything malformed is a BadInput naming `where` and the problem."""
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInput(where, f"not readable outcomes JSON ({type(e).__name__}: {e})") from None
        if not isinstance(body, dict):
            raise BadInput(where, "not per-sample outcomes: the JSON is not an object")
        missing = [k for k in ("schema_version", "n", "ids", "flags") if k not in body]
        if missing:
            raise BadInput(where, f"per-sample outcomes need the keys {', '.join(missing)}")
        if body["schema_version"] != OUTCOMES_SCHEMA_VERSION:
            raise BadInput(where, f"unsupported outcomes schema_version {body['schema_version']!r} (valid: {OUTCOMES_SCHEMA_VERSION})")
        n = body["n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadInput(where, f"n must be a non-negative integer, got {n!r}")
        raw = _unb64(body["ids"], where, "ids")
        if len(raw) != 8 * n:
            raise BadInput(where, f"ids: {len(raw)} bytes, expected {8 * n} (8 per sample for n={n})")
        ids = np.frombuffer(raw, dtype="<i8").astype(np.int64)
        problem = _ids_problem(ids)
        if problem:
            raise BadInput(where, f"ids: {problem}")
        if not isinstance(body["flags"], dict):
            raise BadInput(where, "flags must be an object of metric id -> packed bits")
        flags = {}
        for metric, packed in body["flags"].items():
            raw = _unb64(packed, where, f"flags[{metric!r}]")
            if len(raw) != (n + 7) // 8:
                raise BadInput(where, f"flags[{metric!r}]: {len(raw)} bytes, expected {(n + 7) // 8} for n={n}")
            bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
            if bits[n:].any():
                raise BadInput(where, f"flags[{metric!r}]: padding bits after sample {n} are set (a truncated or altered file)")
            flags[metric] = bits[:n].astype(bool)
        labels = None
        if body.get("labels") is not None:
            raw = _unb64(body["labels"], where, "labels")
            if len(raw) != 8 * n:
                raise BadInput(where, f"labels: {len(raw)} bytes, expected {8 * n} (8 per sample for n={n})")
            labels = np.frombuffer(raw, dtype="<i8").astype(np.int64)
        digests = None
        if body.get("digests") is not None:
            raw = _unb64(body["digests"], where, "digests")
            if len(raw) != DIGEST_BYTES * n:
                raise BadInput(where, f"digests: {len(raw)} bytes, expected {DIGEST_BYTES * n} ({DIGEST_BYTES} per sample for n={n})")
            digests = np.frombuffer(raw, dtype=np.uint8).reshape(n, DIGEST_BYTES)
        return cls(ids, flags, labels, digests)

    def _aligned(self, baseline: "Outcomes", metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(common ids, baseline flags, this run's flags) over the ids both share, sorted by id."""
        for side, o in (("this run", self), ("the baseline", baseline)):
            if metric not in o.flags:
                raise KeyError(f"{side} has no per-sample outcomes for {metric!r}")
        common, here, there = np.intersect1d(self.ids, baseline.ids, assume_unique=True, return_indices=True)
        return common, baseline.flags[metric][there], self.flags[metric][here]

    def pairs(self, baseline: "Outcomes", metric: str) -> tuple[int, int, int, int]:
        """(n11, n10, n01, n00) over the shared ids; the first index is the baseline's outcome, the
        second this run's (n10: right in the baseline, wrong now)."""
        _, before, now = self._aligned(baseline, metric)
        return (int(np.sum(before & now)), int(np.sum(before & ~now)), int(np.sum(~before & now)), int(np.sum(~before & ~now)))

    def flipped(self, baseline: "Outcomes", metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids that got worse, ids that got better) against the baseline, each sorted."""
        common, before, now = self._aligned(baseline, metric)
        return common[before & ~now], common[~before & now]


def sample_digests(x: Any, labels: Any) -> np.ndarray:
    """(n, DIGEST_BYTES) uint8: per sample, the first bytes of sha256 over its image as float32
    little-endian (C order) followed by its label as int64 little-endian. Equal digests at an id mean
    the two runs scored the same image with the same label there."""
    x = np.ascontiguousarray(np.asarray(x), dtype="<f4")
    labels = np.asarray(labels).astype("<i8")
    if x.ndim < 1 or labels.shape != (x.shape[0],):
        raise ValueError(f"need one label per image, got images {x.shape} and labels {labels.shape}")
    out = np.empty((x.shape[0], DIGEST_BYTES), dtype=np.uint8)
    for i in range(x.shape[0]):
        h = hashlib.sha256(x[i].tobytes())
        h.update(labels[i].tobytes())
        out[i] = np.frombuffer(h.digest()[:DIGEST_BYTES], dtype=np.uint8)
    return out


def pairing(candidate: Optional[Outcomes], baseline: Optional[Outcomes], min_overlap: float = 1.0) -> tuple[bool, str]:
    """Whether two runs' per-sample outcomes may be paired, and if not why: the one rule `harness
    compare` and the max_drop gates share. Paired when both carry digests, at least `min_overlap` of
    the candidate's ids are in the baseline, and every shared id holds the same sample in both. A
    different `limit` or seed's subset fails the overlap; a data set that gained or changed a sample
    (which moves every later id) fails the digests. Returns (True, "paired") or (False, why)."""
    if candidate is None or baseline is None:
        missing = [side for side, o in (("this run", candidate), ("the baseline", baseline)) if o is None]
        return False, f"no per-sample outcomes (outcomes.json) for {' and '.join(missing)}"
    lacking = [side for side, o in (("this run's", candidate), ("the baseline's", baseline)) if o.digests is None]
    if lacking:
        return False, (f"{' and '.join(lacking)} outcomes.json has no per-sample digests (written before they were recorded): "
                       "whether the ids name the same samples cannot be checked")
    common, here, there = np.intersect1d(candidate.ids, baseline.ids, assume_unique=True, return_indices=True)
    if candidate.n == 0 or common.size == 0:
        return False, "the two runs share no sample ids"
    overlap = common.size / candidate.n
    if overlap < min_overlap - 1e-12:
        return False, (f"only {common.size} of this run's {candidate.n} sample ids ({overlap:.1%}) are in the baseline, "
                       f"below min_overlap {min_overlap:g} (another data limit or seed's subset?)")
    differ = np.any(candidate.digests[here] != baseline.digests[there], axis=1)
    if differ.any():
        return False, (f"{int(differ.sum())} of the {common.size} shared sample ids hold different samples in the two runs "
                       f"(first: id {int(common[differ][0])}; the data changed, e.g. a file added before it)")
    return True, "paired"


def _ids_problem(ids: np.ndarray) -> str:
    if ids.size and int(ids.min()) < 0:
        return f"sample ids are indices into a split and cannot be negative, found {int(ids.min())}"
    uniq, counts = np.unique(ids, return_counts=True)
    if uniq.size != ids.size:
        return f"sample id {int(uniq[counts > 1][0])} appears {int(counts[counts > 1][0])} times (ids must be unique)"
    return ""


def _bools(t: Any) -> np.ndarray:
    return np.asarray(t.cpu().numpy() if hasattr(t, "cpu") else t, dtype=bool)


def pack_bits(mask: Any) -> str:
    """A bool vector (numpy or torch) as base64 of its packed bits."""
    return _b64(np.packbits(_bools(mask)))


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The inverse of pack_bits for n samples; ValueError when the text does not hold exactly that."""
    raw = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"packed bits hold {raw.size} bytes, expected {(n + 7) // 8} for {n} samples")
    return np.unpackbits(raw)[:n].astype(bool)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode("ascii")


def _unb64(value: Any, where: str, key: str) -> bytes:
    if not isinstance(value, str):
        raise BadInput(where, f"{key} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(where, f"{key}: not valid base64 ({e})") from None
