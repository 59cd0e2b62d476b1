"""One endpoint's query budget and client-side rate across the processes of a Ray run.

An endpoint model counts what it sends in a harness.sources.endpoint.Meter. On the Ray engine the
driver and every worker hold their own copy of the module; without a shared count, `max_queries`
and `rate` would hold per process (four workers could send four budgets). So the engine puts the
driver's Meter, with what it counted so far, into a Ray actor, and the driver's module and every
worker's use it through a RemoteMeter; when the engine closes, the driver's module gets a local
Meter back holding the final counts (its probes may still query after the engine is gone).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["RemoteMeter", "share_meter", "unshare_meters"]


class _MeterActor:
    """The shared Meter, in one Ray actor (calls are served one at a time)."""

    def __init__(self, queries: int, requests: int) -> None:
        from harness.sources.endpoint import Meter

        self.meter = Meter(queries, requests)

    def reserve(self, images: int, most: Optional[int]) -> Optional[int]:
        return self.meter.reserve(images, most)

    def request(self) -> int:
        return self.meter.request()

    def wait(self, rate: float) -> float:
        return self.meter.wait(rate)

    def counts(self) -> tuple[int, int]:
        return self.meter.counts()


class RemoteMeter:
    """The Meter interface over the actor (picklable: Ray sends the handle to the workers)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def _call(self, name: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actor, name).remote(*args))

    def reserve(self, images: int, most: Optional[int]) -> Optional[int]:
        return self._call("reserve", images, most)

    def request(self) -> int:
        return self._call("request")

    def wait(self, rate: float) -> float:
        return self._call("wait", rate)

    def counts(self) -> tuple[int, int]:
        return tuple(self._call("counts"))  # type: ignore[return-value]


def share_meter(ray: Any, model: Any) -> Optional[RemoteMeter]:
    """The shared meter of the endpoint inside `model` (made on first use, from the driver's counts),
    now also the driver's; None for a model that is no endpoint."""
    from harness.sources.endpoint import endpoint_of

    endpoint = endpoint_of(model)
    if endpoint is None:
        return None
    if isinstance(endpoint.meter, RemoteMeter):
        return endpoint.meter
    queries, requests = endpoint.meter.counts()
    actor = ray.remote(num_cpus=0)(_MeterActor).remote(queries, requests)
    endpoint.meter = RemoteMeter(actor)
    return endpoint.meter


def unshare_meters(models: list[Any]) -> None:
    """Gives each driver-side endpoint a local Meter again, with the shared counts (before Ray goes)."""
    from harness.sources.endpoint import Meter, endpoint_of

    for model in models:
        endpoint = endpoint_of(model)
        if endpoint is not None and isinstance(endpoint.meter, RemoteMeter):
            queries, requests = endpoint.meter.counts()
            endpoint.meter = Meter(queries, requests)
