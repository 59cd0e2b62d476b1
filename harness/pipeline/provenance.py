"""Stage 3, provenance: what the run measures (the model's, data's, config's and suite's hashes, the
files it read, versions, device), and the saved work tied to a fingerprint of them: on resume, what
a run into the same output directory finished, when the fingerprints match."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from harness.config import Config
    from harness.pipeline.context import RunContext

__all__ = ["provenance", "resolved_suite"]


def resolved_suite(cfg: Config) -> str:
    """The suite as it will run: every attack entry with all its knobs, defaults filled in (so a
    changed default in another harness version changes the suite's hash), and the cascade."""
    import dataclasses

    from harness.config import AttackConfig

    entries = []
    for a in cfg.attacks:
        entry: dict[str, Any] = {"entry": a.model_dump(mode="json")}
        if isinstance(a, AttackConfig):
            built = a.build()
            entry["resolved"] = dataclasses.asdict(built) if dataclasses.is_dataclass(built) else dict(a.params)
        entries.append(entry)
    return json.dumps({"attacks": entries, "cascade": cfg.cascade}, sort_keys=True, default=str)


def _artifacts(ctx: RunContext) -> list[dict[str, Any]]:
    """The files the run read, each with its sha256: the model's (not for a caller's object), the data's
    (not for the caller's tensors), the config file, and the defended variants' weights."""
    from harness.records.provenance import artifact, config_artifact, data_artifact, model_artifacts

    cfg, req, base = ctx.cfg, ctx.request, ctx.base
    artifacts = [] if req.model is not None else model_artifacts(cfg.model.source, cfg.model.weights, base)
    if req.model is None and cfg.model.source == "builtin:digits-cnn":
        from harness.sources.builtin import recipe_for, weights_path

        # the cached, trained builtin model the run loaded: the plain recipe's or the noise-trained one's
        artifacts.append(artifact("weights", weights_path(recipe_for(dict(cfg.model.kwargs)))))
    if req.data is None:
        artifacts += [a for a in [data_artifact(cfg.data.source, base, split=cfg.data.split)] if a]
    artifacts += [a for a in [config_artifact(req.config)] if a]
    for d in cfg.defenses:
        if d.weights:
            artifacts.append(artifact(f"weights:{d.defense_id}", base / d.weights if not Path(d.weights).is_absolute() else Path(d.weights)))
    return artifacts


def provenance(ctx: RunContext) -> RunContext:
    from harness.pipeline.resume import SavedWork, fingerprint
    from harness.records.provenance import package_versions

    cfg, info, data = ctx.cfg, ctx.model_info, ctx.data
    config_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    artifacts = _artifacts(ctx)
    ctx.provenance = {
        **{k: v for k, v in info.items() if k != "source"},
        "model_source": info["source"],
        "dataset_sha256": data.sha256(),
        "data_source": data.source,
        "split": data.split,
        "samples": len(data),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "suite_sha256": hashlib.sha256(resolved_suite(cfg).encode()).hexdigest(),
        "config_file": ctx.label,
        "seed": cfg.seed,
        "device": ",".join(str(d) for d in ctx.devices),
        "versions": package_versions(),
        "started_at": ctx.started.isoformat(timespec="seconds"),
        "duration_s": 0.0,  # set when the record is made
        "artifacts": artifacts,
    }
    print_ = fingerprint(json.loads(config_json), ctx.provenance.get("model_sha256", ""), ctx.provenance["dataset_sha256"],
                         ctx.provenance["versions"].get("harness", ""))
    ctx.saved = SavedWork(ctx.out, print_, len(data))
    if ctx.request.resume:
        note = ctx.saved.restore(cfg.attacks)
        ctx.provenance["resume"] = note
        print(note, file=sys.stderr)
    return ctx
