"""Stage 8, judge: the scorecard record (metrics, attacks, defended variants, probes, checks, per-class
results, example images, intervals, gates, verdict) and the per-sample outcomes the gates are judged
again with, so a max_drop gate against a baseline is a paired test."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from harness.evaluation.runner import Evaluation
    from harness.pipeline.context import RunContext

__all__ = ["judge", "record_of"]


def record_of(ctx: RunContext, ev: Evaluation, defended: Optional[tuple] = None, probed: Optional[tuple] = None,
              certified: Optional[tuple] = None) -> dict[str, Any]:
    """The scorecard record of `ev` (with the defended variants', probes' and certificates' records when given), judged
    by the config's gates; also what a partial save writes as the suite goes."""
    from harness.records.scorecard import SCHEMA_VERSION
    from harness.reports.images import class_records, encode_probe_images, example_records
    from harness.verdicts.gates import judge_gates, overall_verdict
    from harness.verdicts.metrics import interval_methods, metric_counts, metric_id, metric_intervals

    cfg, base_card = ctx.cfg, ctx.baseline
    records, extra_metrics, extra_checks = defended or ([], {}, [])
    probe_records, probe_metrics = probed or ([], {})
    cert_records, cert_metrics, cert_checks = certified or ([], {}, [])
    rec = {"schema_version": SCHEMA_VERSION, "name": cfg.name, "passed": False, "verdict": "inconclusive", "on_inconclusive": cfg.on_inconclusive,
           "metrics": {**ev.metrics(), **extra_metrics, **probe_metrics, **cert_metrics}, "gates": [], "attacks": [r.record() for r in ev.results],
           "probes": encode_probe_images(probe_records), "defenses": records, "certificates": cert_records, "checks": [*ev.checks, *extra_checks, *cert_checks],
           "provenance": {**ctx.provenance, "duration_s": round(time.perf_counter() - ctx.t0, 3)}}
    # pictures are the reporting layer's: evaluation hands over masks and pixels, reports make the PNGs
    rec["classes"] = class_records(ev, ctx.data.y, cfg.model.num_classes)
    labels = ctx.model_info.get("labels")  # a model that names its classes (a Hugging Face config's id2label)
    if labels and len(labels) >= len(rec["classes"]["ids"]):
        rec["classes"]["names"] = [labels[i] for i in rec["classes"]["ids"]]
    rec["examples"] = example_records(ev, ctx.data)
    # 95%: Wilson for every fraction with a sample count, plus the producers' own (AUROC, medians, ...)
    rec["intervals"] = metric_intervals(rec)
    rec["interval_methods"] = interval_methods(rec)
    for a in rec["attacks"]:
        a["ci95"] = rec["intervals"].get(metric_id("robust_accuracy", a["id"], a["epsilon"]))
    rec["gates"] = judge_gates(cfg.gates, rec["metrics"], metric_counts(rec), None if base_card is None else base_card.metrics,
                               baseline_counts=None if base_card is None else metric_counts(base_card.record),
                               on_inconclusive=cfg.on_inconclusive, intervals=rec["intervals"],
                               interval_methods=rec["interval_methods"])
    rec["passed"], rec["verdict"] = overall_verdict(rec["gates"], rec["checks"])
    return rec


def judge(ctx: RunContext) -> RunContext:
    from harness.reports.scorecard import Scorecard
    from harness.verdicts.outcomes import Outcomes

    record = record_of(ctx, ctx.evaluation, ctx.defended, ctx.probed, ctx.certified)
    outcomes = Outcomes.from_evaluation(ctx.evaluation, ctx.data)  # the samples' digests read from the source in batches
    ctx.card = Scorecard(record, outcomes).rejudge(ctx.cfg.gates, ctx.baseline)
    return ctx
