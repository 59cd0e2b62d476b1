"""The Ray engine: the run's units on Ray actors, one per GPU (or GPU fraction) or per CPU slot, on
one machine or a cluster. The driver keeps the cascade barriers (harness.evaluation.cascade); this
engine only runs what it is handed, with the guarantees of `harness.engines.base`.

- **Workers** build the model once from its recipe (harness.engines.recipes: the model config and
  the weights as safetensors bytes, verified against the provenance sha256 in the worker) and read
  their own batches through the sample source; data that lives only in the driver's memory goes to
  the object store once, as raw bytes. No model or data is ever pickled. A `python:` model's module
  travels in Ray's runtime environment (a copy of it becomes the workers' working directory).
- **Same answer.** Each worker runs torch with the driver's thread count (or `threads`) and with
  TF32 off, and a unit's draws come from its own seed, so on the CPU a unit gives the same bits on
  any worker: the scorecard does not depend on the number of workers.
- **Spread.** About `in_flight` (2) units per worker are outstanding at a time, taken from every lane
  the runner has open (`concurrency`), so independent (norm, epsilon) groups, minimal attacks and
  corruptions run side by side.
- **Faults.** A unit whose worker (or node) is lost is sent to another; a replacement worker is
  asked for. Out of memory, a worker halves as the local engine does, starting from the run's
  `limit`, and reports the size it got down to, which then holds for every later unit.
- **Security.** Ray runs code for anyone who can reach its port: keep the cluster on a private
  network with token authentication (`RAY_AUTH_MODE=token`); see docs/scaling.md.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from harness.core.errors import BadInput, RunFailed
from harness.engines.actors import IN_FLIGHT, Cancelled, _Pool, _versions
from harness.engines.base import Rows, Unit, UnitResult
from harness.engines.stage import BatchLimit

if TYPE_CHECKING:
    from harness.sources.data import Data

__all__ = ["RayEngine", "require_ray", "INSTALL"]

INSTALL = "pip install 'robustgate[ray]'"
MAX_ATTEMPTS = 4  # a unit is sent to at most this many workers that died under it


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput("engine", f"the Ray engine needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _connect(ray: Any, address: Optional[str], code: Optional[Any] = None) -> bool:
    """Joins the cluster at `address` (or starts a local Ray when None); True when this call started
    or joined it (and so should leave it at close). `code`, a directory holding the user's model
    module, becomes the job's working directory on every worker (Ray's runtime environment; Ray
    takes a local directory for the whole job only). ray.init installs its own SIGTERM handler: the
    caller's (the harness's: SIGTERM stops a run as Ctrl-C does) is put back after it. A Ray this
    process had already started is used as it is, with the runtime environment it was given."""
    if ray.is_initialized():
        return False
    import logging

    if address is not None:
        _reachable(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if code is not None:
        kwargs["runtime_env"] = {"working_dir": str(code)}
    if address is None:
        kwargs.update(address="local", include_dashboard=False)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "--address" if address is not None else "engine"
        raise BadInput(where, f"cannot reach a Ray cluster at {address or 'a new local instance'} "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return True


def _reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT must answer within `timeout` (Ray itself waits minutes on an address where nothing listens)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise BadInput("--address", f"expected auto or HOST:PORT, got {address!r}")
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise BadInput("--address", f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}); start one with "
                       "`ray start --head` or leave --address out to start a local Ray") from None


class RayEngine:
    """`harness.engines.base.Engine` on Ray actors.

    address: None starts a local Ray on this machine; "auto" or "HOST:PORT" joins a running cluster
    (an already initialized Ray in this process is used as it is). workers: how many actors
    (default: one per GPU, or per `threads` CPUs when the cluster has no GPU or the run's device is
    the CPU). gpus_per_worker: a GPU fraction per actor (0.5 puts two on each GPU). threads: torch
    threads in each worker (default: the driver's, so results match the local engine bit for bit).
    device: the run's device spec; `cpu` keeps the workers on CPUs, anything else takes the cluster's
    GPUs where it has some (the driver itself may have none).
    """

    concurrency = 32  # lanes the runner may keep open at once: the pool, not the lanes, bounds the work in flight

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, gpus_per_worker: Optional[float] = None,
                 threads: Optional[int] = None, in_flight: int = IN_FLIGHT, device: Any = "auto") -> None:
        if workers is not None and workers < 1:
            raise BadInput("engine.workers", f"must be at least 1, got {workers}")
        if gpus_per_worker is not None and not 0 < gpus_per_worker:
            raise BadInput("engine.gpus_per_worker", f"must be positive, got {gpus_per_worker}")
        if threads is not None and threads < 1:
            raise BadInput("engine.threads", f"must be at least 1, got {threads}")
        self.address, self.workers, self.gpus_per_worker, self.in_flight = address, workers, gpus_per_worker, in_flight
        self.threads = threads or torch.get_num_threads()
        # the run's device spec, as written: `auto` means the cluster's GPUs when it has any, whatever the driver has
        self.device = [str(d).strip() for d in (device.split(",") if isinstance(device, str) else device)]
        self.limit = BatchLimit()
        self._ray: Any = None
        self._pool: Optional[_Pool] = None
        self._owns_ray = False
        self._stop = threading.Event()
        self._model: Optional[tuple] = None
        self._data_ref: Optional[tuple] = None
        self._data_key: Optional[str] = None
        self._code: Any = None
        self._lock = threading.Lock()
        self.retried = 0  # units resent after their worker was lost
        self._metered: list[torch.nn.Module] = []  # models whose endpoint counts in a shared meter (harness.engines.meters)

    # -- the workers ------------------------------------------------------------------------------

    def _ensure_pool(self, recipe: Any) -> _Pool:
        if self._pool is not None:
            return self._pool
        from harness.engines.recipes import code_dir

        ray = self._ray = require_ray()
        self._code = code_dir(recipe)
        self._owns_ray = _connect(ray, self.address, self._code)
        shipped = self._owns_ray and self._code is not None
        gpus = float(ray.cluster_resources().get("GPU", 0))
        cpu_only = all(d == "cpu" for d in self.device) and self.gpus_per_worker is None
        use_gpu = not cpu_only and (gpus > 0 or self.gpus_per_worker is not None)
        if use_gpu:
            per = self.gpus_per_worker or 1.0
            if gpus < per:
                raise BadInput("engine.gpus_per_worker", f"each worker asks for {per:g} GPU but the cluster has {gpus:g}")
            count = self.workers or max(1, int(gpus // per))
            options: dict[str, Any] = {"num_gpus": per, "num_cpus": min(1, self.threads)}
        else:
            cpus = float(ray.cluster_resources().get("CPU", 1))
            count = self.workers or max(1, int(cpus // self.threads))
            options = {"num_cpus": self.threads}
        self._pool = _Pool(ray, count, options, (self.threads, "cuda" if use_gpu else "cpu", _versions(), shipped), self.in_flight)
        return self._pool

    @property
    def size(self) -> int:
        """Workers up now."""
        return 0 if self._pool is None else self._pool.size

    # -- the Engine protocol ----------------------------------------------------------------------

    def start(self, model: torch.nn.Module, data: "Data", devices: Sequence[torch.device]) -> None:
        from harness.engines.recipes import data_recipe, labels_digest, model_recipe

        if not devices:
            raise ValueError("an engine needs at least one device")
        recipe = model_recipe(model)
        pool = self._ensure_pool(recipe)
        recipe = self._with_meter(model, recipe)
        self.limit = BatchLimit()
        self._stop.clear()
        self._model = (recipe.key, [pool.ray.put(recipe)])
        key = labels_digest(data) + repr(getattr(data, "origin", None))
        if key != self._data_key:
            self._data_ref, self._data_key = (key[:24], [pool.ray.put(data_recipe(data))]), key

    def update(self, model: torch.nn.Module) -> None:
        from harness.engines.recipes import model_recipe

        if self._pool is None:
            raise RuntimeError("RayEngine.start() was not called")
        recipe = self._with_meter(model, model_recipe(model))
        self._model = (recipe.key, [self._pool.ray.put(recipe)])

    def _with_meter(self, model: torch.nn.Module, recipe: Any) -> Any:
        """An endpoint's recipe carries the meter its driver-side module now shares with the workers
        (harness.engines.meters): `max_queries` and `rate` hold for the run, not per process."""
        if recipe.identity != "address":
            return recipe
        import dataclasses

        from harness.engines.meters import share_meter

        meter = share_meter(self._pool_for(model).ray, model)
        self._metered = [*self._metered, model]
        return dataclasses.replace(recipe, meter=meter)

    def fork(self) -> "RayEngine":
        """Another engine on the same workers (a defended variant evaluated beside the model): its own
        model, data and limit; closing it leaves the workers to this one."""
        twin = RayEngine.__new__(RayEngine)
        twin.__dict__.update(self.__dict__)
        twin.limit, twin._stop, twin._lock, twin._owns_ray = BatchLimit(), threading.Event(), threading.Lock(), False
        twin._model = twin._data_ref = twin._data_key = None
        twin._forked = True
        return twin

    def cancel(self) -> None:
        """Every call waiting on workers stops (the runner calls this when a lane fails or on Ctrl-C)."""
        self._stop.set()

    def _dispatch(self, items: Sequence[Any], method: str, on_done: Optional[Callable[[int, Any], None]]) -> list:
        if self._pool is None or (self._model is None and method != "call"):
            raise RuntimeError("RayEngine.start() was not called")
        pool, ray = self._pool, self._pool.ray
        results: list = [None] * len(items)
        pending = list(range(len(items)))[::-1]  # popped from the end: in order
        attempts = [0] * len(items)
        active: dict[Any, tuple[int, int]] = {}  # ref -> (item, worker)
        lost_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                       getattr(ray.exceptions, "NodeDiedError", ray.exceptions.RayActorError),
                       getattr(ray.exceptions, "ActorUnavailableError", ray.exceptions.RayActorError))
        try:
            while pending or active:
                if self._stop.is_set():
                    raise Cancelled()
                while pending and len(active) < max(1, pool.in_flight * max(1, len(pool.live))):
                    taken = pool.acquire(self._stop) if not active else pool.try_acquire()
                    if taken is None:  # every worker full: wait on what is in flight
                        break
                    w, actor = taken
                    i = pending.pop()
                    if method == "call":
                        ref = actor.call.remote(*items[i])
                    else:
                        ref = getattr(actor, method).remote(self._model, self._data_ref, items[i], self.limit.size)
                    active[ref] = (i, w)
                if not active:
                    continue
                ready, _ = ray.wait(list(active), num_returns=1, timeout=0.1)
                for ref in ready:
                    i, w = active.pop(ref)
                    try:
                        status, value, size, retries = ray.get(ref)
                    except lost_errors as e:
                        pool.died(w)
                        attempts[i] += 1
                        if attempts[i] >= MAX_ATTEMPTS:
                            raise RunFailed(f"unit {i} lost its worker {attempts[i]} times; last: {type(e).__name__}") from None
                        with self._lock:
                            self.retried += 1
                        pending.append(i)
                        continue
                    pool.release(w)
                    if status == "err":
                        raise value
                    self._lowered(size, retries)
                    results[i] = value
                    if on_done is not None:
                        on_done(i, value)
        finally:
            for ref, (_, w) in active.items():
                pool.release(w)
        return results

    def _lowered(self, size: Optional[int], retries: int) -> None:
        """A worker halved: the size it got down to holds for every later unit of the run."""
        if retries:
            with self.limit._lock:
                self.limit.retries += retries
                self.limit.size = size if self.limit.size is None else min(self.limit.size, size)

    def share_model(self, model: torch.nn.Module) -> tuple:
        """A model's recipe in the object store, for jobs that build it afresh (`map`)."""
        from harness.engines.recipes import model_recipe

        recipe = model_recipe(model)
        pool = self._pool_for(model)
        recipe = self._with_meter(model, recipe)
        return recipe.key, [pool.ray.put(recipe)]

    def share_data(self, data: "Data") -> tuple:
        """A sample source's recipe in the object store, read by jobs through `view.data(ref)`."""
        from harness.engines.recipes import data_recipe, labels_digest

        pool = self._pool_for(None)
        return (labels_digest(data) + repr(getattr(data, "origin", None)))[:24], [pool.ray.put(data_recipe(data))]

    def _pool_for(self, model: Optional[torch.nn.Module]) -> _Pool:
        if self._pool is None:
            from harness.engines.recipes import model_recipe

            if model is None:
                raise RuntimeError("RayEngine: share a model (or start) before sharing data")
            self._ensure_pool(model_recipe(model))
        return self._pool

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple], on_done: Optional[Callable[[int, Any], None]] = None) -> list:
        """fn(view, *job) for every job, spread over the workers; results in job order, `on_done(i,
        result)` as each returns. `fn` is a module-level function of the harness (Ray sends it by
        name); `view` gives the worker's `device`, `data(ref)` and `fresh_model(ref)` for refs from
        share_data and share_model. A job whose worker is lost is run again elsewhere."""
        return self._dispatch([(fn, tuple(job)) for job in jobs], "call", on_done)

    def on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(view, model_ref, data_ref, *args) on one worker, with the model and data this engine was
        started with (`view.model(model_ref)`, `view.data(data_ref)`): the runner's validity checks
        run there, on the workers' device, rather than on a driver that may have only a CPU."""
        if self._model is None:
            raise RuntimeError("RayEngine.start() was not called")
        return self.map(fn, [(self._model, self._data_ref, *args)])[0]

    def forward(self, batches: Sequence[Rows], on_done: Optional[Callable[[int], None]] = None) -> list[torch.Tensor]:
        done = None if on_done is None else (lambda i, _: on_done(i))
        return self._dispatch(list(batches), "forward", done)

    def run(self, units: Sequence[Unit], on_done: Optional[Callable[[int, UnitResult], None]] = None) -> list[UnitResult]:
        return self._dispatch(list(units), "run", on_done)

    def close(self) -> None:
        self._model = self._data_ref = None
        self._data_key = None
        if getattr(self, "_forked", False):
            return
        if self._metered:
            from harness.engines.meters import unshare_meters

            unshare_meters(self._metered)  # before the actors go with Ray: the driver's endpoint keeps its counts
            self._metered = []
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._code is not None:
            import shutil

            shutil.rmtree(self._code, ignore_errors=True)
            self._code = None
        if self._owns_ray and self._ray is not None:
            self._ray.shutdown()
            self._owns_ray = False
