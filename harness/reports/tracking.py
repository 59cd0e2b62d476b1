"""A scorecard logged to MLflow: the config as params, every metric (and its 95% interval), the
verdict and the hashes as tags, and the run's files as artifacts.

MLflow allows only letters, digits, `_ - . /` and spaces in a metric, param or tag name, so metric ids
are written with one mapping (`mlflow_name`): the family's `:` becomes `/`, the `@` before a parameter
becomes ` at `, and any other character outside those becomes `_`:

    robust_accuracy:pgd-linf@8/255        ->  robust_accuracy/pgd-linf at 8/255
    tpr_at_fpr:mia@0.01                   ->  tpr_at_fpr/mia at 0.01
    certified_accuracy:smoothing@0.5      ->  certified_accuracy/smoothing at 0.5

Each metric's interval is logged beside it as `<name> ci95_low` and `<name> ci95_high`, and the
artifact `mlflow-metric-names.json` maps every MLflow name back to its metric id. Example::

    run_id = log_to_mlflow(card, [out / "scorecard.json"], "sqlite:///mlflow.db", "robustness", "digits", params)
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit, urlunsplit

__all__ = ["mlflow_name", "flat_params", "run_tags", "metric_rows", "log_to_mlflow", "redact_uri", "INSTALL"]

INSTALL = "pip install 'robustgate[mlflow]'"
ARTIFACTS = ("scorecard.json", "report.html", "summary.md", "junit.xml")
MAX_PARAM = 500  # the longest param value every MLflow release accepts
_BAD = re.compile(r"[^\w.\- /]")


def mlflow_name(metric_id: str) -> str:
    """The MLflow name of a metric id (the mapping in this module's docstring)."""
    family, _, rest = metric_id.partition(":")
    subject, at, param = rest.partition("@")
    name = family + (f"/{subject}" if rest else "") + (f" at {param}" if at else "")
    return _BAD.sub("_", name).replace("//", "/_/").strip("/") or "_"


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A config mapping as MLflow params: nested keys joined by `.`, list items by their index
    (`attacks.0.name`), values as text cut to MAX_PARAM characters."""
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else None
    if items is None:
        text = json.dumps(config) if not isinstance(config, str) else config
        return {prefix: text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 3] + "..."}
    for key, value in items:
        out.update(flat_params(value, f"{prefix}.{key}" if prefix else _BAD.sub("_", str(key))))
    return out


def run_tags(record: dict[str, Any]) -> dict[str, str]:
    """The verdict and what the result rests on, as `harness.*` tags."""
    prov = record.get("provenance", {})
    tags = {"harness.verdict": record.get("verdict"), "harness.passed": str(bool(record.get("passed"))).lower(),
            "harness.name": record.get("name"), "harness.seed": prov.get("seed"), "harness.device": prov.get("device"),
            "harness.version": (prov.get("versions") or {}).get("harness")}
    for key in ("model_sha256", "dataset_sha256", "config_sha256", "verdict_sha256"):
        tags[f"harness.{key}"] = prov.get(key)
    failed = [g["metric"] for g in record.get("gates", []) if not g.get("passed")]
    tags["harness.failed_gates"] = ", ".join(failed)[:MAX_PARAM]
    return {k: str(v) for k, v in tags.items() if v is not None}


def metric_rows(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics to log (each interval's ends beside its metric) and the MLflow name -> metric id map.
    A metric that is not a finite number (NaN: nothing measured) is left out: MLflow cannot chart it."""
    values: dict[str, float] = {}
    names: dict[str, str] = {}
    intervals = record.get("intervals", {})
    for mid, value in sorted(record.get("metrics", {}).items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == float("inf"):
            continue
        name = mlflow_name(mid)
        if name in names and names[name] != mid:
            raise ValueError(f"metric ids {names[name]!r} and {mid!r} map to one MLflow name {name!r}")
        names[name], values[name] = mid, float(value)
        ci = intervals.get(mid)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
            values[f"{name} ci95_low"], values[f"{name} ci95_high"] = float(ci[0]), float(ci[1])
    return values, names


def redact_uri(uri: str) -> str:
    """The URI without a password (http://user:secret@host -> http://user:***@host), for messages."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_to_mlflow(record: dict[str, Any], files: list[Path], uri: Optional[str], experiment: str, run_name: str,
                  params: dict[str, str]) -> str:
    """Logs one run; returns its MLflow run id. The run ends FINISHED (the verdict is a tag, not a
    status), or FAILED when logging broke off. Raises ImportError when mlflow is missing."""
    import mlflow  # noqa: F401  (ImportError here: the caller names the extra)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri or None)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.source.name": "harness"})
    run_id = run.info.run_id
    try:
        stamp = int(time.time() * 1000)
        values, names = metric_rows(record)
        for batch in _chunks([Param(k, v) for k, v in sorted(params.items())], 100):
            client.log_batch(run_id, params=batch)
        for batch in _chunks([Metric(k, v, stamp, 0) for k, v in values.items()], 1000):
            client.log_batch(run_id, metrics=batch)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags(record).items()])
        for f in files:
            if f.is_file():
                client.log_artifact(run_id, str(f))
        with tempfile.TemporaryDirectory() as tmp:
            mapping = Path(tmp) / "mlflow-metric-names.json"
            mapping.write_text(json.dumps(names, indent=1, sort_keys=True), encoding="utf-8")
            client.log_artifact(run_id, str(mapping))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
