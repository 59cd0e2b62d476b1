"""`harness.run`: config in, Scorecard out. The CLI and notebooks both come through here."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Optional, Union

from harness.config import Config, load_config, parse_config
from harness.core.errors import BadInput, RunFailed
from harness.core.files import write_text_atomic
from harness.records.scorecard import SCHEMA_VERSION, Scorecard

__all__ = ["run", "resolve_config"]

ConfigLike = Union[None, str, Path, dict, Config]


def resolve_config(config: ConfigLike) -> tuple[Config, Path, str]:
    """A validated Config, the directory its relative paths start from, and its label for messages."""
    if isinstance(config, Config):
        return config, Path.cwd(), "config"
    if isinstance(config, dict):
        return parse_config(config, "config"), Path.cwd(), "config"
    cfg, base, _ = load_config(config)
    return cfg, base, "default" if config is None else str(config)


def _resolved_suite(cfg: Config) -> str:
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


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_data(data: Any, cfg: Config):
    from harness.sources.data import Data, data_from_tensors

    if isinstance(data, Data):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data_from_tensors(data[0], data[1], cfg.data.limit, cfg.seed)
    try:  # a torch Dataset of (image tensor, label)
        import torch

        xs, ys = zip(*(data[i] for i in range(len(data))))
        return data_from_tensors(torch.stack(list(xs)), torch.tensor([int(v) for v in ys]), cfg.data.limit, cfg.seed)
    except Exception as e:
        raise BadInput("data", f"expected (x, y) tensors or a Dataset of (image, label), got {type(data).__name__} ({e})") from None


def run(config: ConfigLike = None, *, model: Any = None, data: Any = None, out: Optional[Union[str, Path]] = None,
        device: Optional[Union[str, list]] = None, seed: Optional[int] = None, baseline: Optional[Union[str, Path, Scorecard]] = None,
        show_progress: Optional[bool] = None, resume: bool = False) -> Scorecard:
    """Runs a suite and returns its Scorecard; writes the run's outputs to `out` when given.

    `config` is a YAML path, a dict, a Config, or None for the embedded default. `model` (a
    torch.nn.Module taking the config's preprocessing) and `data` ((x, y) tensors in [0, 1]) override
    the config's. The harness evaluates `model` itself, not a copy, and hands it back as it found it:
    every parameter's requires_grad, every submodule's training mode and every tensor's device are
    restored afterwards, also when the run fails. Bad input raises BadInput; a failed or interrupted
    run raises RunFailed, with finished results saved to `out/scorecard.partial.json` and
    `out/run-state.json` as each attack at each epsilon finishes. `resume=True` reuses what a run
    into the same `out` finished (when its config, model and data hashes match) and computes only the
    rest. While it runs, the run holds `out` (a lock file in it): a second run into the same `out`
    raises BadInput naming the first.
    """
    with contextlib.ExitStack() as stack:
        if out is not None:
            from harness.core.files import output_lock

            stack.enter_context(output_lock(Path(out)))
        if model is not None and _is_module(model):
            from harness.sources.models import kept_as_found

            stack.enter_context(kept_as_found(model))
        return _run(config, model=model, data=data, out=out, device=device, seed=seed, baseline=baseline,
                    show_progress=show_progress, resume=resume)


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _run(config: ConfigLike, *, model: Any, data: Any, out: Optional[Union[str, Path]], device: Optional[Union[str, list]],
         seed: Optional[int], baseline: Optional[Union[str, Path, Scorecard]], show_progress: Optional[bool], resume: bool) -> Scorecard:
    """run(), inside the output lock and with the caller's model state kept (see run)."""
    cfg, base, label = resolve_config(config)
    if seed is not None or device is not None:
        cfg = parse_config({**cfg.model_dump(mode="json"), **({"seed": seed} if seed is not None else {}),
                            **({"device": device} if device is not None else {})}, label)
    base_card = baseline if isinstance(baseline, Scorecard) or baseline is None else Scorecard.load(baseline)

    import torch

    from harness.engines.devices import resolve_devices
    from harness.verdicts.gates import judge_gates, overall_verdict
    from harness.sources.models import BoundedModel, load_model, state_dict_sha256
    from harness.evaluation.runner import evaluate

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    devices = resolve_devices(cfg.device)
    _seed_everything(cfg.seed)
    if data is not None:
        ds = _as_data(data, cfg)
    else:
        from harness.sources.data import load_data

        ds = load_data(cfg.data.source, cfg.data.split, cfg.data.limit, cfg.seed, base, cfg.data.image_size)
    pre = cfg.model.preprocessing
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise BadInput("model", f"expected a torch.nn.Module, got {type(model).__name__}")
        wrapped, model_info = BoundedModel(model, pre.mean, pre.std), {"source": "python:object", "model_sha256": state_dict_sha256(model)}
    else:
        wrapped, model_info = load_model(cfg.model.source, cfg.model.weights, cfg.model.num_classes, pre.mean, pre.std, cfg.model.kwargs, base)
    if pre.mean is not None and len(pre.mean) != ds.x.shape[1] or pre.std is not None and len(pre.std) != ds.x.shape[1]:
        raise BadInput("model.preprocessing", f"mean/std need one value per channel: the data has {ds.x.shape[1]}")

    from harness.records.provenance import config_artifact, data_artifact, model_artifacts, package_versions

    config_json = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    artifacts = [] if model is not None else model_artifacts(cfg.model.source, cfg.model.weights, base)
    if model is None and cfg.model.source == "builtin:digits-cnn":
        from harness.sources.builtin import weights_path
        from harness.records.provenance import artifact

        artifacts.append(artifact("weights", weights_path()))  # the cached, trained builtin model the run loaded
    if data is None:
        artifacts += [a for a in [data_artifact(cfg.data.source, base, split=cfg.data.split)] if a]
    artifacts += [a for a in [config_artifact(config)] if a]
    for d in cfg.defenses:
        if d.weights:
            from harness.records.provenance import artifact

            artifacts.append(artifact(f"weights:{d.defense_id}", base / d.weights if not Path(d.weights).is_absolute() else Path(d.weights)))
    provenance: dict[str, Any] = {
        **{k: v for k, v in model_info.items() if k != "source"},
        "model_source": model_info["source"],
        "dataset_sha256": ds.sha256(),
        "data_source": ds.source,
        "split": ds.split,
        "samples": len(ds),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "suite_sha256": hashlib.sha256(_resolved_suite(cfg).encode()).hexdigest(),
        "config_file": label,
        "seed": cfg.seed,
        "device": ",".join(str(d) for d in devices),
        "versions": package_versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": 0.0,
        "artifacts": artifacts,
    }

    def record_of(ev, defended: Optional[tuple] = None, probed: Optional[tuple] = None) -> dict[str, Any]:
        from harness.reports.images import class_records, example_records
        from harness.verdicts.metrics import interval_methods, metric_counts, metric_id, metric_intervals

        records, extra_metrics, extra_checks = defended or ([], {}, [])
        probe_records, probe_metrics = probed or ([], {})
        extra_metrics = {**extra_metrics, **probe_metrics}
        rec = {"schema_version": SCHEMA_VERSION, "name": cfg.name, "passed": False, "verdict": "inconclusive", "on_inconclusive": cfg.on_inconclusive,
               "metrics": {**ev.metrics(), **extra_metrics}, "gates": [], "attacks": [r.record() for r in ev.results],
               "probes": probe_records, "defenses": records, "checks": [*ev.checks, *extra_checks],
               "provenance": {**provenance, "duration_s": round(time.perf_counter() - t0, 3)}}
        rec["classes"] = class_records(ev, ds.y, cfg.model.num_classes)
        rec["examples"] = example_records(ev, ds)
        # 95%: Wilson for every fraction with a sample count, plus the producers' own (AUROC, medians, ...)
        rec["intervals"] = metric_intervals(rec)
        rec["interval_methods"] = interval_methods(rec)
        for a in rec["attacks"]:
            a["ci95"] = rec["intervals"].get(metric_id("robust_accuracy", a["id"], a["epsilon"]))
        rec["gates"] = judge_gates(cfg.gates, rec["metrics"], metric_counts(rec), None if base_card is None else base_card.metrics,
                                   baseline_counts=None if base_card is None else metric_counts(base_card.record),
                                   on_inconclusive=cfg.on_inconclusive, intervals=rec["intervals"],
                                   interval_methods=rec["interval_methods"])
        rec["passed"], rec["verdict"] = overall_verdict(rec["gates"], rec["checks"])
        return rec

    from harness.records.resume import STATE_FILE, fingerprint, load_state, save_state

    partial = Path(out) / "scorecard.partial.json" if out is not None else None
    state = Path(out) / STATE_FILE if out is not None else None
    print_ = fingerprint(json.loads(config_json), provenance.get("model_sha256", ""), provenance["dataset_sha256"], provenance["versions"].get("harness", ""))
    done: dict = {}
    probes_done: dict[str, dict] = {}
    if resume:
        if state is None:
            note = "resume needs an output directory (out=) holding a saved run: starting from the beginning"
        else:
            done, probes_done, note = load_state(state, print_, len(ds), cfg.attacks)
        provenance["resume"] = note
        _say(note)

    def save_partial(ev) -> None:
        if partial is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            save_state(state, print_, len(ds), ev.results, probes_done)
            write_text_atomic(partial, Scorecard({**record_of(ev), "passed": False, "verdict": "inconclusive"}).to_json())

    try:
        ev = evaluate(wrapped, ds, cfg.attacks, devices, cfg.data.batch_size, cfg.seed, cfg.model.num_classes,
                      on_result=save_partial, show_progress=show_progress, cascade=cfg.cascade, done=done)
    except (BadInput, RunFailed):
        raise
    except KeyboardInterrupt:
        raise RunFailed(f"interrupted; finished results are in {partial} (`harness run ... --resume` continues)" if partial else "interrupted") from None
    except Exception as e:
        where = f"; finished results are in {partial}" if partial is not None and partial.exists() else ""
        raise RunFailed(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}{where}") from e
    from harness.verdicts.outcomes import Outcomes

    # rejudged with the per-sample outcomes, so max_drop against a baseline is a paired test
    defended = None
    if cfg.defenses:
        from harness.evaluation.variants import evaluate_defenses

        def run_suite(variant, label: str):
            return evaluate(variant, ds, cfg.attacks, devices, cfg.data.batch_size, cfg.seed, cfg.model.num_classes,
                            show_progress=show_progress, cascade=cfg.cascade)

        def load_variant(weights: str):
            return load_model(cfg.model.source, weights, cfg.model.num_classes, pre.mean, pre.std, cfg.model.kwargs, base)[0]

        try:
            defended = evaluate_defenses(cfg, wrapped, ds, devices, ev, run_suite, load_variant)
        except (BadInput, RunFailed):
            raise
        except KeyboardInterrupt:
            raise RunFailed(f"interrupted while evaluating defenses; the undefended results are in {partial}" if partial else "interrupted") from None
    probed = None
    if cfg.probes:
        from harness.evaluation.probes import evaluate_probes

        def train_loader():
            from harness.defenses.hardening import train_plan

            from harness.sources.data import load_data

            plan = train_plan(cfg)
            return load_data(plan.data.source or cfg.data.source, plan.data.split, plan.data.limit, cfg.seed, base, cfg.data.image_size)

        def make_model(fine_tune: bool):  # the probe copies it, and re-initializes it unless it fine-tunes
            return load_model(cfg.model.source, cfg.model.weights, cfg.model.num_classes, pre.mean, pre.std, cfg.model.kwargs, base)[0].to(devices[0])

        def probe_done(unit: str, rec: dict) -> None:
            probes_done[unit] = rec
            save_partial(ev)

        try:
            probed = evaluate_probes(cfg, wrapped, ds, train_loader, make_model, devices[0], None if out is None else Path(out),
                                     probes_done, probe_done)
        except (BadInput, RunFailed):
            raise
        except KeyboardInterrupt:
            raise RunFailed(f"interrupted while running probes; finished results are in {partial} (`harness run ... --resume` continues)"
                            if partial else "interrupted") from None
    card = Scorecard(record_of(ev, defended, probed), Outcomes.from_evaluation(ev, ds.ids, ds.y, ds.x)).rejudge(cfg.gates, base_card)
    if out is not None:
        card.save(out)
        if state.exists():
            state.unlink()  # the run is whole: scorecard.json says everything the state did
    return card


def _say(line: str) -> None:
    import sys

    print(line, file=sys.stderr)
