"""`harden`: trains a configured model with an adversarial-training defense, and what it writes.

The config's `train:` section over the builtin model's recipe (`train_plan`), checkpoints after every
epoch (safetensors, nothing pickled) so `--resume` continues bit for bit, and the weights plus a log
of clean and robust accuracy per epoch. The defenses and their epoch loop are in defenses.training.

    from harness.defenses.hardening import harden
    harden("configs/defended.yaml", "pgd-at", "at.safetensors", epsilon=0.2)
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Optional

import torch

from harness.config import TrainConfig


from .registry import DEFENSES
from .training import AdversarialTraining, Check, TrainState, _snapshot, build_defense, make_optimizer, pgd_check, train, training_defenses

__all__ = ["harden", "train_plan", "builtin_recipe"]


def builtin_recipe(source: str) -> dict[str, Any]:
    """A builtin model's own training recipe, under the user's `train:` keys.

    The digits CNN trains as its standard recipe does (Adam, its learning rate, batch size and
    epochs) but from scratch: at equal epochs PGD-AT from scratch ended more robust than PGD-AT
    fine-tuning the standard weights (PGD-20 at L-inf 0.2: 0.56 against 0.52 after 20 epochs).
    """
    if source != "builtin:digits-cnn":
        return {}
    from harness.sources.builtin import RECIPE

    return {"epochs": RECIPE["epochs"], "batch_size": RECIPE["batch_size"], "start": "scratch", "schedule": {"name": "none"},
            "optimizer": {"name": "adam", "lr": RECIPE["lr"], "weight_decay": 0.0}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "defense" else v
    return out


def train_plan(cfg, epochs: Optional[int] = None) -> TrainConfig:
    """The config's `train:` section over its builtin model's recipe, with `epochs` overriding both."""
    from pydantic import ValidationError

    from harness.core.errors import BadInput

    given = cfg.train.model_dump(exclude_unset=True) if cfg.train is not None else {}
    merged = _merge(builtin_recipe(cfg.model.source), given)
    if epochs is not None:
        merged["epochs"] = epochs
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput("train." + ".".join(str(p) for p in err["loc"]), err["msg"]) from None


def _fingerprint_diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    out = [f"train.{k}" for k in sorted(set(saved.get("train", {})) | set(now.get("train", {})))
           if saved.get("train", {}).get(k) != now.get("train", {}).get(k)]
    return out + [k for k in keys if k != "train" and saved.get(k) != now.get(k)]


def _save_checkpoint(path, state: TrainState, net, optimizer, scaler, fingerprint: dict) -> None:
    """Tensors (weights, kept weights, optimizer buffers) as safetensors, the rest as JSON in its
    header: one file, written atomically, that loads without unpickling anything."""
    import json

    from safetensors.torch import save_file

    from harness.core.files import atomic_path

    tensors = {f"model/{k}": v for k, v in _snapshot(net).items()}
    tensors.update({f"best/{k}": v for k, v in (state.best or {}).items()})
    opt = optimizer.state_dict()
    rest: dict[str, dict[str, Any]] = {}
    for pid, entries in opt["state"].items():
        for key, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = v.detach().to("cpu", copy=True).contiguous()
            else:
                rest.setdefault(str(pid), {})[key] = v
    meta = {"format": "harness-checkpoint/1", "fingerprint": fingerprint, "epoch": state.epoch, "records": state.records,
            "best_epoch": state.best_epoch, "best_robust": state.best_robust, "stopped": state.stopped,
            "optimizer": {"param_groups": opt["param_groups"], "state": rest, "ids": sorted(opt["state"])},
            "scaler": scaler.state_dict() if scaler is not None else None}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"harness": json.dumps(meta)})


def _load_checkpoint(path, fingerprint: dict, net, optimizer, scaler) -> TrainState:
    import json

    from safetensors import safe_open

    from harness.core.errors import BadInput

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["harness"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise BadInput(str(path), f"not a readable checkpoint ({type(e).__name__}); delete it to start over") from None
    changed = _fingerprint_diff(meta.get("fingerprint", {}), fingerprint)
    if changed:
        raise BadInput(str(path), f"the checkpoint was made with other settings ({', '.join(changed)} differ): "
                                  "delete it, or drop --resume to start over")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    net.load_state_dict(part("model/"))
    opt = meta["optimizer"]
    state = {pid: {**opt["state"].get(str(pid), {}), **part(f"optim/{pid}/")} for pid in opt["ids"]}
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return TrainState(epoch=meta["epoch"], records=meta["records"], best=part("best/") or None, best_epoch=meta["best_epoch"],
                      best_robust=meta["best_robust"], stopped=meta["stopped"])


def _reinitialize(net: torch.nn.Module, seed: int) -> None:
    from harness.core.errors import BadInput

    layers = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise BadInput("train.start", "scratch needs layers with reset_parameters(), and this model has none (use start: model)")
    torch.manual_seed(seed)
    for m in layers:
        m.reset_parameters()


def harden(config: Any, defense: str, out: Any, *, resume: bool = False, device: Optional[str] = None, epochs: Optional[int] = None,
           show_progress: Optional[bool] = None, check: Optional[Check] = None,
           on_epoch: Optional[Callable[[dict], None]] = None, notify: Optional[Callable[[str], None]] = None, **knobs: Any):
    """Trains the config's model with a training defense; writes `out` (safetensors) and `out.log.json`.

    `config` is a YAML path, a dict or a Config; its `train:` section (over a builtin model's own
    recipe) says how, `train.defense.<name>` holds the defense's knobs and `knobs` override them. A
    checkpoint `out.ckpt` is written after every epoch and `resume=True` continues from it. `check`
    replaces the per-epoch PGD check; `on_epoch` gets each epoch's record; `notify` gets notes meant
    for the user. Bad input raises BadInput; Ctrl-C or a failed run raises RunFailed, keeping the
    checkpoint. Returns the path of the weights.
    """
    import datetime as dt
    from pathlib import Path

    from harness.api import resolve_config
    from harness.sources.data import load_data
    from harness.engines.devices import resolve_devices
    from harness.core.errors import BadInput, RunFailed
    from harness.sources.models import load_model

    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    cfg, base, label = resolve_config(config)
    plan = train_plan(cfg, epochs)
    try:
        chosen = build_defense(defense, {**plan.defense.get(defense, {}), **knobs})
    except ValueError as e:
        where = "--defense" if defense not in training_defenses() else "knobs" if knobs else f"{label}: train.defense.{defense}"
        raise BadInput(where, str(e)) from None
    out = Path(out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise BadInput(str(out), "the weights are written as safetensors: name a file ending in .safetensors")
    ckpt, log_path = Path(f"{out}.ckpt"), Path(f"{out}.log.json")
    notes: list[str] = []  # told to `notify` once the input is accepted, so a bad input stays one line
    note = notes.append

    devices = resolve_devices(device if device is not None else cfg.device)
    dev = devices[0]
    if len(devices) > 1:
        note(f"training uses the first device only ({dev})")
    amp = plan.amp and dev.type == "cuda"
    if plan.amp and not amp:
        note(f"train.amp is ignored on {dev.type}: mixed precision needs CUDA")
    seed = plan.seed if plan.seed is not None else cfg.seed
    source = plan.data.source or cfg.data.source
    if source == cfg.data.source and plan.data.split == cfg.data.split:
        note(f"training on the split the suite evaluates ({source}, {plan.data.split}): its robust accuracy will flatter the model")
    data = load_data(source, plan.data.split, plan.data.limit, seed, base, cfg.data.image_size)
    holdout = plan.data.holdout or max(1, min(1000, len(data) // 10))
    if holdout >= len(data):
        raise BadInput("train.data.holdout", f"holds out {holdout} of the {len(data)} training samples, leaving none to train on")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    held, kept = perm[:holdout].sort().values, perm[holdout:].sort().values
    pre = cfg.model.preprocessing
    model, info = load_model(cfg.model.source, cfg.model.weights, cfg.model.num_classes, pre.mean, pre.std, cfg.model.kwargs, base)
    if any(v is not None and len(v) != data.x.shape[1] for v in (pre.mean, pre.std)):
        raise BadInput("model.preprocessing", f"mean/std need one value per channel: the data has {data.x.shape[1]}")
    if plan.start == "scratch":
        _reinitialize(model.net, seed)
    model.to(dev).eval()
    fingerprint = {"defense": defense, "knobs": asdict(chosen), "train": plan.model_dump(mode="json", exclude={"defense"}), "seed": seed,
                   "model": {k: v for k, v in info.items() if k != "weights"}, "data_sha256": data.sha256()}
    optimizer = make_optimizer(plan, model.net)
    scaler = None
    if amp and not torch.cuda.is_bf16_supported():  # float16 needs loss scaling; bfloat16 does not
        scaler = torch.amp.GradScaler("cuda")
    state = TrainState()
    if resume and ckpt.is_file():
        state = _load_checkpoint(ckpt, fingerprint, model.net, optimizer, scaler)
        note(f"resuming after epoch {state.epoch} of {plan.epochs} from {ckpt}")
    elif resume:
        note(f"no checkpoint {ckpt} to resume from: training starts at epoch 1")
    elif ckpt.is_file():
        note(f"{ckpt} from an unfinished run is replaced as this one goes (--resume would have continued it)")
    resumed_from = state.epoch if resume else None

    def after_epoch(st: TrainState, opt, sc) -> None:
        _save_checkpoint(ckpt, st, model.net, opt, sc, fingerprint)
        if on_epoch is not None:
            on_epoch(dict(st.records[-1]))

    for text in notes if notify is not None else ():
        notify(text)
    check = check or pgd_check(chosen, data.x[held], data.y[held], seed, dev, batch_size=cfg.data.batch_size)
    try:
        train(chosen, model, data.x[kept], data.y[kept], plan, dev, check=check, seed=seed, state=state, optimizer=optimizer,
              scaler=scaler, amp=amp, show_progress=show_progress, on_epoch=after_epoch)
        _write_outputs(out, log_path, model.net, chosen, state, {
            "check": {"attack": "pgd", "steps": chosen.check_steps, "norm": chosen.norm, "epsilon": str(chosen.epsilon), "samples": holdout},
            "train": plan.model_dump(mode="json"), "config": cfg.model_dump(mode="json"), "config_file": label, "seed": seed,
            "device": str(dev), "amp": amp, "model": info,
            "data": {"source": source, "split": plan.data.split, "samples": len(kept), "holdout": holdout, "sha256": data.sha256()},
            "resumed_from_epoch": resumed_from, "notes": notes, "started_at": started.isoformat(timespec="seconds")}, t0)
    except KeyboardInterrupt:
        where = ("while writing the outputs" if state.epoch >= plan.epochs or state.stopped
                 else f"in epoch {state.epoch + 1} of {plan.epochs}")
        kept_note = (f"; {ckpt} keeps {state.epoch} finished epoch(s): rerun with --resume to continue" if ckpt.is_file()
                     else "; no epoch had finished")
        raise RunFailed(f"interrupted {where}{kept_note}") from None
    except torch.cuda.OutOfMemoryError:
        raise RunFailed(f"out of device memory in epoch {state.epoch + 1} (lower train.batch_size)") from None
    ckpt.unlink(missing_ok=True)
    return out


def _write_outputs(out, log_path, net: torch.nn.Module, defense: AdversarialTraining, state: TrainState, record: dict, t0: float) -> None:
    """The weights, then the log naming their sha256; each written atomically."""
    import json

    from safetensors.torch import save_file

    from harness.core.files import atomic_path, sha256_file, write_text_atomic
    from harness.records.provenance import package_versions

    name = next(n for n, obj in DEFENSES.items() if obj is type(defense))
    kept_epoch = state.best_epoch if defense.keep_best and state.best is not None else state.epoch
    with atomic_path(out) as tmp:
        save_file(_snapshot(net), str(tmp), metadata={"defense": name, "knobs": json.dumps(asdict(defense)), "epoch": str(kept_epoch)})
    log = {"defense": name, "knobs": asdict(defense), "epochs": state.records, "kept_epoch": kept_epoch, "best_epoch": state.best_epoch,
           "stopped": state.stopped, **record, "versions": package_versions(), "weights": str(out), "weights_sha256": sha256_file(out),
           "duration_s": round(time.perf_counter() - t0, 3)}
    write_text_atomic(log_path, json.dumps(log, indent=2) + "\n")
