"""Engines run units of work where the model lives: `local` (threads over this process's devices) and
`ray` (Ray actors, harness.engines.cluster; Ray loads only when asked for). See harness.engines.base."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["engine_for", "ENGINES"]

ENGINES = ("local", "ray")


def engine_for(name: str = "local", address: Optional[str] = None, workers: Optional[int] = None,
               gpus_per_worker: Optional[float] = None, threads: Optional[int] = None, device: Any = "auto") -> Any:
    """A new engine by name; `ray` without Ray installed is BadInput naming the pip command."""
    if name == "local":
        from harness.engines.local import LocalEngine

        return LocalEngine()
    if name == "ray":
        from harness.engines.cluster import RayEngine, require_ray

        require_ray()
        return RayEngine(address=address, workers=workers, gpus_per_worker=gpus_per_worker, threads=threads, device=device)
    from harness.core.errors import BadInput

    raise BadInput("engine", f"unknown engine {name!r} (valid: {', '.join(ENGINES)})")
