"""The pytest plugin (entry point `pytest11: harness`): robustness gates as tests.

- The `harness_run` fixture runs a suite and returns its Scorecard; its outputs go to a temporary
  directory unless `out=` says where::

      def test_the_gate(harness_run):
          assert harness_run("configs/ci-gate.yaml").passed

- `pytest --harness CONFIG` (repeatable) collects each gate of CONFIG as a test item, plus one item for
  the validity checks (a failed check fails a run whatever its gates say). The suite runs once, at the
  first item; each item then passes or fails with its gate's verdict, and its failure message and its
  JUnit properties (`pytest --junitxml`) carry the value, the threshold, the 95% interval and the reason.
  Given alone, `--harness` runs only those gates; with test paths beside it, both.

pytest imports this module in every session of an environment where the harness is installed, so it
imports nothing heavy at module level (torch loads when a suite first runs).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

__all__ = ["harness_run", "GateItem", "ChecksItem", "HarnessConfig"]

_CONFIGS = pytest.StashKey[set]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "robustness gates (harness)")
    group.addoption("--harness", action="append", default=[], metavar="CONFIG",
                    help="Collect each gate of a harness config as a test (repeatable); the suite runs once.")
    group.addoption("--harness-out", metavar="DIR",
                    help="Write each config's outputs to DIR/<config name>/ [default: reports/<name>-<timestamp>/].")
    group.addoption("--harness-baseline", metavar="SCORECARD", help="A scorecard to judge max_drop gates against.")
    group.addoption("--harness-device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N [default: the config's device].")


def pytest_configure(config: pytest.Config) -> None:
    here = config.invocation_params.dir
    paths = [(here / p).resolve() for p in config.getoption("harness") or []]
    config.stash[_CONFIGS] = set(paths)
    if not paths:
        return
    config.addinivalue_line("markers", "harness_gate: a gate of a harness config, collected by --harness")
    # alone, --harness runs just its gates; beside explicit test paths, both
    given = [str(p) for p in paths]
    config.args[:] = given if config.args_source != pytest.Config.ArgsSource.ARGS else [*config.args, *given]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Collector]:
    if file_path.resolve() in parent.config.stash.get(_CONFIGS, set()):
        return HarnessConfig.from_parent(parent, path=file_path)
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def _one_line(err: BaseException) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _bound(gate: Any) -> tuple[str, float]:
    """A config gate's operator and threshold, as the scorecard writes them."""
    if gate.min is not None:
        return ">=", gate.min
    if gate.max is not None:
        return "<=", gate.max
    return "max_drop", gate.max_drop


class HarnessError(Exception):
    """The suite could not run: bad input (what `harness run` exits 2 for) or a failed run (exit 3)."""


class GateFailed(AssertionError):
    """A gate (or a check) did not pass; the message is the whole explanation, no traceback needed."""


class HarnessConfig(pytest.File):
    """One config given to --harness: validated at collection, run once when its first item runs."""

    _card: Any = None
    _error: Optional[str] = None

    def collect(self):
        from harness.config import load_config

        cfg, _, _ = load_config(self.path)
        self.suite_name = cfg.name
        for i, gate in enumerate(cfg.gates):
            op, threshold = _bound(gate)
            yield GateItem.from_parent(self, name=f"gate {i}: {gate.metric} {op} {threshold:g}", index=i, metric=gate.metric, op=op)
        yield ChecksItem.from_parent(self, name="checks")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        from harness.core.errors import BadInput

        if isinstance(excinfo.value, BadInput):
            return f"harness: error: {_one_line(excinfo.value)}"
        return super().repr_failure(excinfo, style)

    def card(self) -> Any:
        """The suite's Scorecard, run on first use; HarnessError (one line) when it cannot run."""
        if self._card is None and self._error is None:
            from harness.api import run
            from harness.core.errors import BadInput, RunFailed

            opt = self.config.getoption
            out_root = opt("harness_out")
            if out_root:
                out = Path(out_root) / _safe_name(self.suite_name)
            else:
                out = Path("reports") / f"{_safe_name(self.suite_name)}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            try:
                self._card = run(self.path, out=out, device=opt("harness_device"), baseline=opt("harness_baseline"), show_progress=False)
            except BadInput as e:
                self._error = f"harness: error: {_one_line(e)}"
            except RunFailed as e:
                self._error = f"harness: run failed: {_one_line(e)}"
            self.out = out
        if self._error is not None:
            raise HarnessError(self._error)
        return self._card


class _HarnessItem(pytest.Item):
    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (GateFailed, HarnessError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, Optional[int], str]:
        return self.path, None, f"{self.parent.name}::{self.name}"


class GateItem(_HarnessItem):
    """One gate: passes when the scorecard's gate passed (an inconclusive gate follows its
    `on_inconclusive`, as `harness run` does)."""

    def __init__(self, *, index: int, metric: str, op: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index, self.metric, self.op = index, metric, op
        self.add_marker("harness_gate")

    def runtest(self) -> None:
        card = self.parent.card()
        gates = card.gates
        if self.index >= len(gates) or gates[self.index]["metric"] != self.metric or gates[self.index]["op"] != self.op:
            raise GateFailed(f"the scorecard of {self.path} has no gate {self.index} on {self.metric} ({self.op})")
        g = gates[self.index]
        ci = g.get("ci95")
        for key, value in (("metric", g["metric"]), ("op", g["op"]), ("threshold", g["threshold"]), ("value", g["value"]),
                           ("ci95_low", ci[0] if ci else None), ("ci95_high", ci[1] if ci else None),
                           ("interval_method", g.get("interval_method")), ("baseline", g.get("baseline")),
                           ("verdict", g["verdict"]), ("reason", g.get("reason") or ""), ("scorecard", str(self.parent.out / "scorecard.json"))):
            self.user_properties.append((key, "" if value is None else value))
        if not g["passed"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
            reason = g.get("reason") or ""
            if ci and "CI" not in reason:  # the judge's reason quotes the interval it decided on
                reason = "; ".join(r for r in (reason, f"95% CI [{ci[0]:.4f}, {ci[1]:.4f}]") if r)
            raise GateFailed(f"{g['verdict'].upper()} {g['metric']} {g['op']} {g['threshold']}: {value}; "
                             + (f"{reason}; " if reason else "") + f"report: {self.parent.out / 'report.html'}")


class ChecksItem(_HarnessItem):
    """The run's validity checks: any check that failed fails this item (and the run)."""

    def runtest(self) -> None:
        card = self.parent.card()
        failed = [c for c in card.checks if c["status"] == "fail"]
        for c in card.checks:
            self.user_properties.append((f"check:{c['name']}", c["status"]))
        if failed:
            raise GateFailed("check(s) failed, so no gate of this run can be trusted: "
                             + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))


@pytest.fixture
def harness_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Runs a suite like `harness.run` and returns its Scorecard. A relative config path that does
    not exist from the working directory is read from pytest's rootdir; the outputs go to a fresh
    temporary directory unless `out=` is given."""

    def run(config: Any = None, **kwargs: Any) -> Any:
        from harness.api import run as run_suite

        if isinstance(config, (str, Path)) and not Path(config).is_absolute() and not Path(config).exists():
            rooted = request.config.rootpath / config
            config = rooted if rooted.exists() else config
        kwargs.setdefault("out", tmp_path_factory.mktemp("harness"))
        kwargs.setdefault("show_progress", False)
        return run_suite(config, **kwargs)

    return run
