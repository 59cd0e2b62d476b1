"""PGD speed side by side: the harness against a bare PyTorch loop (the floor), foolbox and ART.

Everything runs in this one process on the same model and the same points (the ones the model
classifies correctly), L-inf, the same epsilon, steps and step size (2.5 * eps / steps). Each
variant is timed `--repeats` times, interleaved with the others so that drift of the machine
(thermal, other load) falls on all of them alike; the table shows the median time and the median
of the per-repeat ratios to the floor.

    .venv/bin/python benchmarks/pgd_speed.py                     # digits CNN and synthetic CNN
    .venv/bin/python benchmarks/pgd_speed.py --model digits --repeats 9

The floor does exactly the passes native PGD does with early_stop=False (random start, steps + 1
forwards, steps backwards, sign step, projection, per-sample best iterate kept with torch.where),
and no more, so "ratio" is the harness's overhead over the least that computation can cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import statistics
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.attacks import PGD, ThreatModel
from harness.sources.models import BoundedModel

Run = Callable[[int], torch.Tensor]  # seed -> adversarial examples for the benchmark's points


def floor_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, rel: float,
              generator: torch.Generator) -> torch.Tensor:
    """L-inf PGD in plain PyTorch, with the same arithmetic as attacks.PGD (early_stop=False), so
    its output is bit-identical for the same generator; the benchmark checks that."""
    step = eps * rel
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * u - 1) * eps).clamp(0, 1)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for t in range(steps + 1):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y, reduction="none")
        success = logits.argmax(dim=1) != y
        improve = ~fooled & (success | (loss > best_loss))
        best = torch.where(improve.view(shape), x_adv.detach(), best)
        best_loss = torch.where(improve, loss.detach(), best_loss)
        fooled = fooled | success
        if t == steps:
            break
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        delta = (x_adv.detach() + step * grad.sign() - x).clamp(-eps, eps)
        x_adv = (x + delta).clamp(0, 1)
    return best


class SyntheticCNN(nn.Module):
    """A mid-sized CNN for 3x32x32 inputs (about 0.3 M parameters, ~40 MFLOP a forward pass), so
    that the model, not per-step bookkeeping, dominates a step."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits_setup() -> tuple[BoundedModel, torch.Tensor, torch.Tensor]:
    from harness.sources.builtin import digits_cnn
    from harness.sources.data import digits_split

    model = BoundedModel(digits_cnn()[0])
    x, y = digits_split("test")
    return (model, *_correct(model, x, y))


def synthetic_setup(n: int) -> tuple[BoundedModel, torch.Tensor, torch.Tensor]:
    """Random weights and random images; the labels are the model's own predictions, so every point
    counts as correctly classified (robust accuracy here says little: the margins are tiny)."""
    torch.manual_seed(0)
    model = BoundedModel(SyntheticCNN())
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        keep = model(x).argmax(dim=1) == y
    return x[keep].contiguous(), y[keep].contiguous()


def variants(model: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             libraries: bool, runner: bool) -> dict[str, Run]:
    rel = 2.5 / steps
    threat = ThreatModel("linf", eps)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    out: dict[str, Run] = {
        "floor (bare torch loop)": lambda s: floor_pgd(model, x, y, eps, steps, rel, gen(s)),
        "harness PGD early_stop=False": lambda s: PGD(steps, rel, early_stop=False)(model, x, y, threat, generator=gen(s)),
        "harness PGD early_stop=True": lambda s: PGD(steps, rel)(model, x, y, threat, generator=gen(s)),
    }
    if runner:
        out.update(_runner_variants(model, x, y, eps, steps, rel))
    if libraries:
        from harness.attacks.adapters import ARTAttack, FoolboxAttack

        for module, name, attack in (("foolbox", "foolbox LinfPGD", FoolboxAttack("pgd", steps, rel)),
                                     ("art", "ART ProjectedGradientDescentPyTorch", ARTAttack("pgd", steps, rel, batch_size=len(y)))):
            if importlib.util.find_spec(module) is None:
                print(f"({module} is not installed: skipped; pip install 'robustgate[{module}]')")
                continue
            out[name] = (lambda a: lambda s: a(model, x, y, threat, generator=gen(s)))(attack)
    return out


def _runner_variants(model: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, rel: float) -> dict[str, Run]:
    """The runner's path on the same points: PGD as one unit of work on the local engine, plus its
    clipping, budget check and re-scoring forward pass. It returns verdicts, not examples, so these
    runs report robust accuracy directly (see `robust_accuracy`)."""
    from harness.engines.base import Unit
    from harness.engines.local import LocalEngine
    from harness.sources.data import data_from_tensors

    engine = LocalEngine()
    engine.start(model, data_from_tensors(x, y), [torch.device("cpu")])
    rows = tuple(range(len(y)))
    out: dict[str, Run] = {}
    for early in (False, True):
        attack = PGD(steps, rel, early_stop=early)

        def run(seed: int, attack: PGD = attack) -> torch.Tensor:
            (result,) = engine.run([Unit(attack=attack, norm="linf", epsilon=eps, rows=rows, seed=seed, batch_size=len(rows))])
            return ~result.broken  # (n,) bool robust, in place of examples
        out[f"runner (local engine) early_stop={early}"] = run
    return out


def robust_accuracy(model: nn.Module, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    if out.dtype == torch.bool:  # the runner's own verdicts
        return float(out.float().mean())
    assert bool(ThreatModel("linf", eps).contains(out, x).all()), "an attack left the budget"
    with torch.no_grad():
        return float((model(out).argmax(dim=1) == y).float().mean())


def measure(runs: dict[str, Run], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run(0)  # warm-up: lazy imports, allocator, one-time library setup
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # no variant always runs first
        for name in order:
            t0 = time.perf_counter()
            runs[name](r)
            times[name].append(time.perf_counter() - t0)
    return times


def _paired(times: list[float], floor: list[float]) -> float:
    """Median of the per-repeat ratios: each repeat's runs sat next to each other in time, so a slow
    spell of the machine cancels out of the ratio instead of landing on whichever variant it hit."""
    return statistics.median(t / f for t, f in zip(times, floor))


def report(title: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, repeats: int,
           libraries: bool, runner: bool) -> None:
    runs = variants(model, x, y, eps, steps, libraries, runner)
    floor, native = runs["floor (bare torch loop)"](0), runs["harness PGD early_stop=False"](0)
    identical = torch.equal(floor, native)
    times = measure(runs, repeats)
    floor_times = times["floor (bare torch loop)"]
    print(f"\n{title}: {len(y)} points of shape {tuple(x.shape[1:])}, linf eps {eps}, {steps} steps, step {2.5 / steps:.4g} * eps, "
          f"median of {repeats}; floor and harness (early_stop=False) outputs identical: {identical}")
    print(f"| {'variant':<38} | {'seconds':>8} | {'x floor':>7} | {'min..max s':>13} | {'robust acc':>10} |")
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 9}:|{'-' * 15}:|{'-' * 12}:|")
    for name, run in runs.items():
        med = statistics.median(times[name])
        ra = robust_accuracy(model, run(0), x, y, eps)
        span = f"{min(times[name]):.3f}..{max(times[name]):.3f}"
        print(f"| {name:<38} | {med:>8.3f} | {_paired(times[name], floor_times):>7.3f} | {span:>13} | {ra:>10.4f} |")
    ratio = _paired(times["harness PGD early_stop=False"], floor_times)
    print(f"harness PGD (early_stop=False) / floor = {ratio:.3f}: {'within' if ratio <= 1.05 else 'ABOVE'} the 1.05 target")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("digits", "synthetic", "both"), default="both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--synthetic-n", type=int, default=128, help="points for the synthetic model")
    p.add_argument("--synthetic-eps", type=float, default=None,
                   help="epsilon for the synthetic model (default: --eps; its random weights give tiny margins, so "
                        "at 0.1 every point falls in the first step and early stopping has nothing to show: try 0.01)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-libraries", action="store_true", help="skip foolbox and ART")
    p.add_argument("--no-runner", action="store_true", help="skip the runner's path (a unit on the local engine)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{dt.date.today()}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  python {platform.python_version()}")
    if args.model in ("digits", "both"):
        report("builtin digits CNN", *digits_setup(), args.eps, args.steps, args.repeats, not args.no_libraries, not args.no_runner)
    if args.model in ("synthetic", "both"):
        eps = args.eps if args.synthetic_eps is None else args.synthetic_eps
        report("synthetic CNN", *synthetic_setup(args.synthetic_n), eps, args.steps, args.repeats, not args.no_libraries, not args.no_runner)


if __name__ == "__main__":
    main()
