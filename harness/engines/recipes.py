"""Recipes: how a worker in another process (a Ray actor, perhaps on another machine) rebuilds the
run's model and sample source without anything pickled crossing over.

A model recipe is the model's config (source, classes, preprocessing, factory kwargs, the
directory its relative paths start from), its weights as safetensors bytes, and the sha256 the run's
provenance recorded for those weights (`state_dict_sha256`). The worker builds the architecture from
the source, loads the bytes, and refuses to run unless the hash of what it loaded is the recorded
one. An ONNX file or an endpoint travels as its source alone: the worker opens the file (a path every
node must see) and checks its hash, or calls the same address. A defended variant is its inner recipe plus the defense (a frozen dataclass of plain values),
its mode and its draws' seed.

A data recipe is either the loader's arguments (the worker reads its own batches through the sample
source, from a path every node must see; the labels and split ids it gets must be the driver's) or,
for data that lives only in the driver's memory (`harness.run(data=(x, y))`), the raw bytes of the
samples, put in the object store once.

    recipe = model_recipe(model)            # on the driver
    model = build_model(recipe)             # in the worker: verified, bounded, in eval mode
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from harness.core.errors import BadInput, RunFailed

__all__ = ["ModelRecipe", "DataRecipe", "model_recipe", "build_model", "data_recipe", "build_data", "code_dir", "labels_digest"]

_OBJECT = ("the Ray engine rebuilds the model on every worker from the config's model source and its weights; a model "
           "handed in as a Python object cannot reach them without pickling it: name it in model.source "
           "(e.g. python:MODULE:FACTORY) instead, or use --engine local")


@dataclass(frozen=True)
class ModelRecipe:
    source: str
    num_classes: Optional[int]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]
    kwargs: dict[str, Any]
    base: str  # where the config's relative paths start (a torchscript: path must be one every node sees)
    weights: bytes  # safetensors of the network's state_dict
    sha256: str  # state_dict_sha256 recorded by the run's provenance
    outputs_probabilities: bool = False
    # a preprocessing defense around the model: (defense dataclass, mode, eot, seed); None for the model itself
    wrapper: Optional[tuple[Any, str, int, int]] = None
    inner: Optional["ModelRecipe"] = None  # the wrapped model's recipe, when `wrapper` is set
    # what `sha256` hashes (harness.sources.models.source_identity): the state dict, whose bytes travel in
    # `weights`; or an ONNX "file" / an endpoint's "address", which the worker opens itself (no weights travel)
    identity: str = "state_dict"
    # an endpoint's query count shared by every process of the run (harness.engines.meters.RemoteMeter)
    meter: Any = None

    @property
    def key(self) -> str:
        """Names the model a worker builds from this recipe (cache key): weights, config and wrapper."""
        h = hashlib.sha256()
        if self.inner is not None:
            h.update(self.inner.key.encode())
            h.update(repr(self.wrapper).encode())
        else:
            h.update(repr((self.source, self.num_classes, self.mean, self.std, sorted(self.kwargs.items()), self.base, self.sha256)).encode())
        h.update(b"p" if self.outputs_probabilities else b"l")
        return h.hexdigest()[:24]


def _weights_bytes(net: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    # clones: safetensors refuses tensors that share storage (tied weights)
    return save({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()})


def model_recipe(model: torch.nn.Module) -> ModelRecipe:
    """The recipe of a model the harness loaded (load_model records where it came from), or of a
    preprocessing defense around one. BadInput for a model that came in as a Python object."""
    from harness.defenses.preprocess import Defended
    from harness.sources.models import BoundedModel, state_dict_sha256

    if isinstance(model, Defended):
        inner = model_recipe(model.model)
        return ModelRecipe(**{**inner.__dict__, "weights": b"", "wrapper": (model.defense, model.mode, model.eot, model.seed),
                              "inner": inner})
    origin = getattr(model, "origin", None) if isinstance(model, BoundedModel) else None
    if origin is None:
        raise BadInput("engine", _OBJECT)
    config = dict(source=origin["source"], num_classes=origin["num_classes"], mean=None if origin["mean"] is None else tuple(origin["mean"]),
                  std=None if origin["std"] is None else tuple(origin["std"]), kwargs=dict(origin["kwargs"]), base=origin["base"],
                  outputs_probabilities=bool(model.outputs_probabilities))
    identity = origin.get("identity", "state_dict")
    if identity != "state_dict":  # an ONNX file, an endpoint: the worker builds it from its source, no weights travel
        return ModelRecipe(**config, weights=b"", sha256=origin["model_sha256"], identity=identity)
    sha = state_dict_sha256(model.net)
    if sha != origin["model_sha256"]:
        raise RunFailed(f"the model's weights changed after loading (sha256 {sha[:12]} != {origin['model_sha256'][:12]}): "
                        "the workers would evaluate other weights than the provenance names")
    return ModelRecipe(**config, weights=_weights_bytes(model.net), sha256=sha)


def _architecture(recipe: ModelRecipe, base: Optional[Path] = None) -> torch.nn.Module:
    """The network from its source, before its weights: the builtin model is not retrained here.
    `base` replaces the recipe's directory (a worker whose copy of the module sits elsewhere)."""
    from harness.sources.models import MODELS, _scheme

    if recipe.source == "builtin:digits-cnn":
        from harness.sources.builtin import DigitsCNN

        return DigitsCNN()
    scheme, arg = _scheme(recipe.source)
    return MODELS.get(scheme)(arg, recipe.num_classes, dict(recipe.kwargs), base or Path(recipe.base))


def build_model(recipe: ModelRecipe, base: Optional[Path] = None) -> torch.nn.Module:
    """In the worker: the model the recipe names, its weights verified against the recorded sha256."""
    from safetensors.torch import load

    from harness.defenses.preprocess import defended
    from harness.sources.models import BoundedModel, state_dict_sha256

    if recipe.inner is not None:
        defense, mode, eot, seed = recipe.wrapper
        return defended(build_model(recipe.inner, base), defense, mode, eot=eot, seed=seed)
    net = _architecture(recipe, base)
    if recipe.identity != "state_dict":
        from harness.sources.models import source_identity

        sha, _ = source_identity(recipe.source, net, base or Path(recipe.base))
        if sha != recipe.sha256:
            raise RunFailed(f"the worker's {recipe.identity} of {recipe.source} hashes to {sha[:12]}, not the run's {recipe.sha256[:12]}: "
                            "refusing to evaluate another model")
        if recipe.meter is not None:
            net.meter = recipe.meter
    else:
        try:
            net.load_state_dict(load(recipe.weights), strict=True)
        except RuntimeError as e:
            raise RunFailed(f"the worker's {recipe.source} does not take the run's weights: {' '.join(str(e).split())[:200]}") from None
        sha = state_dict_sha256(net)
        if sha != recipe.sha256:
            raise RunFailed(f"the weights the worker loaded hash to {sha[:12]}, not the run's {recipe.sha256[:12]}: refusing to evaluate them")
    model = BoundedModel(net, recipe.mean, recipe.std)
    model.outputs_probabilities = recipe.outputs_probabilities
    return model


def code_dir(recipe: ModelRecipe) -> Optional[Path]:
    """For a python: source whose module lives beside the config or in the working directory: a fresh
    directory holding a copy of its top-level module or package, for Ray's runtime environment to
    ship to the workers (it becomes their working directory, where the factory's import looks first).
    None when there is nothing to ship (an installed package, or another source)."""
    while recipe.inner is not None:
        recipe = recipe.inner
    if not recipe.source.startswith("python:"):
        return None
    import importlib.util

    top = recipe.source.removeprefix("python:").rpartition(":")[0].split(".")[0]
    roots = [Path(recipe.base).resolve(), Path.cwd().resolve()]
    added = [str(p) for p in roots if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).resolve()
    if spec.submodule_search_locations:
        path = path.parent
    if not any(path.is_relative_to(r) for r in roots) or any(part == "site-packages" for part in path.parts):
        return None
    stage = Path(tempfile.mkdtemp(prefix="harness-code-"))
    if path.is_dir():
        shutil.copytree(path, stage / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(path, stage / path.name)
    return stage


@dataclass(frozen=True)
class DataRecipe:
    """The loader's arguments (`origin`), or the samples themselves (`x`: float32 bytes of (n, *shape))."""

    n: int
    shape: tuple[int, ...]
    labels: str  # labels_digest of the driver's y and ids: a worker's data must match it
    origin: Optional[dict[str, Any]] = None
    x: Optional[bytes] = None
    y: Optional[bytes] = None  # int64
    ids: Optional[bytes] = None  # int64


def labels_digest(data: Any) -> str:
    h = hashlib.sha256(repr((len(data), tuple(data.shape))).encode())
    for t in (data.y, data.ids):
        h.update(t.contiguous().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# sources a worker reads for itself (files every node sees, or data built into the harness); anything else travels as bytes
_READ_BY_WORKER = ("builtin:", "npz:", "npy:", "imagefolder:", "torchvision:")


def data_recipe(data: Any) -> DataRecipe:
    origin = getattr(data, "origin", None)
    common = dict(n=len(data), shape=tuple(data.shape), labels=labels_digest(data))
    if origin is not None and str(origin["source"]).startswith(_READ_BY_WORKER):
        return DataRecipe(**common, origin=dict(origin))
    x = torch.cat([b for _, b in data.batches()]) if len(data) else torch.zeros((0, *data.shape))
    return DataRecipe(**common, x=x.float().contiguous().numpy().tobytes(), y=data.y.to(torch.int64).numpy().tobytes(),
                      ids=data.ids.to(torch.int64).numpy().tobytes())


def build_data(recipe: DataRecipe) -> Any:
    """In the worker: the run's sample source, read from its files or rebuilt from the bytes."""
    from harness.sources.data import load_data
    from harness.sources.samples import TensorData

    if recipe.origin is not None:
        o = recipe.origin
        data = load_data(o["source"], o["split"], o["limit"], o["seed"], Path(o["base"]), o["image_size"])
    else:
        x = torch.from_numpy(np.frombuffer(recipe.x, dtype=np.float32).copy()).view(recipe.n, *recipe.shape)
        y = torch.from_numpy(np.frombuffer(recipe.y, dtype=np.int64).copy())
        ids = torch.from_numpy(np.frombuffer(recipe.ids, dtype=np.int64).copy())
        data = TensorData(x=x, y=y, ids=ids, source="python:tensors", split="given")
    if labels_digest(data) != recipe.labels:
        where = recipe.origin["source"] if recipe.origin else "the data"
        raise RunFailed(f"{where} reads differently on this worker (labels, ids or shape differ from the driver's): every node "
                        "must see the same files")
    return data
