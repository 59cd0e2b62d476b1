"""Stage 6, probes: every `probes:` entry (poisoning probes that train a copy of the model, scans of
the model or of its training data), each finished unit saved as it finishes and reused on resume."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext
    from harness.sources.data import Data
    from harness.sources.models import BoundedModel

__all__ = ["probed", "training_data"]


def training_data(ctx: RunContext) -> Data:
    """The data the probes poison and train on: the config's `train.data` (over a builtin model's recipe)."""
    from harness.config import train_plan
    from harness.sources.data import load_data

    cfg = ctx.cfg
    plan = train_plan(cfg)
    return load_data(plan.data.source or cfg.data.source, plan.data.split, plan.data.limit, cfg.seed, ctx.base, cfg.data.image_size)


def _model_to_train(ctx: RunContext, fine_tune: bool) -> BoundedModel:
    """The config's model on the first device; the probe copies it, and re-initializes it unless it fine-tunes."""
    from harness.pipeline.load import configured_model

    return configured_model(ctx, ctx.cfg.model.weights).to(ctx.devices[0])


def probed(ctx: RunContext) -> RunContext:
    ctx.probed = None
    if not ctx.cfg.probes:
        return ctx
    from functools import partial

    from harness.evaluation.probes import evaluate_probes

    try:
        ctx.probed = evaluate_probes(ctx.cfg, ctx.model, ctx.data, partial(training_data, ctx), partial(_model_to_train, ctx),
                                     ctx.devices[0], ctx.out, ctx.saved.probes, ctx.probe_finished, getattr(ctx, "engine", None),
                                     ctx.base)
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(ctx.interrupted("interrupted while running probes; finished results are in {partial} "
                                        "(`harness run ... --resume` continues)")) from None
    return ctx
