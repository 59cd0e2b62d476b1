"""Stage 2, load: the devices, the seeded global generators, the data and the model (the config's, or
the caller's), and the check that the model's preprocessing fits the data's channels."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Optional

from harness.core.errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    from harness.config import Config
    from harness.pipeline.context import RunContext
    from harness.sources.data import Data
    from harness.sources.models import BoundedModel

__all__ = ["load", "seed_everything", "as_data", "configured_model", "refuse_white_box"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def as_data(data: Any, cfg: Config) -> Data:
    """The caller's data as a sample source: a Data as is, (x, y) tensors, or a torch Dataset of (image, label)."""
    from harness.sources.data import Data, data_from_tensors

    if isinstance(data, Data):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data_from_tensors(data[0], data[1], cfg.data.limit, cfg.seed)
    try:
        import torch

        xs, ys = zip(*(data[i] for i in range(len(data))))
        return data_from_tensors(torch.stack(list(xs)), torch.tensor([int(v) for v in ys]), cfg.data.limit, cfg.seed)
    except Exception as e:
        raise BadInput("data", f"expected (x, y) tensors or a Dataset of (image, label), got {type(data).__name__} ({e})") from None


def configured_model(ctx: RunContext, weights: Optional[str]) -> BoundedModel:
    """The config's model with these weights (a defended variant's, or its own again for a probe to train)."""
    from harness.sources.models import load_model

    m, pre = ctx.cfg.model, ctx.cfg.model.preprocessing
    return load_model(m.source, weights, m.num_classes, pre.mean, pre.std, m.kwargs, ctx.base)[0]


def refuse_white_box(cfg: Config, model: BoundedModel) -> None:
    """A model without gradients (an ONNX graph that did not convert, an endpoint) runs only what needs
    none (harness.config.schema.refuse_white_box says what): anything else is bad input, said before any work."""
    from harness.config.schema import refuse_white_box as refuse

    refuse(cfg, model.black_box)


def load(ctx: RunContext) -> RunContext:
    import torch

    from harness.engines.devices import resolve_devices
    from harness.sources.data import load_data
    from harness.sources.models import BoundedModel, load_model, state_dict_sha256

    cfg, req = ctx.cfg, ctx.request
    ctx.devices = resolve_devices(cfg.device)
    if req.engine is not None and not isinstance(req.engine, (str, dict)):
        ctx.engine = req.engine  # the caller's engine, used and left open
    else:
        from harness.engines import engine_for

        e = cfg.engine
        ctx.engine = engine_for(e.name, e.address, e.workers, e.gpus_per_worker, e.threads, cfg.device)
    seed_everything(cfg.seed)  # before the model loads: a factory's random initialization is part of the run
    if req.data is not None:
        ctx.data = as_data(req.data, cfg)
    else:
        ctx.data = load_data(cfg.data.source, cfg.data.split, cfg.data.limit, cfg.seed, ctx.base, cfg.data.image_size)
    pre = cfg.model.preprocessing
    if req.model is not None:
        if not isinstance(req.model, torch.nn.Module):
            raise BadInput("model", f"expected a torch.nn.Module, got {type(req.model).__name__}")
        ctx.model = BoundedModel(req.model, pre.mean, pre.std)
        ctx.model_info = {"source": "python:object", "model_sha256": state_dict_sha256(req.model)}
    else:
        ctx.model, ctx.model_info = load_model(cfg.model.source, cfg.model.weights, cfg.model.num_classes, pre.mean, pre.std,
                                               cfg.model.kwargs, ctx.base)
    channels = ctx.data.shape[0]
    if any(v is not None and len(v) != channels for v in (pre.mean, pre.std)):
        raise BadInput("model.preprocessing", f"mean/std need one value per channel: the data has {channels}")
    refuse_white_box(cfg, ctx.model)
    if cfg.certificates:  # a layer interval bounds cannot follow is bad input: said now, before the suite runs
        from harness.evaluation.certificates import check_models

        check_models(cfg, ctx.model)
    return ctx
