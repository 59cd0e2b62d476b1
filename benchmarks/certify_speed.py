"""Randomized smoothing's CERTIFY side by side: the harness against ART's PyTorchRandomizedSmoothing.

One process, one model, the same points: the builtin digits CNN trained under Gaussian noise of
sigma 0.25 (`digits_cnn(noise_recipe(0.25))`, eval mode), `--points` evenly spaced digits of the 450
test images, both sides at the same sigma, n0, n, alpha and batch size, on the CPU (or `--device cuda`:
the harness draws its noise on the device, ART gets `device_type="gpu"`).

    .venv/bin/python benchmarks/certify_speed.py                       # 50 points, n 10,000, 1 repeat: about 4 min here
    .venv/bin/python benchmarks/certify_speed.py --repeats 3 --no-baseline  # three interleaved timings of each side

ART needs `pip install adversarial-robustness-toolbox statsmodels` (its Clopper-Pearson bound is
statsmodels' `proportion_confint`; the benchmark stops naming the command otherwise).

What is the same and what is not (read from ART 1.20's `RandomizedSmoothingMixin.certify`):
- Both are Cohen et al.'s CERTIFY: the class is the argmax of n0 = ART's `sample_size` draws, its
  probability is bounded from below on n fresh draws, and below 1/2 both abstain (-1, radius 0);
  the radius is sigma * Phi^-1(p_lower). ART's bound is `proportion_confint(k, n, alpha=2 * alpha,
  method="beta")[0]`, the lower end of a two-sided 1 - 2 alpha Clopper-Pearson interval, which is
  the one-sided 1 - alpha bound the harness computes; the benchmark checks this by giving ART's
  bound the harness's own counts (the "same counts" line).
- Neither clips the noisy inputs: ART's `clip_values` bound only its attacks, its `predict` adds the
  noise and calls the model as is, and the harness adds noise in [0, 1] space without clipping.
- The draws differ: ART draws from numpy's global generator (seeded here with `--seed`), point after
  point; the harness gives each point its own torch generator from (seed, sample id). The two sides
  therefore disagree as two Monte Carlo runs do, and the "harness, seed + 1" row shows how much two
  runs of the same code differ, the yardstick for the ART row's agreement.
- ART loops over points in Python (one `predict` of n0 and one of n draws each, through numpy and a
  DataLoader); the harness packs points into shared forward passes of `--batch` images.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from harness.defenses.smoothing import RandomizedSmoothing

MISSING = "ART's randomized smoothing needs: .venv/bin/pip install adversarial-robustness-toolbox statsmodels"
RADII = (0.25, 0.5)


@dataclass(frozen=True)
class Answer:
    """One side's CERTIFY on the benchmark's points: class (-1 abstains) and radius, as numpy."""

    prediction: np.ndarray
    radius: np.ndarray


def setup(points: int, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[int]]:
    from harness.sources.builtin import digits_cnn, noise_recipe
    from harness.sources.data import digits_split

    net, _ = digits_cnn(noise_recipe(0.25))
    net.eval()
    x, y = digits_split("test")
    assert x.dim() == 4 and x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1, tuple(x.shape)
    ids = np.unique(np.linspace(0, len(x) - 1, min(points, len(x))).round().astype(int)).tolist()
    return net.to(device), x[ids].contiguous().to(device), y[ids].contiguous(), ids


def art_smoother(net: nn.Module, sigma: float, n0: int, alpha: float, device: str):
    try:
        import statsmodels  # noqa: F401  (ART imports it lazily, at the first bound)
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    except ImportError as err:
        raise SystemExit(f"{MISSING} ({err})") from None
    return PyTorchRandomizedSmoothing(model=net, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                                      clip_values=(0.0, 1.0), preprocessing=None, device_type="gpu" if device.startswith("cuda") else "cpu",
                                      sample_size=n0, scale=sigma, alpha=alpha)


def run_harness(rs: RandomizedSmoothing, net: nn.Module, x: torch.Tensor, ids: list[int], seed: int) -> tuple[Answer, float, object]:
    t0 = time.perf_counter()
    cert = rs.certify(net, x, num_classes=10, ids=ids, seed=seed)
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return Answer(cert.prediction.cpu().numpy(), cert.radius.double().cpu().numpy()), seconds, cert


def run_art(art, x: torch.Tensor, n: int, batch: int, seed: int) -> tuple[Answer, float]:
    np.random.seed(seed)  # ART draws its noise from numpy's global generator
    xs = x.cpu().numpy()
    t0 = time.perf_counter()
    prediction, radius = art.certify(xs, n=n, batch_size=batch)
    seconds = time.perf_counter() - t0
    return Answer(np.asarray(prediction, dtype=np.int64), np.asarray(radius, dtype=np.float64)), seconds


def certified_accuracy(a: Answer, y: np.ndarray, r: float) -> float:
    return float(((a.prediction == y) & (a.radius >= r)).mean())


def agreement(a: Answer, b: Answer) -> tuple[float, float, int, int]:
    """Fraction of points where both abstain or both certify the same class; the median |radius
    difference| over the points both certify with the same class, their count, and the count of
    points certified by both with different classes (a real disagreement, not Monte Carlo noise)."""
    same = a.prediction == b.prediction
    both = same & (a.prediction >= 0)
    clash = (a.prediction >= 0) & (b.prediction >= 0) & ~same
    med = float(np.median(np.abs(a.radius[both] - b.radius[both]))) if both.any() else float("nan")
    return float(same.mean()), med, int(both.sum()), int(clash.sum())


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=50, help="evenly spaced test digits (at most 450)")
    p.add_argument("--n", type=int, default=10_000, help="estimation draws per point")
    p.add_argument("--n0", type=int, default=100, help="selection draws per point (ART's sample_size)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000, help="images per forward pass, both sides")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side, interleaved; the median is shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both sides run")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the harness's second run at seed + 1")
    args = p.parse_args(argv)
    if importlib.util.find_spec("art") is None or importlib.util.find_spec("statsmodels") is None:
        raise SystemExit(MISSING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    import art

    net, x, y_t, ids = setup(args.points, args.device)
    y = y_t.numpy()
    rs = RandomizedSmoothing(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, batch=args.batch)
    smoother = art_smoother(net, args.sigma, args.n0, args.alpha, args.device)
    print(f"{dt.date.today()}  {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  device {torch.cuda.get_device_name(x.device) if x.is_cuda else 'cpu'}  ART {art.__version__}  python {platform.python_version()}")
    print(f"builtin digits CNN trained under noise 0.25: {len(ids)} evenly spaced test digits, sigma {args.sigma}, "
          f"n0 {args.n0}, n {args.n}, alpha {args.alpha}, batch {args.batch}, seed {args.seed}, median of {args.repeats}")

    # warm-up on two points with few draws: lazy imports (scipy, statsmodels), allocator, DataLoader
    warm = RandomizedSmoothing(sigma=args.sigma, n0=args.n0, n=args.n0, alpha=args.alpha, batch=args.batch)
    run_harness(warm, net, x[:2], ids[:2], args.seed)
    run_art(smoother, x[:2], args.n0, args.batch, args.seed)

    h_times, a_times, ratios = [], [], []
    for r in range(args.repeats):
        order = ("harness", "art") if r % 2 == 0 else ("art", "harness")  # neither side always runs first
        for side in order:
            if side == "harness":
                ours, t, cert = run_harness(rs, net, x, ids, args.seed)
                h_times.append(t)
            else:
                theirs, t = run_art(smoother, x, args.n, args.batch, args.seed)
                a_times.append(t)
        ratios.append(a_times[-1] / h_times[-1])
    rows: list[tuple[str, Answer, Optional[list[float]]]] = [("harness", ours, h_times), ("ART", theirs, a_times)]
    if not args.no_baseline:
        rows.append((f"harness, seed {args.seed + 1}", run_harness(rs, net, x, ids, args.seed + 1)[0], None))

    head = "".join(f" | cert acc r={r:<4}" for r in RADII)
    print(f"\n| {'side':<18} | {'seconds':>8} | {'min..max s':>15}{head} | abstain | agree w/ harness | med |dr| | both cert | clash |")
    print(f"|{'-' * 20}|{'-' * 9}:|{'-' * 16}:" + f"|{'-' * 16}:" * len(RADII) + f"|{'-' * 8}:|{'-' * 17}:|{'-' * 9}:|{'-' * 10}:|{'-' * 6}:|")
    for name, ans, times in rows:
        secs = f"{statistics.median(times):>8.2f}" if times else f"{'-':>8}"
        span = f"{min(times):.2f}..{max(times):.2f}" if times else "-"
        accs = "".join(f" | {certified_accuracy(ans, y, r):>16.4f}" for r in RADII)
        if ans is ours:
            agree = f" | {'-':>16} | {'-':>8} | {'-':>9} | {'-':>5} |"
        else:
            frac, med, both, clash = agreement(ours, ans)
            agree = f" | {frac:>16.4f} | {med:>8.4f} | {both:>9d} | {clash:>5d} |"
        print(f"| {name:<18} | {secs} | {span:>15}{accs} | {float((ans.prediction < 0).mean()):>7.4f}{agree}")
    print(f"ART / harness seconds = {statistics.median(ratios):.2f} (median of the per-repeat ratios; "
          f"each: {', '.join(f'{q:.2f}' for q in ratios)})")

    # ART's bound and radius on the harness's own counts: any difference here is one of formula, not of draws
    art_lower = np.array([smoother._lower_confidence_bound(int(k), args.n) for k in cert.top_count.tolist()])
    from scipy.stats import norm

    art_radius = np.where(art_lower < 0.5, 0.0, args.sigma * norm.ppf(np.maximum(art_lower, 0.5)))
    dp = float(np.max(np.abs(art_lower - cert.p_lower.double().cpu().numpy())))
    dr = float(np.max(np.abs(art_radius - ours.radius)))
    same_abstain = bool(np.array_equal(art_lower < 0.5, ours.prediction < 0))
    print(f"same counts (the harness's n draws through ART's bound): max |p_lower diff| {dp:.3g}, "
          f"max |radius diff| {dr:.3g}, same abstentions: {same_abstain}")
    if dp > 1e-9 or dr > 1e-9 or not same_abstain:
        raise SystemExit("the harness's bound differs from ART's on the same counts")


if __name__ == "__main__":
    main()
