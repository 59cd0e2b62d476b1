"""The privacy probes (membership inference, model extraction) against ART's, on the same model and data.

One process, one target: the builtin digits CNN (trained on the 1347 images of sklearn digits' train
split). Members are the train split, non-members the 450 test images. Every row's figures are
re-computed here from the scores or the stolen model, except the harness's own, which are read from
its scorecard (its metrics, intervals and probe records).

    .venv/bin/python benchmarks/privacy.py --quick          # LiRA online with 4 shadow models, budgets 100 300
    .venv/bin/python benchmarks/privacy.py                  # online + offline, 16 shadows, budgets 100 300 1000
    .venv/bin/python benchmarks/privacy.py --skip-ours      # ART's rows alone

Membership inference rows:
  harness lira online|offline   harness.run with {name: membership-inference, method: lira, target: model,
                                shadow_models: N}: LiRA with N shadows trained by the builtin recipe on
                                random halves of train + test
  harness loss                  the same probe with method: loss (Yeom et al.'s threshold on the loss)
  ART black-box <m>, <input>    MembershipInferenceBlackBox(attack_model_type=m, input_type=input): an attack
                                model fit on half of the members and half of the non-members (it is told
                                which is which), scored with infer(probabilities=True) on the other halves;
                                `prediction` features are the victim's softmax probabilities (what a
                                deployed API answers), `loss` its cross-entropy on the true label
  reference loss (here)         the loss threshold in a few lines of torch on ART's evaluation halves (a
                                check on the harness's loss row, which uses all trials)
  ART rule-based                MembershipInferenceBlackBoxRuleBased: "member" when the model is right;
                                a 0/1 score, scored on the same evaluation halves

TPR@1%FPR is the harness's definition for every row: a threshold chosen on a calibration part of the
trials (the highest score at which at most 1% of its non-members are called members), TPR and FPR
measured on the rest (for ART: its evaluation halves, 674 members + 225 non-members, split in two
again at random; for the harness: its `calibration: 0.5` split of all 1797 trials). ci95: for ART a
plain Wilson interval on the measured TPR, for the harness its record's interval. "ROC TPR@1%" (the
largest TPR at FPR <= 0.01, no held-out threshold, so optimistic) and AUC are read off the ROC of ART's whole evaluation halves (899 trials), and of the
harness's evaluation part (its record's ROC, at most 300 points; its auc metric; 898 trials).

Extraction rows (victim: the builtin model; query pool: the 1347 train images, unlabeled; a fresh
DigitsCNN thief for every budget, Adam lr 1e-3, batch 64, the builtin recipe's 30 epochs unless
--epochs, raised as the harness raises them so that at least --min-steps optimizer steps run (the
harness's default 500: 250 epochs at 100 queries, 100 at 300, 32 at 1000), the same for ART's thief
(the "ep." in the setting)): fidelity is the thief's agreement with the victim on the 450 test images,
stolen accuracy its accuracy on their labels.
  harness probabilities|labels  {name: extraction, queries: holdout, answers: probabilities|labels, budgets: [...]}
  ART KnockoffNets              KnockoffNets(sampling_strategy="random", use_probability=True), the victim
                                answering softmax probabilities (soft targets for the thief's cross-entropy)
  ART CopycatCNN                CopycatCNN (the victim's labels, one-hot)

"seconds" is wall time: a whole harness.run for the harness's MIA rows (shadow training included); the
probe record's own seconds for its extraction rows (one budget each); the attack's fit + infer, or
extract, for ART's. Everything runs with torch.set_num_threads(--threads) (default 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

import harness
from harness.core.stats import wilson_interval
from harness.sources.builtin import RECIPE, DigitsCNN, digits_cnn
from harness.sources.data import digits_split

FPR = 0.01
ART_MISSING = ("ART is not installed: pip install adversarial-robustness-toolbox "
               "(or pip install 'robustgate[art]'), or run with --skip-art")


def art_modules():
    try:
        from art.attacks.extraction import CopycatCNN, KnockoffNets
        from art.attacks.inference.membership_inference import (MembershipInferenceBlackBox,
                                                                 MembershipInferenceBlackBoxRuleBased)
        from art.estimators.classification import PyTorchClassifier
    except ImportError as err:
        raise SystemExit(f"{ART_MISSING} ({err})") from None
    return PyTorchClassifier, MembershipInferenceBlackBox, MembershipInferenceBlackBoxRuleBased, KnockoffNets, CopycatCNN


def classifier(net: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    PyTorchClassifier = art_modules()[0]
    return PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), optimizer=optimizer, input_shape=(1, 8, 8),
                             nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")


# ---------------------------------------------------------------------------------------------- scoring


def roc_tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    ok = np.asarray(fpr) <= level + 1e-12
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def calibrated(cal_m: np.ndarray, cal_n: np.ndarray, ev_m: np.ndarray, ev_n: np.ndarray, level: float) -> dict[str, Any]:
    """Threshold on the calibration part (call "member" when score > t, at most `level` of its
    non-members above t), TPR and FPR measured on the evaluation part."""
    allowed = int(math.floor(level * len(cal_n)))
    t = float(np.sort(cal_n)[::-1][allowed]) if allowed < len(cal_n) else -math.inf
    k = int((ev_m > t).sum())
    return {"tpr": k / len(ev_m), "ci95": wilson_interval(k, len(ev_m)), "fpr": float((ev_n > t).mean()), "threshold": t}


def auc(s_m: np.ndarray, s_n: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(s_m)), np.zeros(len(s_n))], np.r_[s_m, s_n]))


def score(s_m: np.ndarray, s_n: np.ndarray, seed: int) -> dict[str, Any]:
    """Calibrated TPR@1% on a random half of each (the other half chooses the threshold); AUC and the
    ROC read-off on all of them (no threshold to choose)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(s_m)), rng.permutation(len(s_n))
    cm, em = pm[: len(pm) // 2], pm[len(pm) // 2:]
    cn, en = pn[: len(pn) // 2], pn[len(pn) // 2:]
    out = calibrated(s_m[cm], s_n[cn], s_m[em], s_n[en], FPR)
    y = np.r_[np.ones(len(s_m)), np.zeros(len(s_n))]
    s = np.r_[s_m, s_n]
    fpr, tpr, _ = roc_curve(y, s)
    out.update(auc=float(roc_auc_score(y, s)), roc_tpr=roc_tpr_at(fpr, tpr, FPR), n=(len(s_m), len(s_n)), n_measured=(len(em), len(en)))
    return out


# ---------------------------------------------------------------------------------------------- ART


def art_mia(victim: nn.Module, xm, ym, xn, yn, models: list[str], seed: int) -> list[dict[str, Any]]:
    _, BlackBox, RuleBased, _, _ = art_modules()
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(ym)), rng.permutation(len(yn))
    fm, em = pm[: len(pm) // 2], pm[len(pm) // 2:]
    fn, en = pn[: len(pn) // 2], pn[len(pn) // 2:]
    xm, ym, xn, yn = xm.numpy(), ym.numpy(), xn.numpy(), yn.numpy()
    probs = classifier(nn.Sequential(victim, nn.Softmax(dim=1)).eval())  # the API's answers
    logits = classifier(victim)  # for input_type="loss": the cross-entropy on the true label
    rows = []
    settings = [(m, "prediction") for m in models] + [("nn", "loss")]
    for m, kind in settings:
        torch.manual_seed(seed)
        np.random.seed(seed)
        start = time.perf_counter()
        attack = BlackBox(probs if kind == "prediction" else logits, input_type=kind, attack_model_type=m)
        attack.fit(x=xm[fm], y=ym[fm], test_x=xn[fn], test_y=yn[fn])
        s_m = np.asarray(attack.infer(xm[em], ym[em], probabilities=True)).reshape(len(em), -1)[:, -1]
        s_n = np.asarray(attack.infer(xn[en], yn[en], probabilities=True)).reshape(len(en), -1)[:, -1]
        seconds = time.perf_counter() - start
        # the same attack model on the examples it was fit on: how far it learned its fit halves
        f_m = np.asarray(attack.infer(xm[fm], ym[fm], probabilities=True)).reshape(len(fm), -1)[:, -1]
        f_n = np.asarray(attack.infer(xn[fn], yn[fn], probabilities=True)).reshape(len(fn), -1)[:, -1]
        rows.append({"method": f"ART black-box {m}", "setting": f"{kind}, fit on {len(fm)}+{len(fn)}", "seconds": seconds,
                     "fit_auc": auc(f_m, f_n), **score(s_m, s_n, seed)})
    start = time.perf_counter()
    attack = RuleBased(probs)
    s_m = np.asarray(attack.infer(xm[em], ym[em], probabilities=True))[:, 1]
    s_n = np.asarray(attack.infer(xn[en], yn[en], probabilities=True))[:, 1]
    rows.append({"method": "ART rule-based", "setting": "member if correct", "seconds": time.perf_counter() - start,
                 **score(s_m, s_n, seed)})
    return rows


def reference_loss(victim: nn.Module, xm, ym, xn, yn, seed: int) -> dict[str, Any]:
    """Yeom et al.'s loss threshold in plain torch, scored on the same evaluation halves as ART's rows:
    the figure the harness's `method: loss` should match (it sees all trials, not half)."""
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(ym)), rng.permutation(len(yn))
    em, en = pm[len(pm) // 2:], pn[len(pn) // 2:]
    start = time.perf_counter()
    with torch.no_grad():
        s_m = -nn.functional.cross_entropy(victim(xm[em]), ym[em], reduction="none").numpy()
        s_n = -nn.functional.cross_entropy(victim(xn[en]), yn[en], reduction="none").numpy()
    return {"method": "reference loss (here)", "setting": "-loss, ART's evaluation halves", "seconds": time.perf_counter() - start,
            **score(s_m, s_n, seed)}


def agreement(thief: nn.Module, victim: nn.Module, x, y) -> tuple[float, float]:
    with torch.no_grad():
        t, v = thief(x).argmax(1), victim(x).argmax(1)
    return float((t == v).float().mean()), float((t == y).float().mean())


def thief_epochs(budget: int, epochs: int, batch: int, min_steps: int) -> int:
    """The epochs the harness's thief trains for at a budget (harness.attacks.privacy.train_thief):
    the recipe's, raised so that at least min_steps optimizer steps run."""
    return max(epochs, math.ceil(min_steps / max(1, math.ceil(budget / batch))))


def art_extraction(victim: nn.Module, x_pool, x_te, y_te, budgets: list[int], epochs: int, batch: int, min_steps: int,
                   seed: int) -> list[dict[str, Any]]:
    _, _, _, KnockoffNets, CopycatCNN = art_modules()
    probs = classifier(nn.Sequential(victim, nn.Softmax(dim=1)).eval())
    logits = classifier(victim)
    rows = []
    for name, make in (("ART KnockoffNets", lambda b, e: KnockoffNets(probs, batch_size_fit=batch, batch_size_query=256, nb_epochs=e,
                                                                     nb_stolen=b, sampling_strategy="random", use_probability=True,
                                                                     verbose=False)),
                       ("ART CopycatCNN", lambda b, e: CopycatCNN(logits, batch_size_fit=batch, batch_size_query=256, nb_epochs=e,
                                                                  nb_stolen=b, use_probability=False))):
        for b in budgets:
            torch.manual_seed(seed)
            np.random.seed(seed)
            net = DigitsCNN()
            thief = classifier(net, torch.optim.Adam(net.parameters(), lr=1e-3))
            e = thief_epochs(b, epochs, batch, min_steps)
            start = time.perf_counter()
            make(b, e).extract(x_pool.numpy(), thieved_classifier=thief)
            seconds = time.perf_counter() - start
            net.eval()
            fid, acc = agreement(net, victim, x_te, y_te)
            rows.append({"method": name, "setting": f"{'probabilities' if 'Knockoff' in name else 'labels'}, {b} queries, {e} ep.",
                         "budget": b, "answers": "probabilities" if "Knockoff" in name else "labels",
                         "fidelity": fid, "stolen_accuracy": acc, "seconds": seconds})
    return rows


# ---------------------------------------------------------------------------------------------- harness


def config(probe: dict[str, Any], seed: int) -> dict[str, Any]:
    return {"name": "privacy-bench", "seed": seed, "device": "cpu", "model": {"source": "builtin:digits-cnn"},
            "data": {"source": "builtin:digits", "split": "test"}, "attacks": [], "probes": [probe]}


def run_ours(probe: dict[str, Any], out: Path, seed: int):
    """(seconds, card, None) or (seconds, None, the error's traceback)."""
    start = time.perf_counter()
    try:
        card = harness.run(config(probe, seed), out=out / probe["id"], show_progress=False)
    except Exception:
        return time.perf_counter() - start, None, traceback.format_exc()
    return time.perf_counter() - start, card, None


def probe_records(card, pid: str) -> list[dict[str, Any]]:
    return [p for p in card.record.get("probes", []) if p.get("id") == pid]


def ours_mia(probe: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    pid = probe["id"]
    setting = f"{probe['method']}" + (f" {probe.get('variant', 'online')}, {probe['shadow_models']} shadows"
                                      if probe["method"] == "lira" else "")
    row: dict[str, Any] = {"method": f"harness {probe['method']}", "setting": setting}
    seconds, card, error = run_ours(probe, out, seed)
    row["seconds"] = seconds
    if error:
        return {**row, "error": error}
    rec = probe_records(card, pid)[0]
    key = f"tpr_at_fpr:{pid}@{FPR}"
    intervals = rec.get("metric_intervals") or card.record.get("metric_intervals", {})
    level = next((lv for lv in rec.get("levels", []) if math.isclose(lv.get("fpr", -1), FPR)), {})
    roc = rec.get("roc") or {}
    row.update(tpr=card.metrics[key], auc=card.metrics[f"auc:{pid}"],
               ci95=tuple(intervals.get(key, {}).get("ci95") or (math.nan, math.nan)),
               fpr=level.get("fpr_measured", math.nan),
               roc_tpr=roc_tpr_at(roc["fpr"], roc["tpr"], FPR) if roc.get("fpr") else math.nan,
               n=(rec.get("evaluation", {}).get("n_members"), rec.get("evaluation", {}).get("n_nonmembers")),
               record_seconds=rec.get("seconds"), shadow_accuracy=rec.get("shadow_accuracy"))
    return row


def ours_extraction(answers: str, budgets: list[int], epochs: Optional[int], min_steps: Optional[int], out: Path,
                    seed: int) -> list[dict[str, Any]]:
    pid = "steal" if answers == "probabilities" else f"steal-{answers}"
    probe: dict[str, Any] = {"name": "extraction", "id": pid, "queries": "holdout", "answers": answers, "budgets": budgets}
    if epochs is not None:
        probe["epochs"] = epochs
    if min_steps is not None:
        probe["min_steps"] = min_steps
    seconds, card, error = run_ours(probe, out, seed)
    if error:
        return [{"method": "harness extraction", "setting": f"{answers}, budgets {budgets}", "seconds": seconds, "error": error}]
    rows = []
    for b in budgets:
        rec = next(r for r in probe_records(card, pid) if r.get("budget") == b)
        e = thief_epochs(b, RECIPE["epochs"] if epochs is None else epochs, RECIPE["batch_size"],
                         default_min_steps() if min_steps is None else min_steps)
        rows.append({"method": "harness extraction", "setting": f"{answers}, {b} queries, {e} ep.", "budget": b, "answers": answers,
                     "fidelity": card.metrics[f"fidelity:{pid}@{b}"], "stolen_accuracy": card.metrics[f"stolen_accuracy:{pid}@{b}"],
                     "ci95": tuple(card.record.get("metric_intervals", {}).get(f"fidelity:{pid}@{b}", {}).get("ci95", (math.nan, math.nan))),
                     "seconds": rec.get("seconds", math.nan), "run_seconds": seconds})
    return rows


def default_min_steps() -> int:
    from harness.attacks.privacy import Extraction

    return Extraction().min_steps


# ---------------------------------------------------------------------------------------------- table


def f4(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def ci(v: Any) -> str:
    return "-" if not v or any(isinstance(a, float) and math.isnan(a) for a in v) else f"{v[0]:.3f}..{v[1]:.3f}"


def table(rows: list[dict[str, Any]]) -> None:
    head = ("method", "setting", "TPR@1%FPR", "ci95", "FPR meas.", "ROC TPR@1%", "AUC", "fidelity", "stolen acc", "seconds")
    widths = (22, 36, 9, 12, 9, 10, 6, 8, 10, 8)
    print("| " + " | ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))) + " |")
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        if r.get("error"):
            cells = (r["method"], r["setting"], "failed", "", "", "", "", "", "", f"{r['seconds']:.2f}")
        else:
            cells = (r["method"], r["setting"], f4(r.get("tpr")), ci(r.get("ci95")) if "tpr" in r else "-", f4(r.get("fpr")),
                     f4(r.get("roc_tpr")), f4(r.get("auc")), f4(r.get("fidelity")), f4(r.get("stolen_accuracy")), f"{r['seconds']:.2f}")
        print("| " + " | ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |")


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}" if b else ("n/a (peer 0)" if a else "1.00 (both 0)")


def ratios(mia: list[dict[str, Any]], ext: list[dict[str, Any]]) -> None:
    ok = [r for r in mia if not r.get("error")]
    ours = [r for r in ok if r["method"].startswith("harness lira")]
    art = [r for r in ok if r["method"].startswith("ART black-box")]
    if ours and art:
        best = max(art, key=lambda r: (r["tpr"], r["auc"]))
        for o in ours:
            print(f"MIA {o['setting']} / {best['method']} ({best['setting']}, ART's best TPR@1%): "
                  f"TPR@1%FPR x{ratio(o['tpr'], best['tpr'])}, ROC TPR@1% x{ratio(o['roc_tpr'], best['roc_tpr'])}, "
                  f"AUC x{ratio(o['auc'], best['auc'])}, seconds x{ratio(o['seconds'], best['seconds'])}")
    good = [r for r in ext if not r.get("error")]
    for answers, peer in (("probabilities", "ART KnockoffNets"), ("labels", "ART CopycatCNN")):
        for o in [r for r in good if r["method"] == "harness extraction" and r["answers"] == answers]:
            p = next((r for r in good if r["method"] == peer and r["budget"] == o["budget"]), None)
            if p:
                print(f"extraction {answers} @{o['budget']} / {peer}: fidelity x{ratio(o['fidelity'], p['fidelity'])}, "
                      f"stolen accuracy x{ratio(o['stolen_accuracy'], p['stolen_accuracy'])}, seconds x{ratio(o['seconds'], p['seconds'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 shadow models, budgets 100 300, ART attack models nn rf")
    ap.add_argument("--shadows", type=int, default=None, help="LiRA shadow models (default 16; --quick 4)")
    ap.add_argument("--variants", nargs="+", default=None, choices=["online", "offline"],
                    help="LiRA variants, each its own run (default online offline; --quick online)")
    ap.add_argument("--budgets", type=int, nargs="+", default=None, help="extraction query budgets (default 100 300 1000; --quick 100 300)")
    ap.add_argument("--epochs", type=int, default=None, help="thief epochs (default: the builtin recipe's 30)")
    ap.add_argument("--art-models", nargs="+", default=None, help="ART black-box attack models (default nn rf gb; --quick nn rf)")
    ap.add_argument("--min-steps", type=int, default=None,
                    help="least optimizer steps of a thief (default: the harness's, 500); ART's epochs are raised to match")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every row (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="where the harness runs write (default: a temporary folder)")
    ap.add_argument("--skip-art", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-mia", action="store_true")
    ap.add_argument("--skip-extraction", action="store_true")
    args = ap.parse_args()
    shadows = args.shadows or (4 if args.quick else 16)
    budgets = args.budgets or ([100, 300] if args.quick else [100, 300, 1000])
    variants = args.variants or (["online"] if args.quick else ["online", "offline"])
    models = args.art_models or (["nn", "rf"] if args.quick else ["nn", "rf", "gb"])
    epochs = args.epochs if args.epochs is not None else RECIPE["epochs"]  # the builtin recipe's, which the harness's thief uses
    min_steps = default_min_steps() if args.min_steps is None else args.min_steps
    if not args.skip_art:
        art_modules()  # fail early, naming the install
    torch.set_num_threads(args.threads)

    victim = digits_cnn()[0].eval()  # trained and cached on a first use (untimed here)
    torch.set_num_threads(args.threads)
    for p in victim.parameters():
        p.requires_grad_(False)
    x_tr, y_tr = digits_split("train")
    x_te, y_te = digits_split("test")
    with torch.no_grad():
        acc_tr = float((victim(x_tr).argmax(1) == y_tr).float().mean())
        acc_te = float((victim(x_te).argmax(1) == y_te).float().mean())
    import importlib.metadata as md

    try:
        art_version = md.version("adversarial-robustness-toolbox")
    except md.PackageNotFoundError:
        art_version = "absent"
    print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC {platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), ART {art_version}, Python {platform.python_version()}; builtin digits CNN: "
          f"train accuracy {acc_tr:.4f} ({len(y_tr)} members), test accuracy {acc_te:.4f} ({len(y_te)} non-members); "
          f"shadows {shadows}, budgets {budgets}, thief epochs {epochs} (at least {min_steps} steps) batch {RECIPE['batch_size']}, "
          f"seed {args.seed}")

    tmp = None
    out = args.out
    if out is None and not args.skip_ours:
        tmp = tempfile.TemporaryDirectory(prefix="privacy-bench-")
        out = Path(tmp.name)
    mia: list[dict[str, Any]] = []
    ext: list[dict[str, Any]] = []
    if not args.skip_mia:
        if not args.skip_ours:
            for v in variants:
                mia.append(ours_mia({"name": "membership-inference", "id": f"mia-{v}", "method": "lira", "variant": v,
                                     "target": "model", "shadow_models": shadows}, out, args.seed))
            mia.append(ours_mia({"name": "membership-inference", "id": "mia-loss", "method": "loss", "target": "model"}, out, args.seed))
        mia.append(reference_loss(victim, x_tr, y_tr, x_te, y_te, args.seed))
        if not args.skip_art:
            mia += art_mia(victim, x_tr, y_tr, x_te, y_te, models, args.seed)
    if not args.skip_extraction:
        if not args.skip_ours:
            for answers in ("probabilities", "labels"):
                ext += ours_extraction(answers, budgets, args.epochs, args.min_steps, out, args.seed)
        if not args.skip_art:
            ext += art_extraction(victim, x_tr, x_te, y_te, budgets, epochs, RECIPE["batch_size"], min_steps, args.seed)
    print()
    table(mia + sorted(ext, key=lambda r: (r.get("budget", 0), r["method"])))
    print()
    for r in mia:
        if r.get("shadow_accuracy"):
            print(f"{r['method']} {r['setting']}: shadow accuracy {r['shadow_accuracy']}, TPR measured on {r['n']} members/non-members, "
                  f"the probe record says {r['record_seconds']:.2f} s, the run took {r['seconds']:.2f} s")
        elif r.get("record_seconds") is not None:
            print(f"{r['method']} {r['setting']}: TPR measured on {r['n']} members/non-members, "
                  f"the probe record says {r['record_seconds']:.2f} s, the run took {r['seconds']:.2f} s")
        elif r.get("n_measured"):
            print(f"{r['method']} {r['setting']}: AUC on {r['n'][0]} members / {r['n'][1]} non-members, "
                  f"TPR@1%FPR on {r['n_measured'][0]} / {r['n_measured'][1]} (threshold from the others), {r['seconds']:.2f} s"
                  + (f"; AUC on its own fit halves {r['fit_auc']:.4f}" if "fit_auc" in r else ""))
    ratios(mia, ext)
    errors = [r for r in mia + ext if r.get("error")]
    for r in errors:
        print(f"\n{r['method']} ({r['setting']}) failed:\n{r['error']}")
    if tmp is not None:
        tmp.cleanup()
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
