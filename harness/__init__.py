"""harness: adversarial robustness testing for PyTorch models, with scorecards that gate deployment.

    import harness
    card = harness.run()            # the embedded default suite
    card.passed, card.metrics["clean_accuracy"]
    harness.compare(card_a, card_b) # model versions side by side

Importing this package is cheap: torch and the rest load when a run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "gate", "compare", "harden", "Scorecard", "BadInput", "RunFailed", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from harness.api import run
    from harness.pipeline.harden import harden

    from harness.reports.comparison import compare
    from harness.core.errors import BadInput, RunFailed
    from harness.reports.scorecard import Scorecard

_LAZY = {"run": "harness.api", "compare": "harness.reports.comparison", "harden": "harness.pipeline.harden",
         "Scorecard": "harness.reports.scorecard", "BadInput": "harness.core.errors", "RunFailed": "harness.core.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def gate(scorecard: Any, config: Any = None, baseline: Any = None):
    """Judges a saved scorecard again (its own gates, or a config's) without re-running it."""
    from harness.api import resolve_config
    from harness.reports.scorecard import Scorecard

    card = scorecard if isinstance(scorecard, Scorecard) else Scorecard.load(scorecard)
    base = baseline if isinstance(baseline, Scorecard) or baseline is None else Scorecard.load(baseline)
    if config is None:
        return card.rejudge(None, base)
    cfg = resolve_config(config)[0]
    return card.rejudge(cfg.gates, base, on_inconclusive=cfg.on_inconclusive)
