"""`harness harden`'s files: the checkpoint after every epoch (so `--resume` continues bit for bit),
then the weights and the log naming their sha256. All safetensors, nothing pickled; each written
atomically."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import BadInput
from harness.core.files import atomic_path, sha256_file, write_text_atomic
from harness.defenses.training import AdversarialTraining, TrainState
from harness.training import snapshot

__all__ = ["save_checkpoint", "load_checkpoint", "write_outputs"]


def _fingerprint_diff(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    out = [f"train.{k}" for k in sorted(set(saved.get("train", {})) | set(now.get("train", {})))
           if saved.get("train", {}).get(k) != now.get("train", {}).get(k)]
    return out + [k for k in keys if k != "train" and saved.get(k) != now.get(k)]


def save_checkpoint(path: Path, state: TrainState, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    fingerprint: dict) -> None:
    """Tensors (weights, kept weights, optimizer buffers) as safetensors, the rest as JSON in its
    header: one file that loads without unpickling anything."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v for k, v in snapshot(net).items()}
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


def load_checkpoint(path: Path, fingerprint: dict, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> TrainState:
    """Restores the weights, optimizer and scaler saved at `path` into these, and returns the training
    state; BadInput when the file is unreadable or was made with other settings."""
    from safetensors import safe_open

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


def write_outputs(out: Path, log_path: Path, net: torch.nn.Module, defense: AdversarialTraining, state: TrainState,
                  record: dict, t0: float) -> None:
    """The weights, then the log naming their sha256."""
    from safetensors.torch import save_file

    from harness.defenses.registry import DEFENSES
    from harness.records.provenance import package_versions

    name = next(n for n, obj in DEFENSES.items() if obj is type(defense))
    kept_epoch = state.best_epoch if defense.keep_best and state.best is not None else state.epoch
    with atomic_path(out) as tmp:
        save_file(snapshot(net), str(tmp), metadata={"defense": name, "knobs": json.dumps(asdict(defense)), "epoch": str(kept_epoch)})
    log = {"defense": name, "knobs": asdict(defense), "epochs": state.records, "kept_epoch": kept_epoch, "best_epoch": state.best_epoch,
           "stopped": state.stopped, **record, "versions": package_versions(), "weights": str(out), "weights_sha256": sha256_file(out),
           "duration_s": round(time.perf_counter() - t0, 3)}
    write_text_atomic(log_path, json.dumps(log, indent=2) + "\n")
