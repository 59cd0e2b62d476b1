"""The Ray engine's workers and their pool (harness.engines.cluster uses them).

`_WorkerImpl` is one Ray actor: it builds models and data from their recipes (cached by key), runs
units and clean batches on them through harness.engines.stage, and runs the harness's own jobs (a
poisoning fraction) with its models and data at hand. Every exception goes back to the driver as a
value, to be raised there as it was raised here. `_Pool` holds the actors and how many units each
has outstanding; it is thread-safe, since every lane of the runner takes workers from it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch

from harness.core.errors import RunFailed
from harness.engines.base import Rows, Unit
from harness.engines.stage import BatchLimit

IN_FLIGHT = 2  # units outstanding per worker
START_TIMEOUT_S = 300.0  # a worker that is not up by then (no resources anywhere, a broken node) fails the run


class Cancelled(Exception):
    """The run was interrupted or failed elsewhere: this call stops waiting."""


# what a worker's __init__ says when its node cannot run the job (see _WorkerImpl.__init__)
_REFUSALS = ("this node has", "a GPU worker found no CUDA device")


class _WorkerImpl:
    """One Ray actor: builds models and data from recipes (cached by key) and runs units on them."""

    def __init__(self, threads: int, device: str, versions: dict[str, str], shipped: bool = False) -> None:
        mine = _versions()
        if mine != versions:
            raise RuntimeError(f"this node has {mine}, the driver {versions}: install the same versions on every node")
        torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a GPU worker found no CUDA device")
        self.device = torch.device(device)
        # the model's module came in the runtime environment: import it from there (the working
        # directory), not from the driver's config directory, which this node may not have
        self.base = __import__("pathlib").Path.cwd() if shipped else None
        self.models: dict[str, Any] = {}
        self.data: dict[str, Any] = {}

    def ping(self) -> dict[str, Any]:
        import os

        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "threads": torch.get_num_threads(),
                "device": str(self.device)}

    def _model(self, ref: tuple[str, list]) -> Any:
        import ray

        from harness.engines.recipes import build_model
        from harness.engines.stage import Counting

        key, box = ref
        if key not in self.models:
            if len(self.models) >= 4:  # a run's variants one after another: keep the newest few
                self.models.pop(next(iter(self.models)))
            model = build_model(ray.get(box[0]), self.base).to(self.device)
            self.models[key] = (model, Counting(model))
        return self.models[key]

    def _data(self, ref: tuple[str, list]) -> Any:
        import ray

        from harness.engines.recipes import build_data

        key, box = ref
        if key not in self.data:
            if len(self.data) >= 3:  # the run's test data, a probe's training data: keep the newest few
                self.data.pop(next(iter(self.data)))
            self.data[key] = build_data(ray.get(box[0]))
        return self.data[key]

    def _on_model(self, model: tuple, data: tuple, size: Optional[int], work: Callable[..., Any]) -> tuple:
        """work(net, counter, data, limit) with TF32 off, from the run's batch limit: ("ok", result, the
        size the limit got down to, halvings) or ("err", the exception as raised, for the driver)."""
        from harness.engines.stage import strict_fp32

        try:
            with strict_fp32():
                net, counter = self._model(model)
                limit = BatchLimit()
                limit.size = size
                return "ok", work(net, counter, self._data(data), limit), limit.size, limit.retries
        except Exception as e:
            return "err", _portable(e), None, 0

    def run(self, model: tuple, data: tuple, unit: Unit, size: Optional[int]) -> tuple:
        from harness.engines.stage import run_unit

        return self._on_model(model, data, size, lambda net, counter, d, limit: run_unit(unit, net, counter, d, limit))

    def forward(self, model: tuple, data: tuple, rows: Rows, size: Optional[int]) -> tuple:
        from harness.engines.stage import forward_rows

        return self._on_model(model, data, size,
                              lambda net, _, d, limit: forward_rows(net, d, torch.tensor(rows, dtype=torch.long), limit))

    def call(self, fn: Callable[..., Any], args: tuple) -> tuple:
        """fn(view, *args) here: a job of the harness's own (a poisoning fraction) with the worker's
        models and data at hand (`_View`)."""
        try:
            return "ok", fn(_View(self), *args), None, 0
        except Exception as e:
            return "err", _portable(e), None, 0


class _View:
    """What a job sees of its worker: the device, the data and fresh models built from shared recipes."""

    def __init__(self, worker: _WorkerImpl) -> None:
        self._worker, self.device = worker, worker.device

    def data(self, ref: tuple) -> Any:
        return self._worker._data(ref)

    def model(self, ref: tuple) -> torch.nn.Module:
        """The worker's model for this recipe (built once, kept): for jobs that only evaluate it."""
        return self._worker._model(ref)[0]

    def fresh_model(self, ref: tuple) -> torch.nn.Module:
        """A new model from the recipe every call (a job may train it in place)."""
        import ray

        from harness.engines.recipes import build_model

        return build_model(ray.get(ref[1][0]), self._worker.base).to(self.device)


def _portable(e: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")


def _versions() -> dict[str, str]:
    """What must be the same on every node for a unit to give the same bits: the harness and torch."""
    from importlib import metadata

    try:
        mine = metadata.version("robustgate")  # the distribution's, as provenance records it
    except metadata.PackageNotFoundError:
        mine = "not installed"
    return {"harness": mine, "torch": str(torch.__version__)}


_WORKER_CLASS: list = []


def _worker_class(ray: Any) -> Any:
    if not _WORKER_CLASS:
        _WORKER_CLASS.append(ray.remote(max_restarts=0, max_task_retries=0)(_WorkerImpl))
    return _WORKER_CLASS[0]


class _Pool:
    """The workers, and how many units each has outstanding. Thread-safe: every lane of the runner
    takes workers from here."""

    def __init__(self, ray: Any, count: int, options: dict[str, Any], init: tuple, in_flight: int = IN_FLIGHT) -> None:
        self.ray, self.options, self.init, self.in_flight = ray, options, init, in_flight
        self.cond = threading.Condition()
        self.live: dict[int, Any] = {}  # worker id -> actor handle
        self.load: dict[int, int] = {}
        self.starting: dict[Any, tuple[int, Any]] = {}  # ping ref -> (id, actor)
        self.lost = 0
        self.replacements = count  # at most as many replacements as workers asked for
        self._next = 0
        self.info: dict[int, dict] = {}
        self.since = time.monotonic()
        for _ in range(count):
            self._spawn()

    def _spawn(self) -> None:
        actor = _worker_class(self.ray).options(**self.options).remote(*self.init)
        self.starting[actor.ping.remote()] = (self._next, actor)
        self._next += 1

    def _promote(self) -> None:
        """Workers whose first ping came back join the pool; one whose start failed fails the run."""
        if not self.starting:
            return
        ready, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in ready:
            wid, actor = self.starting.pop(ref)
            try:
                self.info[wid] = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                text = " ".join(str(getattr(e, "cause", None) or e).split())
                refused = next((m for m in _REFUSALS if m in text), None)
                if refused is not None:  # a node that cannot give the same answer: the run stops rather than lose it quietly
                    start = text.find(refused)
                    raise RunFailed(f"a Ray worker refused to start: {text[start:start + 300]}") from None
                if self.live or self.starting:  # a replacement whose node went away: the others carry on
                    continue
                raise RunFailed(f"no Ray worker could start: {text[:300]}") from None
            self.live[wid], self.load[wid] = actor, 0

    def _take(self) -> Optional[tuple[int, Any]]:
        """The least loaded worker with a free slot, its load counted; None when every one is full. Under `cond`."""
        self._promote()
        free = [w for w in self.live if self.load[w] < self.in_flight]
        if not free:
            return None
        w = min(free, key=lambda k: (self.load[k], k))
        self.load[w] += 1
        return w, self.live[w]

    def try_acquire(self) -> Optional[tuple[int, Any]]:
        """A worker with a free slot now, or None (the caller has units in flight to wait on instead)."""
        with self.cond:
            return self._take()

    def acquire(self, stop: threading.Event) -> tuple[int, Any]:
        """A worker with a free slot, waiting for one (and for the first workers to start)."""
        with self.cond:
            while True:
                if stop.is_set():
                    raise Cancelled()
                taken = self._take()
                if taken is not None:
                    return taken
                if not self.live:
                    if not self.starting:
                        raise RunFailed(f"every Ray worker was lost ({self.lost}) and none could replace them")
                    if time.monotonic() - self.since > START_TIMEOUT_S:
                        raise RunFailed(f"no Ray worker started within {START_TIMEOUT_S:.0f} s: does the cluster have the "
                                        f"resources asked for ({self.options})?")
                self.cond.wait(0.05)

    def release(self, w: int) -> None:
        with self.cond:
            if w in self.load:
                self.load[w] -= 1
            self.cond.notify_all()

    def died(self, w: int) -> None:
        """Worker w (or its node) is gone: its outstanding units come back to their callers to resend."""
        with self.cond:
            actor = self.live.pop(w, None)
            self.load.pop(w, None)
            if actor is None:
                return
            self.lost += 1
            self.since = time.monotonic()
            try:
                self.ray.kill(actor)
            except Exception:
                pass
            if self.replacements > 0:
                self.replacements -= 1
                self._spawn()
            self.cond.notify_all()

    @property
    def size(self) -> int:
        with self.cond:
            self._promote()
            return len(self.live)

    def close(self) -> None:
        with self.cond:
            for actor in [*self.live.values(), *(a for _, a in self.starting.values())]:
                try:
                    self.ray.kill(actor)
                except Exception:
                    pass
            self.live, self.load, self.starting = {}, {}, {}
