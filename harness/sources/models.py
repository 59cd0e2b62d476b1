"""Models as the harness sees them: [0, 1] inputs in, logits out, always in eval mode.

Sources: ``builtin:digits-cnn``, ``python:module:factory``, ``onnx:PATH`` and ``huggingface:DIR`` (data,
run by onnxruntime or transformers), ``torchvision:NAME`` and ``timm:NAME``
(architectures built with pretrained=False, weights from a local file only; a timm model's own mean
and std become the preprocessing unless the config gives one) and ``torchscript:PATH``. Weights are safetensors or a plain state_dict read
with ``torch.load(weights_only=True)``: an arbitrary pickle is refused and its code never runs.
Two sources are code by nature and loading them runs it: ``python:`` imports a module and calls
its factory, ``torchscript:`` runs the TorchScript program the archive holds (RUNS_CODE says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from harness.core.errors import BadInput, one_line
from harness.core.files import sha256_file
from harness.core.registry import Registry

__all__ = ["BoundedModel", "MODELS", "load_model", "load_weights", "state_dict_sha256", "model_choices", "model_listing", "kept_as_found",
           "check_source", "source_identity", "TORCH_LOAD_FLOOR", "require_safe_torch_load"]

MODELS: Registry = Registry("model")


class BoundedModel(nn.Module):
    """Wraps a network so attacks see only [0, 1] inputs and logits.

    It owns normalization (mean/std), keeps the network in eval mode whatever is asked, and,
    when the network outputs probabilities, hands out their logarithm as logits (softmax of the
    result gives back the same probabilities; the cross-entropy loss stays well defined).
    """

    def __init__(self, net: nn.Module, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)  # attacks need input gradients only
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.outputs_probabilities = False
        self.train(False)

    @property
    def black_box(self) -> Optional[str]:
        """Why the network runs without gradients (an ONNX graph onnxruntime runs), or None."""
        return getattr(self.net, "black_box_reason", None)

    def train(self, mode: bool = True) -> "BoundedModel":
        return super().train(False)  # evaluation never runs a model in training mode

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """What the network is given for [0, 1] images x."""
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.normalize(x))
        if self.outputs_probabilities:
            out = torch.log(out.clamp_min(1e-30))
        return out


@contextlib.contextmanager
def kept_as_found(net: nn.Module) -> Iterator[nn.Module]:
    """Hands `net` back as it came, however the block ends: BoundedModel freezes its parameters and
    puts it in eval mode, and the devices move it; a caller's model must not come back changed."""
    modes = [(m, m.training) for m in net.modules()]
    grads = [(p, p.requires_grad) for p in net.parameters()]
    places = [(m, kind, name, t.device) for m in net.modules() for kind in ("_parameters", "_buffers")
              for name, t in getattr(m, kind).items() if t is not None]
    try:
        yield net
    finally:
        for m, kind, name, device in places:
            t = getattr(m, kind).get(name)
            if t is None or t.device == device:
                continue
            if kind == "_parameters":
                t.data = t.data.to(device)  # the same Parameter object: an optimizer holding it still works
                if t.grad is not None:
                    t.grad = t.grad.to(device)
            else:
                getattr(m, kind)[name] = t.to(device)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode  # each submodule's own flag, not train() cascading one mode down


def looks_like_probabilities(out: torch.Tensor) -> bool:
    """True when every row is non-negative, at most 1 and sums to 1: a softmax head, not logits."""
    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        return False
    sums = out.sum(dim=1)
    return bool((out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def state_dict_sha256(net: nn.Module) -> str:
    """A hash of the model's parameters and buffers as evaluated, whatever file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


# CVE-2025-32434: before torch 2.6, a crafted file could run code through torch.load(weights_only=True).
TORCH_LOAD_FLOOR = (2, 6)


def _torch_release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "2.5.1+cu121" or "2.6.0a0"."""
    import re

    return tuple(int(m.group()) if (m := re.match(r"\d+", part)) else 0 for part in version.split("+")[0].split(".")[:2])


def require_safe_torch_load(where: str, instead: str = "save the weights as .safetensors") -> None:
    """BadInput naming `where` unless the installed torch's weights-only loader is past CVE-2025-32434."""
    version = str(torch.__version__)
    if _torch_release(version) < TORCH_LOAD_FLOOR:
        floor = ".".join(map(str, TORCH_LOAD_FLOOR))
        raise BadInput(where, f"refused: torch {version} is older than {floor}, and its torch.load(weights_only=True) can be "
                       f"made to run code (CVE-2025-32434); install torch>={floor}, or {instead}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file; never an arbitrary pickle."""
    if path.is_dir():
        raise BadInput(str(path), "is a directory, not a weights file (name the .safetensors or .pt file inside it)")
    if not path.is_file():
        raise BadInput(str(path), "weights file not found")
    if path.stat().st_size == 0:
        raise BadInput(str(path), "the weights file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise BadInput(str(path), f"corrupt safetensors file ({type(e).__name__}: {one_line(e)})") from None
    require_safe_torch_load(str(path))
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the one error line says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # the weights-only loader names an opcode it cannot read (random bytes) or a global it will not call (code)
        if "weights only" in str(e).lower() and "unsupported operand" not in str(e).lower():
            raise BadInput(str(path), "refused: the file needs arbitrary unpickling to load (save a state_dict or safetensors instead)") from None
        raise BadInput(str(path), "corrupt or unreadable weights file (not a torch.save archive or pickle of tensors)") from None
    except Exception as e:
        raise BadInput(str(path), f"corrupt or unreadable weights file ({type(e).__name__}: {one_line(e)})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(str(path), "weights must be a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _apply_weights(net: nn.Module, path: Path) -> None:
    state = load_weights(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        result = one_line(e).removeprefix("Error(s) in loading state_dict for ")
        raise BadInput(str(path), f"weights do not fit the architecture: {result}") from None


@MODELS.register("builtin:digits-cnn")
def _builtin_digits_cnn(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    from harness.sources.builtin import digits_cnn, recipe_for

    if num_classes not in (None, 10):
        raise BadInput("model.num_classes", f"builtin:digits-cnn has 10 classes, not {num_classes}")
    net, _ = digits_cnn(recipe_for(kwargs))
    return net


@MODELS.register("python")
def _python_factory(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    module_name, attr = _python_parts(arg)
    # the config's directory and the working directory lead the search only while the module is imported
    # and its factory runs: left there, they would shadow other imports for the rest of the process
    added = [p for p in dict.fromkeys((str(base), str(Path.cwd()))) if p not in sys.path]
    sys.path[:0] = added
    try:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise BadInput("model.source", f"cannot import module {module_name!r} ({type(e).__name__}: {one_line(e)})") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise BadInput("model.source", f"module {module_name!r} has no callable {attr!r}")
        try:
            net = factory(**kwargs)
        except Exception as e:
            raise BadInput("model.source", f"factory {arg} failed ({type(e).__name__}: {one_line(e)})") from None
    finally:
        for p in added:  # only what was added here: entries the module itself put there stay
            if p in sys.path:
                sys.path.remove(p)
    if not isinstance(net, nn.Module):
        raise BadInput("model.source", f"factory {arg} returned {type(net).__name__}, not a torch.nn.Module")
    return net


@MODELS.register("torchvision")
def _torchvision(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    import torchvision

    valid = torchvision.models.list_models()
    if arg not in valid:
        raise BadInput("model.source", f"unknown torchvision model {arg!r} (valid: {', '.join(valid)})")
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    return torchvision.models.get_model(arg, weights=None, **extra, **kwargs)


@MODELS.register("timm")
def _timm(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    from harness.attacks.adapters import require

    timm = require("timm")
    if "pretrained" in kwargs or "pretrained_cfg_overlay" in kwargs:
        raise BadInput("model.kwargs.pretrained", "timm models are built with pretrained=False: weights come from model.weights, "
                       "a local file (nothing is downloaded)")
    if not timm.is_model(arg):
        close = timm.list_models(f"*{arg.split('.')[0][:6]}*")[:8]
        raise BadInput("model.source", f"unknown timm model {arg!r}" + (f" (close: {', '.join(close)})" if close else
                       " (timm.list_models() lists them)"))
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    try:
        return timm.create_model(arg, pretrained=False, **extra, **kwargs)
    except TypeError as e:
        raise BadInput("model.kwargs", f"timm model {arg!r} does not take these kwargs ({one_line(e)})") from None


def _own_preprocessing(scheme: str, net: nn.Module) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """The normalization a source's model carries with it (a timm model's pretrained_cfg, a Hugging Face
    image processor's), or none."""
    cfg = {"timm": getattr(net, "pretrained_cfg", None), "huggingface": getattr(net, "own_preprocessing", None)}.get(scheme)
    if not isinstance(cfg, Mapping) or cfg.get("mean") is None or cfg.get("std") is None:
        return None, None
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


@MODELS.register("onnx")
def _onnx(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    from harness.sources.onnx import load_onnx

    return load_onnx(_resolve(arg, base), num_classes, kwargs)


@MODELS.register("huggingface")
def _huggingface(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    from harness.sources.huggingface import load_huggingface

    return load_huggingface(_resolve(arg, base), num_classes, kwargs)


def _endpoint(scheme: str) -> Any:
    def load(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
        from harness.sources.endpoint import load_endpoint

        return load_endpoint(f"{scheme}:{arg}", num_classes, kwargs)

    return load


MODELS.register("http")(_endpoint("http"))
MODELS.register("https")(_endpoint("https"))


@MODELS.register("torchscript")
def _torchscript(arg: str, num_classes: Optional[int], kwargs: dict, base: Path) -> nn.Module:
    path = _resolve(arg, base)
    if path.is_dir():
        raise BadInput(str(path), "is a directory, not a TorchScript file")
    if not path.is_file():
        raise BadInput(str(path), "TorchScript file not found")
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice would add a line to every run's stderr
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise BadInput(str(path), f"not a loadable TorchScript archive ({type(e).__name__}: {one_line(e)})") from None


_FORMS = {"python": "python:MODULE:FACTORY", "torchvision": "torchvision:NAME", "timm": "timm:NAME", "torchscript": "torchscript:PATH",
          "onnx": "onnx:PATH", "huggingface": "huggingface:DIR", "http": "http://HOST[:PORT]/PATH", "https": "https://HOST[:PORT]/PATH"}

# What loading each source executes, for `harness list models`: the weights file is never unpickled,
# but a python: module and a TorchScript archive are code, and loading them runs it.
RUNS_CODE = {
    "builtin:digits-cnn": "runs only the harness's own code",
    "python": "RUNS CODE: imports and runs the module and calls its factory (trust it as you would `import` it)",
    "torchvision": "runs only torchvision's code (architecture from torchvision; weights from a local file only)",
    "timm": "runs only timm's code (architecture from timm, pretrained=False; weights from a local file only; pip install 'robustgate[timm]')",
    "torchscript": "RUNS CODE: runs the TorchScript program the archive holds, when loaded and on every forward pass",
    "huggingface": "runs only transformers' code (a local directory; model.safetensors only, never a pickle; "
                   "trust_remote_code off); pip install 'robustgate[huggingface]'",
    "http": "runs no code: POSTs images to the endpoint and reads its scores (a black box: black-box attacks only)",
    "https": "runs no code: POSTs images to the endpoint over TLS and reads its scores (a black box: black-box attacks only)",
    "onnx": "runs no code of yours: onnxruntime executes the graph (or torch's operators, once onnx2torch converts it); "
            "pip install 'robustgate[onnx]'",
}
WEIGHTS_NOTE = ("weights: (any source) safetensors, or torch.load(weights_only=True) on torch >= 2.6; never unpickled "
                "as arbitrary objects, so a weights file runs no code")


def model_choices() -> list[str]:
    return [_FORMS.get(n, n) for n in MODELS.names()]


def model_listing() -> list[str]:
    """`harness list models`: each source's form and, plainly, whether loading it runs code of the user's."""
    width = max(len(f) for f in model_choices())
    return [f"{_FORMS.get(n, n):<{width}}  {RUNS_CODE.get(n, 'see its documentation')}" for n in MODELS.names()] + [WEIGHTS_NOTE]


def _python_parts(arg: str) -> tuple[str, str]:
    module_name, sep, attr = arg.rpartition(":")
    if not sep or not module_name or not attr:
        raise BadInput("model.source", f"expected python:MODULE:FACTORY (e.g. python:mypkg.nets:build), got python:{arg}")
    return module_name, attr


def _scheme(source: str) -> tuple[str, str]:
    if source in MODELS:
        return source, ""
    scheme, sep, arg = source.partition(":")
    if not sep or scheme not in MODELS or scheme == "builtin" or not arg:
        raise BadInput("model.source", f"unknown model source {source!r} (valid: {', '.join(model_choices())})")
    if scheme == "python":
        _python_parts(arg)  # the form only: nothing is imported while a config is validated
    return scheme, arg


def source_identity(source: str, net: nn.Module, base: Path = Path(".")) -> tuple[str, str]:
    """(sha256, what it hashes) naming the model a source gave: for `onnx:PATH` the file's bytes (an
    onnxruntime session has no state dict: the file is the model), for an endpoint its address (its
    weights cannot be read), else the network's state dict ("state_dict")."""
    scheme, arg = _scheme(source)
    if scheme == "onnx":
        return sha256_file(_resolve(arg, base)), "file"
    if scheme in ("http", "https"):
        return hashlib.sha256(source.encode()).hexdigest(), "address"
    return state_dict_sha256(net), "state_dict"


def check_source(source: str) -> None:
    _scheme(source)


def load_model(source: str, weights: Optional[str] = None, num_classes: Optional[int] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               kwargs: Optional[dict[str, Any]] = None, base: Path = Path(".")) -> tuple[BoundedModel, dict[str, Any]]:
    """Builds the wrapped model and a provenance record (hashes of weights and parameters)."""
    scheme, arg = _scheme(source)
    if scheme in ("torchvision", "timm") and weights is None:
        raise BadInput("model.weights", f"{scheme} models need a local weights file (nothing is downloaded)")
    if scheme in ("onnx", "huggingface", "http", "https") and weights is not None:
        holder = {"onnx": "an ONNX file", "huggingface": "a Hugging Face directory"}.get(scheme, "an endpoint")
        raise BadInput("model.weights", f"{holder} holds its own weights: leave model.weights out")
    net = MODELS.get(scheme)(arg, num_classes, dict(kwargs or {}), base)
    info: dict[str, Any] = {"source": source}
    if mean is None and std is None:
        mean, std = _own_preprocessing(scheme, net)
        if mean is not None:
            info["preprocessing"] = {"mean": mean, "std": std, "from": f"the {scheme} model's own configuration"}
    if weights is not None:
        path = _resolve(weights, base)
        _apply_weights(net, path)
        info["weights"] = str(path)
        info["weights_sha256"] = sha256_file(path)
    info["model_sha256"], identity = source_identity(source, net, base)
    if scheme in ("http", "https"):
        info["endpoint"] = source
    if scheme == "huggingface":
        info["labels"], info["image_processor"] = net.labels, net.processor_notes
    if scheme == "onnx":
        info["onnx"] = getattr(net, "onnx_conversion", None) or {"gradients": None, "black_box": net.black_box_reason}
    model = BoundedModel(net, mean, std)
    # where it came from, for an engine whose workers rebuild it (harness.engines.recipes)
    model.origin = {"source": source, "num_classes": num_classes, "mean": None if mean is None else list(mean),
                    "std": None if std is None else list(std), "kwargs": dict(kwargs or {}), "base": str(Path(base).resolve()),
                    "model_sha256": info["model_sha256"], "identity": identity}
    return model, info
