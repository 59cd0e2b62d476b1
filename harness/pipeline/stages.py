"""A run as ordered stages over one RunContext: each stage is a plain function that takes the context
and returns it with its fields filled (see harness.pipeline.context).

    ctx = run_stages(RunContext(RunRequest(config="configs/ci-gate.yaml", out=Path("reports/ci"))))
    ctx.card.verdict

resolve -> load -> provenance -> suite -> defended -> probed -> certified -> judge -> write -> track. harness.run is
this inside the output lock and the guard that hands a caller's model back as it was found.
"""

from __future__ import annotations

from typing import Callable, Sequence

from harness.pipeline.certified import certified
from harness.pipeline.context import RunContext
from harness.pipeline.defended import defended
from harness.pipeline.judge import judge
from harness.pipeline.load import load
from harness.pipeline.probed import probed
from harness.pipeline.provenance import provenance
from harness.pipeline.resolve import resolve
from harness.pipeline.suite import suite
from harness.pipeline.track import track
from harness.pipeline.write import write

__all__ = ["Stage", "STAGES", "run_stages"]

Stage = Callable[[RunContext], RunContext]

STAGES: tuple[Stage, ...] = (resolve, load, provenance, suite, defended, probed, certified, judge, write, track)


def run_stages(ctx: RunContext, stages: Sequence[Stage] = STAGES) -> RunContext:
    for stage in stages:
        ctx = stage(ctx)
    return ctx
