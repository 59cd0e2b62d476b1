"""Peak resident memory of `harness run` over 5k, 20k and 50k images of 3x64x64, read from npy:DIR and
from an image folder: flat in the number of images when every stage reads through the sample source.

    .venv/bin/python benchmarks/memory.py                       # npy and imagefolder, 5k/20k/50k
    .venv/bin/python benchmarks/memory.py --sizes 5000 20000 --kinds npy

Each measurement is its own `harness run` subprocess (peak from os.wait4's rusage of that child,
ru_maxrss), with a fixed cheap suite: FGSM at one epsilon on a tiny CNN from a python: factory the
benchmark writes, batch_size 256, `limit: null`. The data are random uint8 pixels written to a temp
dir (the image folder as PNG files; the smaller folders are hard links into the largest). Exit 1 when
the peak at the largest size is more than 10% above the peak at the smallest, for some kind.
`--kinds npz` measures the in-memory kind as a control, which grows with the number of images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (3, 64, 64)
CLASSES = 10
FLAT = 0.10  # the largest size's peak may be at most 10% above the smallest's

MODEL = '''"""A tiny CNN for 3x64x64 images (written by benchmarks/memory.py)."""
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''

SUITE = """name: memory-{kind}-{n}
device: cpu
model:
  source: python:tinycnn:build
data:
  source: {source}
  limit: null
  batch_size: 256
attacks:
  - {{name: fgsm, norm: linf, epsilons: [0.01]}}
"""


def _pixels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, CLASSES, n)


def write_npy(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.uint8, shape=(n, *SHAPE))
    y = np.empty(n, dtype=np.int64)
    for a in range(0, n, 5000):  # written in chunks: the benchmark itself stays small too
        x[a:a + 5000], y[a:a + 5000] = _pixels(min(5000, n - a), seed=a)
    x.flush()
    del x
    np.save(folder / "y.npy", y)


def write_folder(folder: Path, n: int) -> None:
    from PIL import Image

    for a in range(0, n, 5000):
        x, y = _pixels(min(5000, n - a), seed=a)
        for i, (img, label) in enumerate(zip(x, y)):
            d = folder / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.transpose(img, (1, 2, 0))).save(d / f"{a + i:06d}.png", compress_level=1)


def link_folder(src: Path, dst: Path, n: int) -> None:
    """The first n images of `src` (by their number), hard-linked: no second copy on disk."""
    for d in sorted(src.iterdir()):
        (dst / d.name).mkdir(parents=True)
        for f in d.iterdir():
            if int(f.stem) < n:
                os.link(f, dst / d.name / f.name)


def peak_rss(cfg: Path, out: Path) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit code) of one `harness run` subprocess."""
    cmd = [sys.executable, "-m", "harness", "run", str(cfg), "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cfg.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read() if p.stderr else b""
    _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage, not the max over all children so far
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if p.returncode not in (0, 1):  # 1: a gate failed, still a full run
        sys.exit(f"harness run {cfg.name} failed (exit {p.returncode}): {err.decode(errors='replace').strip()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds, p.returncode  # Linux reports ru_maxrss in KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--kinds", nargs="+", choices=["npy", "imagefolder", "npz"], default=["npy", "imagefolder"],
                    help="npz (in memory, not a default) is the control: its peak grows with the number of images")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir, removed after)")
    args = ap.parse_args()
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        (root / "tinycnn.py").write_text(MODEL)
        rows = []
        for kind in args.kinds:
            t0 = time.perf_counter()
            if kind == "npy":
                for n in sizes:
                    write_npy(root / f"npy{n}", n)
            elif kind == "npz":
                for n in sizes:
                    write_npy(root / f"npz{n}.d", n)
                    np.savez(root / f"npz{n}", x=np.load(root / f"npz{n}.d" / "x.npy"), y=np.load(root / f"npz{n}.d" / "y.npy"))
            else:
                write_folder(root / f"imagefolder{sizes[-1]}", sizes[-1])
                for n in sizes[:-1]:
                    link_folder(root / f"imagefolder{sizes[-1]}", root / f"imagefolder{n}", n)
            print(f"# wrote the {kind} data ({', '.join(map(str, sizes))} images) in {time.perf_counter() - t0:.0f} s", flush=True)
            for n in sizes:
                cfg = root / f"{kind}{n}.yaml"
                cfg.write_text(SUITE.format(kind=kind, n=n, source=f"{kind}:{kind}{n}" + (".npz" if kind == "npz" else "")))
                mib, seconds, code = peak_rss(cfg, root / f"out-{kind}{n}")
                rows.append((kind, n, mib, seconds))
                print(f"# {kind} {n}: {mib:.0f} MiB peak, {seconds:.0f} s", flush=True)
    print(f"\npeak RSS of `harness run` (FGSM linf 0.01, tiny CNN, batch_size 256, limit null), images of {'x'.join(map(str, SHAPE))}")
    print(f"| {'source':<11} | {'images':>7} | {'peak RSS MiB':>12} | {'vs smallest':>11} | {'seconds':>7} |")
    print(f"| {'-' * 11} | {'-' * 6}: | {'-' * 11}: | {'-' * 10}: | {'-' * 6}: |")
    flat = True
    for kind in args.kinds:
        mine = [r for r in rows if r[0] == kind]
        base = mine[0][2]
        for _, n, mib, seconds in mine:
            print(f"| {kind:<11} | {n:>7} | {mib:>12.0f} | {mib / base - 1:>+10.1%} | {seconds:>7.0f} |")
        flat &= mine[-1][2] <= base * (1 + FLAT)
    print(f"\nflat (largest within {FLAT:.0%} of smallest, every kind): {'yes' if flat else 'NO'}")
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
