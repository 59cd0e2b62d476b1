"""`onnx:PATH` model sources: an ONNX file run by onnxruntime, with gradients where its graph converts.

The file is loaded into an onnxruntime session (the reference for what the model computes). Its graph
is then converted to torch with onnx2torch and the two are compared on a probe batch: within
`TOLERANCE` the converted module is the model (white-box: gradients flow, every attack runs); otherwise,
or when it does not convert, the session itself is the model, a black box (`OnnxRuntimeModule`) that
answers queries without gradients, and the run refuses the attacks that need them before any work.

Loading an ONNX file runs no Python code of the user's: the graph is data, executed by onnxruntime
(and, once converted, by torch's own operators).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from harness.core.errors import BadInput, one_line

__all__ = ["OnnxRuntimeModule", "load_onnx", "TOLERANCE", "black_box_reason"]

TOLERANCE = 1e-4  # the largest |torch - onnxruntime| logit difference, relative to 1 + max |logit|, kept as the same model
PROBE = 4  # images in the probe batch


class OnnxRuntimeModule(nn.Module):
    """An onnxruntime session as a module: float32 NCHW in, logits out on the input's device, no
    gradients (a black box). `black_box_reason` says why the graph is not run as torch."""

    def __init__(self, path: Path, session: Any, reason: str) -> None:
        super().__init__()
        self.path, self.session, self.black_box_reason = str(path), session, reason
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def __getstate__(self) -> dict:  # a session does not pickle: a worker reopens the file
        state = {k: v for k, v in self.__dict__.items() if k != "session"}
        return state

    def __setstate__(self, state: dict) -> None:
        import onnxruntime

        self.__dict__.update(state)
        self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])


def black_box_reason(net: nn.Module) -> Optional[str]:
    """Why a model runs without gradients (an ONNX graph that did not convert), or None."""
    return getattr(net, "black_box_reason", None)


def _probe_shape(session: Any, kwargs: dict) -> tuple[int, ...]:
    given = kwargs.get("input_shape")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BadInput("model.source", f"an ONNX classifier takes one input (images); this graph takes {len(inputs)}")
    dims = list(inputs[0].shape)[1:]
    if given is not None:
        if not (isinstance(given, list) and all(isinstance(d, int) and d > 0 for d in given)):
            raise BadInput("model.kwargs.input_shape", f"expected [C, H, W] as positive integers, got {given!r}")
        return (PROBE, *given)
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise BadInput("model.kwargs.input_shape", f"the graph's input has symbolic dimensions {inputs[0].shape}: give "
                       "model.kwargs.input_shape: [C, H, W] so the converted graph can be checked")
    return (PROBE, *dims)


def _converted(path: Path, session: Any, shape: tuple[int, ...]) -> tuple[Optional[nn.Module], str, Optional[float]]:
    """onnx2torch's module and a note when it computes what onnxruntime does on a probe batch; else
    (None, why not, the difference if it ran)."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as e:
        return None, f"onnx2torch is not installed ({e.name}: pip install 'robustgate[onnx]')", None
    try:
        module = convert(onnx.load(str(path))).eval()
    except Exception as e:
        return None, f"onnx2torch cannot convert the graph ({type(e).__name__}: {one_line(e, 160)})", None
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    reference = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    try:
        with torch.no_grad():
            ours = module(x).float().numpy()
    except Exception as e:
        return None, f"the converted graph fails on a probe batch ({type(e).__name__}: {one_line(e, 160)})", None
    if ours.shape != reference.shape:
        return None, f"the converted graph gives shape {ours.shape}, onnxruntime {reference.shape}", None
    diff = float(np.abs(ours - reference).max())
    if not diff <= TOLERANCE * (1.0 + float(np.abs(reference).max())):
        return None, f"the converted graph's logits differ from onnxruntime's by {diff:.3g}", diff
    return module, "converted by onnx2torch", diff


def load_onnx(path: Path, num_classes: Optional[int], kwargs: dict) -> nn.Module:
    """The model an ONNX file holds: onnx2torch's module when it matches onnxruntime, else the session."""
    from harness.attacks.adapters import require

    unknown = sorted(set(kwargs) - {"input_shape"})
    if unknown:
        raise BadInput(f"model.kwargs.{unknown[0]}", "onnx models take only `input_shape` ([C, H, W], for graphs with symbolic sizes)")
    if path.is_dir() or not path.is_file():
        raise BadInput(str(path), "ONNX file not found" if not path.exists() else "is a directory, not an ONNX file")
    ort = require("onnxruntime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BadInput(str(path), f"not a loadable ONNX model ({type(e).__name__}: {one_line(e, 200)})") from None
    shape = _probe_shape(session, kwargs)
    try:
        out = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, dtype=np.float32)})[0]
    except Exception as e:
        raise BadInput(str(path), f"onnxruntime cannot run it on float32 images of shape {list(shape[1:])} "
                       f"({type(e).__name__}: {one_line(e, 200)})") from None
    if out.ndim != 2 or (num_classes is not None and out.shape[1] != num_classes):
        raise BadInput("model.num_classes" if out.ndim == 2 else str(path),
                       f"the graph outputs shape {list(out.shape)}; expected (batch, {num_classes or 'classes'})")
    module, note, diff = _converted(path, session, shape)
    if module is not None:
        module.onnx_conversion = {"gradients": note, "max_abs_diff": diff}
        return module
    return OnnxRuntimeModule(path, session, note)
