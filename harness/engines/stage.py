"""Running one unit of work where the model lives, and trusting none of the attack's output.

Every returned example is clipped to the input bounds, checked against its own budget (an example
outside it is replaced by the clean input: it is not an adversarial example) and re-scored by the
harness's own forward pass. The model the attack sees counts its queries (rows through forward)
and gradient evaluations; the re-scoring pass is not counted.

Out of device memory, a batch is split in two and each half retried, down to one sample; the
smaller size then holds for the rest of the run (`BatchLimit`), so later batches do not fail first.
Any engine (local threads, a Ray worker) runs a unit through `run_unit` and a clean batch through
`forward_rows`, so the guarantees of `harness.engines.base` hold wherever the work runs. A model
with a `reseed(key)` method (a randomized preprocessing defense) has its draws restarted from the
unit's seed (a clean batch's: its first row) before each, so they too depend on the unit alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from harness.attacks import BOUNDS, BUDGET_TOLERANCE, ThreatModel
from harness.core.errors import BadInput, RunFailed
from harness.engines.base import EXAMPLES, Unit, UnitResult

if TYPE_CHECKING:
    from harness.sources.data import Data

__all__ = ["Counting", "run_unit", "forward_rows", "device_of", "is_oom", "BatchLimit", "halving", "strict_fp32", "EXAMPLES"]


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


def halving(fn: Callable[[torch.Tensor, int], object], rows: torch.Tensor, seed: int, limit: BatchLimit, what: str) -> list:
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


_FP32 = threading.Lock()
_fp32 = {"users": 0, "saved": (True, True)}  # evaluations in this process holding TF32 off, and the flags found


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off while evaluating: a re-scored prediction must not flip on reduced-precision math.
    The flags are process-wide: with evaluations side by side (defended variants on their own
    threads), the first to enter saves them and the last to leave puts them back."""
    with _FP32:
        if _fp32["users"] == 0:
            _fp32["saved"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        _fp32["users"] += 1
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with _FP32:
            _fp32["users"] -= 1
            if _fp32["users"] == 0:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _fp32["saved"]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def run_unit(unit: Unit, model: torch.nn.Module, counter: Counting, data: "Data", limit: BatchLimit) -> UnitResult:
    """The unit's attack on its rows, on `model`'s device; `counter` wraps `model` and is used by
    this unit alone while it runs (its counts are taken before and after)."""
    rows = torch.tensor(unit.rows, dtype=torch.long)
    targets = None if unit.targets is None else torch.tensor(unit.targets, dtype=torch.long)

    def attack_rows(pos: torch.Tensor, seed: int) -> UnitResult:
        device = device_of(model)
        idx = rows[pos]
        x, y = data.read(idx).to(device), data.y[idx].to(device)
        e = torch.full((idx.numel(),), unit.epsilon).to(device=device, dtype=x.dtype)
        threat = ThreatModel(unit.norm, e)
        extra = {} if targets is None else {"target": targets[pos].to(device)}
        gen = torch.Generator(device=device).manual_seed(seed)
        _reseed(model, seed)
        adv = unit.attack(counter, x, y, threat, generator=gen, **extra).detach()
        with torch.no_grad():
            adv = adv.to(x.dtype).clamp(*BOUNDS)  # the engine owns the bounds, whatever the attack returned
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
        return UnitResult(broken.cpu(), dist.cpu(), hit.cpu(), int((~inside).sum()), int((~finite).sum()) + int((~ok).sum()),
                          examples=examples)

    counter.take()
    start = time.perf_counter()
    parts = halving(attack_rows, torch.arange(len(unit.rows)), unit.seed, limit, "an attack batch")
    seconds = time.perf_counter() - start
    queries, gradients = counter.take()
    out = parts[0] if len(parts) == 1 else UnitResult.concat(parts)
    out.queries, out.gradients, out.seconds = queries, gradients, seconds
    return out


def _reseed(model: torch.nn.Module, key: int) -> None:
    """A randomized model (a preprocessing defense that draws noise) restarts its draws from `key`."""
    reseed = getattr(model, "reseed", None)
    if callable(reseed):
        reseed(key)


def forward_rows(model: torch.nn.Module, data: "Data", rows: torch.Tensor, limit: BatchLimit) -> torch.Tensor:
    """The model's logits (float32, CPU) for these rows; checks the model's output against the data."""

    def forward(idx: torch.Tensor, _seed: int) -> torch.Tensor:
        _reseed(model, int(idx[0]) + 1 if idx.numel() else 0)  # a batch's draws follow from its rows
        with torch.no_grad():
            try:
                out = model(data.read(idx).to(device_of(model)))
            except Exception as e:
                if is_oom(e):
                    raise
                raise BadInput(data.source, f"the model cannot take this data: inputs of shape {tuple(data.shape)} fail with {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(idx):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadInput("model.source", f"the model must return (batch, classes) scores, returned {shape} for a batch of {len(idx)}")
        return out.float().cpu()

    return torch.cat(halving(forward, rows, 0, limit, "the clean pass"))
