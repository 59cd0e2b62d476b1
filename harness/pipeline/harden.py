"""`harness harden` as a pipeline: resolve -> load -> train -> write over one HardenContext.

The config's `train:` section over the builtin model's recipe (harness.config.train_plan), a
checkpoint after every epoch so `--resume` continues bit for bit, and the weights plus a log of clean
and robust accuracy per epoch (harness.pipeline.checkpoint). The defenses and their epoch loop are
harness.defenses.training on harness.training.

    from harness.pipeline.harden import harden
    harden("configs/defended.yaml", "pgd-at", "at.safetensors", epsilon=0.2)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from harness.core.errors import BadInput, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from harness.config import Config, TrainConfig
    from harness.defenses.training import AdversarialTraining, Check, TrainState
    from harness.sources.data import Data
    from harness.sources.models import BoundedModel

__all__ = ["HardenRequest", "HardenContext", "HARDEN_STAGES", "harden"]


@dataclass(frozen=True)
class HardenRequest:
    """What the caller of harden asked for (see harden)."""

    config: Any
    defense: str
    out: Path
    resume: bool = False
    device: Optional[str] = None
    epochs: Optional[int] = None
    show_progress: Optional[bool] = None
    check: Optional[Check] = None
    on_epoch: Optional[Callable[[dict], None]] = None
    notify: Optional[Callable[[str], None]] = None
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass(repr=False)
class HardenContext:
    request: HardenRequest
    notes: list[str] = field(default_factory=list)  # told to `notify` once the input is accepted, so a bad input stays one line
    # resolve
    started: dt.datetime = field(init=False)
    t0: float = field(init=False)
    cfg: Config = field(init=False)
    base: Path = field(init=False)
    label: str = field(init=False)
    plan: TrainConfig = field(init=False)
    defense: AdversarialTraining = field(init=False)
    ckpt: Path = field(init=False)  # WEIGHTS.ckpt, the last finished epoch
    log_path: Path = field(init=False)  # WEIGHTS.log.json
    # load
    device: torch.device = field(init=False)
    amp: bool = field(init=False)
    seed: int = field(init=False)
    source: str = field(init=False)
    data: Data = field(init=False)
    held: torch.Tensor = field(init=False)  # rows kept out of training for the per-epoch check
    kept: torch.Tensor = field(init=False)  # rows trained on
    model: BoundedModel = field(init=False)
    model_info: dict[str, Any] = field(init=False)
    fingerprint: dict[str, Any] = field(init=False)  # what a checkpoint must match to be resumed
    optimizer: torch.optim.Optimizer = field(init=False)
    scaler: Any = field(init=False)
    state: TrainState = field(init=False)
    resumed_from: Optional[int] = field(init=False)
    # train
    check_record: dict[str, Any] = field(init=False)  # what the per-epoch check measures, as the log names it
    # write
    weights: Path = field(init=False)

    def __repr__(self) -> str:
        return f"HardenContext({', '.join(n for n in self.__dataclass_fields__ if hasattr(self, n))})"


def resolve(ctx: HardenContext) -> HardenContext:
    from harness.config import defense_knobs, train_plan
    from harness.defenses.training import build_defense, training_defenses
    from harness.pipeline.resolve import resolve_config

    req = ctx.request
    ctx.started, ctx.t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    ctx.cfg, ctx.base, ctx.label = resolve_config(req.config)
    ctx.plan = train_plan(ctx.cfg, req.epochs)
    try:
        ctx.defense = build_defense(req.defense, defense_knobs({**ctx.plan.defense.get(req.defense, {}), **req.knobs}))
    except ValueError as e:
        where = "--defense" if req.defense not in training_defenses() else "knobs" if req.knobs else f"{ctx.label}: train.defense.{req.defense}"
        raise BadInput(where, str(e)) from None
    if req.out.suffix != ".safetensors" or req.out.is_dir():
        raise BadInput(str(req.out), "the weights are written as safetensors: name a file ending in .safetensors")
    ctx.ckpt, ctx.log_path = Path(f"{req.out}.ckpt"), Path(f"{req.out}.log.json")
    return ctx


def _reinitialize(net: torch.nn.Module, seed: int) -> None:
    import torch

    layers = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise BadInput("train.start", "scratch needs layers with reset_parameters(), and this model has none (use start: model)")
    torch.manual_seed(seed)
    for m in layers:
        m.reset_parameters()


def load(ctx: HardenContext) -> HardenContext:
    """The device, the training data split into trained and held-out rows, the model (re-initialized
    for `start: scratch`), the optimizer, and the training state: fresh, or the checkpoint's on resume."""
    import torch

    from harness.defenses.training import TrainState, make_optimizer
    from harness.engines.devices import resolve_devices
    from harness.pipeline.checkpoint import load_checkpoint
    from harness.sources.data import load_data
    from harness.sources.models import load_model
    from harness.training import make_scaler

    req, cfg, plan, note = ctx.request, ctx.cfg, ctx.plan, ctx.notes.append
    devices = resolve_devices(req.device if req.device is not None else cfg.device)
    ctx.device = dev = devices[0]
    if len(devices) > 1:
        note(f"training uses the first device only ({dev})")
    ctx.amp = plan.amp and dev.type == "cuda"
    if plan.amp and not ctx.amp:
        note(f"train.amp is ignored on {dev.type}: mixed precision needs CUDA")
    ctx.seed = seed = plan.seed if plan.seed is not None else cfg.seed
    ctx.source = plan.data.source or cfg.data.source
    if ctx.source == cfg.data.source and plan.data.split == cfg.data.split:
        note(f"training on the split the suite evaluates ({ctx.source}, {plan.data.split}): its robust accuracy will flatter the model")
    ctx.data = data = load_data(ctx.source, plan.data.split, plan.data.limit, seed, ctx.base, cfg.data.image_size)
    holdout = plan.data.holdout or max(1, min(1000, len(data) // 10))
    if holdout >= len(data):
        raise BadInput("train.data.holdout", f"holds out {holdout} of the {len(data)} training samples, leaving none to train on")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    ctx.held, ctx.kept = perm[:holdout].sort().values, perm[holdout:].sort().values
    pre = cfg.model.preprocessing
    ctx.model, ctx.model_info = load_model(cfg.model.source, cfg.model.weights, cfg.model.num_classes, pre.mean, pre.std, cfg.model.kwargs,
                                           ctx.base)
    channels = data.shape[0]
    if any(v is not None and len(v) != channels for v in (pre.mean, pre.std)):
        raise BadInput("model.preprocessing", f"mean/std need one value per channel: the data has {channels}")
    if plan.start == "scratch":
        _reinitialize(ctx.model.net, seed)
    ctx.model.to(dev).eval()
    ctx.fingerprint = {"defense": req.defense, "knobs": asdict(ctx.defense), "train": plan.model_dump(mode="json", exclude={"defense"}),
                       "seed": seed, "model": {k: v for k, v in ctx.model_info.items() if k != "weights"}, "data_sha256": data.sha256()}
    ctx.optimizer = make_optimizer(plan, ctx.model.net)
    ctx.scaler = make_scaler(plan.settings(), dev) if ctx.amp else None  # float16 needs loss scaling; bfloat16 does not
    ctx.state, ctx.resumed_from = TrainState(), None
    if req.resume and ctx.ckpt.is_file():
        ctx.state = load_checkpoint(ctx.ckpt, ctx.fingerprint, ctx.model.net, ctx.optimizer, ctx.scaler)
        note(f"resuming after epoch {ctx.state.epoch} of {plan.epochs} from {ctx.ckpt}")
    elif req.resume:
        note(f"no checkpoint {ctx.ckpt} to resume from: training starts at epoch 1")
    elif ctx.ckpt.is_file():
        note(f"{ctx.ckpt} from an unfinished run is replaced as this one goes (--resume would have continued it)")
    if req.resume:
        ctx.resumed_from = ctx.state.epoch
    for text in ctx.notes if req.notify is not None else ():
        req.notify(text)
    return ctx


@contextlib.contextmanager
def _kept_on_failure(ctx: HardenContext) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) and running out of device memory become RunFailed naming what the checkpoint keeps."""
    import torch

    try:
        yield
    except KeyboardInterrupt:
        state, epochs = ctx.state, ctx.plan.epochs
        where = "while writing the outputs" if state.epoch >= epochs or state.stopped else f"in epoch {state.epoch + 1} of {epochs}"
        kept = (f"; {ctx.ckpt} keeps {state.epoch} finished epoch(s): rerun with --resume to continue" if ctx.ckpt.is_file()
                else "; no epoch had finished")
        raise RunFailed(f"interrupted {where}{kept}") from None
    except torch.cuda.OutOfMemoryError:
        raise RunFailed(f"out of device memory in epoch {ctx.state.epoch + 1} (lower train.batch_size)") from None


def _after_epoch(ctx: HardenContext, state: TrainState, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    from harness.pipeline.checkpoint import save_checkpoint

    save_checkpoint(ctx.ckpt, state, ctx.model.net, optimizer, scaler, ctx.fingerprint)
    if ctx.request.on_epoch is not None:
        ctx.request.on_epoch(dict(state.records[-1]))


def train(ctx: HardenContext) -> HardenContext:
    """The epochs still to do, a checkpoint after each; the per-epoch check on the held-out rows."""
    from harness.defenses.training import epoch_check, train as train_epochs

    data, req = ctx.data, ctx.request
    check, ctx.check_record = epoch_check(ctx.defense, data.read(ctx.held), data.y[ctx.held], ctx.seed, ctx.device,
                                          batch_size=ctx.cfg.data.batch_size)
    check = req.check or check
    with _kept_on_failure(ctx):
        train_epochs(ctx.defense, ctx.model, data.read(ctx.kept), data.y[ctx.kept], ctx.plan, ctx.device, check=check, seed=ctx.seed,
                     state=ctx.state, optimizer=ctx.optimizer, scaler=ctx.scaler, amp=ctx.amp, show_progress=req.show_progress,
                     on_epoch=partial(_after_epoch, ctx))
    return ctx


def write(ctx: HardenContext) -> HardenContext:
    """The weights and the log; then the checkpoint goes, as the training is whole."""
    from harness.pipeline.checkpoint import write_outputs

    d, plan, out = ctx.defense, ctx.plan, ctx.request.out
    with _kept_on_failure(ctx):
        write_outputs(out, ctx.log_path, ctx.model.net, d, ctx.state, {
            "check": ctx.check_record,
            "train": plan.model_dump(mode="json"), "config": ctx.cfg.model_dump(mode="json"), "config_file": ctx.label, "seed": ctx.seed,
            "device": str(ctx.device), "amp": ctx.amp, "model": ctx.model_info,
            "data": {"source": ctx.source, "split": plan.data.split, "samples": len(ctx.kept), "holdout": len(ctx.held),
                     "sha256": ctx.data.sha256()},
            "resumed_from_epoch": ctx.resumed_from, "notes": ctx.notes, "started_at": ctx.started.isoformat(timespec="seconds")}, ctx.t0)
    ctx.ckpt.unlink(missing_ok=True)
    ctx.weights = out
    return ctx


HARDEN_STAGES: tuple[Callable[[HardenContext], HardenContext], ...] = (resolve, load, train, write)


def harden(config: Any, defense: str, out: Any, *, resume: bool = False, device: Optional[str] = None, epochs: Optional[int] = None,
           show_progress: Optional[bool] = None, check: Optional[Check] = None,
           on_epoch: Optional[Callable[[dict], None]] = None, notify: Optional[Callable[[str], None]] = None, **knobs: Any) -> Path:
    """Trains the config's model with a training defense; writes `out` (safetensors) and `out.log.json`.

    `config` is a YAML path, a dict or a Config; its `train:` section (over a builtin model's own
    recipe) says how, `train.defense.<name>` holds the defense's knobs and `knobs` override them. A
    checkpoint `out.ckpt` is written after every epoch and `resume=True` continues from it. `check`
    replaces the per-epoch PGD check; `on_epoch` gets each epoch's record; `notify` gets notes meant
    for the user. Bad input raises BadInput; Ctrl-C or a failed run raises RunFailed, keeping the
    checkpoint. Returns the path of the weights.
    """
    ctx = HardenContext(HardenRequest(config, defense, Path(out), resume, device, epochs, show_progress, check, on_epoch, notify, knobs))
    for stage in HARDEN_STAGES:
        ctx = stage(ctx)
    return ctx.weights
