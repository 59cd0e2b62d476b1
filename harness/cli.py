"""The `harness` command. Thin: parsing, exit codes and one-line errors; the work is in harness.api.

Nothing heavy is imported at module level, so `harness --help` does not load torch.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Optional

import click

from .errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, BadInput, RunFailed

__all__ = ["main", "cli"]

LIST_KINDS = ("attacks", "probes", "defenses", "models", "datasets")


class _State:
    debug = False


def _fail(code: int, message: str) -> None:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())  # one line, whatever a library said
    click.echo(f"harness: {line}", err=True)
    sys.exit(code)


def _guard(fn):
    """Maps the two failure kinds to their exit codes and one line; --debug shows the traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as e:
            if _State.debug:
                raise
            _fail(EXIT_BAD_INPUT, f"error: {e}")
        except RunFailed as e:
            if _State.debug:
                raise
            _fail(EXIT_RUN_FAILED, f"run failed: {e}")
        except ImportError as e:
            from attacks.adapters import MissingDependency

            if not isinstance(e, MissingDependency) or _State.debug:
                raise
            _fail(EXIT_BAD_INPUT, f"error: {e}")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harness")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Adversarial robustness testing for PyTorch models, with gates for deployment.

    \b
    Exit codes: 0 every gate passed, 1 a gate or check failed (or could not be judged),
    2 bad input (config, model, weights, data, arguments), 3 the run itself failed.
    """
    _State.debug = debug


def _default_out(name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{safe}-{stamp}"


def _print_summary(card, out: Optional[Path]) -> None:
    m = card.metrics
    click.echo(f"{card.name}: {card.verdict.upper()}  (clean accuracy {m.get('clean_accuracy', float('nan')):.4f})")
    for g in card.gates:
        value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
        extra = f"  ({g['reason']})" if g.get("reason") else ""
        click.echo(f"  [{g['verdict']:>12}] {g['metric']} {g['op']} {g['threshold']}: {value}{extra}")
    for c in card.checks:
        if c["status"] != "pass":
            click.echo(f"  [check {c['status']}] {c['name']}: {c['detail']}")
    if out is not None:
        click.echo(f"outputs: {out}/ (scorecard.json, report.html, junit.xml, summary.md)")


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory [default: reports/<name>-<timestamp>/].")
@click.option("--device", help="auto, cpu, cuda, cuda:N, or a comma-separated list to shard batches over.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A scorecard to judge max_drop gates against.")
@click.option("--seed", type=int, help="Override the config's seed.")
@_guard
def run(config: Optional[Path], out: Optional[Path], device: Optional[str], baseline: Optional[Path], seed: Optional[int]) -> None:
    """Run a suite (the embedded default when CONFIG is left out) and write its scorecard."""
    from .api import resolve_config, run as run_suite
    from .devices import parse_devices

    cfg, _, _ = resolve_config(config)  # validate before anything heavy, and to name the output dir
    if device is not None:
        parse_devices(device)
    out = out or _default_out(cfg.name)
    card = run_suite(cfg if config is None else config, out=out, device=device, seed=seed, baseline=baseline)
    _print_summary(card, out)
    sys.exit(card.exit_code)


@cli.command()
@click.argument("scorecard", type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path), help="Judge with this config's gates instead of the scorecard's own.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A scorecard to judge max_drop gates against.")
@_guard
def gate(scorecard: Path, config: Optional[Path], baseline: Optional[Path]) -> None:
    """Judge a saved scorecard's gates again, without re-running anything."""
    from . import gate as rejudge

    card = rejudge(scorecard, config, baseline)
    _print_summary(card, None)
    sys.exit(card.exit_code)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_guard
def validate(config: Path) -> None:
    """Check a config without loading a model or data."""
    from .config import load_config

    cfg, _, _ = load_config(config)
    click.echo(f"{config}: valid ({len(cfg.attacks)} attack(s), {len(cfg.gates)} gate(s), {len(cfg.metric_ids())} metric(s))")


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(LIST_KINDS))
def list_(kind: Optional[str]) -> None:
    """List what a config can name: attacks, probes, defenses, models, datasets."""
    for k in [kind] if kind else LIST_KINDS:
        click.echo(f"{k}:")
        for line in _listing(k):
            click.echo(f"  {line}")


def _listing(kind: str) -> list[str]:
    if kind == "attacks":
        from attacks import ATTACKS, attack_params

        lines = []
        for name, cls in ATTACKS.items():
            knobs = ", ".join(f"{f}={p.default!r}" for f, p in attack_params(cls).items())
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            lines.append(f"{name:<8} norms {'/'.join(cls.norms):<8} {knobs}    {summary}")
        from attacks.adapters import NAMING

        lines.append(f"({NAMING})")
        return lines
    if kind == "models":
        from .models import model_choices

        return model_choices()
    if kind == "datasets":
        from .data import dataset_choices

        return dataset_choices()
    return ["(none in this version)"]


def main() -> None:
    """The console script: like click's standalone mode, but a usage error is one line (exit 2)."""
    try:
        code = cli.main(prog_name="harness", standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # plain `harness`: show the help
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail(EXIT_BAD_INPUT, f"error: {e.format_message()}{hint}")
    except click.Abort:
        _fail(EXIT_RUN_FAILED, "interrupted")
    except click.ClickException as e:
        _fail(e.exit_code, f"error: {e.format_message()}")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
