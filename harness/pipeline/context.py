"""The run context: what a run was asked, what each stage has filled in so far, and the work it has saved.

A stage takes the context and returns it with its own fields filled (see harness.pipeline.stages).
A field a stage fills has no value until then, so reading it too early fails with AttributeError
naming it, not with a None further on. `filled()` says which are there.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from harness.pipeline.resume import SavedWork

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.config import Config
    from harness.evaluation.runner import Evaluation
    from harness.reports.scorecard import Scorecard
    from harness.sources.data import Data
    from harness.sources.models import BoundedModel

__all__ = ["RunRequest", "RunContext"]


@dataclass(frozen=True)
class RunRequest:
    """What the caller of harness.run asked for, as given (see harness.api.run)."""

    config: Any = None  # a YAML path, a dict, a Config, or None for the embedded default
    model: Any = None  # a torch.nn.Module replacing the config's model
    data: Any = None  # (x, y) tensors, a Data or a torch Dataset replacing the config's data
    out: Optional[Path] = None
    device: Optional[Union[str, list]] = None
    seed: Optional[int] = None
    baseline: Any = None  # a scorecard path or a Scorecard
    show_progress: Optional[bool] = None
    resume: bool = False
    engine: Any = None  # "local", "ray" or an `engine:` mapping replacing the config's; or an Engine to use as it is
    mlflow: Optional[str] = None  # a tracking URI replacing the config's `tracking.mlflow` ("" for MLflow's default)


@dataclass(repr=False)
class RunContext:
    request: RunRequest
    # resolve
    cfg: Config = field(init=False)
    base: Path = field(init=False)  # where the config's relative paths start
    label: str = field(init=False)  # the config's name in messages and provenance
    baseline: Optional[Scorecard] = field(init=False)
    started: dt.datetime = field(init=False)
    t0: float = field(init=False)  # perf_counter at the start, for duration_s
    # load
    devices: list[torch.device] = field(init=False)
    engine: Any = field(init=False)  # where the units run (harness.engines); closed by close()
    data: Data = field(init=False)
    model: BoundedModel = field(init=False)
    model_info: dict[str, Any] = field(init=False)  # the model's source and hashes, as its loader tells them
    # provenance
    provenance: dict[str, Any] = field(init=False)
    saved: SavedWork = field(init=False)  # partial saves and resume
    # suite, defended, probed
    evaluation: Evaluation = field(init=False)
    defended: Optional[tuple[list[dict], dict[str, float], list[dict]]] = field(init=False)  # records, metrics, checks
    probed: Optional[tuple[list[dict], dict[str, float]]] = field(init=False)  # records, metrics
    # certified
    certified: Optional[tuple[list[dict], dict[str, float], list[dict]]] = field(init=False)  # records, metrics, checks
    # judge
    card: Scorecard = field(init=False)

    def filled(self) -> list[str]:
        """The fields set so far, in stage order."""
        return [f.name for f in fields(self) if hasattr(self, f.name)]

    def __repr__(self) -> str:
        return f"RunContext({', '.join(self.filled())})"

    def close(self) -> None:
        """Releases what the run holds beyond its outputs: the engine's workers (one handed in stays open)."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None and engine is not self.request.engine:
            engine.close()

    @property
    def out(self) -> Optional[Path]:
        return self.request.out

    def save_partial(self, ev: Evaluation) -> None:
        """Saves what has finished (the suite's units so far, the probes' units) so an interrupted run
        keeps it: run-state.json for --resume, scorecard.partial.json to read. Called after each unit."""
        if self.saved.out is None:
            return
        from harness.pipeline.judge import record_of

        self.saved.save(ev.results, record_of(self, ev))

    def probe_finished(self, unit: str, record: dict) -> None:
        """One probe unit finished: kept for the record and saved with the suite's results."""
        self.saved.probes[unit] = record
        self.save_partial(self.evaluation)

    def interrupted(self, message: str) -> str:
        """The message of the RunFailed for Ctrl-C (or SIGTERM): `message` with {partial} naming the saved
        results, or plain "interrupted" when the run saves nothing (no output directory)."""
        partial = self.saved.partial
        return "interrupted" if partial is None else message.format(partial=partial)
