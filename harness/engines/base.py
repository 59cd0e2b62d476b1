"""The engine contract: the runner hands an engine units of work and gets per-sample results back in order.

A `Unit` is one batch of one attack (or one cascade stage of an ensemble) at one epsilon: the built
attack, the norm, the epsilon, the rows of the run's sample source it attacks, and the seed of its
random draws. It is a frozen value of plain fields (the attack is a frozen dataclass), so it can be
pickled to another process, retried, or skipped on resume; `entry`, `stage` and `batch` only name
it. The runner decides which points are attacked (the cascade barriers between stages stay there);
an engine only runs what it is handed.

What every engine (the local thread pool here, the next issue's Ray engine) must guarantee:

- **Order.** `run(units)` returns one `UnitResult` per unit, in unit order, whatever order they
  finished in; each result's per-sample fields follow the unit's rows.
- **Purity.** A unit's result is a function of the unit and the model and data handed to `start`:
  the same unit gives bit-identical results on the same kind of device, whichever replica or worker
  runs it and whichever other units share the run. The attack draws its randomness from one
  `torch.Generator` on the unit's device seeded with `unit.seed`, and from nothing else.
- **Trust nothing.** Every adversarial example is clipped to the input bounds, replaced by the
  clean input where it is not finite or leaves its budget (a violation), and re-scored by a forward
  pass of the model itself; `stage.run_unit` does all of this, so an engine calls it where the
  model lives rather than re-implementing it.
- **Full precision.** Units and the clean pass run with TF32 off (`stage.strict_fp32`), so a
  re-scored prediction does not flip on reduced-precision math; the runner sets it for the threads of
  its own process, an engine with other processes sets it in each.
- **Out of memory.** A unit whose rows do not fit is cut into halves, retried, and so on down to one
  row (then `RunFailed`); the smaller size then holds for the rest of the run (`limit`), and pieces
  get seeds derived from the unit's (`stage.halving`). Halving changes the random draws, which the
  runner reports as a `memory` warning: purity holds for a given piece size, not across sizes.
- **Counting.** `queries` is the number of rows the attack put through the model's forward,
  `gradients` those whose input required a gradient, counted per unit (retries included); the
  engine's own re-scoring pass is not counted.
- **Errors.** An exception of an attack reaches the caller of `run` as it was raised (after the
  units already finished have been reported to `on_done`).

`forward(batches)` is the clean pass: the model's logits for each batch of rows, in order, with the
same halving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from harness.engines.stage import BatchLimit
    from harness.sources.data import Data

__all__ = ["Rows", "Unit", "UnitResult", "Engine", "EXAMPLES"]

EXAMPLES = 4  # adversarial examples kept per attack run, for the report

Rows = tuple[int, ...]  # positions 0 .. len(data) - 1 in the run's sample source (not split ids)


@dataclass(frozen=True)
class Unit:
    """One batch of work: `attack(model, x[rows], y[rows], ThreatModel(norm, epsilon), generator=seeded)`."""

    attack: Any  # a frozen attack dataclass (or any picklable callable with the attack signature)
    norm: str
    epsilon: float  # inf for minimal-perturbation attacks and corruptions
    rows: Rows
    seed: int
    batch_size: int  # the size the rows were cut at; an engine runs them in pieces no larger
    targets: Optional[tuple[int, ...]] = None  # per row, the class a targeted attack aims at
    entry: str = ""  # names the unit (for logs, retries, resume): "<entry index>|<attack id>|<epsilon>"
    stage: int = 0  # cascade stage within the entry
    batch: int = 0  # batch within the stage

    def __post_init__(self) -> None:
        if not 0 < self.batch_size:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if len(self.rows) > self.batch_size:
            raise ValueError(f"a unit holds at most batch_size={self.batch_size} rows, got {len(self.rows)}")
        if self.targets is not None and len(self.targets) != len(self.rows):
            raise ValueError(f"{len(self.targets)} targets for {len(self.rows)} rows")
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0 (or inf), got {self.epsilon}")


@dataclass
class UnitResult:
    """What one unit (or, concatenated, one stage) did, per row of the unit in its order."""

    broken: torch.Tensor  # (m,) bool: the re-scored example is misclassified (or its logits not finite)
    distance: torch.Tensor  # (m,) float32: perturbation size of the example kept
    target_hit: torch.Tensor  # (m,) bool: re-scored as the unit's target (False when untargeted)
    violations: int = 0  # examples outside their budget (replaced by the clean input)
    nonfinite: int = 0  # non-finite examples plus non-finite re-scored logits
    queries: int = 0
    gradients: int = 0
    seconds: float = 0.0
    # a few adversarial examples, for the report: (row in the sample source, example on the CPU, its prediction)
    examples: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)

    @classmethod
    def concat(cls, parts: Sequence["UnitResult"], seconds: Optional[float] = None) -> "UnitResult":
        """Parts in order as one result; `seconds` is the wall time they took (default: their sum)."""
        cat = lambda k, dtype: torch.cat([getattr(p, k) for p in parts]) if parts else torch.zeros(0, dtype=dtype)  # noqa: E731
        return cls(broken=cat("broken", torch.bool), distance=cat("distance", torch.float32), target_hit=cat("target_hit", torch.bool),
                   violations=sum(p.violations for p in parts), nonfinite=sum(p.nonfinite for p in parts),
                   queries=sum(p.queries for p in parts), gradients=sum(p.gradients for p in parts),
                   seconds=sum(p.seconds for p in parts) if seconds is None else seconds,
                   examples=[e for p in parts for e in p.examples][:EXAMPLES])


class Engine(Protocol):
    """Runs units on devices. `start` begins a run: it hands over the model (bounded, in eval
    mode), the sample source and the devices, and starts a fresh `limit`; an engine may be started
    again for the next run (a defended variant) without being closed. `update` hands over a changed
    model within the run (the runner does when the model turns out to output probabilities),
    keeping `limit`. `close` releases the replicas or workers."""

    limit: "BatchLimit"  # this run's largest batch known to fit, and how many times batches were halved

    def start(self, model: torch.nn.Module, data: "Data", devices: Sequence[torch.device]) -> None: ...

    def update(self, model: torch.nn.Module) -> None: ...

    def forward(self, batches: Sequence[Rows], on_done: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
        """The model's logits (float32, on the CPU) for each batch of rows, in batch order."""
        ...

    def run(self, units: Sequence[Unit], on_done: Optional[Callable[[int, UnitResult], None]] = None) -> list[UnitResult]:
        """Every unit's result, in unit order; `on_done(i, result)` as each finishes (one call at a time)."""
        ...

    def close(self) -> None: ...
