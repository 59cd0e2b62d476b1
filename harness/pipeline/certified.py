"""Stage 7, certificates: every `certificates:` entry (randomized smoothing, interval bounds) on the
config's model over the run's data, each finished entry saved as it finishes and reused on resume;
their soundness checks join the run's checks, so a certificate an attack contradicts fails the run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from harness.pipeline.context import RunContext

__all__ = ["certified"]


def certified(ctx: RunContext) -> RunContext:
    ctx.certified = None
    if not ctx.cfg.certificates:
        return ctx
    from harness.evaluation.certificates import evaluate_certificates

    try:
        ctx.certified = evaluate_certificates(ctx.cfg, ctx.model, ctx.data, ctx.devices[0], ctx.saved.probes, ctx.probe_finished)
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(ctx.interrupted("interrupted while certifying; finished results are in {partial} "
                                        "(`harness run ... --resume` continues)")) from None
    except Exception as e:  # a certificate that crashes keeps what finished, as the suite does (exit 3)
        partial = ctx.saved.partial
        where = f"; finished results are in {partial} (`harness run ... --resume` continues)" if partial is not None and partial.exists() else ""
        raise RunFailed(f"certificates: {type(e).__name__}: {' '.join(str(e).split())[:300]}{where}") from e
    return ctx
