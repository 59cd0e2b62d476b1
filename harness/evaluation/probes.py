"""The `probes:` section: poisoning probes over fractions, scans of a training set or a model, and
privacy probes (membership inference, extraction: harness.evaluation.privacy).

Two kinds of poisoning entry:

- a probe (`badnets`, `clean-label`, `label-flip`; `harness list probes`) over `fractions`: for
  each, the training set is poisoned, a model trained with the config's recipe (`train:` over the
  builtin model's own), and `attack_success_rate:<id>@<fraction>` (triggered test samples of other
  classes classified as the target) and `clean_accuracy:<id>@<fraction>` recorded. `scans:` on
  the entry run on what the probe planted, so the scan's precision and recall are known:
  `scan_precision:<id>/<scan>@<fraction>`, `scan_recall:...`, and for Neural Cleanse on the
  poisoned model `anomaly_index:<id>/neural-cleanse@<fraction>`.
- a scan on its own (`activation-clustering`, `spectral-signatures` over the configured training
  data with the config's model; `neural-cleanse` of the config's model): flagged sample ids go to
  a file beside the scorecard; `flagged_fraction:<scan>` or `anomaly_index:neural-cleanse`.

Each probe fraction is a unit of the run's saved state: an interrupted run resumes after the last
finished one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.attacks.scans import SCANS, check_probe_name  # noqa: F401 (importable from here, as before)
from harness.config.metric_ids import probe_metric_ids  # noqa: F401
from harness.core.errors import BadInput
from harness.core.ids import metric_id
from harness.core.stats import paired_drop_interval
from harness.evaluation.entries import whole, wilson_entry

_wilson = wilson_entry  # the name this module's interval entries had before they were shared
from harness.evaluation.privacy import evaluate_privacy, is_privacy

__all__ = ["SCANS", "probe_metric_ids", "evaluate_probes", "PIXEL_KEYS"]

# Pictures leave evaluation as raw pixels, (C, H, W) nested lists in [0, 1], under these keys; the
# reporting layer (harness.reports.images.encode_probe_images) turns each into a PNG under the key
# without the suffix ("trigger", "mask", "pattern") before the scorecard is written.
PIXEL_KEYS = ("trigger_pixels", "mask_pixels", "pattern_pixels")


def _scan_training_set(scan: str, model, x: torch.Tensor, y: torch.Tensor, poisoned_ids, params: dict) -> dict[str, Any]:
    from harness.attacks import scans

    feats = scans.penultimate(model, x)
    if scan == "activation-clustering":
        flagged = scans.activation_clustering(feats, y, **params)
    else:
        flagged = scans.spectral_signatures(feats, y, **params)
    mask = flagged[0] if isinstance(flagged, tuple) else flagged
    return scans.scan_report(mask, poisoned_ids)


def _neural_cleanse(model, x, y, num_classes: int, params: dict) -> dict[str, Any]:
    from harness.attacks import scans

    res = scans.neural_cleanse(model, x, y, num_classes=num_classes, **params)
    out = {k: _plain(v) for k, v in res.items() if k not in ("mask", "pattern")}
    for key in ("mask", "pattern"):
        t = res.get(key)
        if isinstance(t, torch.Tensor):
            img = t.detach().float().cpu()
            out[f"{key}_pixels"] = (img if img.dim() == 3 else img.unsqueeze(0)).tolist()
    return out


def _pixels(image: torch.Tensor) -> list:
    """A (C, H, W) picture as the raw pixels a record carries (float32 values, so its PNG is exact)."""
    return image.detach().float().cpu().tolist()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _check_fractions(i: int, entry, probe, train) -> None:
    most = probe.max_fraction(train.y) if hasattr(probe, "max_fraction") else 1.0
    over = [f.label for f in entry.fractions if f.value > most]
    if over:
        raise BadInput(f"probes[{i}].fractions", f"{entry.name} can poison at most {most:.4f} of this training set "
                       f"({len(train)} samples), not {', '.join(over)}")


def _spread(cfg, engine, test, train_loader, make_model, num_classes: int, out: Optional[Path], done: dict[str, dict],
            emit: Callable[[str, dict], None]) -> tuple[dict[str, tuple], Any]:
    """Every unfinished poisoning fraction (each a training run, independent of the others) as a job on
    the engine's workers, all at once; each is written and saved as it returns. Returns the finished
    ones by unit, and the training data if it was loaded."""
    pending = [(i, entry, f) for i, entry in enumerate(cfg.probes) if entry.name not in SCANS
               for f in entry.fractions if f"probe|{i}|{entry.probe_id}|{f.label}" not in done]
    if not pending:
        return {}, None
    train = train_loader()
    for i in dict.fromkeys(i for i, _, _ in pending):
        _check_fractions(i, cfg.probes[i], cfg.probes[i].build(), train)
    model_ref, train_ref, test_ref = engine.share_model(make_model(False)), engine.share_data(train), engine.share_data(test)
    units = [f"probe|{i}|{entry.probe_id}|{f.label}" for i, entry, f in pending]
    computed: dict[str, tuple] = {}

    def finished(k: int, result: tuple) -> None:
        computed[units[k]] = result
        _write_scans(out, result[1])
        emit(units[k], result[0])

    engine.map(fraction_job, [(cfg, i, f.label, model_ref, train_ref, test_ref, num_classes) for i, _, f in pending], on_done=finished)
    return computed, train


def evaluate_probes(cfg, model, test, train_loader: Callable[[], Any], make_model: Callable[[bool], Any], device, out: Optional[Path],
                    done: dict[str, dict], emit: Callable[[str, dict], None], engine: Any = None,
                    base: Path = Path(".")) -> tuple[list[dict], dict[str, float]]:
    """Every `probes:` entry: (scorecard records, metrics). `train_loader()` gives the training Data,
    `make_model(fine_tune)` a model to poison-train (the config's weights, or freshly initialized);
    units in `done` (a resumed run) are reused; `emit(unit, record)` saves each as it finishes. On an
    engine with workers (one that can `map` jobs: Ray), the poisoning fractions train side by side
    there, each as `fraction_job`; scans run here. Privacy entries run through
    harness.evaluation.privacy (their shadow models and query budgets spread the same way); `base`
    is where a thief's model source is found."""
    records: list[dict] = []
    metrics: dict[str, float] = {}
    train = None
    num_classes = int(max(int(test.y.max()), 0) + 1)
    computed: dict[str, tuple] = {}
    if hasattr(engine, "map"):
        computed, train = _spread(cfg, engine, test, train_loader, make_model, num_classes, out, done, emit)
    for i, entry in enumerate(cfg.probes):
        if is_privacy(entry.name):
            for rec in evaluate_privacy(cfg, i, model, test, train_loader, make_model, device, out, done, emit, engine, base):
                records.append(rec)
                metrics.update(rec["metrics"])
            continue
        if entry.name in SCANS:
            unit = f"probe|{i}|{entry.probe_id}"
            rec = done.get(unit)
            if rec is None:
                t0 = time.perf_counter()
                if entry.name == "neural-cleanse":
                    res = _neural_cleanse(model, whole(test).to(device), test.y.to(device), num_classes, entry.params)
                    rec = {"id": entry.probe_id, "name": entry.name, "kind": "model-scan", **_plain(res),
                           "seconds": round(time.perf_counter() - t0, 3)}
                    metrics_of = {metric_id("anomaly_index", "neural-cleanse"): rec.get("anomaly_index")}
                    rec["metric_intervals"] = {metric_id("anomaly_index", "neural-cleanse"): _point(ANOMALY_WHY)}
                else:
                    train = train if train is not None else train_loader()
                    report = _scan_training_set(entry.name, model, whole(train).to(device), train.y.to(device), None, entry.params)
                    ids = [int(train.ids[j]) for j in report.get("flagged_ids", [])]
                    if out is not None:
                        scans_module().write_flagged(Path(out) / "scans" / f"{entry.probe_id}.json", ids, scan=entry.name)
                    rec = {"id": entry.probe_id, "name": entry.name, "kind": "data-scan", "n": len(train),
                           "n_flagged": len(ids), "flagged_fraction": len(ids) / max(1, len(train)),
                           "flagged_file": f"scans/{entry.probe_id}.json", "seconds": round(time.perf_counter() - t0, 3)}
                    metrics_of = {metric_id("flagged_fraction", entry.probe_id): rec["flagged_fraction"]}
                    rec["metric_intervals"] = {metric_id("flagged_fraction", entry.probe_id): wilson_entry(len(ids), len(train))}
                rec["metrics"] = metrics_of
                emit(unit, rec)
            records.append(rec)
            metrics.update(rec["metrics"])
            continue
        probe = entry.build()
        if any(f"probe|{i}|{entry.probe_id}|{f.label}" not in done for f in entry.fractions):
            train = train if train is not None else train_loader()
            _check_fractions(i, entry, probe, train)
        for f in entry.fractions:
            unit = f"probe|{i}|{entry.probe_id}|{f.label}"
            rec = done.get(unit)
            if rec is None:
                train = train if train is not None or unit in computed else train_loader()
                rec, files = computed[unit] if unit in computed else fraction_record(cfg, i, entry, probe, f, train, test, make_model,
                                                                                     device, num_classes)
                if unit not in computed:
                    _write_scans(out, files)
                    emit(unit, rec)
            records.append(rec)
            metrics.update(rec["metrics"])
    return records, {k: v for k, v in metrics.items() if v is not None}


def fraction_record(cfg, i: int, entry, probe, f, train, test, make_model: Callable[[bool], Any], device,
                    num_classes: int) -> tuple[dict[str, Any], list[tuple[str, list[int], str]]]:
    """One fraction of a poisoning probe: poison, train, measure, scan. Returns its record and the
    scan files to write beside the scorecard ((relative path, flagged ids, scan)): the caller writes
    them, since this may run on a worker that does not see the output directory."""
    fine_tune = bool(getattr(probe, "fine_tune", False))
    files: list[tuple[str, list[int], str]] = []
    from harness.config.train import train_plan

    t0 = time.perf_counter()
    plan = train_plan(cfg)
    res = probe.run(lambda: make_model(fine_tune), (whole(train), train.y), (whole(test), test.y), f.value, plan,
                    device, plan.seed if plan.seed is not None else cfg.seed)
    rec = {"id": entry.probe_id, "name": entry.name, "kind": "probe", "fraction": f.label, "fraction_value": f.value,
           **{k: _plain(_rounded(getattr(res, k))) for k in ("attack_success_rate", "clean_accuracy", "clean_accuracy_baseline",
                                                             "n_poisoned", "target") if hasattr(res, k)},
           "n_test": len(test),
           "n_triggered": int((test.y != int(res.target)).sum()) if getattr(res, "target", None) is not None else 0,
           "seconds": round(time.perf_counter() - t0, 3), "scans": []}
    ms = {metric_id("clean_accuracy", entry.probe_id, f.label): rec["clean_accuracy"]}
    if rec.get("attack_success_rate") is not None:
        ms[metric_id("attack_success_rate", entry.probe_id, f.label)] = rec["attack_success_rate"]
    intervals: dict[str, dict] = {}
    if entry.name == "label-flip" and rec.get("clean_accuracy_baseline") is not None:
        cost = metric_id("clean_accuracy_cost", entry.probe_id, f.label)
        ms[cost] = rec["clean_accuracy_baseline"] - rec["clean_accuracy"]
        intervals[cost] = _paired_cost(getattr(res, "discordant", None), len(test))
        rec["n_discordant"] = list(res.discordant) if getattr(res, "discordant", None) is not None else None
    poisoned_x, poisoned_y = getattr(res, "poisoned_train", None) or (whole(train), train.y)
    for scan in entry.scans:
        subject = f"{entry.probe_id}/{scan}"
        if scan == "neural-cleanse":
            nc = _neural_cleanse(res.model, whole(test).to(device), test.y.to(device), num_classes, {})
            rec["scans"].append({"scan": scan, **_plain(nc)})
            ms[metric_id("anomaly_index", subject, f.label)] = nc.get("anomaly_index")
            intervals[metric_id("anomaly_index", subject, f.label)] = _point(ANOMALY_WHY)
        else:
            planted = [int(j) for j in getattr(res, "poisoned_ids", [])]
            knobs = {}
            if scan == "spectral-signatures" and planted:  # the paper's protocol: eps is the poisoned share of the class
                in_target = int((poisoned_y == int(res.target)).sum()) if getattr(res, "target", None) is not None else 0
                knobs["eps"] = min(1.0, len(planted) / in_target) if in_target else 0.05
            report = _scan_training_set(scan, res.model, poisoned_x.to(device), poisoned_y.to(device), planted, knobs)
            flagged_ids = [int(j) for j in report.get("flagged_ids", [])]
            files.append((f"scans/{entry.probe_id}@{f.label}-{scan}.json", flagged_ids, scan))
            rec["scans"].append({"scan": scan, **{k: _plain(v) for k, v in report.items() if k != "flagged_ids"},
                                 "flagged_file": f"scans/{entry.probe_id}@{f.label}-{scan}.json"})
            ms[metric_id("scan_precision", subject, f.label)] = report.get("precision")
            ms[metric_id("scan_recall", subject, f.label)] = report.get("recall")
            hits = int(report.get("true_positives", 0))
            intervals[metric_id("scan_precision", subject, f.label)] = wilson_entry(hits, int(report["n_flagged"]))
            intervals[metric_id("scan_recall", subject, f.label)] = wilson_entry(hits, int(report.get("n_poisoned", 0)))
    if all(hasattr(probe, k) for k in ("size", "position", "pattern")):
        from harness.attacks.poisoning import trigger_image

        rec["trigger_pixels"] = _pixels(trigger_image(tuple(test.shape), probe.size, probe.position, probe.pattern))
    rec["metrics"], rec["metric_intervals"] = ms, intervals
    return rec, files


def fraction_job(worker: Any, cfg, i: int, label: str, model_ref: Any, train_ref: Any, test_ref: Any, num_classes: int) -> tuple:
    """fraction_record on an engine's worker (harness.engines.cluster.RayEngine.map): the model,
    training and test data rebuilt there from their recipes; a fresh model for every training."""
    entry = cfg.probes[i]
    f = next(f for f in entry.fractions if f.label == label)
    return fraction_record(cfg, i, entry, entry.build(), f, worker.data(train_ref), worker.data(test_ref),
                           lambda fine_tune: worker.fresh_model(model_ref), worker.device, num_classes)


def _write_scans(out: Optional[Path], files: list[tuple[str, list[int], str]]) -> None:
    if out is not None:
        for rel, ids, scan in files:
            scans_module().write_flagged(Path(out) / rel, ids, scan=scan)


ANOMALY_WHY = ("the anomaly index is one class's distance from the median reversed-trigger norm over the model's classes, "
               "in units of their median absolute deviation: a statistic of one optimisation per class on one model, with "
               "no sampling model to put an interval on; it is judged on its point value")


def _point(why: str) -> dict[str, Any]:
    return {"ci95": None, "method": "point", "n": None, "why": why}


def _paired_cost(discordant: Optional[tuple[int, int]], n: int) -> dict[str, Any]:
    """The label-flip probe's accuracy cost (baseline minus poisoned) is a difference of two models'
    accuracies on the same test points: a paired interval (Tango's score interval) from the discordant counts."""
    if discordant is None or n <= 0:
        return _point("the per-sample outcomes of the baseline were not kept (a run saved before they were): no paired interval")
    lo, hi = paired_drop_interval(discordant[0], discordant[1], n)
    return {"ci95": [round(lo, 6), round(hi, 6)], "method": "tango-score", "n": int(n)}


def scans_module():
    from harness.attacks import scans

    return scans


def _rounded(v: Any) -> Any:
    """Accuracies computed in float32 print as 0.9850000143: round them to what a count supports."""
    return round(float(v), 6) if isinstance(v, float) else v
