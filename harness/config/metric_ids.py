"""The metric ids a suite will produce, computed from its config alone (for validating gates before
anything runs): attacks and their worst cases, defended variants and detectors, probes and scans.
The evaluation modules produce exactly these ids; they import the helpers from here."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from harness.core.ids import metric_id

__all__ = ["entry_epsilons", "worst_groups", "suite_metric_ids", "probe_metric_ids", "privacy_metric_ids", "certificate_metric_ids", "defense_kind", "variant_subject",
           "detector_metric_ids", "white_box_attacks", "detector_groups"]


def _bounded(entry) -> bool:
    return hasattr(entry, "norm") and not entry.minimal


def entry_epsilons(attacks) -> list[list]:
    """Per attack entry, the epsilons it is judged at: its own, or for a minimal-perturbation attack
    that lists none, every epsilon the suite's bounded attacks use for its norm."""
    by_norm: dict[str, dict[float, object]] = {}
    for a in attacks:
        if _bounded(a):
            for eps in a.epsilons:
                by_norm.setdefault(a.norm, {}).setdefault(eps.value, eps)
    out = []
    for a in attacks:
        if not hasattr(a, "norm"):
            out.append([])
        elif a.epsilons:
            out.append(list(a.epsilons))
        else:
            out.append(sorted(by_norm.get(a.norm, {}).values(), key=lambda e: e.value))
    return out


def worst_groups(attacks, epsilons: Optional[list] = None) -> dict[tuple[str, float], str]:
    """(norm, epsilon value) -> the epsilon's label, as first written in the config."""
    groups: dict[tuple[str, float], str] = {}
    for a, eps_list in zip(attacks, epsilons if epsilons is not None else entry_epsilons(attacks)):
        for eps in eps_list:
            groups.setdefault((a.norm, eps.value), eps.label)
    return groups


def suite_metric_ids(config) -> list[str]:
    ids = ["clean_accuracy"]
    per_entry = entry_epsilons(config.attacks)
    for a, eps_list in zip(config.attacks, per_entry):
        if not hasattr(a, "norm"):  # corruptions: one robust accuracy per kind and severity
            ids += [metric_id("robust_accuracy", kind, str(sev)) for kind in a.kinds for sev in a.severities]
            continue
        if a.minimal:
            ids.append(metric_id("median_perturbation", a.attack_id))
        for eps in eps_list:
            ids.append(metric_id("robust_accuracy", a.attack_id, eps.label))
            ids.append(metric_id("attack_success_rate", a.attack_id, eps.label))
    for (norm, _), label in worst_groups(config.attacks, per_entry).items():
        ids.append(metric_id("robust_accuracy", f"worst-{norm}", label))
    return (ids + _defense_metric_ids(config, ids) + [m for p in getattr(config, "probes", []) for m in probe_metric_ids(p)]
            + [m for c in getattr(config, "certificates", []) for m in certificate_metric_ids(c)])


def certificate_metric_ids(entry) -> list[str]:
    """What one `certificates:` entry produces (harness.evaluation.certificates): certified accuracy at
    each radius or epsilon; for randomized smoothing also the smoothed classifier's clean accuracy and
    abstain rate (PREDICT)."""
    subject = entry.certificate_id
    ids = [metric_id("certified_accuracy", subject, e.label) for e in entry.levels]
    if entry.build().norm == "l2":
        ids += [metric_id("clean_accuracy", subject), metric_id("abstain_rate", subject)]
    return ids


def _defense_metric_ids(config, base: list[str]) -> list[str]:
    """The metric ids the `defenses:` entries add (see harness.evaluation.variants)."""
    if not getattr(config, "defenses", None):
        return []

    out: list[str] = []
    for entry in config.defenses:
        kind = defense_kind(entry.build())
        if kind == "detector":
            out += detector_metric_ids(entry.defense_id, config.attacks)
            continue
        prefixes = [entry.defense_id] + ([f"{entry.defense_id}-naive"] if kind == "preprocessing" else [])
        out += [v for p in prefixes for m in base for v in [variant_subject(p, m)] if v is not None]
    return out


def probe_metric_ids(entry) -> list[str]:
    """The metric ids one `probes:` entry produces (for validating gates before anything runs)."""
    from harness.attacks.privacy import PRIVACY
    from harness.attacks.scans import SCANS

    if entry.name in PRIVACY:
        return privacy_metric_ids(entry.probe_id, entry.build())
    if entry.name in SCANS:
        return [metric_id("anomaly_index", "neural-cleanse")] if entry.name == "neural-cleanse" else [metric_id("flagged_fraction", entry.probe_id)]
    ids = []
    for f in entry.fractions:
        if entry.name != "label-flip":
            ids.append(metric_id("attack_success_rate", entry.probe_id, f.label))
        ids += [metric_id("clean_accuracy", entry.probe_id, f.label)]
        if entry.name == "label-flip":
            ids.append(metric_id("clean_accuracy_cost", entry.probe_id, f.label))
        for scan in entry.scans:
            subject = f"{entry.probe_id}/{scan}"
            ids += ([metric_id("anomaly_index", subject, f.label)] if scan == "neural-cleanse"
                    else [metric_id("scan_precision", subject, f.label), metric_id("scan_recall", subject, f.label)])
    return ids


def privacy_metric_ids(subject: str, probe: Any) -> list[str]:
    """What a privacy probe produces (harness.evaluation.privacy). Membership inference: TPR at each
    FPR level (absent from a run whose trials cannot resolve the level), AUROC, advantage. Extraction,
    per query budget: fidelity and stolen accuracy, and per output defense the same, the fidelity drop
    and (once) the clean-accuracy cost of serving its answers. Rate limiting: the requests answered
    before the endpoint throttled."""
    if probe.name == "membership-inference":
        return [metric_id("tpr_at_fpr", subject, f"{f:g}") for f in probe.fprs] + [metric_id("auc", subject), metric_id("advantage", subject)]
    if probe.name == "rate-limit":
        return [metric_id("throttled_after", subject)]
    ids: list[str] = []
    defenses = [d.label for d in probe.output_defenses()]
    for b in probe.budgets:
        ids += [metric_id("fidelity", subject, str(b)), metric_id("stolen_accuracy", subject, str(b))]
        for d in defenses:
            ids += [metric_id(f, f"{subject}/{d}", str(b)) for f in ("fidelity", "stolen_accuracy", "fidelity_drop")]
    return ids + [metric_id("clean_accuracy_cost", f"{subject}/{d}") for d in defenses]


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


def white_box_attacks(attacks: Sequence[Any]) -> list[tuple[str, str, list, Any]]:
    """(name, norm, epsilons, attack) of every white-box attack of the suite with a budget, in config
    order; an ensemble contributes its white-box stages (`standard:apgd-ce`, ...) one by one."""
    from harness.attacks.base import access_of

    from harness.config.schema import AttackConfig

    out = []
    for cfg in attacks:
        if isinstance(cfg, AttackConfig) and not cfg.minimal and cfg.epsilons and cfg.backend == "native":
            attack = cfg.build()
            stages = attack.stages(cfg.norm) if hasattr(attack, "stages") else [(None, attack)]
            out += [(cfg.attack_id if name is None else f"{cfg.attack_id}:{name}", cfg.norm, list(cfg.epsilons), stage)
                    for name, stage in stages if access_of(stage) == "white-box"]
    return out


def detector_groups(attacks: Sequence[Any]) -> dict[tuple[str, float], str]:
    """(norm, epsilon value) -> its label as first written, over the suite's white-box attacks."""
    groups: dict[tuple[str, float], str] = {}
    for _, norm, eps_list, _ in white_box_attacks(attacks):
        for eps in eps_list:
            groups.setdefault((norm, eps.value), eps.label)
    return groups


def detector_metric_ids(defense_id: str, attacks: Sequence[Any]) -> list[str]:
    """What a detector entry produces at each (norm, epsilon) of the suite's white-box attacks: against
    the per-sample worst case of those attacks (`worst-<norm>`), and against the attack that knows the
    detector (`adaptive-<norm>`, the one gates should use; the norm keeps an L2 and an L-inf epsilon
    written alike apart)."""
    out = []
    for (norm, _), label in detector_groups(attacks).items():
        out += [metric_id(f, f"{defense_id}/worst-{norm}", label) for f in ("detection_rate", "auroc")]
        out += [metric_id(f, f"{defense_id}/adaptive-{norm}", label) for f in ("detection_rate", "auroc", "evasion_rate")]
    return out
