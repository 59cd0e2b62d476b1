"""The `standard` ensemble against ART's AutoAttack, and what the cascade saves.

One process, one model (the builtin digits CNN), the same points (the first N correctly classified
test digits), L-inf. Robust accuracy for every row is re-scored here, counting only examples
inside the budget and the [0, 1] box, so no library is taken at its word.

    .venv/bin/python benchmarks/standard_speed.py                  # 256 points, eps 0.1
    .venv/bin/python benchmarks/standard_speed.py --points 64 --eps 0.05 --skip-art

Rows:
  standard (harness)    harness.run with {name: standard} (APGD-CE -> APGD-T -> Square, defaults)
  ART AutoAttack        art.attacks.evasion.AutoAttack with its defaults (its own attack list)
  suite, cascade        fgsm + pgd + standard through harness.run, later attacks on survivors only
  suite, no cascade     the same with cascade: false (every attack on every correct point)
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time

import numpy as np
import torch

import harness
from harness.attacks import ThreatModel
from harness.sources.builtin import digits_cnn
from harness.sources.data import digits_split
from harness.sources.models import BoundedModel


def points(n: int):
    model = BoundedModel(digits_cnn()[0])
    x, y = digits_split("test")
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return model, x[ok][:n], y[ok][:n]


def robust_accuracy(model, x, y, adv, eps: float) -> float:
    adv = adv.clamp(0, 1)
    inside = ThreatModel("linf", eps).contains(adv, x)
    adv = torch.where(inside.view(-1, 1, 1, 1), adv, x)
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def run_suite(x, y, attacks, cascade: bool = True):
    cfg = {"name": "bench", "device": "cpu", "cascade": cascade, "data": {"batch_size": 256}, "attacks": attacks}
    start = time.perf_counter()
    card = harness.run(cfg, data=(x, y), show_progress=False)
    return time.perf_counter() - start, card


def art_autoattack(model, x, y, eps: float):
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    attack = AutoAttack(estimator=clf, norm=np.inf, eps=eps, eps_step=eps / 4, batch_size=256)
    start = time.perf_counter()
    adv = attack.generate(x.numpy(), y=y.numpy())
    return time.perf_counter() - start, torch.from_numpy(adv).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--skip-art", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, x, y = points(args.points)
    print(f"# {dt.date.today()} {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(y)} correctly classified digits, linf eps {args.eps}")
    rows = []
    standard = [{"name": "standard", "norm": "linf", "epsilons": [args.eps]}]
    t_std, card = run_suite(x, y, standard)
    ra_std = card.metrics[f"robust_accuracy:standard-linf@{args.eps}"]
    stages = card.attacks[0]["stages"]
    rows.append(("standard (harness)", t_std, ra_std))
    if not args.skip_art:
        t_art, adv = art_autoattack(model, x, y, args.eps)
        rows.append(("ART AutoAttack (defaults)", t_art, robust_accuracy(model, x, y, adv, args.eps)))
    suite = [{"name": "fgsm", "norm": "linf", "epsilons": [args.eps]}, {"name": "pgd", "norm": "linf", "epsilons": [args.eps], "steps": 20}] + standard
    t_c, card_c = run_suite(x, y, suite, cascade=True)
    t_n, card_n = run_suite(x, y, suite, cascade=False)
    key = f"robust_accuracy:worst-linf@{args.eps}"
    rows.append(("suite fgsm+pgd+standard, cascade", t_c, card_c.metrics[key]))
    rows.append(("suite fgsm+pgd+standard, no cascade", t_n, card_n.metrics[key]))
    print(f"| {'row':<38} | {'seconds':>8} | {'x standard':>10} | {'robust acc':>10} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 11}:|{'-' * 11}:|")
    for name, t, ra in rows:
        print(f"| {name:<38} | {t:8.2f} | {t / t_std:10.2f} | {ra:10.4f} |")
    print("\nstandard's stages:", ", ".join(f"{s['attack']} -> {s['robust_accuracy']:.4f} ({s['seconds']:.1f} s)" for s in stages))
    print(f"cascade saving: {t_n / t_c:.2f}x less time with the cascade (same worst case: {card_c.metrics[key]:.4f} vs {card_n.metrics[key]:.4f})")


if __name__ == "__main__":
    main()
