"""The local engine: a thread per device slot in this process, each holding a model replica.

Unit i runs on slot i % len(devices), one unit at a time per slot, so a slot's `Counting` wrapper
counts exactly its unit's queries. Results come back in unit order (`devices.shard_map`), and a
unit's random draws depend only on its own seed, so metrics do not depend on how many devices
computed them. The batch size known to fit in memory (`limit`) is shared by every slot and every
call, the clean pass included.

    engine = LocalEngine()
    engine.start(model, data, [torch.device("cpu")])
    results = engine.run(units)  # one UnitResult per unit, in order
    engine.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from harness.engines.base import Rows, Unit, UnitResult
from harness.engines.devices import replicate, shard_map
from harness.engines.stage import BatchLimit, Counting, forward_rows, run_unit

if TYPE_CHECKING:
    from harness.sources.data import Data

__all__ = ["LocalEngine"]


class LocalEngine:
    """`harness.engines.base.Engine` over the devices of this process."""

    def __init__(self) -> None:
        self.limit = BatchLimit()
        self.replicas: list[torch.nn.Module] = []
        self.counters: list[Counting] = []
        self._data: Optional["Data"] = None
        self._devices: list[torch.device] = []

    def start(self, model: torch.nn.Module, data: "Data", devices: Sequence[torch.device]) -> None:
        if not devices:
            raise ValueError("an engine needs at least one device")
        self.limit = BatchLimit()
        self._devices = list(devices)
        self._data = data
        self.update(model)

    def update(self, model: torch.nn.Module) -> None:
        self._started()
        self.replicas = replicate(model, self._devices)
        self.counters = [Counting(m) for m in self.replicas]  # one per slot, even where a device repeats

    def _started(self) -> "Data":
        if self._data is None:
            raise RuntimeError("LocalEngine.start() was not called")
        return self._data

    def forward(self, batches: Sequence[Rows], on_done: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
        data = self._started()

        def one(i: int, rows: Rows, slot: int) -> torch.Tensor:
            return forward_rows(self.replicas[slot], data, torch.tensor(rows, dtype=torch.long), self.limit)

        done = None if on_done is None else (lambda i, _: on_done(i))
        return shard_map(one, batches, len(self.replicas), on_done=done)

    def run(self, units: Sequence[Unit], on_done: Optional[Callable[[int, UnitResult], None]] = None) -> list[UnitResult]:
        data = self._started()

        def one(i: int, unit: Unit, slot: int) -> UnitResult:
            return run_unit(unit, self.replicas[slot], self.counters[slot], data, self.limit)

        return shard_map(one, units, len(self.replicas), on_done=on_done)

    def close(self) -> None:
        self.replicas, self.counters, self._data, self._devices = [], [], None, []
