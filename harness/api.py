"""`harness.run`: config in, Scorecard out. The CLI and notebooks both come through here; the run
itself is the pipeline (harness.pipeline.stages: resolve, load, provenance, suite, defended, probed,
judge, write)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from harness.pipeline.context import RunContext, RunRequest
from harness.pipeline.resolve import ConfigLike, resolve_config
from harness.pipeline.stages import run_stages

if TYPE_CHECKING:  # pragma: no cover
    from harness.reports.scorecard import Scorecard

__all__ = ["run", "resolve_config"]


def run(config: ConfigLike = None, *, model: Any = None, data: Any = None, out: Optional[Union[str, Path]] = None,
        device: Optional[Union[str, list]] = None, seed: Optional[int] = None, baseline: Optional[Union[str, Path, Scorecard]] = None,
        show_progress: Optional[bool] = None, resume: bool = False, engine: Any = None, mlflow: Optional[str] = None) -> Scorecard:
    """Runs a suite and returns its Scorecard; writes the run's outputs to `out` when given.

    `config` is a YAML path, a dict, a Config, or None for the embedded default. `model` (a
    torch.nn.Module taking the config's preprocessing) and `data` ((x, y) tensors in [0, 1]) override
    the config's. The harness evaluates `model` itself, not a copy, and hands it back as it found it:
    every parameter's requires_grad, every submodule's training mode and every tensor's device are
    restored afterwards, also when the run fails. Bad input raises BadInput; a failed or interrupted
    run raises RunFailed, with finished results saved to `out/scorecard.partial.json` and
    `out/run-state.json` as each attack at each epsilon finishes. `resume=True` reuses what a run
    into the same `out` finished (when its config, model and data hashes match) and computes only the
    rest. While it runs, the run holds `out` (a lock file in it): a second run into the same `out`
    raises BadInput naming the first. `engine` ("local", "ray", an `engine:` mapping such as
    {"name": "ray", "address": "auto"}, or an engine object, used and left open) says where the
    units run; the results do not depend on it. `mlflow` (a tracking URI, "" for MLflow's default)
    logs the finished run to MLflow, replacing the config's `tracking.mlflow`; the card's `tracking`
    then holds the MLflow run id.
    """
    request = RunRequest(config, model, data, None if out is None else Path(out), device, seed, baseline, show_progress, resume, engine,
                         mlflow)
    with contextlib.ExitStack() as stack:
        if request.out is not None:
            from harness.core.files import output_lock

            stack.enter_context(output_lock(request.out))
        if model is not None and _is_module(model):
            from harness.sources.models import kept_as_found

            stack.enter_context(kept_as_found(model))
        ctx = RunContext(request)
        try:
            return run_stages(ctx).card
        finally:
            ctx.close()


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)
