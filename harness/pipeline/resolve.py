"""Stage 1, resolve: the validated config (with the caller's seed and device), its base directory and
label, the baseline scorecard, and the clock the run's duration starts from."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING, Union

from harness.config import Config, load_config, parse_config

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["ConfigLike", "resolve_config", "resolve"]

ConfigLike = Union[None, str, Path, dict, Config]


def resolve_config(config: ConfigLike) -> tuple[Config, Path, str]:
    """A validated Config, the directory its relative paths start from, and its label for messages."""
    if isinstance(config, Config):
        return config, Path.cwd(), "config"
    if isinstance(config, dict):
        return parse_config(config, "config"), Path.cwd(), "config"
    cfg, base, _ = load_config(config)
    return cfg, base, "default" if config is None else str(config)


def resolve(ctx: RunContext) -> RunContext:
    from harness.reports.scorecard import Scorecard

    req = ctx.request
    cfg, ctx.base, ctx.label = resolve_config(req.config)
    engine = req.engine if isinstance(req.engine, (str, dict)) else None
    if req.seed is not None or req.device is not None or engine is not None:  # validated again: an override is config too
        # only the keys the config gave: a dump of every default would read as if each had been written
        # out, and a partial `train:` over the builtin recipe would become the generic recipe
        raw = cfg.model_dump(mode="json", exclude_unset=True)
        raw.setdefault("engine", {"name": "local"})
        if isinstance(engine, dict):  # the keys given replace the config's (a CLI --address keeps the config's workers)
            current = {"name": "local", **raw["engine"]}
            engine = {**(current if engine.get("name", current["name"]) == current["name"] else {}), **engine}
        cfg = parse_config({**raw, **({"seed": req.seed} if req.seed is not None else {}),
                            **({"device": req.device} if req.device is not None else {}),
                            **({"engine": engine} if engine is not None else {})}, ctx.label)
    ctx.cfg = cfg
    from harness.pipeline.track import require_tracking

    require_tracking(ctx)  # a missing mlflow is bad input before the run, not a failure after it
    ctx.baseline = req.baseline if isinstance(req.baseline, Scorecard) or req.baseline is None else Scorecard.load(req.baseline)
    ctx.started, ctx.t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    return ctx
