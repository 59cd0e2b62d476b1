"""Stage 10, track: the written run logged to MLflow when the config's `tracking.mlflow` or the caller
(`harness run --mlflow [URI]`, `harness.run(..., mlflow=URI)`) asks for it.

It runs after the outputs are written, so a tracking server that fails loses no result: the run then
ends as a failed run (exit 3) whose message names the output directory and the URI (without its
password). mlflow is checked for at the start of the run (`require_tracking`), not after the suite.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from harness.core.errors import BadInput, RunFailed, one_line

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["track", "tracking_uri", "require_tracking"]


def tracking_uri(ctx: RunContext) -> Optional[str]:
    """The MLflow URI this run logs to ("" for MLflow's own default), or None for no tracking."""
    given = ctx.request.mlflow
    return given if given is not None else ctx.cfg.tracking.mlflow


def require_tracking(ctx: RunContext) -> None:
    """BadInput (exit 2) naming the extra, before any work, when the run is to be tracked without mlflow."""
    from harness.reports.tracking import INSTALL

    if tracking_uri(ctx) is not None and importlib.util.find_spec("mlflow") is None:
        raise BadInput("tracking.mlflow", f"logging to MLflow needs mlflow, which is not installed: {INSTALL}")


def track(ctx: RunContext) -> RunContext:
    uri = tracking_uri(ctx)
    if uri is None:
        return ctx
    from harness.reports.tracking import ARTIFACTS, flat_params, log_to_mlflow, redact_uri

    cfg = ctx.cfg
    params = flat_params(cfg.model_dump(mode="json", exclude_unset=True, exclude={"tracking"}))
    name = cfg.tracking.run_name or cfg.name
    where = redact_uri(uri) if uri else "MLflow's default tracking URI"
    with tempfile.TemporaryDirectory() as tmp:
        out = ctx.out
        if out is None:  # a run without an output directory still logs its files
            out = Path(tmp)
            ctx.card.save(out)
        try:
            run_id = log_to_mlflow(ctx.card.record, [out / f for f in ARTIFACTS], uri, cfg.tracking.experiment, name, params)
        except Exception as e:
            kept = f"the results are in {ctx.out}; " if ctx.out is not None else ""
            # the URI is replaced before the text is cut: a cut through it could leave part of a password
            message = one_line(str(e).replace(uri, where) if uri else e)
            raise RunFailed(f"{kept}logging them to MLflow at {where} failed: {type(e).__name__}: {message}") from None
    ctx.card.tracking = {"mlflow_run_id": run_id, "experiment": cfg.tracking.experiment, "tracking_uri": where}
    return ctx
