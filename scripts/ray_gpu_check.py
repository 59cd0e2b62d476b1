"""The Ray engine with one GPU worker against the local engine on the same GPU: the same metrics, and
the throughput of each. Run by scripts/gpu_check.sh on a machine with a CUDA device:

    .venv/bin/python scripts/ray_gpu_check.py [--limit 450] [--repeats 2]

Prints one line per engine (seconds per run, attacked points per second) and whether the metrics are
identical; exits 1 when they are not, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=450, help="test digits to attack")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="a dry run of this script on the CPU (a CPU worker), where there is no GPU")
    args = parser.parse_args()

    import torch

    import harness
    from harness.engines import engine_for

    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA device: nothing to check (--cpu runs this script on the CPU)", file=sys.stderr)
        return 2
    import ray

    gpu = not args.cpu
    ray.init(address="local", num_gpus=1 if gpu else 0, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    suite = {"name": "ray-gpu", "device": "cuda" if gpu else "cpu", "seed": 0, "data": {"source": "builtin:digits", "limit": args.limit, "batch_size": 128},
             "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1, 0.2], "params": {"steps": 50}},
                         {"name": "apgd-ce", "norm": "l2", "epsilons": [1.0], "params": {"steps": 50}}]}
    local, remote = ("local (cuda:0)", "ray (1 GPU worker)") if gpu else ("local (cpu)", "ray (1 CPU worker)")
    engines = {local: lambda: engine_for("local"),
               remote: lambda: engine_for("ray", workers=1, gpus_per_worker=1.0 if gpu else None, device=suite["device"])}
    made = {name: make() for name, make in engines.items()}
    seconds: dict[str, list[float]] = {name: [] for name in made}
    metrics: dict[str, dict] = {}
    try:
        for name, engine in made.items():  # warm-up: the Ray worker starts, CUDA kernels load
            metrics[name] = harness.run(suite, show_progress=False, engine=engine).metrics
        for _ in range(args.repeats):
            for name, engine in made.items():
                t0 = time.perf_counter()
                card = harness.run(suite, show_progress=False, engine=engine)
                seconds[name].append(time.perf_counter() - t0)
                if card.metrics != metrics[name]:
                    print(f"{name}: metrics changed between repeats", file=sys.stderr)
                    return 1
    finally:
        for engine in made.values():
            engine.close()
    points = args.limit * 4  # four (attack, epsilon) runs over at most `limit` points each (the cascade attacks fewer)
    base = statistics.median(seconds[local])
    for name, s in seconds.items():
        med = statistics.median(s)
        print(f"{name:<20} {med:8.2f} s/run   {points / med:8.1f} attack-points/s   x local {med / base:5.2f}")
    same = metrics[local] == metrics[remote]
    print(f"metrics identical: {same}  ({len(metrics[local])} metrics; on a GPU, kernels may differ run to run: "
          "a difference is reported, not hidden)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
