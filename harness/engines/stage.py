"""Running one attack over (sample, epsilon) pairs on the devices, and trusting none of its output.

Every returned example is clipped to the input bounds, checked against its own budget (an example
outside it is replaced by the clean input: it is not an adversarial example) and re-scored by the
harness's own forward pass. The model the attack sees counts its queries (rows through forward)
and gradient evaluations; the re-scoring pass is not counted.

Out of device memory, a batch is split in two and each half retried, down to one sample; the
smaller size then holds for the rest of the run (`BatchLimit`), so later batches do not fail first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from harness.attacks import BOUNDS, BUDGET_TOLERANCE, ThreatModel

from harness.engines.devices import shard_map
from harness.core.errors import RunFailed

__all__ = ["Counting", "PairResult", "run_pairs", "device_of", "is_oom", "BatchLimit", "halving", "EXAMPLES"]

EXAMPLES = 4  # adversarial examples kept per attack run, for the report


def is_oom(e: BaseException) -> bool:
    """CUDA (or any torch device) out of memory."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


class BatchLimit:
    """The largest batch known to fit, shared by the batches of a run; None until memory ran out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.size: Optional[int] = None
        self.retries = 0

    def lower(self, failed: int) -> None:
        with self._lock:
            self.retries += 1
            half = max(1, failed // 2)
            self.size = half if self.size is None else min(self.size, half)


def halving(fn: Callable[[torch.Tensor, int], tuple], rows: torch.Tensor, seed: int, limit: BatchLimit, what: str) -> list[tuple]:
    """fn(rows, seed) on `rows`, split into pieces of at most `limit.size`; a piece that runs out of
    memory is halved and retried (the halves get seeds derived from the piece's). Returns fn's
    results in row order. At one row and still out of memory: RunFailed."""
    size = limit.size
    if size is not None and rows.numel() > size:
        return [r for k, part in enumerate(rows.split(size)) for r in halving(fn, part, _child(seed, k), limit, what)]
    try:
        return [fn(rows, seed)]
    except Exception as e:
        if not is_oom(e):
            raise
        if rows.numel() <= 1:
            raise RunFailed(f"out of device memory on {what} even with a batch of one sample") from e
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        limit.lower(int(rows.numel()))
        return halving(fn, rows, seed, limit, what)


def _child(seed: int, k: int) -> int:
    return (seed * 1_000_003 + 7919 * (k + 1)) % (2**61 - 1)


def device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Counting(torch.nn.Module):
    """Wraps the model an attack is given: rows through forward are queries; rows through a forward
    whose input needs a gradient are gradient evaluations."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # an eval-mode model stays one in the libraries' eyes
        self._lock = threading.Lock()
        self.queries = 0
        self.gradients = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.queries += x.shape[0]
            if torch.is_grad_enabled() and x.requires_grad:
                self.gradients += x.shape[0]
        return self.model(x)

    def take(self) -> tuple[int, int]:
        with self._lock:
            out = (self.queries, self.gradients)
            self.queries = self.gradients = 0
        return out


@dataclass
class PairResult:
    """Per pair (sample, epsilon): broken by the attack, perturbation size; and the run's totals."""

    broken: torch.Tensor  # (m,) bool
    distance: torch.Tensor  # (m,) float
    target_hit: torch.Tensor  # (m,) bool (False when untargeted)
    violations: int
    nonfinite: int
    queries: int
    gradients: int
    seconds: float
    # a few adversarial examples, for the report: (sample index into x_all, example on the CPU, its prediction)
    examples: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def run_pairs(attack, replicas: Sequence[torch.nn.Module], counters: Sequence[Counting], x_all: torch.Tensor,
              y_all: torch.Tensor, sample: torch.Tensor, eps: torch.Tensor, norm: str, batch_size: int,
              seed_of: Callable[[int], int], target_all: Optional[torch.Tensor] = None,
              on_batch: Optional[Callable[[], None]] = None, limit: Optional[BatchLimit] = None) -> PairResult:
    """Attacks pairs (sample[i], eps[i]) in batches sharded over the replicas; eps may be inf (minimal attacks)."""
    m = int(sample.numel())
    batches = list(torch.arange(m).split(max(1, batch_size))) if m else []  # split() of nothing gives one empty batch

    limit = limit if limit is not None else BatchLimit()

    def run(i: int, rows: torch.Tensor, slot: int):
        parts = halving(lambda r, seed: attack_rows(r, seed, slot), rows, seed_of(i), limit, "an attack batch")
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                sum(p[3] for p in parts), sum(p[4] for p in parts), [e for p in parts for e in p[5]][:EXAMPLES])

    def attack_rows(rows: torch.Tensor, seed: int, slot: int):
        model = replicas[slot]
        device = device_of(model)
        idx = sample[rows]
        x, y = x_all[idx].to(device), y_all[idx].to(device)
        e = eps[rows].to(device=device, dtype=x.dtype)
        threat = ThreatModel(norm, e)
        extra = {} if target_all is None else {"target": target_all[idx].to(device)}
        gen = torch.Generator(device=device).manual_seed(seed)
        adv = attack(counters[slot], x, y, threat, generator=gen, **extra).detach()
        with torch.no_grad():
            adv = adv.to(x.dtype).clamp(*BOUNDS)  # the runner owns the bounds, whatever the attack returned
            finite = torch.isfinite(adv).flatten(1).all(dim=1)
            adv = torch.where(_rows(finite, adv), adv, x)
            inside = threat.contains(adv, x, BUDGET_TOLERANCE)
            adv = torch.where(_rows(inside, adv), adv, x)  # out of budget: not an adversarial example
            logits = model(adv)
            ok = torch.isfinite(logits).all(dim=1)
            pred = logits.argmax(dim=1)
            broken = (pred != y) | ~ok
            hit = (pred == extra["target"]) & ok if extra else torch.zeros_like(broken)
            dist = threat.distance(adv, x)
        shown = torch.nonzero(broken & ok).flatten()[:EXAMPLES]
        examples = [(int(idx[k]), adv[k].detach().cpu(), int(pred[k])) for k in shown.tolist()]
        return broken.cpu(), dist.cpu(), hit.cpu(), int((~inside).sum()), int((~finite).sum()) + int((~ok).sum()), examples

    for c in counters:
        c.take()
    start = time.perf_counter()
    parts = shard_map(run, batches, len(replicas), on_done=on_batch)
    seconds = time.perf_counter() - start
    counts = [c.take() for c in {id(c): c for c in counters}.values()]
    cat = lambda k, dtype: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0, dtype=dtype)
    return PairResult(
        broken=cat(0, torch.bool), distance=cat(1, torch.float32), target_hit=cat(2, torch.bool),
        violations=sum(p[3] for p in parts), nonfinite=sum(p[4] for p in parts),
        queries=sum(q for q, _ in counts), gradients=sum(g for _, g in counts), seconds=seconds,
        examples=[e for p in parts for e in p[5]][:EXAMPLES],
    )
