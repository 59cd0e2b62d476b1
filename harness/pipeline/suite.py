"""Stage 4, the suite: the clean pass and every attack entry on the model, each finished unit saved as
it finishes (RunContext.save_partial); the units a resumed run restored are reused, not rerun."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from harness.evaluation.runner import AttackResult, Evaluation
    from harness.pipeline.context import RunContext
    from harness.sources.models import BoundedModel

__all__ = ["suite", "evaluate_suite"]


def evaluate_suite(ctx: RunContext, model: BoundedModel, label: str = "", *, on_result: Optional[Callable[[Any], None]] = None,
                   done: Optional[dict[str, list[AttackResult]]] = None, engine: Any = None) -> Evaluation:
    """The config's attack suite on `model` over the run's data, on `engine` (default: the run's).
    `label` (a defended variant's name, as evaluate_defenses calls this) does not change what runs."""
    from harness.evaluation.runner import evaluate

    cfg = ctx.cfg
    return evaluate(model, ctx.data, cfg.attacks, ctx.devices, cfg.data.batch_size, cfg.seed, cfg.model.num_classes,
                    on_result=on_result, show_progress=ctx.request.show_progress, cascade=cfg.cascade, done=done,
                    engine=engine if engine is not None else getattr(ctx, "engine", None))


def suite(ctx: RunContext) -> RunContext:
    try:
        ctx.evaluation = evaluate_suite(ctx, ctx.model, on_result=ctx.save_partial, done=ctx.saved.done)
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(ctx.interrupted("interrupted; finished results are in {partial} (`harness run ... --resume` continues)")) from None
    except Exception as e:
        partial = ctx.saved.partial
        where = f"; finished results are in {partial}" if partial is not None and partial.exists() else ""
        raise RunFailed(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}{where}") from e
    return ctx
