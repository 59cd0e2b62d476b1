"""Wall time of a heavier suite on the local engine and on the Ray engine with 1 and 2 workers.

One process, one local Ray (started here with 2 CPUs), the builtin digits CNN on a deterministic
subset of the builtin digits test split. The suite: the `standard` ensemble (APGD-CE -> APGD-T ->
Square) at two L-inf epsilons, a defended variant (bit-depth squeezing, evaluated naively and
adaptively), and a BadNets poisoning probe at three fractions.

    .venv/bin/python benchmarks/ray_scaling.py --repeats 1              # about 10 min on a 2-core VM (2026-12-02)
    .venv/bin/python benchmarks/ray_scaling.py --repeats 3 --limit 300
    .venv/bin/python benchmarks/ray_scaling.py --workers 1 2 4 --no-attacks-only

Rows (each is harness.run on the same config; "first" includes the Ray workers' start):
  local, 1 thread          the local engine with torch.set_num_threads(1): the fair comparison with
                           single-threaded workers; every ratio is to this row
  local, N threads         the local engine with the machine's default torch threads
  ray W worker(s), first   a new RayEngine(workers=W, threads=1): its first run, actors starting
  ray W worker(s), warm    later runs on the same engine object (workers, model and data reused)
  ... attacks only         the same suite without the defense and the probe, to tell the part that
                           spreads over workers (attack units) from the rest

Round 0 runs the Ray configurations once (each engine's first run, actors starting); then
`--repeats` rounds of every configuration, the order reversed every other round. "seconds" is the median over those rounds; "x local-1" the median of the per-round ratios
to the single-threaded local row. While a Ray row runs, the driver is single-threaded too, so
whatever still runs on the driver costs what it costs in the local 1-thread row. The metrics of
every run are compared with the local 1-thread run of the same suite: any difference is printed
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

import harness
from harness.engines import engine_for


def suite(limit: int, batch_size: int, eps: list[float], queries: int, epochs: int, full: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "ray-scaling",
        "seed": 0,
        "device": "cpu",
        "model": {"source": "builtin:digits-cnn"},
        "data": {"source": "builtin:digits", "split": "test", "limit": limit, "batch_size": batch_size},
        "attacks": [{"name": "standard", "norm": "linf", "epsilons": eps, "queries": queries}],
    }
    if full:
        cfg["defenses"] = [{"name": "bit-depth", "bits": 3}]
        cfg["train"] = {"epochs": epochs}
        cfg["probes"] = [{"name": "badnets", "fractions": [0.01, 0.05, 0.1], "target": 0, "size": 3,
                          "position": "bottom-right", "pattern": "checker"}]
    return cfg


def same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Metric names whose values differ (NaN equals NaN); empty when the scorecards agree bit for bit."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            out.append(k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64, help="test samples attacked (a deterministic subset; default 64)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per unit of work (default 16: several units per stage)")
    ap.add_argument("--eps", type=float, nargs=2, default=[0.05, 0.1], help="the two L-inf epsilons (default 0.05 0.1)")
    ap.add_argument("--queries", type=int, default=300, help="Square's queries in `standard` (default 300; the attack's own default is 5000)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of each poisoning-probe model (default 1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after round 0 (default 2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (default 1 2), each threads=1")
    ap.add_argument("--cpus", type=int, default=None,
                    help="logical CPUs the local Ray is given (default: the sum of --workers, so every engine's actors can be up "
                         "at once; the idle ones take no core, and the work still runs on this machine's cores)")
    ap.add_argument("--no-attacks-only", action="store_true", help="skip the attacks-only rows")
    args = ap.parse_args()

    import ray

    default_threads = torch.get_num_threads()
    # one Ray for every row: each engine keeps its actors between rounds, so the logical CPUs must hold them all (with
    # only as many as the cores, a later engine's actors would wait for the first's and it would run on fewer workers)
    cpus = args.cpus if args.cpus is not None else sum(args.workers)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    full = suite(args.limit, args.batch_size, list(args.eps), args.queries, args.epochs, True)
    bare = suite(args.limit, args.batch_size, list(args.eps), args.queries, args.epochs, False)

    engines = {w: engine_for("ray", workers=w, threads=1) for w in args.workers}

    def local(threads: int, cfg: dict[str, Any]) -> Callable[[], Any]:
        def go() -> Any:
            torch.set_num_threads(threads)
            return harness.run(cfg, show_progress=False, engine="local")
        return go

    def on_ray(w: int, cfg: dict[str, Any]) -> Callable[[], Any]:
        def go() -> Any:
            torch.set_num_threads(1)  # the driver's own share of the work, single-threaded as in the local 1-thread row
            card = harness.run(cfg, show_progress=False, engine=engines[w])
            if engines[w].size != w:
                raise SystemExit(f"the {w}-worker engine ran with {engines[w].size} worker(s) up: give Ray more --cpus")
            return card
        return go

    configs: list[tuple[str, str, Callable[[], Any], int]] = [  # (row name, suite, run, threads)
        ("local, 1 thread", "full", local(1, full), 1),
        (f"local, {default_threads} threads", "full", local(default_threads, full), default_threads),
    ]
    configs += [(f"ray {w} worker{'s' if w > 1 else ''}", "full", on_ray(w, full), 1) for w in args.workers]
    if not args.no_attacks_only:
        configs.append(("local, 1 thread, attacks only", "bare", local(1, bare), 1))
        configs += [(f"ray {w} worker{'s' if w > 1 else ''}, attacks only", "bare", on_ray(w, bare), 1) for w in args.workers]

    print(f"# {dt.date.today()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} (default threads "
          f"{default_threads}), ray {ray.__version__}, Python {platform.python_version()}")
    print(f"# suite: standard linf @ {args.eps[0]} {args.eps[1]} (queries {args.queries}), bit-depth 3 defended variant, "
          f"badnets @ 0.01 0.05 0.1 ({args.epochs} epochs); {args.limit} test digits, batch size {args.batch_size}; "
          f"repeats {args.repeats}", flush=True)

    first: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    runs: list[tuple[str, str, int, dict[str, Any]]] = []  # (row, suite, round, metrics)
    try:
        for r in range(args.repeats + 1):
            order = [c for c in configs if c[0].startswith("ray")] if r == 0 else configs if r % 2 else configs[::-1]
            for name, kind, go, threads in order:
                start = time.perf_counter()
                card = go()
                seconds = time.perf_counter() - start
                (times[name].append(seconds) if r else first.__setitem__(name, seconds))
                runs.append((name, kind, r, dict(card.metrics)))
                print(f"  round {r}: {name:<32} {seconds:7.2f} s", flush=True)
    finally:
        for e in engines.values():
            e.close()
        torch.set_num_threads(default_threads)
        ray.shutdown()

    def ratios(name: str, base: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], times[base]))

    print()
    print(f"| {'row':<36} | {'seconds':>8} | {'x local-1':>9} | {'min..max s':>15} | {'first run s':>11} |")
    print(f"|{'-' * 38}|{'-' * 9}:|{'-' * 10}:|{'-' * 16}:|{'-' * 12}:|")
    for name, kind, _, _ in configs:
        base = "local, 1 thread" if kind == "full" else "local, 1 thread, attacks only"
        ts = times[name]
        fr = f"{first[name]:11.2f}" if name.startswith("ray") else f"{'-':>11}"
        print(f"| {name:<36} | {statistics.median(ts):8.2f} | {ratios(name, base):9.2f} | "
              f"{min(ts):6.2f}..{max(ts):6.2f} | {fr} |")
    print("(attacks-only rows: x is to 'local, 1 thread, attacks only')")

    if not args.no_attacks_only:
        print()
        base_full, base_bare = statistics.median(times["local, 1 thread"]), statistics.median(times["local, 1 thread, attacks only"])
        print(f"split of the local 1-thread run: attacks {base_bare:.1f} s, the rest (defended variant, "
              f"probe) {base_full - base_bare:.1f} s")
        for w in args.workers:
            n = f"ray {w} worker{'s' if w > 1 else ''}"
            full_w, bare_w = statistics.median(times[n]), statistics.median(times[f"{n}, attacks only"])
            rest_w = full_w - bare_w
            print(f"{n}: attacks {bare_w:.1f} s ({base_bare / bare_w:.2f}x faster than local 1 thread), "
                  f"the rest {rest_w:.1f} s ({(base_full - base_bare) / rest_w:.2f}x)" if rest_w > 0 else
                  f"{n}: attacks {bare_w:.1f} s, the rest {rest_w:.1f} s (within noise)")
        print("(the rest = full suite minus attacks only, medians; a ratio near 1 says that part does not spread)")

    reference = {kind: m for name, kind, r, m in runs if name.startswith("local, 1 thread") and r == 1}
    mismatches = []
    for name, kind, r, m in runs:
        diff = same(reference[kind], m)
        if diff:
            shown = ", ".join(f"{k}: {reference[kind].get(k)!r} vs {m.get(k)!r}" for k in diff[:3])
            mismatches.append(f"{name} (round {r}): {len(diff)} of {len(m)} metrics differ from local 1 thread; {shown}")
    print()
    if mismatches:
        print("METRICS DIFFER between configurations:")
        for line in mismatches:
            print("  " + line)
        sys.exit(1)
    print(f"metrics identical across all {len(configs)} configurations and every round "
          f"({len(reference['full'])} metrics in the full suite)")


if __name__ == "__main__":
    main()
