"""The privacy probes of `probes:` (harness.attacks.privacy) as units of a run, and their metrics.

Membership inference (`membership-inference`): the pool is the training data (`target: shadows`)
or the training data plus the evaluated data (`target: model`, members the former). Each shadow
model is a unit, `probe|<i>|<id>|shadow-<k>`, whose record holds the model's confidence and loss on
every pool example; the keep masks come from the run's seed and are written with the scores to
`privacy/<id>-keep.json` beside the scorecard. Each shadow model in turn is the target (trials pooled
over models: correlated, since every example recurs in every model), or the config's model is.

Trials (example, target model) are split by example into a calibration part, which chooses each
threshold, and an evaluation part, which measures it: TPR at a fixed FPR is not tuned on the trials
it reports. An FPR level is resolved only when both parts hold at least 1/fpr non-member trials;
otherwise its metric is absent (a gate on it is inconclusive). Intervals count the examples, not
the trials, where trials of one example are correlated (the effective sample size of a clustered
proportion, Wilson's interval over it; the AUROC's score interval over distinct examples), and a
threshold chosen on calibration trials adds its own spread (a bootstrap of the calibration
examples), so the interval of TPR at 1% FPR covers the threshold's luck as well as the count's.

Rate limiting (`rate-limit`): one unit, `probe|<i>|<id>`, a burst at the endpoint (rate_limit_record).

Extraction (`extraction`): each query budget is a unit, `probe|<i>|<id>|<budget>`: a thief trained
on the undefended answers and one per output defense, with the same initialisation and batch
order, so the answers are the only difference; fidelity (agreement with the victim's labels) and
stolen accuracy on the evaluated data, the drop a defense makes as a paired difference.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness.core.errors import BadInput
from harness.core.ids import metric_id
from harness.evaluation.entries import whole, wilson_entry
from harness.core.stats import (auc_score, auroc_interval, best_advantage_threshold, count_above, newcombe_interval,
                                paired_drop_interval, roc_points, threshold_at_fpr, wilson_interval)

__all__ = ["evaluate_privacy", "membership_metrics", "clustered_wilson", "shadow_job", "budget_job", "fpr_label", "is_privacy"]

POOLED_WHY = ("trials pooled over shadow models are correlated (every example recurs as a member and a non-member): "
              "the interval counts each example once")


def is_privacy(name: str) -> bool:
    from harness.attacks.privacy import PRIVACY

    return name in PRIVACY


def fpr_label(fpr: float) -> str:
    return f"{fpr:g}"


def _r(v: float, digits: int = 6) -> float:
    return round(float(v), digits)


# --- statistics of membership trials ------------------------------------------------------------

BOOTSTRAP = 200  # resamples of the calibration examples, for the spread a chosen threshold adds


def clustered_wilson(hits: torch.Tensor, groups: torch.Tensor, extra_variance: float = 0.0) -> dict[str, Any]:
    """The interval entry of a proportion over trials that cluster by `groups` (an example's trials
    across shadow models): Wilson's interval at the effective sample size n / deff, deff the ratio of
    the cluster-robust variance of the proportion to the binomial one, kept between the number of
    clusters (trials of a cluster fully alike) and the number of trials (independent).
    `extra_variance` is variance from elsewhere (the threshold's, chosen on other trials), added
    before the effective size is taken. With no trial: [0, 1]."""
    n = int(hits.numel())
    if n == 0:
        return {"ci95": [0.0, 1.0], "method": "wilson", "n": 0}
    g = torch.unique(groups, return_inverse=True)[1]
    clusters = int(g.max()) + 1
    s = torch.zeros(clusters, dtype=torch.float64).index_add_(0, g, hits.double())
    m = torch.zeros(clusters, dtype=torch.float64).index_add_(0, g, torch.ones(n, dtype=torch.float64))
    p = float(s.sum()) / n
    if clusters == n:
        n_eff = float(n)
    elif 0.0 < p < 1.0 and clusters > 1:
        var = float(((s - p * m) ** 2).sum()) / n ** 2 * clusters / (clusters - 1)
        n_eff = min(float(n), max(float(clusters), p * (1 - p) / var)) if var > 0 else float(n)
    else:
        n_eff = float(clusters)  # nothing to estimate the correlation from: count the examples
    if extra_variance > 0 and 0.0 < p < 1.0:
        n_eff = p * (1 - p) / (p * (1 - p) / n_eff + extra_variance)
    lo, hi = wilson_interval(p * n_eff, n_eff)  # type: ignore[arg-type]
    method = "wilson" if n_eff == n else "wilson-effective-n"
    out = {"ci95": [_r(lo), _r(hi)], "method": method, "n": n}
    if n_eff != n:
        out["n_effective"] = _r(n_eff, 1)
    return out


def _bootstrap_weights(groups: torch.Tensor, seed: int) -> Any:
    """(BOOTSTRAP, trials) Poisson(1) counts per example, shared by all of an example's trials."""
    import numpy as np

    inverse = torch.unique(groups, return_inverse=True)[1].numpy()
    rng = np.random.default_rng(int(seed))
    return rng.poisson(1.0, (BOOTSTRAP, int(inverse.max()) + 1 if len(inverse) else 0))[:, inverse].astype(np.float64)


def _threshold_spread(cal_neg: torch.Tensor, cal_neg_groups: torch.Tensor, ev_pos: torch.Tensor, fpr: float, seed: int) -> float:
    """The variance of the evaluation TPR over thresholds chosen on bootstrap resamples of the
    calibration non-members: what choosing the threshold on a finite sample adds to the TPR's spread."""
    import numpy as np

    w = _bootstrap_weights(cal_neg_groups, seed)
    values = cal_neg.numpy()
    order = np.argsort(-values, kind="stable")
    ranked, through = values[order], np.cumsum(w[:, order], axis=1)
    ev = np.sort(ev_pos.numpy())
    tprs = []
    for b in range(BOOTSTRAP):
        j = int(np.searchsorted(through[b], fpr * through[b, -1] + 1e-9 * max(1.0, through[b, -1]), side="right"))
        t = ranked[min(j, len(ranked) - 1)]
        tprs.append(1.0 - np.searchsorted(ev, t, side="right") / len(ev))
    return float(np.var(tprs, ddof=1))


def _advantage_spread(cal_pos, cal_pos_groups, cal_neg, cal_neg_groups, ev_pos, ev_neg, seed: int) -> float:
    """The variance of the evaluation advantage over thresholds chosen on bootstrap resamples of the calibration trials."""
    import numpy as np

    p, n = cal_pos.numpy(), cal_neg.numpy()
    cuts = np.unique(np.concatenate([p, n, [-np.inf]]))
    wp, wn = _bootstrap_weights(cal_pos_groups, seed), _bootstrap_weights(cal_neg_groups, seed + 1)

    def above(values: Any, w: Any) -> Any:  # per resample, the weighted share strictly above each cut
        order = np.argsort(values, kind="stable")
        at = np.searchsorted(values[order], cuts, side="right")
        cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w[:, order], axis=1)], axis=1)
        return 1.0 - cum[:, at] / np.maximum(cum[:, -1:], 1e-300)

    gap = above(p, wp) - above(n, wn)
    ep, en = np.sort(ev_pos.numpy()), np.sort(ev_neg.numpy())
    advs = []
    for b in range(BOOTSTRAP):
        t = cuts[np.flatnonzero(gap[b] >= gap[b].max() - 1e-12)[-1]]
        advs.append((1.0 - np.searchsorted(ep, t, side="right") / len(ep)) - (1.0 - np.searchsorted(en, t, side="right") / len(en)))
    return float(np.var(advs, ddof=1))


def membership_metrics(scores: torch.Tensor, member: torch.Tensor, groups: torch.Tensor, fprs: tuple[float, ...],
                       calibration: float, seed: int, subject: str) -> dict[str, Any]:
    """Metrics of membership scores (larger: more likely a member): per FPR level the TPR at the
    threshold chosen on the calibration examples, measured on the evaluation examples; AUROC over all
    trials; the advantage (max TPR - FPR) at the threshold best on calibration, measured on evaluation.
    Returns the record's fields (levels, auc, advantage, roc, counts, metrics, metric_intervals)."""
    scores, member, groups = scores.double(), member.bool(), groups.long()
    uniq = torch.unique(groups)
    order = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(int(seed)))]
    cal_groups = order[: max(1, min(len(order) - 1, math.ceil(calibration * len(order))))]
    in_cal = torch.isin(groups, cal_groups)
    parts = {"calibration": in_cal, "evaluation": ~in_cal}
    pos, neg = scores[member], scores[~member]
    cal_pos, cal_neg = scores[in_cal & member], scores[in_cal & ~member]
    ev_pos, ev_neg = scores[~in_cal & member], scores[~in_cal & ~member]
    ev_pos_groups, ev_neg_groups = groups[~in_cal & member], groups[~in_cal & ~member]
    cal_pos_groups, cal_neg_groups = groups[in_cal & member], groups[in_cal & ~member]
    rec: dict[str, Any] = {"n_trials": int(scores.numel()), "n_members": int(member.sum()), "n_nonmembers": int((~member).sum()),
                           "n_examples": int(len(uniq))}
    rec.update({k: {"n_members": int((mask & member).sum()), "n_nonmembers": int((mask & ~member).sum()),
                    "n_examples": int(len(torch.unique(groups[mask])))} for k, mask in parts.items()})
    metrics: dict[str, Optional[float]] = {}
    intervals: dict[str, dict] = {}
    levels = []
    for f in fprs:
        label, mid = fpr_label(f), metric_id("tpr_at_fpr", subject, fpr_label(f))
        need = math.ceil(1.0 / f - 1e-9)
        if min(len(cal_neg), len(ev_neg)) < need or len(ev_pos) == 0:
            why = (f"an FPR of {label} needs at least {need} non-member trials in both the calibration and the evaluation "
                   f"part, and they hold {len(cal_neg)} and {len(ev_neg)}" if len(ev_pos) else "the evaluation part holds no member trial")
            levels.append({"fpr": f, "label": label, "resolved": False, "why": why})
            intervals[mid] = {"ci95": None, "method": "absent", "n": int(len(ev_neg)), "why": why}
            continue
        t = threshold_at_fpr(cal_neg, f)
        hits_pos, hits_neg = ev_pos > t, ev_neg > t
        tpr, fpr_measured = float(hits_pos.double().mean()), float(hits_neg.double().mean())
        spread = _threshold_spread(cal_neg, cal_neg_groups, ev_pos, f, seed + 1)
        levels.append({"fpr": f, "label": label, "resolved": True, "threshold": _r(t), "tpr": _r(tpr),
                       "fpr_measured": _r(fpr_measured), "fpr_measured_ci95": clustered_wilson(hits_neg, ev_neg_groups)["ci95"],
                       "threshold_sd_of_tpr": _r(math.sqrt(spread))})
        metrics[mid] = _r(tpr)
        intervals[mid] = clustered_wilson(hits_pos, ev_pos_groups, spread)
    auc = auc_score(pos.numpy(), neg.numpy())
    pos_examples, neg_examples = len(torch.unique(groups[member])), len(torch.unique(groups[~member]))
    auc_id, adv_id = metric_id("auc", subject), metric_id("advantage", subject)
    if math.isfinite(auc):
        metrics[auc_id] = _r(auc)
        lo, hi = auroc_interval(auc, pos_examples, neg_examples)
        intervals[auc_id] = {"ci95": [_r(lo), _r(hi)], "method": "auroc-score", "n": pos_examples + neg_examples,
                             **({"why": POOLED_WHY} if pos_examples + neg_examples < scores.numel() else {})}
    if len(cal_pos) and len(cal_neg) and len(ev_pos) and len(ev_neg):
        t = best_advantage_threshold(cal_pos.numpy(), cal_neg.numpy())
        tp, fp = count_above(ev_pos.numpy(), t), count_above(ev_neg.numpy(), t)
        adv = tp / len(ev_pos) - fp / len(ev_neg)
        metrics[adv_id] = _r(adv)
        pe, ne = clustered_wilson(ev_pos > t, ev_pos_groups), clustered_wilson(ev_neg > t, ev_neg_groups)
        n1, n2 = pe.get("n_effective", pe["n"]), ne.get("n_effective", ne["n"])
        p1, p2 = tp / len(ev_pos), fp / len(ev_neg)
        binomial = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
        spread = _advantage_spread(cal_pos, cal_pos_groups, cal_neg, cal_neg_groups, ev_pos, ev_neg, seed + 2)
        if binomial > 0:  # the threshold's spread widens both sides alike: fewer effective trials
            n1, n2 = n1 * binomial / (binomial + spread), n2 * binomial / (binomial + spread)
        lo, hi = newcombe_interval(p1 * n1, n1, p2 * n2, n2)  # type: ignore[arg-type]
        intervals[adv_id] = {"ci95": [_r(max(-1.0, lo)), _r(min(1.0, hi))], "method": "newcombe", "n": int(len(ev_pos) + len(ev_neg))}
        rec["advantage_threshold"] = _r(t)
    fpr_curve, tpr_curve = roc_points(ev_pos.numpy(), ev_neg.numpy())
    rec.update(levels=levels, auc=metrics.get(auc_id), advantage=metrics.get(adv_id), roc={"fpr": fpr_curve, "tpr": tpr_curve},
               metrics={k: v for k, v in metrics.items() if v is not None}, metric_intervals=intervals)
    return rec


# --- membership inference as units ------------------------------------------------------------

def _pool(probe: Any, train: Any, test: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], list]:
    """(x, y, member or None, [[source, split, id], ...]) of the examples the shadow models split."""
    if probe.target == "shadows":
        return whole(train), train.y, None, [[train.source, train.split, int(i)] for i in train.ids]
    if (train.source, train.split) == (test.source, test.split):
        raise BadInput("probes", f"membership-inference target: model takes the training data ({train.source}, split {train.split}) "
                       f"as members and the evaluated data as non-members, but both are split {test.split} of {test.source}")
    x = torch.cat([whole(train), whole(test)])
    y = torch.cat([train.y, test.y])
    member = torch.cat([torch.ones(len(train), dtype=torch.bool), torch.zeros(len(test), dtype=torch.bool)])
    ids = [[d.source, d.split, int(i)] for d in (train, test) for i in d.ids]
    return x, y, member, ids


def shadow_record(cfg: Any, i: int, k: int, x: torch.Tensor, y: torch.Tensor, make_model: Callable[[], Any], device: Any,
                  keep: torch.Tensor) -> dict[str, Any]:
    """Shadow model k of entry i: trained on the pool examples its keep row holds, observed on all."""
    from harness.attacks.privacy import derived_seed, observe, train_shadow
    from harness.config.train import train_plan

    entry = cfg.probes[i]
    probe = entry.build()
    t0 = time.perf_counter()
    plan = train_plan(cfg).settings()
    seed = derived_seed(cfg.seed, "shadow", entry.probe_id, k)
    model = train_shadow(make_model, x, y, keep, plan, device, seed, probe.epochs)
    conf, loss, right = observe(model, x, y, device)
    return {"id": entry.probe_id, "kind": "shadow", "model": k, "n_train": int(keep.sum()),
            "members_accuracy": _r(right[keep].double().mean()) if bool(keep.any()) else None,
            "nonmembers_accuracy": _r(right[~keep].double().mean()) if bool((~keep).any()) else None,
            "confidence": [float(v) for v in conf], "loss": [float(v) for v in loss], "seconds": round(time.perf_counter() - t0, 3)}


def shadow_job(worker: Any, cfg: Any, i: int, k: int, model_ref: Any, train_ref: Any, test_ref: Any) -> dict[str, Any]:
    """shadow_record on an engine's worker (harness.engines.cluster.RayEngine.map), the pool rebuilt there."""
    probe = cfg.probes[i].build()
    x, y, _, _ = _pool(probe, worker.data(train_ref), worker.data(test_ref))
    keep = _keep(cfg, i, probe, len(y))[k]
    return shadow_record(cfg, i, k, x, y, lambda: worker.fresh_model(model_ref), worker.device, keep)


def _keep(cfg: Any, i: int, probe: Any, n: int) -> torch.Tensor:
    from harness.attacks.privacy import derived_seed, keep_masks

    entry = cfg.probes[i]
    m = probe.shadow_models if probe.uses_shadows() else 0
    return keep_masks(m, n, derived_seed(cfg.seed, "keep", entry.probe_id)) if m else torch.zeros(0, n, dtype=torch.bool)


def _membership(cfg: Any, i: int, model: Any, test: Any, train: Any, make_model: Callable[[bool], Any], device: Any,
                out: Optional[Path], done: dict[str, dict], emit: Callable[[str, dict], None], engine: Any) -> dict[str, Any]:
    from harness.attacks.privacy import derived_seed, lira_scores, loss_scores, observe

    entry = cfg.probes[i]
    probe, pid = entry.build(), entry.probe_id
    t0 = time.perf_counter()
    x, y, member, ids = _pool(probe, train, test)
    keep = _keep(cfg, i, probe, len(y))
    units = [f"probe|{i}|{pid}|shadow-{k}" for k in range(len(keep))]
    shadows: dict[int, dict] = {k: done[u] for k, u in enumerate(units) if u in done}
    earlier = sum(float(s.get("seconds", 0.0)) for s in shadows.values())  # what a resumed run reuses took before
    pending = [k for k in range(len(keep)) if k not in shadows]
    if pending and hasattr(engine, "map"):
        model_ref, train_ref, test_ref = engine.share_model(make_model(False)), engine.share_data(train), engine.share_data(test)

        def finished(j: int, rec: dict) -> None:
            shadows[pending[j]] = rec
            emit(units[pending[j]], rec)

        engine.map(shadow_job, [(cfg, i, k, model_ref, train_ref, test_ref) for k in pending], on_done=finished)
    for k in pending:
        if k not in shadows:
            shadows[k] = shadow_record(cfg, i, k, x, y, lambda: make_model(False), device, keep[k])
            emit(units[k], shadows[k])
    conf = torch.tensor([shadows[k]["confidence"] for k in range(len(keep))], dtype=torch.float64).view(len(keep), len(y))
    loss = torch.tensor([shadows[k]["loss"] for k in range(len(keep))], dtype=torch.float64).view(len(keep), len(y))
    if probe.target == "model":
        c, l_, _ = observe(model, x, y, device)
        score = loss_scores(l_) if probe.method == "loss" else lira_scores(c, conf, keep, probe.variant, probe.variance)
        scores, labels, groups = score.unsqueeze(0), member.unsqueeze(0), torch.arange(len(y)).unsqueeze(0)
    else:
        rows = []
        for t in range(len(keep)):
            others = torch.arange(len(keep)) != t
            rows.append(loss_scores(loss[t]) if probe.method == "loss" else
                        lira_scores(conf[t], conf[others], keep[others], probe.variant, probe.variance))
        scores, labels, groups = torch.stack(rows), keep, torch.arange(len(y)).expand(len(keep), len(y))
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise BadInput(f"probes[{i}]", f"membership-inference {pid}: {bad} trial score(s) are not finite (the models' logits "
                       "are infinite or NaN on some pool examples)")
    rec: dict[str, Any] = {"id": pid, "name": entry.name, "kind": "membership", "method": probe.method,
                           "variant": probe.variant if probe.method == "lira" else None,
                           "variance": probe.variance if probe.method == "lira" else None, "target": probe.target,
                           "shadow_models": len(keep), "pool": len(y)}
    rec.update(membership_metrics(scores.flatten(), labels.flatten(), groups.flatten(), tuple(probe.fprs), probe.calibration,
                                  derived_seed(cfg.seed, "calibration", pid), pid))
    if shadows:
        accs = [(s["members_accuracy"], s["nonmembers_accuracy"]) for s in shadows.values()]
        rec["shadow_accuracy"] = {"members": _r(sum(a for a, _ in accs if a is not None) / len(accs)),
                                  "nonmembers": _r(sum(b for _, b in accs if b is not None) / len(accs))}
    if out is not None:
        from harness.core.files import write_text_atomic

        path = Path(out) / "privacy" / f"{pid}-keep.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"probe": pid, "pool": ids, "target": probe.target,
                                            "keep": [[int(v) for v in row] for row in keep],
                                            "member": [[int(v) for v in row] for row in labels],
                                            "scores": [[_r(v) for v in row] for row in scores]}) + "\n")
        rec["keep_file"] = f"privacy/{pid}-keep.json"
    rec["seconds"] = round(time.perf_counter() - t0 + earlier, 3)
    return rec


# --- extraction as units ----------------------------------------------------------------------

def budget_record(cfg: Any, i: int, budget: int, victim: Any, make_thief: Callable[[], Any], test: Any, train: Any,
                  device: Any) -> dict[str, Any]:
    """One query budget of an extraction entry: the undefended thief and one per output defense."""
    from harness.attacks.privacy import answer, derived_seed, predict, query_set, train_thief
    from harness.config.train import train_plan

    entry = cfg.probes[i]
    probe, pid = entry.build(), entry.probe_id
    t0 = time.perf_counter()
    x_test = whole(test)
    holdout = whole(train) if probe.queries == "holdout" else None
    if holdout is not None and len(holdout) < max(probe.budgets):
        raise BadInput(f"probes[{i}].budgets", f"queries: holdout has {len(holdout)} training images, fewer than the budget "
                       f"{max(probe.budgets)}: lower the budget or use uniform-noise or patches")
    queries = query_set(probe.queries, max(probe.budgets), tuple(test.shape), derived_seed(cfg.seed, "queries", pid), holdout)[:budget]
    probs = predict(victim, queries, device)
    victim_test = predict(victim, x_test, device)
    victim_labels = victim_test.argmax(1)
    plan = train_plan(cfg, source=probe.thief).settings()  # a thief of its own trains by its own recipe
    seed = derived_seed(cfg.seed, "thief", pid, budget)

    def thief_on(answers: torch.Tensor) -> torch.Tensor:
        thief = train_thief(make_thief, queries, answers, plan, device, seed, probe.epochs, probe.min_steps)
        return predict(thief, x_test, device).argmax(1)

    n = len(test)
    stolen = thief_on(answer(probs, probe.answer_kind()))
    agree, right = stolen == victim_labels, stolen == test.y
    victim_right = victim_labels == test.y
    fid, acc = float(agree.double().mean()), float(right.double().mean())
    rec: dict[str, Any] = {"id": pid, "name": entry.name, "kind": "extraction", "queries": probe.queries, "answers": probe.answer_kind(),
                           "budget": int(budget), "victim_queries": int(budget), "thief": probe.thief or "config",
                           "n_test": n, "victim_accuracy": _r(victim_right.double().mean()), "fidelity": _r(fid),
                           "stolen_accuracy": _r(acc), "defenses": []}
    at = str(budget)
    ms = {metric_id("fidelity", pid, at): _r(fid), metric_id("stolen_accuracy", pid, at): _r(acc)}
    iv = {metric_id("fidelity", pid, at): wilson_entry(int(agree.sum()), n), metric_id("stolen_accuracy", pid, at): wilson_entry(int(right.sum()), n)}
    for d in probe.output_defenses():
        sub = f"{pid}/{d.label}"
        d_labels = thief_on(d.apply(probs))
        d_agree, d_right = d_labels == victim_labels, d_labels == test.y
        served_right = d.apply(victim_test).argmax(1) == test.y  # what the defended API's labels score
        d_fid, d_acc = float(d_agree.double().mean()), float(d_right.double().mean())
        drop, cost = fid - d_fid, float(victim_right.double().mean() - served_right.double().mean())
        rec["defenses"].append({"defense": d.label, "fidelity": _r(d_fid), "stolen_accuracy": _r(d_acc), "fidelity_drop": _r(drop),
                                "victim_accuracy": _r(served_right.double().mean()), "clean_accuracy_cost": _r(cost)})
        ms.update({metric_id("fidelity", sub, at): _r(d_fid), metric_id("stolen_accuracy", sub, at): _r(d_acc),
                   metric_id("fidelity_drop", sub, at): _r(drop), metric_id("clean_accuracy_cost", sub): _r(cost)})
        iv.update({metric_id("fidelity", sub, at): wilson_entry(int(d_agree.sum()), n),
                   metric_id("stolen_accuracy", sub, at): wilson_entry(int(d_right.sum()), n),
                   metric_id("fidelity_drop", sub, at): _paired(agree, d_agree),
                   metric_id("clean_accuracy_cost", sub): _paired(victim_right, served_right)})
    rec.update(metrics=ms, metric_intervals=iv, seconds=round(time.perf_counter() - t0, 3))
    return rec


def _paired(before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    """(mean before - mean after) over the same points: Tango's paired score interval."""
    n = int(before.numel())
    if n == 0:
        return {"ci95": [-1.0, 1.0], "method": "tango-score", "n": 0}
    lo, hi = paired_drop_interval(int((before & ~after).sum()), int((~before & after).sum()), n)
    return {"ci95": [_r(lo), _r(hi)], "method": "tango-score", "n": n}


def _thief_maker(probe: Any, make_model: Callable[[bool], Any], num_classes: int, base: Path) -> Callable[[], Any]:
    if probe.thief is None:
        return lambda: make_model(False)
    from harness.sources.models import load_model

    return lambda: load_model(probe.thief, num_classes=num_classes, base=base)[0]


def budget_job(worker: Any, cfg: Any, i: int, budget: int, model_ref: Any, test_ref: Any, train_ref: Any, num_classes: int,
               base: str) -> dict[str, Any]:
    """budget_record on an engine's worker: the victim is the worker's model, the thief a fresh one."""
    probe = cfg.probes[i].build()
    make = (lambda: worker.fresh_model(model_ref)) if probe.thief is None else _thief_maker(probe, None, num_classes, Path(base))  # type: ignore[arg-type]
    return budget_record(cfg, i, budget, worker.model(model_ref), make, worker.data(test_ref),
                         None if train_ref is None else worker.data(train_ref), worker.device)


def _extraction(cfg: Any, i: int, model: Any, test: Any, train_loader: Callable[[], Any], make_model: Callable[[bool], Any],
                device: Any, done: dict[str, dict], emit: Callable[[str, dict], None], engine: Any, num_classes: int,
                base: Path) -> list[dict[str, Any]]:
    entry = cfg.probes[i]
    probe, pid = entry.build(), entry.probe_id
    units = {b: f"probe|{i}|{pid}|{b}" for b in probe.budgets}
    recs: dict[int, dict] = {b: done[u] for b, u in units.items() if u in done}
    pending = [b for b in probe.budgets if b not in recs]
    train = train_loader() if pending and probe.queries == "holdout" else None
    # a black-box victim (an endpoint) is queried from here: its client, credentials and query budget
    # stay in this process; the thieves train here too
    if pending and hasattr(engine, "map") and getattr(model, "black_box", None) is None:
        model_ref, test_ref = engine.share_model(model), engine.share_data(test)
        train_ref = None if train is None else engine.share_data(train)

        def finished(j: int, rec: dict) -> None:
            recs[pending[j]] = rec
            emit(units[pending[j]], rec)

        engine.map(budget_job, [(cfg, i, b, model_ref, test_ref, train_ref, num_classes, str(base)) for b in pending], on_done=finished)
    make_thief = _thief_maker(probe, make_model, num_classes, base)
    for b in pending:
        if b not in recs:
            recs[b] = budget_record(cfg, i, b, model, make_thief, test, train, device)
            emit(units[b], recs[b])
    return [recs[b] for b in probe.budgets]


# --- rate limiting of an endpoint ----------------------------------------------------------------

COUNT_WHY = ("a count observed in one burst: when an endpoint throttles is its policy, not a sample drawn from a population; "
             "judged as observed")
BOUND_WHY = ("not throttled: the burst ended ({stopped}) after {answered} answered requests, so the endpoint's limit, if any, "
             "lies above that; the interval is [{answered}, inf]")


def rate_limit_record(cfg: Any, i: int, model: Any, test: Any) -> dict[str, Any]:
    """A burst of requests at the endpoint behind `model` (harness.attacks.privacy.send_burst), each of
    the first `images` evaluated images, normalized as the model's own predictions are."""
    from harness.attacks.privacy import send_burst
    from harness.config.schema import rate_limit_burst

    entry = cfg.probes[i]
    probe, pid = entry.build(), entry.probe_id
    from harness.sources.endpoint import endpoint_of

    endpoint = endpoint_of(model)
    if endpoint is None:  # the config check names model.source; a caller's own model object lands here
        raise BadInput(f"probes[{i}]", "rate-limit probes an HTTP endpoint's throttling, but the model is not an endpoint")
    x = whole(test)[: probe.images].to("cpu", torch.float32)
    x = model.normalize(x) if hasattr(model, "normalize") else x
    burst = rate_limit_burst(cfg, entry)
    before = int(endpoint.meter.counts()[1])  # this run's own earlier requests, which a limiter may count in the same window
    res = send_burst(lambda: endpoint.try_once(x), probe, burst)
    metric = metric_id("throttled_after", pid)
    if res["throttled"]:
        interval: dict[str, Any] = {"ci95": None, "method": "point", "why": COUNT_WHY}
    else:
        interval = {"ci95": [float(res["answered"]), math.inf], "method": "lower-bound",
                    "why": BOUND_WHY.format(stopped=res["stopped"], answered=res["answered"])}
    return {"id": pid, "name": entry.name, "kind": "rate-limit", "burst": burst,
            "images_per_request": len(x), "within": probe.within, "rate": probe.rate, "requests_before": before, **res,
            "metrics": {metric: res["answered"]}, "metric_intervals": {metric: interval}}


def evaluate_privacy(cfg: Any, i: int, model: Any, test: Any, train_loader: Callable[[], Any], make_model: Callable[[bool], Any],
                     device: Any, out: Optional[Path], done: dict[str, dict], emit: Callable[[str, dict], None],
                     engine: Any = None, base: Path = Path(".")) -> list[dict[str, Any]]:
    """The scorecard records of privacy entry i (one for membership inference, one per budget for
    extraction), each unit reused from `done` or run and saved through `emit` as it finishes."""
    entry = cfg.probes[i]
    num_classes = int(max(int(test.y.max()), 0) + 1)
    if entry.name == "extraction":
        return _extraction(cfg, i, model, test, train_loader, make_model, device, done, emit, engine, num_classes, base)
    unit = f"probe|{i}|{entry.probe_id}"  # membership inference and rate limiting: one record each
    if unit in done:
        return [done[unit]]
    if entry.name == "rate-limit":
        rec = rate_limit_record(cfg, i, model, test)
    else:
        rec = _membership(cfg, i, model, test, train_loader(), make_model, device, out, done, emit, engine)
    emit(unit, rec)
    return [rec]
