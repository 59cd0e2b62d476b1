"""Stage 5, defended variants: every `defenses:` entry (trained weights, a preprocessing defense in its
naive and adaptive modes, a detector) evaluated against the same suite over the same data."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["defended"]


def _side_by_side(ctx: RunContext, variants: list) -> list:
    """The suite on every variant: one after another on the local engine; on an engine that can fork
    (Ray: the same workers, each variant its own model), all at once, each on a driver thread."""
    from harness.pipeline.suite import evaluate_suite

    engine = getattr(ctx, "engine", None)
    if len(variants) <= 1 or not hasattr(engine, "fork"):
        return [evaluate_suite(ctx, model, label) for model, label in variants]
    from concurrent.futures import ThreadPoolExecutor

    forks = [engine.fork() for _ in variants]
    try:
        with ThreadPoolExecutor(max_workers=len(variants), thread_name_prefix="harness-variant") as pool:
            futures = [pool.submit(evaluate_suite, ctx, model, label, engine=fork) for (model, label), fork in zip(variants, forks)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for fork in forks:
                    fork.cancel()
                raise
    finally:
        for fork in forks:
            fork.close()


def defended(ctx: RunContext) -> RunContext:
    ctx.defended = None
    if not ctx.cfg.defenses:
        return ctx
    from harness.evaluation.variants import evaluate_defenses
    from harness.pipeline.load import configured_model
    from harness.pipeline.suite import evaluate_suite

    try:
        ctx.defended = evaluate_defenses(ctx.cfg, ctx.model, ctx.data, ctx.devices, ctx.evaluation,
                                         partial(evaluate_suite, ctx), partial(configured_model, ctx), partial(_side_by_side, ctx))
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(ctx.interrupted("interrupted while evaluating defenses; the undefended results are in {partial}")) from None
    return ctx
