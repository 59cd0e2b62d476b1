"""Carlini & Wagner L2 side by side: the harness's `cw` against foolbox's L2CarliniWagnerAttack and
ART's CarliniL2Method, on the same model, the same points and the same schedule.

All three get the same binary search steps, steps per search step (ART: ``max_iter``), step size
(ART: the initial ``learning_rate`` of its line search) and initial constant. Each is timed
`--repeats` times, interleaved with the others (the order reverses every repeat); the table shows
the median time, the median of the per-repeat ratios to the harness, and, from the first repeat,
the median L2 perturbation over the points broken and the fraction broken (re-scored here).

    .venv/bin/python benchmarks/cw_speed.py                         # 64 digits points, 9 x 100 steps
    .venv/bin/python benchmarks/cw_speed.py --stepsize 0.1 --n 128  # the step the digits model needs
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import math
import platform
import statistics
import time
import warnings
from typing import Callable, Optional

import torch

from harness.attacks import ThreatModel
from harness.attacks.minimal import CarliniWagner
from harness.sources.models import BoundedModel

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> adversarial examples


def digits_setup(n: int) -> tuple[BoundedModel, torch.Tensor, torch.Tensor]:
    """The builtin digits CNN and the first n test points it classifies correctly."""
    from harness.sources.builtin import digits_cnn
    from harness.sources.data import digits_split

    model = BoundedModel(digits_cnn()[0])
    x, y = digits_split("test")
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    return model, x[keep][:n].contiguous(), y[keep][:n].contiguous()


def variants(model: BoundedModel, args: argparse.Namespace) -> dict[str, Run]:
    ours = CarliniWagner(binary_search_steps=args.binary_search_steps, steps=args.steps, stepsize=args.stepsize,
                         initial_const=args.initial_const)
    out: dict[str, Run] = {"harness cw": lambda x, y: ours(model, x, y, ThreatModel("l2", math.inf))}
    if importlib.util.find_spec("foolbox") is None:
        print("(foolbox is not installed: skipped; pip install 'robustgate[foolbox]')")
    else:
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1))
        fattack = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=args.binary_search_steps, steps=args.steps,
                                                   stepsize=args.stepsize, initial_const=args.initial_const)
        out["foolbox L2CarliniWagnerAttack"] = lambda x, y: fattack(fmodel, x, y, epsilons=None)[0]
    if importlib.util.find_spec("art") is None:
        print("(art is not installed: skipped; pip install 'robustgate[art]')")
    else:
        from art.attacks.evasion import CarliniL2Method
        from art.estimators.classification import PyTorchClassifier

        def art(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                    nb_classes=10, clip_values=(0.0, 1.0))
            attack = CarliniL2Method(clf, binary_search_steps=args.binary_search_steps, max_iter=args.steps,
                                     learning_rate=args.stepsize, initial_const=args.initial_const,
                                     batch_size=len(x), verbose=False)
            return torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
        out["ART CarliniL2Method"] = art
    return out


def quality(model: BoundedModel, adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Median L2 over the points broken (re-scored here) and the fraction broken."""
    adv = adv.clamp(0, 1)
    with torch.no_grad():
        broken = model(adv).argmax(dim=1) != y
    size = (adv - x).flatten(1).norm(dim=1)[broken]
    return (float(size.median()) if len(size) else math.nan), float(broken.float().mean())


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="digits test points (correctly classified ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--binary-search-steps", type=int, default=CarliniWagner.binary_search_steps)
    p.add_argument("--steps", type=int, default=CarliniWagner.steps)
    p.add_argument("--stepsize", type=float, default=CarliniWagner.stepsize)
    p.add_argument("--initial-const", type=float, default=CarliniWagner.initial_const)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = digits_setup(args.n)
    runs = variants(model, args)
    for run in runs.values():
        run(x[:2], y[:2])  # warm-up: lazy imports, one-time library setup

    times: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            adv = runs[name](x, y)
            times[name].append(time.perf_counter() - t0)
            first.setdefault(name, adv)

    print(f"{dt.date.today()}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  python {platform.python_version()}")
    print(f"digits CNN, {len(y)} points; {args.binary_search_steps} binary search steps x {args.steps} steps, "
          f"step size {args.stepsize}, initial const {args.initial_const}; median of {args.repeats}")
    print(f"| {'implementation':<30} | {'seconds':>8} | {'x ours':>6} | {'min..max s':>13} | {'median L2':>9} | {'broken':>6} |")
    print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 7}:|{'-' * 14}:|{'-' * 10}:|{'-' * 7}:|")
    ours = times["harness cw"]
    for name in runs:
        ratio = statistics.median(t / o for t, o in zip(times[name], ours))
        span = f"{min(times[name]):.2f}..{max(times[name]):.2f}"
        med, broken = quality(model, first[name], x, y)
        print(f"| {name:<30} | {statistics.median(times[name]):>8.2f} | {ratio:>6.2f} | {span:>13} | {med:>9.4f} | {broken:>6.3f} |")


if __name__ == "__main__":
    main()
