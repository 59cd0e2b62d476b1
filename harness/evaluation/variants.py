"""The `defenses:` section: the undefended model and each defended variant, on the same samples.

Three kinds of defense, told apart by what the registered class offers:

- trained (pgd-at, trades, fast-at): the same model source with the weights `harness harden`
  wrote (`weights:` in the entry); the whole suite runs on it.
- preprocessing (bit-depth, jpeg, median, gaussian-noise): a wrapper around the model. The suite
  runs twice: naively (gradients as the transform gives them) and adaptively (BPDA through
  non-differentiable transforms, EOT over randomized ones). Both appear; gates use the adaptive
  metrics, and the naive run's checks are reported as warnings (masked gradients are what a naive
  evaluation of such a defense is expected to show, and exactly why it must not be trusted).
- detectors (mahalanobis, alibi): fitted on a third of the correctly classified points, their
  threshold set at the entry's false-positive rate on another third, and judged on the last third
  (its clean inputs give the false-positive rate actually reached) at each (norm, epsilon) of the
  suite's white-box attacks, twice: against the per-sample worst case of those attacks (which do
  not know the detector), and against DetectorAware, PGD on the classifier's margin plus the
  detector's score (Carlini & Wagner 2017), which does. Gates should use the adaptive figures.

Metric ids of a variant put the defense id in front of the subject: `clean_accuracy:jpeg`,
`robust_accuracy:jpeg/pgd-linf@0.1`, `robust_accuracy:jpeg/worst-linf@0.1`, the naive run under
`jpeg-naive/...`; detectors give `detection_rate:<id>/worst-linf@<eps>`, `auroc:<id>/worst-linf@<eps>`,
and `detection_rate:`, `auroc:` and `evasion_rate:<id>/adaptive-linf@<eps>` (misclassified and not
flagged, over the judged points). Every one carries a 95% interval in the record's
`metric_intervals` (Wilson; for the AUROC, harness.verdicts.metrics.auroc_interval).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from harness.config.metric_ids import defense_kind, detector_groups, detector_metric_ids, variant_subject, white_box_attacks
from harness.core.errors import BadInput
from harness.core.ids import metric_id
from harness.core.stats import wilson_interval

__all__ = ["defense_kind", "variant_subject", "evaluate_defenses"]


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: v for m, v in metrics.items() for k in [variant_subject(prefix, m)] if k is not None}


def _variant_record(entry, kind: str, mode: Optional[str], prefix: str, ev, base_metrics: dict[str, float]) -> dict[str, Any]:
    metrics = ev.metrics()
    robust = {m: v for m, v in metrics.items() if m.startswith("robust_accuracy:")}
    rec = {
        "id": prefix, "name": entry.name, "kind": kind, "mode": mode, "params": dict(entry.params),
        "clean_accuracy": metrics["clean_accuracy"],
        "clean_accuracy_cost": base_metrics["clean_accuracy"] - metrics["clean_accuracy"],
        "robust_accuracy": robust,
        "gain": {m: v - base_metrics[m] for m, v in robust.items() if m in base_metrics},
        "attacks": [_attack_record(r, prefix) for r in ev.results],
    }  # its checks go to the scorecard's own `checks`, named "<prefix>: <check>", not twice
    if entry.weights:
        rec["weights"] = entry.weights
    return rec


def _attack_record(result, prefix: str) -> dict[str, Any]:
    """An attack's record in a variant: its id and its intervals' metric ids carry the variant's prefix."""
    rec = {**result.record(), "id": f"{prefix}/{result.subject}"}
    if "metric_intervals" in rec:
        rec["metric_intervals"] = {k: v for m, v in rec["metric_intervals"].items() for k in [variant_subject(prefix, m)] if k is not None}
    return rec


def _naive_checks(checks: list[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    """A naive evaluation's failed checks become warnings: they document why it is not trusted."""
    out = []
    for c in checks:
        status = "warn" if c["status"] == "fail" else c["status"]
        detail = c["detail"] + (" (naive evaluation: expected for this defense; the adaptive one is judged)" if c["status"] == "fail" else "")
        out.append({"name": f"{prefix}: {c['name']}", "status": status, "detail": detail})
    return out


# Checks a declared randomized defense trips by design: its predictions vary from pass to pass, and
# so an epsilon-0 attack cannot reproduce them exactly. EOT is how the adaptive run answers that.
_RANDOM_BY_DESIGN = ("randomized-model", "epsilon-zero")


def _declared(check: dict[str, str], defense: Any, label: str) -> dict[str, str]:
    if getattr(defense, "gradient", None) == "random" and check["name"] in _RANDOM_BY_DESIGN and check["status"] == "fail":
        return {"name": f"{label}: {check['name']}", "status": "warn",
                "detail": check["detail"] + " (declared randomized defense: expected; the adaptive run averages gradients over EOT draws)"}
    return {**check, "name": f"{label}: {check['name']}"}


def adversarial_examples(model, attack, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adversarial inputs for (x, y) on the model's device, trusted only after the harness's own
    checks (bounds, budget, re-scoring): returns (examples, broken mask), both on the CPU, and the
    number of examples outside the budget (replaced by their clean input, so never broken)."""
    from harness.attacks import BOUNDS, BUDGET_TOLERANCE, ThreatModel

    from harness.engines.stage import device_of

    dev = device_of(model)
    advs, broken, outside = [], [], 0
    for k, rows in enumerate(torch.arange(len(y)).split(max(1, batch_size))):
        xb, yb = x[rows].to(dev), y[rows].to(dev)
        threat = ThreatModel(norm, torch.full((len(rows),), eps, device=dev))
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + k)
        adv = attack(model, xb, yb, threat, generator=gen).detach().clamp(*BOUNDS)
        with torch.no_grad():
            inside = threat.contains(adv, xb, BUDGET_TOLERANCE) & torch.isfinite(adv).flatten(1).all(dim=1)
            outside += int((~inside).sum())
            adv = torch.where(inside.view(-1, *([1] * (adv.dim() - 1))), adv, xb)
            broken.append((model(adv).argmax(dim=1) != yb).cpu())
        advs.append(adv.cpu())
    return torch.cat(advs), torch.cat(broken), outside


def _worst_case(model, candidates, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], int]:
    """Per sample, the example of the first white-box attack (config order) that breaks it, as the
    harness's worst case does; each attack runs only on the points those before it left unbroken."""
    adv, broken, used, outside = x.clone(), torch.zeros(len(y), dtype=torch.bool), {}, 0
    for k, (name, cand_norm, eps_list, attack) in enumerate(candidates):
        todo = torch.nonzero(~broken).flatten()
        if cand_norm != norm or all(e.value != eps for e in eps_list) or todo.numel() == 0:
            continue
        a_adv, a_broken, out = adversarial_examples(model, attack, x[todo], y[todo], norm, eps, seed * 31 + k, batch_size)
        adv[todo[a_broken]], broken[todo[a_broken]] = a_adv[a_broken], True
        used[name], outside = int(a_broken.sum()), outside + out
    return adv, broken, used, outside


def _judged(detector, model, x_calib, x_clean, adv, broken, fpr: float, row: dict[str, Any]) -> dict[str, Any]:
    """One row of a detector record: the detector on the judged clean points and the broken examples."""
    from harness.defenses.detectors import evaluate_detector

    from harness.engines.stage import device_of

    dev = device_of(model)
    res = evaluate_detector(detector, model, None, None, x_clean.to(dev), adv[broken].to(dev), fpr=fpr, x_calib=x_calib.to(dev))
    res = {k: (v.item() if hasattr(v, "item") else v) for k, v in res.items()}  # plain JSON numbers
    n = int(broken.numel())
    evaded = res["n_adv"] - res["n_detected"]
    out = {**row, **res, "n_attacked": n, "n_evaded": evaded, "evasion_rate": evaded / n if n else 0.0}
    if res["n_adv"] == 0:
        out.update(detection_rate=None, auroc=None, note="the attack broke no judged point at this epsilon: nothing to detect")
    return out


def _row_metrics(defense_id: str, row: dict[str, Any], evasion: bool) -> tuple[dict[str, float], dict[str, dict]]:

    subject = f"{defense_id}/{row['attack']}"
    rate, auc = metric_id("detection_rate", subject, row["epsilon"]), metric_id("auroc", subject, row["epsilon"])
    intervals: dict[str, dict] = {rate: {"ci95": row["detection_rate_ci95"], "method": "wilson", "n": row["n_adv"]},
                                  auc: {"ci95": row["auroc_ci95"], "method": "auroc-score", "n": row["n_adv"] + row["n_clean"],
                                        "n_pos": row["n_adv"], "n_neg": row["n_clean"]}}
    metrics = {rate: row["detection_rate"], auc: row["auroc"]} if row["n_adv"] else {}  # nothing measured: no value
    if evasion:
        ev = metric_id("evasion_rate", subject, row["epsilon"])
        metrics[ev] = row["evasion_rate"]
        intervals[ev] = {"ci95": list(wilson_interval(row["n_evaded"], row["n_attacked"])), "method": "wilson", "n": row["n_attacked"]}
    return metrics, intervals


_NO_GRADIENT = ("{name}'s scores carry no gradient: the detector-aware attack descends a Mahalanobis detector fitted "
                "on the same points instead (a transfer attack), and {name} itself judges the examples")


def _detector_records(entry, detector, model, data, correct: torch.Tensor, attacks, seed: int, batch_size: int) -> tuple[dict, dict]:
    """The detector's record (`results`: one row per attack and epsilon) and its metrics. A third of the
    correctly classified points fit the detector, a third set its threshold, and the last third are
    judged: their clean inputs for the false-positive rate, their adversarial examples for detection."""
    from harness.defenses.detectors import DetectorAware, MahalanobisDetector

    from harness.engines.stage import device_of

    idx = torch.nonzero(correct).flatten()
    fit, calib, judged = idx[0::3], idx[1::3], idx[2::3]
    if judged.numel() < 4:
        raise BadInput(f"defenses[{entry.defense_id}]", f"a detector needs at least 12 correctly classified points, got {idx.numel()}")
    candidates = white_box_attacks(attacks)
    if not candidates:
        raise BadInput(f"defenses[{entry.defense_id}]", "a detector is evaluated against the suite's white-box attacks "
                       "(fgsm, pgd, apgd-*, standard): the suite has none")
    dev = device_of(model)
    x_fit, y_fit = data.read(fit).to(dev), data.y[fit].to(dev)
    detector = detector.fit(model, x_fit, y_fit)
    guide, surrogate = detector, None
    if not callable(getattr(detector, "differentiable_score", None)):
        guide, surrogate = MahalanobisDetector().fit(model, x_fit, y_fit), "mahalanobis"
    del x_fit, y_fit
    x_cal, x_j, y_j = data.read(calib), data.read(judged), data.y[judged]
    with torch.no_grad():
        scale = float(guide.score(model, x_cal.to(dev)).median().clamp_min(1e-6))
    steps = max([s for *_, a in candidates for s in [getattr(a, "steps", None)] if isinstance(s, int)] + [20])
    aware = DetectorAware(guide.differentiable_score, scale=scale, steps=steps)
    rows, metrics, intervals = [], {}, {}
    for (norm, value), label in detector_groups(attacks).items():
        adv, broken, used, outside = _worst_case(model, candidates, x_j, y_j, norm, value, seed, batch_size)
        rows.append(_judged(detector, model, x_cal, x_j, adv, broken, entry.fpr,
                            {"attack": f"worst-{norm}", "norm": norm, "epsilon": label, "broken_by": used, "budget_violations": outside}))
        adv, broken, outside = adversarial_examples(model, aware, x_j, y_j, norm, value, seed * 31 + 17, batch_size)
        rows.append(_judged(detector, model, x_cal, x_j, adv, broken, entry.fpr,
                            {"attack": f"adaptive-{norm}", "norm": norm, "epsilon": label, "budget_violations": outside}))
        for row, evasion in ((rows[-2], False), (rows[-1], True)):
            ms, ivs = _row_metrics(entry.defense_id, row, evasion)
            metrics.update(ms)
            intervals.update(ivs)
    first = rows[0]
    rec = {"id": entry.defense_id, "name": entry.name, "kind": "detector", "mode": None, "params": dict(entry.params), "fpr": entry.fpr,
           "split": {"fit": int(fit.numel()), "calibration": int(calib.numel()), "judged": int(judged.numel())},
           "threshold": first["threshold"], "clean_fpr": first["clean_fpr"], "n_false_positives": first["n_false_positives"],
           "n_clean": first["n_clean"], "clean_fpr_ci95": list(wilson_interval(first["n_false_positives"], first["n_clean"])),
           "adaptive": {"attack": "detector-aware-pgd", "steps": aware.steps, "lambdas": list(aware.lambdas), "kappa": aware.kappa,
                        "scale": round(scale, 6), "surrogate": surrogate,
                        **({"why": _NO_GRADIENT.format(name=entry.name)} if surrogate else {})},
           "gate_on": "adaptive: a gate on a worst-<norm> detection rate or AUROC judges the detector against attacks "
                      "that do not know it is there",
           "results": rows, "metric_intervals": intervals}
    return rec, metrics


def _detector_budget(prefix: str, rec: dict[str, Any]) -> dict[str, str]:
    """The harness's budget re-check of the examples a detector was judged on, its own attack's included."""
    from harness.evaluation.checks import record

    outside = sum(r["budget_violations"] for r in rec["results"])
    made = sum(r["n_attacked"] for r in rec["results"])
    if outside:
        return record(f"{prefix}: budget", "fail", f"{outside} of {made} adversarial example(s) outside their budget; "
                      "they were counted as not adversarial")
    return record(f"{prefix}: budget", "pass", f"every one of {made} adversarial example(s) the detector was judged on is "
                  "inside its budget and the [0, 1] bounds, and its prediction was re-scored")


def _variants(cfg, base_model, load_variant: Callable[[str], Any]) -> list[tuple[Any, str]]:
    """(model, label) of every variant the suite runs on, in config order: a trained defense's weights,
    and each preprocessing defense naive then adaptive. Detectors are judged otherwise."""
    from harness.defenses.preprocess import defended

    out = []
    for entry in cfg.defenses:
        defense = entry.build()
        kind = defense_kind(defense)
        if kind == "trained":
            out.append((load_variant(entry.weights), entry.defense_id))
        elif kind == "preprocessing":
            out += [(defended(base_model, defense, mode, eot=entry.eot, seed=cfg.seed), entry.defense_id if mode == "adaptive"
                     else f"{entry.defense_id}-naive") for mode in ("naive", "adaptive")]
    return out


def evaluate_defenses(cfg, base_model, data, devices, base_ev, run_suite: Callable[..., Any],
                      load_variant: Callable[[str], Any],
                      run_many: Optional[Callable[[list[tuple[Any, str]]], list[Any]]] = None,
                      ) -> tuple[list[dict[str, Any]], dict[str, float], list[dict[str, str]]]:
    """Every `defenses:` entry: (scorecard records, metrics, checks).

    `run_suite(model, label)` runs the config's attack suite on a model over the same data and
    returns its Evaluation; `load_variant(weights)` loads the config's model with other weights;
    `run_many(variants)` (default: run_suite on each in turn) runs the suite on every (model, label)
    and returns their Evaluations in the same order: an engine with workers to spare runs them side
    by side. The variants share nothing but the data, so the order they run in changes no result.
    """
    variants = _variants(cfg, base_model, load_variant)
    evaluations = (run_many or (lambda vs: [run_suite(m, label) for m, label in vs]))(variants)
    by_label = {label: ev for (_, label), ev in zip(variants, evaluations)}
    base_metrics = base_ev.metrics()
    records: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    checks: list[dict[str, str]] = []
    for entry in cfg.defenses:
        defense = entry.build()
        kind = defense_kind(defense)
        prefix = entry.defense_id
        if kind == "trained":
            ev = by_label[prefix]
            records.append(_variant_record(entry, kind, None, prefix, ev, base_metrics))
            metrics.update(_prefixed(ev.metrics(), prefix))
            checks += [{**c, "name": f"{prefix}: {c['name']}"} for c in ev.checks]
        elif kind == "preprocessing":
            for mode in ("naive", "adaptive"):
                label = prefix if mode == "adaptive" else f"{prefix}-naive"
                ev = by_label[label]
                records.append(_variant_record(entry, kind, mode, label, ev, base_metrics))
                metrics.update(_prefixed(ev.metrics(), label))
                if mode == "naive":
                    checks += _naive_checks(ev.checks, label)
                else:
                    checks += [_declared(c, defense, label) for c in ev.checks]
        else:
            rec, ms = _detector_records(entry, defense, base_model, data, base_ev.correct, cfg.attacks, cfg.seed, cfg.data.batch_size)
            records.append(rec)
            metrics.update(ms)
            checks.append(_detector_budget(prefix, rec))
    return records, {k: v for k, v in metrics.items() if v is None or math.isfinite(v)}, checks
