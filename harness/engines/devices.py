"""Devices: parse and resolve `auto`, `cpu`, `cuda`, `cuda:N` or a list, and shard batches over them.

Nothing defaults to CUDA when there is none. With several devices, each holds a replica of the
model and takes every k-th batch; results come back in batch order, so a run's metrics do not
depend on how many devices computed them.
"""

from __future__ import annotations

import copy
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar, Union

from harness.core.errors import BadInput

if TYPE_CHECKING:
    import torch

__all__ = ["parse_devices", "resolve_devices", "replicate", "shard_map"]

T = TypeVar("T")
R = TypeVar("R")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_VALID = "auto, cpu, cuda, cuda:N, or a list of them"


def parse_devices(spec: Union[str, Sequence[str]]) -> list[str]:
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not items or any(not _DEVICE.match(s) for s in items):
        bad = next((s for s in items if not _DEVICE.match(s)), "")
        raise BadInput("device", f"unknown device {bad!r} (valid: {_VALID})")
    if "auto" in items and len(items) > 1:
        raise BadInput("device", "'auto' cannot be combined with other devices")
    return items


def resolve_devices(spec: Union[str, Sequence[str]]) -> list["torch.device"]:
    """torch devices for a spec; `auto` is the first CUDA device if there is one, else the CPU."""
    import torch

    items = parse_devices(spec)
    if items == ["auto"]:
        return [torch.device("cuda:0")] if torch.cuda.is_available() else [torch.device("cpu")]
    devices = []
    for s in items:
        if s.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BadInput("device", f"{s} was asked for but no CUDA device is available here (valid: cpu, auto)")
            d = torch.device("cuda:0" if s == "cuda" else s)
            if d.index >= torch.cuda.device_count():
                raise BadInput("device", f"{s} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
            devices.append(d)
        else:
            devices.append(torch.device("cpu"))
    return devices


def replicate(model: "torch.nn.Module", devices: Sequence["torch.device"]) -> list["torch.nn.Module"]:
    """One model per device; the same object where a device repeats (it is only read)."""
    replicas, by_device = [], {}
    for d in devices:
        if d not in by_device:
            by_device[d] = model.to(d) if not by_device else copy.deepcopy(model).to(d)
        replicas.append(by_device[d])
    return replicas


def shard_map(fn: Callable[[int, T, int], R], items: Sequence[T], n_devices: int,
              on_done: Callable[[int, R], None] | None = None) -> list[R]:
    """Calls fn(i, item, device_slot) for every item, item i on slot i % n_devices; results in order.
    `on_done(i, result)` sees each result as it comes, one call at a time."""
    results: list = [None] * len(items)
    lock = threading.Lock()

    def work(slot: int) -> None:
        for i in range(slot, len(items), n_devices):
            results[i] = fn(i, items[i], slot)
            if on_done is not None:
                with lock:
                    on_done(i, results[i])

    if n_devices == 1 or len(items) <= 1:
        work(0) if n_devices == 1 else [work(s) for s in range(n_devices)]
        return results
    with ThreadPoolExecutor(max_workers=n_devices) as pool:
        for f in [pool.submit(work, s) for s in range(n_devices)]:
            f.result()  # re-raises a worker's exception here
    return results
