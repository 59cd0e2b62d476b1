"""`huggingface:DIR` model sources: a Hugging Face `transformers` image classifier and its image processor,
read from a local directory (what `save_pretrained` writes), never from the network.

The weights must be `model.safetensors`: a `pytorch_model.bin` is a pickle and is refused, and so is a
config that asks for code of its own (`auto_map`: trust_remote_code stays off). The processor's
normalization (`image_mean`, `image_std`, when it normalizes) becomes the preprocessing unless the
config gives one; its resizing and rescaling are not applied (the harness feeds [0, 1] images of the
data's size), and the labels come from the model's `id2label`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.core.errors import BadInput, one_line

__all__ = ["HuggingFaceClassifier", "load_huggingface"]


class HuggingFaceClassifier(nn.Module):
    """A transformers image classifier as a module: pixel values in, the logits tensor out."""

    def __init__(self, model: nn.Module, own_preprocessing: Optional[dict[str, list[float]]], labels: list[str]) -> None:
        super().__init__()
        self.model, self.own_preprocessing, self.labels = model, own_preprocessing, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _processor_normalization(path: Path) -> tuple[Optional[dict[str, list[float]]], dict[str, Any]]:
    """The processor's mean and std when it normalizes, and what else it would have done to an image."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None, {"processor": None}
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(str(file), f"not a readable image processor config ({e})") from None
    notes = {"processor": cfg.get("image_processor_type"), "size": cfg.get("size"), "do_resize": cfg.get("do_resize")}
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if not cfg.get("do_normalize", True) or mean is None or std is None:
        return None, notes
    as_list = lambda v: [float(a) for a in (v if isinstance(v, list) else [v])]
    return {"mean": as_list(mean), "std": as_list(std)}, notes


def load_huggingface(path: Path, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    from harness.attacks.adapters import require

    if kwargs:
        raise BadInput(f"model.kwargs.{sorted(kwargs)[0]}", "huggingface models take no kwargs: the directory's config.json says it all")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BadInput(str(path), "not a Hugging Face model directory (no config.json): save one with model.save_pretrained(DIR)")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("auto_map"):
        raise BadInput(str(path / "config.json"), "asks for code of its own (auto_map); the harness never runs a model "
                       "directory's code (trust_remote_code stays off): use a python: factory you trust instead")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        pickled = [p.name for p in path.glob("*.bin")]
        raise BadInput(str(path), "holds no model.safetensors" + (f" ({', '.join(pickled)} is a pickle and is never loaded: re-save "
                       "with save_pretrained(DIR, safe_serialization=True))" if pickled else ""))
    transformers = require("transformers")
    try:
        quiet = io.StringIO()
        with contextlib.redirect_stderr(quiet):  # its progress bars are not a run's output
            model = transformers.AutoModelForImageClassification.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except Exception as e:
        raise BadInput(str(path), f"transformers cannot load it as an image classifier ({type(e).__name__}: "
                       f"{one_line(e, 200)})") from None
    labels_n = int(model.config.num_labels)
    if num_classes is not None and num_classes != labels_n:
        raise BadInput("model.num_classes", f"the model has {labels_n} labels, not {num_classes}")
    id2label = getattr(model.config, "id2label", {}) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(labels_n)]
    normalization, notes = _processor_normalization(path)
    net = HuggingFaceClassifier(model.eval(), normalization, labels)
    net.processor_notes = notes
    return net
