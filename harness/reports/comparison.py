"""Model versions side by side: scorecards compared metric by metric, gate by gate and sample by sample.

    comparison = harness.compare("reports/v1", "reports/v2")   # scorecards, or their paths
    comparison                                                   # displays itself in a notebook
    comparison.save("compare.html")

`compare_records` is the pure part: scorecards in, a comparison record (plain data) out. The first
scorecard is the reference every delta is taken against. Scorecards of different schema versions,
or measured on different data, or sharing no metric beyond clean accuracy, are refused (BadInput).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from harness.core.errors import BadInput
from harness.core.files import write_text_atomic
from harness.reports.scorecard import Scorecard

__all__ = ["compare", "compare_records", "Comparison"]

CardLike = Union[Scorecard, str, Path]

# +1: higher is better, -1: lower is better; families not listed are shown without a colour.
# Privacy: what a membership-inference attack or a model thief achieves is lower-better; a defense's fidelity drop higher-better.
# Certificates: certified accuracy higher-better; a smoothed classifier that abstains more answers less.
# An endpoint that throttles a fast client after fewer requests gives a thief less: lower-better.
DIRECTION = {"clean_accuracy": 1, "robust_accuracy": 1, "attack_success_rate": -1, "median_perturbation": 1,
             "tpr_at_fpr": -1, "auc": -1, "advantage": -1, "fidelity": -1, "stolen_accuracy": -1,
             "fidelity_drop": 1, "clean_accuracy_cost": -1, "certified_accuracy": 1, "abstain_rate": -1,
             "throttled_after": -1}
_TINY = 1e-12  # a change below this is float noise, not a change


def _family(metric: str) -> str:
    return metric.partition(":")[0].partition("@")[0]


def _disambiguated(names: Sequence[str]) -> list[str]:
    """Names made unique by numbering repeats: a, a -> a, a (2)."""
    out: list[str] = []
    for name in names:
        label, k = name, 1
        while label in out:
            k += 1
            label = f"{name} ({k})"
        out.append(label)
    return out


def _data_of(record: dict[str, Any]) -> tuple[Any, Any]:
    prov = record.get("provenance") or {}
    return prov.get("data_source"), prov.get("split")


def _check_comparable(cards: Sequence[Scorecard], labels: Sequence[str], where: Sequence[str]) -> None:
    """Raises BadInput naming the first scorecard that cannot be compared with the reference, and why."""
    if len(cards) < 2:
        raise BadInput("compare", f"needs at least two scorecards to compare, got {len(cards)}")
    ref, ref_label = cards[0].record, labels[0]
    for card, label, src in zip(cards[1:], labels[1:], where[1:]):
        rec = card.record
        if rec.get("schema_version") != ref.get("schema_version"):
            raise BadInput(src, f"scorecard schema_version {rec.get('schema_version')!r} of {label!r} differs from "
                                f"{ref.get('schema_version')!r} of the reference {ref_label!r}: they cannot be compared")
        (s1, p1), (s2, p2) = _data_of(ref), _data_of(rec)
        if (s1, p1) != (s2, p2):
            raise BadInput(src, f"incomparable suites: {label!r} was measured on {s2} (split {p2}) but the reference "
                                f"{ref_label!r} on {s1} (split {p1})")
        h1, h2 = ((r.get("provenance") or {}).get("dataset_sha256") for r in (ref, rec))
        if h1 and h2 and h1 != h2:
            raise BadInput(src, f"incomparable suites: {label!r} and the reference {ref_label!r} both use {s1} (split {p1}) "
                                f"but different samples: dataset_sha256 {h2[:12]}... vs {h1[:12]}... "
                                "(another data limit or seed, or the data changed)")
    shared = set.intersection(*(set(_values(c.record)) for c in cards)) - {"clean_accuracy"}
    if not shared:
        raise BadInput(where[-1] if len(cards) == 2 else "compare",
                       f"incomparable suites: {', '.join(repr(x) for x in labels)} share no metric beyond clean_accuracy "
                       "(different attacks, norms or epsilons)")


def _values(record: dict[str, Any]) -> dict[str, float]:
    """The metrics with a number (a null, from a non-finite value, cannot be compared)."""
    return {k: v for k, v in record.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _intervals(record: dict[str, Any]) -> dict[str, list[float]]:
    if isinstance(record.get("intervals"), dict):
        return record["intervals"]
    from harness.verdicts.metrics import metric_intervals

    return metric_intervals(record)  # a scorecard saved before intervals were recorded


def _status(metric: str, ref_value: float, value: float, interval: Optional[list[float]]) -> str:
    """regression, improvement or neutral: beyond the reference's 95% interval when it has one,
    else any change in the metric's worse or better direction."""
    direction = DIRECTION.get(_family(metric), 0)
    if direction == 0:
        return "neutral"
    lo, hi = interval if interval else (ref_value - _TINY, ref_value + _TINY)
    if value < lo - _TINY:
        return "regression" if direction > 0 else "improvement"
    if value > hi + _TINY:
        return "improvement" if direction > 0 else "regression"
    return "neutral"


def _metric_rows(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(shared metrics with values, deltas and statuses; metrics only some versions have)."""
    values = [_values(r) for r in records]
    ref_iv = _intervals(records[0])
    order: list[str] = []
    for v in values:
        order += [m for m in v if m not in order]
    shared, partial = [], []
    for m in order:
        have = [i for i, v in enumerate(values) if m in v]
        if len(have) < len(values):
            missing = [labels[i] for i in range(len(values)) if i not in have]
            partial.append({"metric": m, "in": [labels[i] for i in have], "missing": missing})
            continue
        ref = values[0][m]
        interval = ref_iv.get(m) if DIRECTION.get(_family(m)) is not None else None
        shared.append({
            "metric": m, "family": _family(m), "values": [v[m] for v in values], "ref_ci95": interval,
            "basis": "ci95" if interval else "point",
            "deltas": [None] + [v[m] - ref for v in values[1:]],
            "status": [None] + [_status(m, ref, v[m], interval) for v in values[1:]],
        })
    return shared, partial


def _gate_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct gate (metric, op, threshold) with every version's verdict (None: not gated there)."""
    keys: list[tuple] = []
    found: list[dict[tuple, dict]] = []
    for r in records:
        mine = {}
        for g in r.get("gates", []):
            key = (g["metric"], g["op"], g["threshold"])
            mine.setdefault(key, g)
            if key not in keys:
                keys.append(key)
        found.append(mine)
    return [{"metric": m, "op": op, "threshold": t,
             "verdicts": [f[(m, op, t)]["verdict"] if (m, op, t) in f else None for f in found],
             "values": [f[(m, op, t)].get("value") if (m, op, t) in f else None for f in found]}
            for m, op, t in keys]


def _curve_rows(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, list[list[float]]]]:
    """Per norm, each version's worst-case line (its per-attack lines where it has no worst case)."""
    from harness.core.curves import curves

    out: dict[str, dict[str, list[list[float]]]] = {}
    for r, label in zip(records, labels):
        for norm, lines in curves(r).items():
            chosen = {"worst": lines["worst"]} if "worst" in lines else lines
            for name, pts in chosen.items():
                out.setdefault(norm, {})[f"{label}: {name}"] = [[float(x), float(y)] for x, y in pts]
    return {norm: out[norm] for norm in sorted(out)}


def _privacy_rows(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per membership probe id, each version's ROC (and the FPR floor of the version that resolves the
    lowest rates); per extraction probe id, each version's fidelity against the budget, undefended and
    per output defense."""
    from harness.reports.privacy import roc_floor

    membership: dict[str, dict[str, Any]] = {}
    extraction: dict[str, dict[str, Any]] = {}
    for r, label in zip(records, labels):
        for p in r.get("probes") or []:
            if not isinstance(p, dict):
                continue
            pid = str(p.get("id"))
            if p.get("kind") == "membership":
                roc = p.get("roc") or {}
                entry = membership.setdefault(pid, {"id": pid, "floor": 1.0, "lines": {}})
                entry["lines"][label] = [[float(x), float(y)] for x, y in zip(roc.get("fpr") or [], roc.get("tpr") or [])
                                         if _number(x) and _number(y)]
                entry["floor"] = min(entry["floor"], roc_floor((p.get("evaluation") or {}).get("n_nonmembers")))
            elif p.get("kind") == "extraction" and _number(p.get("budget")):
                entry = extraction.setdefault(pid, {"id": pid, "versions": [], "kinds": [], "lines": {}})
                if label not in entry["versions"]:
                    entry["versions"].append(label)
                answers = [("undefended", p)] + [(str(d.get("defense")), d) for d in p.get("defenses") or [] if isinstance(d, dict)]
                for kind, source in answers:
                    if kind not in entry["kinds"]:
                        entry["kinds"].append(kind)
                    if _number(source.get("fidelity")):
                        entry["lines"].setdefault(f"{label}: {kind}", []).append([float(p["budget"]), float(source["fidelity"])])
    for entry in extraction.values():
        entry["lines"] = {k: sorted(v) for k, v in entry["lines"].items()}
    return {"membership": list(membership.values()), "extraction": list(extraction.values())}


def _certificate_rows(records: Sequence[dict[str, Any]], labels: Sequence[str], shared: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per certificate id two or more versions carry: each version's curves and, per level, its figures
    with the status its certified accuracy has in the shared metrics."""
    from harness.reports.certificates import compare_certificates

    return compare_certificates(records, labels, {row["metric"]: row["status"] for row in shared})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flip_rows(cards: Sequence[Scorecard], labels: Sequence[str], shared: Sequence[str]) -> list[dict[str, Any]]:
    """Per non-reference version: per shared robust accuracy both carry per-sample outcomes for, how
    many samples went robust -> broken and back against the reference, McNemar's p, and by class.
    Only where harness.verdicts.outcomes.pairing (the rule max_drop gates use) finds the same samples; else
    the row's note says why it is not paired."""
    from harness.core.stats import mcnemar_p_value
    from harness.verdicts.outcomes import pairing

    ref = cards[0].outcomes
    out = []
    for card, label in zip(cards[1:], labels[1:]):
        row: dict[str, Any] = {"version": label, "metrics": [], "note": ""}
        out.append(row)
        mine = card.outcomes
        if ref is None or mine is None:
            missing = [lab for lab, o in ((labels[0], ref), (label, mine)) if o is None]
            row["note"] = f"no per-sample outcomes (outcomes.json) for {' and '.join(missing)}"
            continue
        paired, why = pairing(mine, ref)
        if not paired:
            row["note"] = f"not paired sample by sample: {why}"
            continue
        import numpy as np

        common = np.intersect1d(ref.ids, mine.ids)
        label_of = _labels_by_id(mine) or _labels_by_id(ref)
        for m in shared:
            if not m.startswith("robust_accuracy:") or m not in ref or m not in mine:
                continue
            n11, n10, n01, n00 = mine.pairs(ref, m)
            lost, gained = mine.flipped(ref, m)
            by_class = None
            if label_of is not None:
                lost_by, gained_by = (Counter(label_of[i] for i in ids.tolist()) for ids in (lost, gained))
                by_class = [{"class": c, "lost": lost_by[c], "gained": gained_by[c]}
                            for c in sorted({label_of[i] for i in common.tolist()})]
            row["metrics"].append({"metric": m, "n_pairs": n11 + n10 + n01 + n00, "robust_to_broken": n10,
                                   "broken_to_robust": n01, "p_value": mcnemar_p_value(n10, n01), "by_class": by_class})
    return out


def _labels_by_id(outcomes: Any) -> Optional[dict[int, int]]:
    if outcomes.labels is None:
        return None
    return dict(zip(outcomes.ids.tolist(), outcomes.labels.tolist()))


def compare_records(cards: Sequence[Scorecard], labels: Optional[Sequence[str]] = None, *,
                    where: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The comparison of scorecards as a plain record; the first card is the reference.

    `labels` name the versions (default: the scorecards' names), made unique by numbering repeats;
    `where` names each card in error messages (default: its label). Raises BadInput when the cards
    cannot be compared, saying why.
    """
    cards = list(cards)
    if labels is not None and len(labels) != len(cards):
        raise BadInput("--label", f"{len(labels)} label(s) for {len(cards)} scorecard(s): give one per scorecard or none")
    labels = _disambiguated([str(x) for x in (labels if labels is not None else [c.record.get("name", "?") for c in cards])])
    where = list(where) if where is not None else list(labels)
    _check_comparable(cards, labels, where)
    records = [c.record for c in cards]
    shared, partial = _metric_rows(records, labels)
    versions = []
    for i, (r, label) in enumerate(zip(records, labels)):
        prov = r.get("provenance") or {}
        statuses = [row["status"][i] for row in shared]
        versions.append({
            "label": label, "name": r.get("name"), "verdict": r.get("verdict"), "passed": r.get("passed"),
            "model_sha256": prov.get("model_sha256"), "model_source": prov.get("model_source"),
            "seed": prov.get("seed"), "started_at": prov.get("started_at"), "samples": prov.get("samples"),
            "worst": {m: v for m, v in _values(r).items() if m.startswith("robust_accuracy:worst-")},
            "clean_accuracy": _values(r).get("clean_accuracy"),
            "outcomes": cards[i].outcomes is not None,
            "regressions": None if i == 0 else statuses.count("regression"),
            "improvements": None if i == 0 else statuses.count("improvement"),
        })
    source, split = _data_of(records[0])
    return {
        "reference": labels[0], "versions": versions,
        "data": {"source": source, "split": split, "dataset_sha256": (records[0].get("provenance") or {}).get("dataset_sha256")},
        "metrics": shared, "partial_metrics": partial, "gates": _gate_rows(records),
        "curves": _curve_rows(records, labels), "privacy": _privacy_rows(records, labels),
        "certificates": _certificate_rows(records, labels, shared),
        "flips": _flip_rows(cards, labels, [row["metric"] for row in shared]),
    }


class Comparison:
    """A comparison of model versions. Displays itself in Jupyter; `save(path)` writes compare.html."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    @property
    def labels(self) -> list[str]:
        return [v["label"] for v in self.record["versions"]]

    def to_html(self) -> str:
        """The whole page: self-contained, no script, no network load (a CSP forbids them)."""
        return _render(self.record, compact=False)

    def _repr_html_(self) -> str:
        return _render(self.record, compact=True)

    def save(self, path: Union[str, Path]) -> Path:
        p = Path(path)
        html = self.to_html()
        try:
            write_text_atomic(p, html)
        except OSError as e:
            raise BadInput(str(p), f"cannot write the comparison ({e.strerror or e})") from None
        return p

    def summary_lines(self) -> list[str]:
        """A few lines of text: per version its verdict, worst-case metrics and regressions."""
        ref = self.record["reference"]
        lines = []
        for v in self.record["versions"]:
            worst = ", ".join(f"{m.removeprefix('robust_accuracy:')} {x:.4f}" for m, x in v["worst"].items())
            clean = "n/a" if v["clean_accuracy"] is None else f"{v['clean_accuracy']:.4f}"
            head = f"{v['label']}: {str(v['verdict']).upper()}  clean {clean}" + (f"; {worst}" if worst else "")
            tail = (" (reference)" if v["regressions"] is None
                    else f"; {v['regressions']} regression(s), {v['improvements']} improvement(s) against {ref}")
            lines.append(head + tail)
        for f in self.record["flips"]:
            for m in f["metrics"]:
                if m["metric"].startswith("robust_accuracy:worst-"):
                    lines.append(f"  {f['version']} vs {ref}, {m['metric'].removeprefix('robust_accuracy:')}: "
                                 f"{m['robust_to_broken']} robust -> broken, {m['broken_to_robust']} broken -> robust "
                                 f"of {m['n_pairs']} (McNemar p={m['p_value']:.3g})")
        return lines

    def __repr__(self) -> str:
        return f"<Comparison of {len(self.labels)} versions: {', '.join(self.labels)}>"


def _render(record: dict[str, Any], compact: bool) -> str:
    import jinja2
    from markupsafe import Markup

    from harness.reports.certificates import compare_svg
    from harness.reports.privacy import _DASHES, budget_svg, roc_svg
    from harness.reports.render import _PALETTE, curve_svg

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=4: "–" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)
    env.filters["delta"] = lambda v, d=4: "–" if v is None else f"{v:+.{d}f}".replace("-", "−")
    env.filters["pvalue"] = lambda p: f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
    charts = [(norm, Markup(curve_svg(norm, {k: [tuple(p) for p in pts] for k, pts in lines.items()})))
              for norm, lines in record["curves"].items()]
    privacy = record.get("privacy") or {}  # a comparison record saved before privacy probes had none
    colour = {v["label"]: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(record["versions"])}  # one per version
    rocs = [(m["id"], Markup(roc_svg({k: [tuple(p) for p in pts] for k, pts in m["lines"].items()}, floor=m["floor"],
                                     colours=colour, title=f"{m['id']}: membership ROC per version, log-log")))
            for m in privacy.get("membership", [])]
    thefts = []
    for e in privacy.get("extraction", []):
        lines = [{"name": f"{v}: {k}", "points": [tuple(p) for p in e["lines"][f"{v}: {k}"]], "colour": colour.get(v),
                  "dash": _DASHES[j % len(_DASHES)]} for v in e["versions"] for j, k in enumerate(e["kinds"]) if f"{v}: {k}" in e["lines"]]
        thefts.append((e["id"], Markup(budget_svg(lines, title=f"{e['id']}: fidelity against the query budget per version",
                                                  y_label="fidelity (agreement with the victim)"))))
    certs = [(e, Markup(compare_svg(e, colour))) for e in record.get("certificates") or []]  # none in an older comparison record
    return env.get_template("compare.html.j2").render(c=record, charts=charts, rocs=rocs, thefts=thefts, certs=certs, compact=compact)


def _load(card: CardLike, i: int) -> tuple[Scorecard, str]:
    if isinstance(card, Scorecard):
        return card, f"scorecard {i + 1}"
    if isinstance(card, (str, Path)):
        return Scorecard.load(card), str(card)
    raise BadInput(f"scorecard {i + 1}", f"expected a Scorecard or the path of a scorecard.json, got {type(card).__name__}")


def compare(*cards: CardLike, labels: Optional[Sequence[str]] = None, out: Optional[Union[str, Path]] = None) -> Comparison:
    """Compares model versions: Scorecards or paths (a scorecard.json or its directory), the first
    the reference. Writes the HTML page to `out` when given. Raises BadInput when they are not comparable."""
    loaded = [_load(c, i) for i, c in enumerate(cards)]
    comparison = Comparison(compare_records([c for c, _ in loaded], labels, where=[w for _, w in loaded]))
    if out is not None:
        comparison.save(out)
    return comparison
