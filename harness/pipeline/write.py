"""Stage 9, write: the scorecard and its renderings into the output directory (none without one), and
the saved partial work removed, since scorecard.json now says everything it did."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["write"]


def write(ctx: RunContext) -> RunContext:
    if ctx.out is not None:
        ctx.card.save(ctx.out)  # scorecard.json last; it removes scorecard.partial.json
        ctx.saved.finish()
    return ctx
