"""`train:` (read by `harness harden` and the poisoning probes) and its translation into the plain
values of harness.training: TrainConfig.settings(), train_plan (the section over a builtin model's
own recipe) and defense_knobs (a training defense's knobs, epsilons as floats)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator
from typing_extensions import Annotated

from harness.config.base import Strict, _reraise, plain_knobs

if TYPE_CHECKING:
    from harness.training.loop import TrainSettings

__all__ = ["TrainConfig", "TrainDataConfig", "OptimizerConfig", "ScheduleConfig", "train_plan", "builtin_recipe", "defense_knobs"]


def defense_knobs(knobs: dict[str, Any], defense: Optional[str] = None) -> dict[str, Any]:
    """A training defense's knobs as harness.defenses.training.build_defense takes them: an epsilon
    written as "8/255" becomes its float. ValueError ("defense 'pgd-at': epsilon ...", when `defense`
    is given) on a budget that does not parse, is negative or is not finite."""
    return plain_knobs(knobs, f"defense {defense!r}" if defense else "")


class TrainDataConfig(Strict):
    """`train.data`: where training examples come from (default: the suite's data source, split train)."""

    source: Optional[str] = None
    split: Literal["train", "test"] = "train"
    limit: Optional[int] = Field(default=None, ge=2)
    batch_size: Optional[int] = Field(default=None, ge=1)  # default: train.batch_size
    holdout: Optional[int] = Field(default=None, ge=1)  # kept out of training for the per-epoch PGD check; default 10%, at most 1000

    @field_validator("source")
    @classmethod
    def _source(cls, v: Optional[str]) -> Optional[str]:
        from harness.sources.data import check_source

        if v is not None:
            _reraise(check_source, v)
        return v


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd only
    weight_decay: float = Field(default=5e-4, ge=0)


class ScheduleConfig(Strict):
    name: Literal["none", "cosine", "step", "onecycle"] = "cosine"
    milestones: list[Annotated[int, Field(ge=1)]] = []  # step: epochs after which lr is multiplied by gamma
    gamma: float = Field(default=0.1, gt=0)  # step
    pct_start: float = Field(default=0.4, gt=0, lt=1)  # onecycle: the fraction of training spent rising to lr


class TrainConfig(Strict):
    """`train:`, read by `harness harden`: how to train, and each training defense's knobs under
    `defense` (e.g. `defense: {pgd-at: {epsilon: 0.2, steps: 10}}`). A builtin model brings its own
    recipe; the keys given here override it."""

    data: TrainDataConfig = TrainDataConfig()
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    amp: bool = False  # mixed precision while training, on CUDA only; evaluation never uses it
    seed: Optional[int] = None  # default: the config's seed
    start: Literal["model", "scratch"] = "model"  # the model as loaded (its weights), or freshly initialized
    defense: dict[str, dict[str, Any]] = {}

    @field_validator("defense")
    @classmethod
    def _knobs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from harness.defenses.training import build_defense

        for name, knobs in v.items():
            build_defense(name, defense_knobs(knobs, name))  # ValueError naming the knob and the valid ones
        return v

    @model_validator(mode="after")
    def _one_batch_size(self) -> "TrainConfig":
        if "batch_size" in self.model_fields_set and self.data.batch_size not in (None, self.batch_size):
            raise ValueError(f"batch_size is {self.batch_size} but data.batch_size is {self.data.batch_size}: set one")
        return self

    def settings(self) -> TrainSettings:
        """The plain training settings harness.training (and the defenses and probes on it) take."""
        from harness.training.loop import OptimizerSettings, ScheduleSettings, TrainSettings

        o, s = self.optimizer, self.schedule
        return TrainSettings(epochs=self.epochs, batch_size=self.data.batch_size or self.batch_size, amp=self.amp,
                             optimizer=OptimizerSettings(o.name, o.lr, o.momentum, o.weight_decay),
                             schedule=ScheduleSettings(s.name, tuple(s.milestones), s.gamma, s.pct_start))


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


def train_plan(cfg: Any, epochs: Optional[int] = None, source: Optional[str] = None) -> TrainConfig:
    """The config's `train:` section over the builtin recipe of its model (or of `source`, a model that
    trains in its place, such as an extraction probe's thief), with `epochs` overriding both."""
    from pydantic import ValidationError

    from harness.core.errors import BadInput

    given = cfg.train.model_dump(exclude_unset=True) if cfg.train is not None else {}
    merged = _merge(builtin_recipe(source or cfg.model.source), given)
    if epochs is not None:
        merged["epochs"] = epochs
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput("train." + ".".join(str(p) for p in err["loc"]), err["msg"]) from None
