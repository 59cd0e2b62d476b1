"""The `certificates:` section as units of a run: certified accuracy, with the soundness checks that
fail a run whose certificate claims more than an attack leaves standing.

Each entry is one unit, `cert|<i>|<id>`, run on `limit` evenly spaced points of the evaluated data
(every point by default; the seeds of its noise come from the run's seed and each sample's id, so a
point's certificate does not depend on which other points are certified):

- `randomized-smoothing` (harness.defenses.smoothing): CERTIFY on every point gives a class (or an
  abstention) and an L2 radius; `certified_accuracy:<id>@<r>` is the fraction of points certified
  correct at radius >= r. PREDICT gives the smoothed classifier's `clean_accuracy:<id>` and
  `abstain_rate:<id>`. Each holds for every point with probability at least 1 - alpha (the per-point
  failure probability, stated beside every interval); the 95% interval (Wilson) is over the test points.
  Soundness: at each radius, an L2 PGD with EOT through the noise attacks the smoothed classifier;
  a point certified at r whose attacked point's top-class probability is, with confidence, below what
  the certificate implies is a violation. Under a sound certificate each point is one with
  probability at most 2 alpha (the certificate's failure, the check's own), so the run fails when
  violations exceed the 99.9% quantile of Binomial(certified points, 2 alpha).
- `interval-bounds` (harness.defenses.intervals): interval bound propagation after the model's
  normalization proves that no input in the L-inf box changes the class; `certified_accuracy:<id>@<eps>`
  is the fraction proven. Soundness: PGD at every epsilon; a proven point that PGD breaks (re-checked in
  float64) is a contradiction, and any one fails the run.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import torch

from harness.core.errors import BadInput
from harness.core.ids import metric_id
from harness.evaluation.entries import wilson_entry

__all__ = ["evaluate_certificates", "check_models", "certificate_points", "allowed_violations", "CHECK_LEVEL"]

CHECK_LEVEL = 1e-3  # the chance that a sound smoothing certificate fails its soundness check
CURVE_POINTS = 400  # at most this many points on a certified-accuracy curve


def certificate_points(n: int, limit: Optional[int]) -> torch.Tensor:
    """`limit` evenly spaced rows of n (Cohen et al. certify every k-th test point), all of them without a limit."""
    k = n if limit is None else min(int(limit), n)
    return (torch.arange(k) * n) // max(k, 1)


def allowed_violations(certified: int, alpha: float) -> int:
    """The most confident violations a sound smoothing certificate shows among `certified` points,
    but with probability CHECK_LEVEL: each point is one with probability at most 2 alpha."""
    from scipy.stats import binom

    return 0 if certified <= 0 else int(binom.ppf(1.0 - CHECK_LEVEL, certified, min(1.0, 2.0 * alpha)))


def _entry(hits: int, n: int, alpha: float) -> dict[str, Any]:
    return {**wilson_entry(hits, n), "alpha": alpha}


def _curve(correct: torch.Tensor, radius: torch.Tensor, n: int) -> dict[str, list[float]]:
    """Certified accuracy as a function of the radius: a step down at every certified point's radius."""
    r = torch.sort(radius[correct].double(), descending=True).values
    if n == 0:
        return {"radius": [], "certified_accuracy": []}
    steps = torch.unique(r) if len(r) else torch.zeros(0, dtype=torch.float64)
    if len(steps) > CURVE_POINTS:
        steps = torch.quantile(r, torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64)).unique()
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), steps]).unique()
    acc = [(radius[correct].double() >= t).sum().item() / n for t in grid]
    return {"radius": [round(float(t), 6) for t in grid], "certified_accuracy": [round(a, 6) for a in acc]}


def _soundness(cid: str, levels: list[dict], what: str) -> dict[str, Any]:
    """The check record of one certificate's soundness over its levels."""
    broken = [lv for lv in levels if lv["n_violations"] > lv["allowed_violations"]]
    above = [lv for lv in levels if lv["certified_accuracy"] > lv["empirical_robust_accuracy"]]
    parts = [f"{lv['label']}: certified {lv['certified_accuracy']:.4f} vs {lv['empirical_robust_accuracy']:.4f} empirical, "
             f"{lv['n_violations']} violation(s) ({lv['allowed_violations']} allowed)" for lv in levels]
    if broken:
        status = "fail"
        head = (f"certificate {cid!r} is contradicted by {what} at {', '.join(lv['label'] for lv in broken)}: "
                "it claims robustness an attack disproves (an unsound certificate or a model that changed)")
    elif above:
        status = "warn"
        head = (f"certificate {cid!r}: certified accuracy above the empirical robust accuracy under {what} at "
                f"{', '.join(lv['label'] for lv in above)}, within what chance allows (no confident violation beyond the bound)")
    else:
        status = "pass"
        head = f"certificate {cid!r}: certified accuracy is at most the empirical robust accuracy under {what} at every level"
    return {"name": f"certificate-soundness:{cid}", "status": status, "detail": f"{head}; " + "; ".join(parts)}


def _smoothing_points(cert, levels: list, model, x: torch.Tensor, y: torch.Tensor, ids: list[int], num_classes: int,
                      seed: int) -> dict[str, torch.Tensor]:
    """Per point of one batch: CERTIFY's class and radius, PREDICT's class, and at each level the
    attack's outcome (robust, violation, distance moved)."""
    c, pred = cert.certify_and_predict(model, x, num_classes, ids, seed)
    out = {"prediction": c.prediction.cpu(), "radius": c.radius.double().cpu(), "predicted": pred.cpu()}
    for j, lv in enumerate(levels):
        emp = cert.empirical(model, x, y, c, float(lv.value), ids, seed)
        out[f"robust{j}"], out[f"violation{j}"], out[f"distance{j}"] = emp.robust.cpu(), emp.violation.cpu(), emp.distance.cpu()
    return out


def _smoothing(entry, cert, pts: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
    cid, n = entry.certificate_id, len(y)
    correct, radius, pred = pts["prediction"] == y, pts["radius"], pts["predicted"]
    levels = []
    for j, lv in enumerate(entry.levels):
        k = int((correct & (radius >= lv.value)).sum())
        robust, distance = int(pts[f"robust{j}"].sum()), pts[f"distance{j}"]
        levels.append({"label": lv.label, "value": lv.value, "certified_accuracy": k / n if n else 0.0, "n_certified": k,
                       "empirical_robust_accuracy": robust / n if n else 0.0, "n_empirical_robust": robust,
                       "n_violations": int(pts[f"violation{j}"].sum()), "allowed_violations": allowed_violations(k, cert.alpha),
                       "max_distance": round(float(distance.max()), 6) if n else 0.0})
    n_correct, n_abstain = int((pred == y).sum()), int((pred < 0).sum())
    rec = {"norm": "l2", "alpha": cert.alpha, "clean_accuracy": n_correct / n if n else 0.0, "n_correct": n_correct,
           "abstain_rate": n_abstain / n if n else 0.0, "n_abstain": n_abstain,
           "certify_abstain_rate": int((pts["prediction"] < 0).sum()) / n if n else 0.0,
           "levels": levels, "curve": _curve(correct, radius, n)}
    ms = {metric_id("certified_accuracy", cid, lv["label"]): lv["certified_accuracy"] for lv in levels}
    iv = {metric_id("certified_accuracy", cid, lv["label"]): _entry(lv["n_certified"], n, cert.alpha) for lv in levels}
    ms[metric_id("clean_accuracy", cid)], iv[metric_id("clean_accuracy", cid)] = rec["clean_accuracy"], _entry(n_correct, n, cert.alpha)
    ms[metric_id("abstain_rate", cid)], iv[metric_id("abstain_rate", cid)] = rec["abstain_rate"], _entry(n_abstain, n, cert.alpha)
    rec["metrics"], rec["metric_intervals"] = ms, iv
    rec["soundness"] = _soundness(cid, levels, "an L2 PGD with EOT on the smoothed classifier")
    return rec


def _pgd_broken(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(broken, x_adv): PGD at L-inf eps finds an input in the box that the model misclassifies
    (budget and prediction re-checked here; the clean misclassified points count as broken, with
    x_adv = x), and the points it found."""
    from harness.attacks import PGD, ThreatModel

    with torch.no_grad():
        broken = model(x).argmax(dim=1) != y
    found = x.clone()
    if eps <= 0:
        return broken, found
    threat = ThreatModel("linf", float(eps))
    g = torch.Generator(x.device).manual_seed(int(seed))
    for _ in range(max(1, restarts)):
        left = (~broken).nonzero().flatten()
        if len(left) == 0:
            break
        adv = threat.project(PGD(steps=steps)(model, x[left], y[left], threat, generator=g), x[left])
        if not bool(threat.contains(adv, x[left]).all()):
            raise RuntimeError("PGD returned a point outside its L-inf budget")
        with torch.no_grad():
            hit = model(adv).argmax(dim=1) != y[left]
        broken[left[hit]], found[left[hit]] = True, adv[hit]
    return broken, found


def _wrong_in_float64(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) bool: misclassified by the model computed in float64, as the bounds are: a point that only
    float32 rounding flips is no contradiction of a float64 proof."""
    import copy

    if len(y) == 0:
        return torch.zeros(0, dtype=torch.bool)
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        return twin(x.double()).argmax(dim=1) != y


def _interval_points(cert, levels: list, model, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per point of one batch: correct or not, and at each level proven, broken by PGD, and both
    (a contradiction, confirmed in float64)."""
    net, mean, std = model.net, getattr(model, "mean", None), getattr(model, "std", None)
    with torch.no_grad():
        out = {"correct": (model(x).argmax(dim=1) == y).cpu()}
    for j, lv in enumerate(levels):
        eps = float(lv.value)
        proven = cert.verified(net, mean, std, x, y, eps).cpu()
        broken, found = _pgd_broken(model, x, y, eps, cert.attack_steps, cert.attack_restarts, seed)
        broken = broken.cpu()
        clash = (proven & broken).nonzero().flatten()
        violation = torch.zeros(len(y), dtype=torch.bool)
        violation[clash] = _wrong_in_float64(model, found[clash.to(found.device)], y[clash.to(y.device)]).cpu()
        out[f"proven{j}"], out[f"broken{j}"], out[f"violation{j}"] = proven, broken, violation
    return out


def _intervals(entry, cert, pts: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, Any]:
    cid, n = entry.certificate_id, len(y)
    levels = []
    for j, lv in enumerate(entry.levels):
        k, robust = int(pts[f"proven{j}"].sum()), int((~pts[f"broken{j}"]).sum())
        levels.append({"label": lv.label, "value": lv.value, "certified_accuracy": k / n if n else 0.0, "n_certified": k,
                       "empirical_robust_accuracy": robust / n if n else 0.0, "n_empirical_robust": robust,
                       "n_violations": int(pts[f"violation{j}"].sum()), "allowed_violations": 0})
    n_correct = int(pts["correct"].sum())
    rec = {"norm": "linf", "method": cert.method, "alpha": 0.0, "clean_accuracy": n_correct / n if n else 0.0, "n_correct": n_correct,
           "levels": levels,
           "curve": {"radius": [lv["value"] for lv in levels], "certified_accuracy": [lv["certified_accuracy"] for lv in levels]}}
    rec["metrics"] = {metric_id("certified_accuracy", cid, lv["label"]): lv["certified_accuracy"] for lv in levels}
    rec["metric_intervals"] = {metric_id("certified_accuracy", cid, lv["label"]): _entry(lv["n_certified"], n, 0.0) for lv in levels}
    rec["soundness"] = _soundness(cid, levels, f"PGD ({cert.attack_steps} steps)")
    return rec


def _over_points(fn: Callable[..., dict[str, torch.Tensor]], data, rows: torch.Tensor, device, batch: int) -> dict[str, torch.Tensor]:
    """fn(x, y, ids, k) over the certified rows (at least one: an empty data set is refused when it
    loads), `batch` of them read at a time (data read by ids; bounds, noise and PGD hold one batch),
    the per-point outcomes joined in order."""
    parts = []
    for k, chunk in enumerate(rows.split(max(1, batch))):
        x, y = data.read(chunk).to(device), data.y[chunk].to(device)
        parts.append(fn(x, y, [int(v) for v in data.ids[chunk]], k))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def check_models(cfg, model) -> None:
    """BadInput, one line naming the entry and the layer, when a certificate cannot follow the model
    (interval bounds and a layer they do not support); the pipeline calls it as the model loads."""
    for i, entry in enumerate(cfg.certificates):
        cert = entry.build()
        if hasattr(cert, "check"):
            try:
                cert.check(model.net)
            except ValueError as e:
                raise BadInput(f"certificates[{i}] ({entry.certificate_id})", " ".join(str(e).split())) from None


def evaluate_certificates(cfg, model, data, device, done: dict[str, dict],
                          emit: Callable[[str, dict], None]) -> tuple[list[dict], dict[str, float], list[dict]]:
    """Every `certificates:` entry on `model` over `data`: (scorecard records, metrics, soundness checks).
    Units in `done` (a resumed run) are reused; `emit(unit, record)` saves each as it finishes."""
    records: list[dict] = []
    metrics: dict[str, float] = {}
    num_classes = int(cfg.model.num_classes or max(int(data.y.max()) + 1, 2))
    for i, entry in enumerate(cfg.certificates):
        cert = entry.build()
        unit = f"cert|{i}|{entry.certificate_id}"
        rec = done.get(unit)
        if rec is None:
            t0 = time.perf_counter()
            rows = certificate_points(len(data), entry.limit)
            y = data.y[rows]
            if cert.norm == "l2":  # a point's noise is its own (seeded by its id): batching changes nothing
                pts = _over_points(lambda x, yb, ids, k: _smoothing_points(cert, entry.levels, model, x, yb, ids, num_classes, cfg.seed),
                                   data, rows, device, cfg.data.batch_size)
                body = _smoothing(entry, cert, pts, y)
            else:
                pts = _over_points(lambda x, yb, ids, k: _interval_points(cert, entry.levels, model, x, yb, cfg.seed + k),
                                   data, rows, device, cfg.data.batch_size)
                body = _intervals(entry, cert, pts, y)
            from dataclasses import asdict

            rec = {"id": entry.certificate_id, "name": entry.name, "kind": "certificate", "params": asdict(cert), "n_points": len(rows),
                   **body, "seconds": round(time.perf_counter() - t0, 3)}
            emit(unit, rec)
        records.append(rec)
        metrics.update(rec["metrics"])
    checks = [r["soundness"] for r in records]
    return records, {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}, checks
