"""Stage 5, defended variants: every `defenses:` entry (trained weights, a preprocessing defense in its
naive and adaptive modes, a detector) evaluated against the same suite over the same data."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["defended"]


def defended(ctx: RunContext) -> RunContext:
    ctx.defended = None
    if not ctx.cfg.defenses:
        return ctx
    from harness.evaluation.variants import evaluate_defenses
    from harness.pipeline.load import configured_model
    from harness.pipeline.suite import evaluate_suite

    try:
        ctx.defended = evaluate_defenses(ctx.cfg, ctx.model, ctx.data, ctx.devices, ctx.evaluation,
                                         partial(evaluate_suite, ctx), partial(configured_model, ctx))
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(ctx.interrupted("interrupted while evaluating defenses; the undefended results are in {partial}")) from None
    return ctx
