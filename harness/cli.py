"""The `harness` command. Thin: parsing, exit codes and one-line errors; the work is in harness.api.

Nothing heavy is imported at module level, so `harness --help` does not load torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Iterator, Optional

import click

from harness.core.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_PASS, EXIT_RUN_FAILED, BadInput, RunFailed

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
            from harness.attacks.adapters import MissingDependency

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


REPORTS = Path("reports")
PARTIAL = "scorecard.partial.json"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def _default_out(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPORTS / f"{_safe_name(name)}-{stamp}"


def _resumable(name: str, reports: Path = REPORTS) -> Optional[Path]:
    """The reports/<name>-*/ holding the most recently saved unfinished run of the config `name`."""
    import json

    found = []
    for d in reports.glob(f"{_safe_name(name)}-*"):
        partial = d / PARTIAL
        try:
            recorded = json.loads(partial.read_text(encoding="utf-8"))
            mtime = partial.stat().st_mtime
        except (OSError, ValueError):
            continue
        # the glob alone would also match "<name>-v2-*"; the record says whose run it is
        if isinstance(recorded, dict) and recorded.get("name") == name:
            found.append((mtime, d.name, d))
    return max(found)[2] if found else None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a run lasts, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so both stop it cleanly."""
    import signal
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
        click.echo(f"outputs: {out}/ (scorecard.json, report.html, junit.xml, summary.md, outcomes.json)")
    tracked = getattr(card, "tracking", None)
    if tracked:
        click.echo(f"mlflow: run {tracked['mlflow_run_id']} in experiment {tracked['experiment']!r} at {tracked['tracking_uri']}")


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory [default: reports/<name>-<timestamp>/].")
@click.option("--device", help="auto, cpu, cuda, cuda:N, or a comma-separated list to shard batches over.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A scorecard to judge max_drop gates against.")
@click.option("--seed", type=int, help="Override the config's seed.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out [default: the newest reports/<name>-*/ "
              "with a scorecard.partial.json], without recomputing what finished.")
@click.option("--engine", "engine", type=click.Choice(["local", "ray"]), help="Where the units run [default: the config's "
              "engine:, else local]. ray needs pip install 'robustgate[ray]'.")
@click.option("--address", help="ray (implies --engine ray): a running cluster, auto or HOST:PORT [default: start a local Ray "
              "on this machine].")
@click.option("--workers", type=int, help="ray (implies --engine ray): how many workers [default: one per GPU, or per CPU slot].")
@click.option("--gpus-per-worker", type=float, help="ray (implies --engine ray): GPUs per worker; a fraction such as 0.5 puts "
              "two on each GPU.")
@click.option("--mlflow", "mlflow", is_flag=False, flag_value="", default=None, metavar="[TRACKING_URI]",
              help="Log the run to MLflow (params, metrics, verdict and hashes as tags, the outputs as artifacts) at "
              "TRACKING_URI [default: the config's tracking.mlflow, else MLFLOW_TRACKING_URI]; give it after CONFIG. Needs pip install 'robustgate[mlflow]'.")
@_guard
def run(config: Optional[Path], out: Optional[Path], device: Optional[str], baseline: Optional[Path], seed: Optional[int],
        resume: bool, engine: Optional[str], address: Optional[str], workers: Optional[int], gpus_per_worker: Optional[float],
        mlflow: Optional[str]) -> None:
    """Run a suite (the embedded default when CONFIG is left out) and write its scorecard.

    Ctrl-C or SIGTERM stops it with exit 3, keeping finished attacks; --resume continues it (with
    any engine: --resume --engine ray continues a local run, and the other way round). The metrics
    do not depend on the engine or the number of workers.
    """
    from harness.api import resolve_config, run as run_suite
    from harness.engines.devices import parse_devices

    if config is None and mlflow and Path(mlflow).suffix in (".yaml", ".yml"):
        # --mlflow takes an optional value, so `--mlflow CONFIG` read the config as a tracking URI
        raise BadInput("--mlflow", f"{mlflow!r} looks like a config, not a tracking URI: write `harness run {mlflow} --mlflow [URI]`")
    cfg, _, _ = resolve_config(config)  # validate before anything heavy, and to name the output dir
    if device is not None:
        parse_devices(device)
    extra = {}
    if resume:
        if out is None:
            out = _resumable(cfg.name)
            if out is None:
                click.echo(f"harness: no unfinished run of {cfg.name!r} under {REPORTS}/ to resume; starting a fresh run", err=True)
        elif not (out / PARTIAL).is_file():
            click.echo(f"harness: {out}/ holds no {PARTIAL}: nothing finished to reuse, the run starts from the beginning", err=True)
        if out is not None:
            extra["resume"] = True
            if (out / PARTIAL).is_file():
                click.echo(f"harness: resuming the run in {out}/", err=True)
    given = {"name": engine, "address": address, "workers": workers, "gpus_per_worker": gpus_per_worker}
    if engine is None and any(v is not None for v in given.values()):
        given["name"] = "ray"  # --address, --workers and --gpus-per-worker only mean something to the Ray engine
    if any(v is not None for v in given.values()):
        extra["engine"] = {k: v for k, v in given.items() if v is not None}
    out = out or _default_out(cfg.name)
    try:
        with _sigterm_as_interrupt():
            card = run_suite(cfg if config is None else config, out=out, device=device, seed=seed, baseline=baseline, mlflow=mlflow, **extra)
    except KeyboardInterrupt:  # before or after the attacks (harness.run maps one during them to RunFailed)
        kept = f"; finished results are in {out / PARTIAL}" if (out / PARTIAL).is_file() else ""
        raise RunFailed(f"interrupted{kept}") from None
    _print_summary(card, out)
    sys.exit(card.exit_code)


_VERDICT_NOTES = {
    "ok": ": the verdict fields match their digest",
    "mismatch": ": the verdict fields (passed, verdict, gates, checks, metrics, ...) do not match their digest (expected "
                "{expected}..., found {actual}...): the scorecard was edited after it was saved",
    "missing": ": the scorecard records no digest of its verdict fields (provenance.verdict_sha256): an edit of them cannot be detected",
}


@cli.command("verify")
@click.argument("scorecard", type=click.Path(path_type=Path))
@_guard
def verify_(scorecard: Path) -> None:
    """Re-hash the files a scorecard names, and check its verdict; exit 1 on any mismatch.

    SCORECARD is a scorecard.json or its directory. Checks the inputs the run recorded (weights,
    model file, a python: model's source, data, config), the outputs written beside it (report.html,
    junit.xml, ...) and its verdict fields (passed, verdict, gates, checks, metrics, ...) against the
    digest saved with them. The digest has no key: it catches an edit, not a forgery.
    """
    from harness.records.provenance import verify

    rows = verify(scorecard)
    if len(rows) == 1:
        click.echo(f"{scorecard}: the scorecard names no artifact; only its verdict fields are checked")
    for r in rows:
        line = f"{r['status']:<8} {r['role']:<13} {r['path']}"
        if r["role"] == "verdict":
            line += _VERDICT_NOTES[str(r["status"])].format(expected=str(r["expected"])[:12], actual=str(r["actual"])[:12])
        elif r["status"] == "mismatch":
            line += f"  (expected {r['expected'][:12]}..., found {r['actual'][:12]}...)"
        click.echo(line)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "mismatch", "missing")}
    bad = counts["mismatch"] + counts["missing"]
    outputs = sum(r["role"] == "output" for r in rows)
    inputs = sum(r["role"] not in ("output", "verdict") for r in rows)
    click.echo(f"{'verified' if not bad else 'NOT verified'}: {inputs} input(s), {outputs} output(s) and the verdict fields; "
               f"{counts['ok']} ok, {counts['mismatch']} mismatch(es), {counts['missing']} missing")
    sys.exit(EXIT_GATE_FAILED if bad else EXIT_PASS)


@cli.command()
@click.argument("scorecard", type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path), help="Judge with this config's gates instead of the scorecard's own.")
@click.option("--baseline", type=click.Path(path_type=Path), help="A scorecard to judge max_drop gates against.")
@_guard
def gate(scorecard: Path, config: Optional[Path], baseline: Optional[Path]) -> None:
    """Judge a saved scorecard's gates again, without re-running anything."""
    from harness import gate as rejudge

    card = rejudge(scorecard, config, baseline)
    _print_summary(card, None)
    sys.exit(card.exit_code)


@cli.command("compare")
@click.argument("scorecards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="The HTML page [default: reports/compare-<timestamp>.html].")
@click.option("--label", "labels", multiple=True, help="A name for each version, in order (repeat it) [default: the scorecards' names].")
@_guard
def compare_(scorecards: tuple[Path, ...], out: Optional[Path], labels: tuple[str, ...]) -> None:
    """Compare model versions side by side: metrics with deltas, gates, curves, per-sample flips.

    Each SCORECARD is a scorecard.json or its directory; the first is the reference. Exit 0 when
    compared (a comparison is not a gate), 2 when the scorecards cannot be compared.
    """
    from harness.reports.comparison import compare

    out = out or REPORTS / f"compare-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.html"
    comparison = compare(*scorecards, labels=list(labels) or None, out=out)
    for line in comparison.summary_lines():
        click.echo(line)
    click.echo(f"comparison: {out}")
    sys.exit(EXIT_PASS)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_guard
def validate(config: Path) -> None:
    """Check a config without loading a model or data."""
    from harness.config import load_config

    cfg, _, _ = load_config(config)
    click.echo(f"{config}: valid ({len(cfg.attacks)} attack(s), {len(cfg.gates)} gate(s), {len(cfg.metric_ids())} metric(s))")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--defense", required=True,
              help="A training defense: pgd-at, trades, fast-at or gaussian-augmentation (see `harness list defenses`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The weights to write (.safetensors); the training log goes beside them, to WEIGHTS.log.json.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override train.epochs.")
@click.option("--device", help="auto, cpu, cuda or cuda:N [default: the config's device; training uses the first].")
@click.option("--resume", is_flag=True, help="Continue from WEIGHTS.ckpt, the checkpoint of the last finished epoch.")
@_guard
def harden(config: Path, defense: str, out: Path, epochs: Optional[int], device: Optional[str], resume: bool) -> None:
    """Adversarially (or noise-) train the config's model; write its weights.

    The config's `train:` section says how to train (a builtin model brings its own recipe) and
    `train.defense.NAME` holds the defense's knobs (norm, epsilon, steps, ...; sigma for
    gaussian-augmentation, the noise a randomized-smoothing certificate needs). Writes WEIGHTS
    (safetensors), WEIGHTS.log.json (clean and PGD robust accuracy, or accuracy under the training
    noise, per epoch on held-out training samples) and, after every epoch, WEIGHTS.ckpt. Ctrl-C or SIGTERM stops it with exit 3 keeping the
    checkpoint; --resume continues. Evaluate the result with `harness run` and
    `model: {source: ..., weights: WEIGHTS}` in a config.
    """
    import json

    from harness.config import load_config
    from harness.engines.devices import parse_devices

    load_config(config)  # a bad config fails here, before torch loads
    if device is not None:
        parse_devices(device)
    from harness.pipeline.harden import harden as harden_model

    from harness.core.files import exclusive

    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # one training per WEIGHTS at a time: two would write its checkpoint and log over each other
        with exclusive(out.with_name(f"{out.name}.lock"), str(out), str(out)), _sigterm_as_interrupt():
            path = harden_model(config, defense, out, resume=resume, device=device, epochs=epochs,
                                notify=lambda text: click.echo(f"harness: {text}", err=True))
    except KeyboardInterrupt:  # outside the epochs (harden maps one during them to RunFailed)
        raise RunFailed("interrupted before training started") from None
    log = json.loads(Path(f"{path}.log.json").read_text(encoding="utf-8"))
    first, kept = log["epochs"][0], log["epochs"][log["kept_epoch"]]
    chk = log["check"]
    click.echo(f"{defense}: {len(log['epochs']) - 1} epoch(s), kept epoch {log['kept_epoch']}"
               + (f" ({log['stopped']})" if log["stopped"] else ""))
    click.echo(f"  on {chk['samples']} held-out training samples: clean accuracy {first['clean_accuracy']:.4f} -> "
               f"{kept['clean_accuracy']:.4f}, PGD-{chk['steps']} robust accuracy at {chk['norm']} {chk['epsilon']} "
               f"{first['robust_accuracy']:.4f} -> {kept['robust_accuracy']:.4f}")
    click.echo(f"outputs: {path} and {path}.log.json")


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(LIST_KINDS))
def list_(kind: Optional[str]) -> None:
    """List what a config can name: attacks, probes, defenses, models, datasets."""
    for k in [kind] if kind else LIST_KINDS:
        click.echo(f"{k}:")
        for line in _listing(k):
            click.echo(f"  {line}")


def _default(value: object) -> str:
    """A knob's default as a config would write it: an epsilon held as a float k/255 shows as 'k/255'."""
    if isinstance(value, float) and 0 < value < 1:
        k = round(value * 255)
        if k and abs(value - k / 255) < 1e-12 and abs(value - round(value, 4)) > 1e-12:
            return repr(f"{k}/255")
    return repr(value)


def _listing(kind: str) -> list[str]:
    if kind == "attacks":
        from harness.attacks import ATTACKS, attack_params

        lines = []
        for name, cls in ATTACKS.items():
            knobs = ", ".join(f"{f}={p.default!r}" for f, p in attack_params(cls).items())
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            lines.append(f"{name:<8} norms {'/'.join(cls.norms):<8} {knobs}    {summary}")
        from harness.attacks.adapters import NAMING

        lines.append(f"({NAMING})")
        return lines
    if kind == "models":
        from harness.sources.models import model_listing

        return model_listing()
    if kind == "datasets":
        from harness.sources.data import dataset_listing

        return dataset_listing()
    if kind in ("defenses", "probes"):
        import dataclasses

        if kind == "defenses":
            from harness.defenses import CERTIFICATES, DEFENSES

            entries = [*DEFENSES.items(), *CERTIFICATES.items()]  # certificates (`certificates:` entries) are defenses' proofs
        else:
            from harness.attacks.poisoning import PROBES
            from harness.attacks.privacy import PRIVACY

            entries = [*PROBES.items(), *PRIVACY.items()]
        lines, width = [], max((len(n) for n, _ in entries), default=0)
        for name, obj in entries:
            fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ()
            knobs = ", ".join(f"{f.name}={_default(f.default)}" for f in fields if f.default is not dataclasses.MISSING)
            first = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())  # the docstring's first sentence
            summary = re.split(r"(?<=\.)\s+(?=[A-Z])", first)[0]
            lines.append(f"{name:<{width}}  {getattr(obj, 'kind', 'probe' if kind == 'probes' else ''):<13} {knobs}    {summary}")
        if kind == "probes":
            from harness.evaluation.probes import SCANS

            lines.append(f"(scans, alone or as `scans:` of a probe: {', '.join(SCANS)})")
        return lines
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
