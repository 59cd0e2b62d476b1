"""The `defenses:` section: the undefended model and each defended variant, on the same samples.

Three kinds of defense, told apart by what the registered class offers:

- trained (pgd-at, trades, fast-at): the same model source with the weights `harness harden`
  wrote (`weights:` in the entry); the whole suite runs on it.
- preprocessing (bit-depth, jpeg, median, gaussian-noise): a wrapper around the model. The suite
  runs twice: naively (gradients as the transform gives them) and adaptively (BPDA through
  non-differentiable transforms, EOT over randomized ones). Both appear; gates use the adaptive
  metrics, and the naive run's checks are reported as warnings (masked gradients are what a naive
  evaluation of such a defense is expected to show, and exactly why it must not be trusted).
- detectors (mahalanobis, alibi): fitted on half of the correctly classified points, evaluated on
  the other half against the suite's first white-box attack at each of its epsilons: detection rate
  at a fixed false-positive rate, and AUROC.

Metric ids of a variant put the defense id in front of the subject: `clean_accuracy:jpeg`,
`robust_accuracy:jpeg/pgd-linf@0.1`, `robust_accuracy:jpeg/worst-linf@0.1`, the naive run under
`jpeg-naive/...`; detectors give `detection_rate:<id>/<attack id>@<eps>` and `auroc:<id>/...`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import BadInput

__all__ = ["defense_kind", "variant_subject", "evaluate_defenses"]


def defense_kind(defense: Any) -> str:
    if hasattr(defense, "transform"):
        return "preprocessing"
    if hasattr(defense, "fit") and hasattr(defense, "score"):
        return "detector"
    return "trained"


def variant_subject(prefix: str, metric: str) -> Optional[str]:
    """`robust_accuracy:pgd-linf@0.1` -> `robust_accuracy:<prefix>/pgd-linf@0.1`; clean accuracy ->
    `clean_accuracy:<prefix>`; None for a metric a variant does not have."""
    family, _, rest = metric.partition(":")
    if metric == "clean_accuracy":
        return f"clean_accuracy:{prefix}"
    if family in ("robust_accuracy", "attack_success_rate", "median_perturbation") and rest:
        return f"{family}:{prefix}/{rest}"
    return None


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
        "attacks": [{**r.record(), "id": f"{prefix}/{r.subject}"} for r in ev.results],
    }  # its checks go to the scorecard's own `checks`, named "<prefix>: <check>", not twice
    if entry.weights:
        rec["weights"] = entry.weights
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


def _first_white_box(attacks: Sequence[Any]):
    from attacks.base import access_of

    from .config import AttackConfig

    for cfg in attacks:
        if isinstance(cfg, AttackConfig) and not cfg.minimal and cfg.epsilons and cfg.backend == "native":
            attack = cfg.build()
            if access_of(attack) == "white-box" and not hasattr(attack, "stages"):
                return cfg, attack
    return None


def adversarial_examples(model, attack, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial inputs for (x, y) on the model's device, trusted only after the harness's own
    checks (bounds, budget, re-scoring): returns (examples, broken mask), both on the CPU."""
    from attacks import BOUNDS, BUDGET_TOLERANCE, ThreatModel

    from .stage import device_of

    dev = device_of(model)
    advs, broken = [], []
    for k, rows in enumerate(torch.arange(len(y)).split(max(1, batch_size))):
        xb, yb = x[rows].to(dev), y[rows].to(dev)
        threat = ThreatModel(norm, torch.full((len(rows),), eps, device=dev))
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + k)
        adv = attack(model, xb, yb, threat, generator=gen).detach().clamp(*BOUNDS)
        with torch.no_grad():
            inside = threat.contains(adv, xb, BUDGET_TOLERANCE) & torch.isfinite(adv).flatten(1).all(dim=1)
            adv = torch.where(inside.view(-1, *([1] * (adv.dim() - 1))), adv, xb)
            broken.append((model(adv).argmax(dim=1) != yb).cpu())
        advs.append(adv.cpu())
    return torch.cat(advs), torch.cat(broken)


def _detector_records(entry, detector, model, data, correct: torch.Tensor, attacks, seed: int, batch_size: int) -> tuple[list, dict]:
    from defenses.detectors import evaluate_detector

    from .metrics import metric_id

    idx = torch.nonzero(correct).flatten()
    fit, held = idx[0::2], idx[1::2]
    if fit.numel() < 4 or held.numel() < 4:
        raise BadInput(f"defenses[{entry.defense_id}]", f"a detector needs at least 8 correctly classified points, got {idx.numel()}")
    found = _first_white_box(attacks)
    if found is None:
        raise BadInput(f"defenses[{entry.defense_id}]", "a detector is evaluated against the suite's first white-box attack "
                       "(fgsm, pgd, apgd-*): the suite has none")
    cfg, attack = found
    from .stage import device_of

    dev = device_of(model)
    detector = detector.fit(model, data.x[fit].to(dev), data.y[fit].to(dev))
    records, metrics = [], {}
    for eps in cfg.epsilons:
        adv, broken = adversarial_examples(model, attack, data.x[held], data.y[held], cfg.norm, eps.value, seed, batch_size)
        if int(broken.sum()) == 0:
            records.append({"attack": cfg.attack_id, "epsilon": eps.label, "n_adv": 0, "detection_rate": None, "auroc": None,
                            "note": "the attack broke no held-out point at this epsilon: nothing to detect"})
            continue
        res = evaluate_detector(detector, model, None, None, data.x[held].to(dev),
                                adv[broken].to(dev), fpr=entry.fpr)
        res = {k: (v.item() if hasattr(v, "item") else v) for k, v in res.items()}  # plain JSON numbers
        records.append({"attack": cfg.attack_id, "epsilon": eps.label, **res})
        subject = f"{entry.defense_id}/{cfg.attack_id}"
        metrics[metric_id("detection_rate", subject, eps.label)] = res["detection_rate"]
        metrics[metric_id("auroc", subject, eps.label)] = res["auroc"]
    return records, metrics


def evaluate_defenses(cfg, base_model, data, devices, base_ev, run_suite: Callable[..., Any],
                      load_variant: Callable[[str], Any]) -> tuple[list[dict[str, Any]], dict[str, float], list[dict[str, str]]]:
    """Every `defenses:` entry: (scorecard records, metrics, checks).

    `run_suite(model, label)` runs the config's attack suite on a model over the same data and
    returns its Evaluation; `load_variant(weights)` loads the config's model with other weights.
    """
    from defenses.preprocess import defended

    base_metrics = base_ev.metrics()
    records: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    checks: list[dict[str, str]] = []
    for entry in cfg.defenses:
        defense = entry.build()
        kind = defense_kind(defense)
        prefix = entry.defense_id
        if kind == "trained":
            ev = run_suite(load_variant(entry.weights), prefix)
            records.append(_variant_record(entry, kind, None, prefix, ev, base_metrics))
            metrics.update(_prefixed(ev.metrics(), prefix))
            checks += [{**c, "name": f"{prefix}: {c['name']}"} for c in ev.checks]
        elif kind == "preprocessing":
            for mode in ("naive", "adaptive"):
                label = prefix if mode == "adaptive" else f"{prefix}-naive"
                ev = run_suite(defended(base_model, defense, mode, eot=entry.eot, seed=cfg.seed), label)
                records.append(_variant_record(entry, kind, mode, label, ev, base_metrics))
                metrics.update(_prefixed(ev.metrics(), label))
                if mode == "naive":
                    checks += _naive_checks(ev.checks, label)
                else:
                    checks += [_declared(c, defense, label) for c in ev.checks]
        else:
            recs, ms = _detector_records(entry, defense, base_model, data, base_ev.correct, cfg.attacks, cfg.seed, cfg.data.batch_size)
            records.append({"id": prefix, "name": entry.name, "kind": kind, "mode": None, "params": dict(entry.params),
                            "fpr": entry.fpr, "results": recs})
            metrics.update(ms)
    return records, {k: v for k, v in metrics.items() if v is None or math.isfinite(v)}, checks
