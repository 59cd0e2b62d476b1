"""YAML (or a dict) becomes a validated, frozen Config before any model or data is loaded.

Every error is a BadInput naming the file and the key path (``attacks[0].epsilons[1]``) and,
where there is a closed set, the choices that would have been valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from harness.config.base import EpsilonField, Strict, _reraise, _UnknownKey, plain_knobs
from harness.config.train import TrainConfig
from harness.core.errors import BadInput

__all__ = ["Config", "ModelConfig", "DataConfig", "AttackConfig", "DefenseConfig", "ProbeConfig", "CertificateConfig", "CorruptionConfig", "GateConfig", "load_config", "parse_config", "DEFAULT_CONFIG_PATH"]

DEFAULT_CONFIG_PATH = Path(__file__).parent.with_name("default.yaml")  # harness/default.yaml
BACKENDS = ("native", "foolbox", "art")


class Preprocessing(Strict):
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std must be positive")
        return v


class ModelConfig(Strict):
    source: str = "builtin:digits-cnn"
    weights: Optional[str] = None
    num_classes: Optional[int] = Field(default=None, ge=2)
    preprocessing: Preprocessing = Preprocessing()
    kwargs: dict[str, Any] = {}

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from harness.sources.models import check_source

        _reraise(check_source, v)
        return v


class DataConfig(Strict):
    source: str = "builtin:digits"
    split: Literal["train", "test"] = "test"
    limit: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=256, ge=1)
    image_size: Optional[Union[int, tuple[int, int]]] = None

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, v: Any) -> Any:
        def size(n: Any) -> bool:
            return isinstance(n, int) and not isinstance(n, bool) and n >= 1

        if v is None or size(v) or isinstance(v, (list, tuple)) and len(v) == 2 and all(size(n) for n in v):
            return v
        raise ValueError(f"must be a positive int or [height, width] of positive ints, got {v!r}")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        from harness.sources.data import check_source

        _reraise(check_source, v)
        return v


class _Knobs(Strict):
    """An entry whose keys beyond its own fields are the knobs of a registered thing (`params`)."""

    params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _split_params(cls, data: Any) -> Any:
        if isinstance(data, dict) and "params" not in data:
            return {**{k: v for k, v in data.items() if k in cls.model_fields},
                    "params": {k: v for k, v in data.items() if k not in cls.model_fields}}
        return data

    def _built(self, registry, what: str, also: tuple[str, ...] = ()):
        """The registered class named by `name`, made with `params` (epsilons translated to floats);
        ValueError listing the valid names."""
        from harness.attacks.config import validated

        if self.name not in registry:
            raise ValueError(f"unknown {what} {self.name!r} (valid: {', '.join(registry.names() + list(also)) or 'none'})")
        return validated(registry.get(self.name), plain_knobs(self.params, f"{what} {self.name!r}"), f"{what} {self.name!r}")


class AttackConfig(_Knobs):
    """One attack entry: the general keys here, the attack's own knobs in `params`.

    A bounded attack needs `epsilons`; a minimal-perturbation one (cw, deepfool) may leave them out
    and is then judged at every epsilon the suite uses for its norm.
    """

    name: str
    norm: Literal["linf", "l2"]
    epsilons: list[EpsilonField] = []
    backend: Literal["native", "foolbox", "art"] = "native"
    id: Optional[str] = None
    targeted: bool = False
    target: Literal["random", "least-likely"] = "random"

    @model_validator(mode="after")
    def _attack_exists(self) -> "AttackConfig":
        from harness.attacks import ATTACKS
        from harness.attacks.base import is_minimal, supports_target

        if self.backend == "native" and self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r} (valid: {', '.join(ATTACKS.names() + ['corruptions'])}; "
                             "a foolbox or ART class needs `backend: foolbox` or `backend: art`)")
        attack = self.build()  # validates the knobs now, before any model is loaded
        if not self.epsilons and not is_minimal(attack):
            raise ValueError(f"attack {self.name!r} needs `epsilons` (a list of budgets, e.g. [\"8/255\"])")
        if self.targeted and not supports_target(attack):
            raise ValueError(f"attack {self.name!r} has no targeted mode (remove `targeted`)")
        return self

    @property
    def attack_id(self) -> str:
        if self.id:
            return self.id
        return f"{self.name}-{self.norm}" + ("-targeted" if self.targeted else "") + ("" if self.backend == "native" else f"-{self.backend}")

    @property
    def minimal(self) -> bool:
        from harness.attacks.base import is_minimal

        return is_minimal(self.build())

    def build(self):
        """The attack value (native, or an adapter over foolbox/ART) with this entry's knobs."""
        from harness.attacks.config import build_attack

        return build_attack(self.name, self.norm, self.backend, self.params)


class DefenseConfig(_Knobs):
    """One `defenses:` entry: a registered defense (`harness list defenses`) and its knobs.

    Trained defenses (pgd-at, trades, fast-at) name the `weights` that `harness harden` wrote; a
    preprocessing defense is a wrapper evaluated naively and adaptively; a detector is judged by its
    detection rate at the false-positive rate `fpr`.
    """

    name: str
    id: Optional[str] = None
    weights: Optional[str] = None
    fpr: float = Field(default=0.05, gt=0, lt=1)
    eot: int = Field(default=8, ge=1)  # draws averaged per gradient in the adaptive run of a randomized preprocessing defense

    @model_validator(mode="after")
    def _defense_exists(self) -> "DefenseConfig":
        from harness.config.metric_ids import defense_kind

        kind = defense_kind(self.build())  # validates the name and knobs before any model loads
        if kind == "trained" and not self.weights:
            raise ValueError(f"defense {self.name!r} is a trained model: give the `weights` that "
                             f"`harness harden CONFIG --defense {self.name} --out WEIGHTS` wrote")
        if kind != "trained" and self.weights:
            raise ValueError(f"defense {self.name!r} takes no `weights` (only trained defenses do)")
        return self

    @property
    def defense_id(self) -> str:
        return self.id or self.name

    def build(self):
        from harness.defenses import DEFENSES

        return self._built(DEFENSES, "defense")


class ProbeConfig(_Knobs):
    """One `probes:` entry: a poisoning probe over `fractions` (badnets, clean-label, label-flip; with
    optional `scans` of what it planted), a scan on its own (activation-clustering,
    spectral-signatures of the training data; neural-cleanse of the model), or a privacy probe
    (membership-inference, extraction; harness.attacks.privacy). Run by harness.evaluation.probes."""

    name: str
    id: Optional[str] = None
    fractions: list[EpsilonField] = []
    scans: list[Literal["activation-clustering", "spectral-signatures", "neural-cleanse"]] = []

    @model_validator(mode="after")
    def _probe_exists(self) -> "ProbeConfig":
        from harness.attacks.privacy import PRIVACY
        from harness.attacks.scans import SCANS

        if self.name in PRIVACY:
            if self.fractions or self.scans:
                raise ValueError(f"{self.name!r} is a privacy probe: it takes no `fractions` or `scans`")
            thief = getattr(self.build(), "thief", None)
            if thief is not None:  # a model source, checked as model.source is, before anything loads
                from harness.sources.models import check_source

                try:
                    _reraise(check_source, thief)
                except ValueError as e:
                    raise ValueError(f"thief: {e}") from None
            return self
        if self.name in SCANS:
            if self.fractions or self.scans:
                raise ValueError(f"{self.name!r} scans the configured model or data: it takes no `fractions` or `scans`")
            return self
        self.build()  # the name and knobs, before any model loads
        if not self.fractions:
            raise ValueError(f"probe {self.name!r} needs `fractions` (poisoning fractions, e.g. [0.01, 0.05, 0.1])")
        bad = [f.label for f in self.fractions if not 0.0 <= f.value < 1.0]
        if bad:
            raise ValueError(f"poisoning fractions must be in [0, 1), got {', '.join(bad)}")
        return self

    @property
    def probe_id(self) -> str:
        return self.id or self.name

    def build(self):
        from harness.attacks.poisoning import PROBES
        from harness.attacks.privacy import PRIVACY
        from harness.attacks.scans import SCANS

        if self.name in PRIVACY:
            return self._built(PRIVACY, "probe")
        return self._built(PROBES, "probe", (*PRIVACY.names(), *SCANS))


class CertificateConfig(_Knobs):
    """One `certificates:` entry: `randomized-smoothing` (L2 `radii`; knobs sigma, n0, n, alpha, ...) or
    `interval-bounds` (L-inf `epsilons`; knob method), run by harness.evaluation.certificates on
    `limit` evenly spaced points of the evaluated data (all of them by default)."""

    name: str
    id: Optional[str] = None
    radii: list[EpsilonField] = []
    epsilons: list[EpsilonField] = []
    limit: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _certificate_exists(self) -> "CertificateConfig":
        cert = self.build()  # the name and knobs, before any model loads
        levels, other = ("radii", "epsilons") if cert.norm == "l2" else ("epsilons", "radii")
        if getattr(self, other):
            raise ValueError(f"{self.name!r} certifies {cert.norm.upper()} {levels}: it takes no `{other}`")
        if not getattr(self, levels):
            raise ValueError(f"{self.name!r} needs `{levels}` (the {cert.norm.upper()} budgets to certify, e.g. [0.25, 0.5])")
        bad = [e.label for e in getattr(self, levels) if not 0.0 <= e.value < float("inf")]
        if bad:
            raise ValueError(f"{levels} must be finite and non-negative, got {', '.join(bad)}")
        return self

    @property
    def levels(self) -> list:
        """The radii (smoothing) or epsilons (interval bounds) as Epsilon values."""
        return list(self.radii or self.epsilons)

    @property
    def certificate_id(self) -> str:
        return self.id or self.build().default_id

    def build(self):
        from harness.defenses import CERTIFICATES

        return self._built(CERTIFICATES, "certificate")


CORRUPTION_KINDS = ("gaussian-noise", "blur", "brightness", "contrast")


class CorruptionConfig(Strict):
    """Common corruptions as a baseline: no budget, one metric per kind and severity."""

    name: Literal["corruptions"]
    kinds: list[Literal["gaussian-noise", "blur", "brightness", "contrast"]] = list(CORRUPTION_KINDS)
    severities: list[Annotated[int, Field(ge=1, le=5)]] = [1, 2, 3, 4, 5]
    id: Optional[str] = None

    @property
    def attack_id(self) -> str:
        return self.id or "corruptions"


def _entry_kind(v: Any) -> str:
    name = v.get("name") if isinstance(v, dict) else getattr(v, "name", None)
    return "corruptions" if name == "corruptions" else "attack"


AttackEntry = Annotated[
    Union[Annotated[AttackConfig, Tag("attack")], Annotated[CorruptionConfig, Tag("corruptions")]],
    Discriminator(_entry_kind),
]


class GateConfig(Strict):
    metric: str
    # a NaN threshold compares false with everything, and an infinite one judges nothing: both refused
    min: Optional[float] = Field(default=None, allow_inf_nan=False)
    max: Optional[float] = Field(default=None, allow_inf_nan=False)
    max_drop: Optional[float] = Field(default=None, ge=0, allow_inf_nan=False)
    # max_drop only: the fraction of this run's sample ids the baseline must hold for a paired test
    min_overlap: Optional[float] = Field(default=None, gt=0, le=1)
    on_inconclusive: Optional[Literal["fail", "pass"]] = None  # None: the config's top-level `on_inconclusive`

    @model_validator(mode="after")
    def _one_bound(self) -> "GateConfig":
        given = [k for k in ("min", "max", "max_drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a gate needs exactly one of min, max, max_drop (got {', '.join(given) or 'none'})")
        if self.min_overlap is not None and self.max_drop is None:
            raise ValueError("min_overlap applies to max_drop gates only (it says how many samples a baseline must share)")
        return self


class EngineConfig(Strict):
    """`engine:` where the units run: `local` (threads over this process's devices) or `ray` (Ray
    actors on this machine or a cluster; harness.engines.cluster). Written as a name alone
    (`engine: ray`) or as a mapping. Like `device`, it is not part of what a resumed run must match."""

    name: Literal["local", "ray"] = "local"
    address: Optional[str] = None  # ray: "auto" or HOST:PORT of a running cluster; none starts a local Ray
    workers: Optional[int] = Field(default=None, ge=1)  # ray: actors [one per GPU, or per `threads` CPUs]
    gpus_per_worker: Optional[float] = Field(default=None, gt=0)  # ray: a fraction such as 0.5 shares a GPU
    threads: Optional[int] = Field(default=None, ge=1)  # ray: torch threads per worker [the driver's]

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _ray_only(self) -> "EngineConfig":
        given = [k for k in ("address", "workers", "gpus_per_worker", "threads") if getattr(self, k) is not None]
        if self.name == "local" and given:
            raise ValueError(f"{given[0]} applies to the ray engine only (engine: {{name: ray, {given[0]}: ...}}, or --engine ray)")
        return self


class TrackingConfig(Strict):
    """`tracking:` where a run is logged besides its output directory. `mlflow` is a tracking URI
    (`http://host:5000`, `sqlite:///mlflow.db`, `databricks`, ...; an empty string takes
    MLFLOW_TRACKING_URI, else MLflow's default); `harness run --mlflow [URI]` overrides it. Like
    `engine`, not part of what a resumed run must match (harness.reports.tracking)."""

    mlflow: Optional[str] = None
    experiment: str = "harness"
    run_name: Optional[str] = None  # None: the config's name

    @field_validator("experiment")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("experiment must be a non-empty name")
        return v


class Config(Strict):
    name: str = "suite"
    seed: int = 0
    device: Union[str, list[str]] = "auto"
    engine: EngineConfig = EngineConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    attacks: list[AttackEntry] = []
    cascade: bool = True  # within a norm and epsilon, later attacks run only on points still robust
    probes: list[ProbeConfig] = []
    defenses: list[DefenseConfig] = []
    certificates: list[CertificateConfig] = []
    gates: list[GateConfig] = []
    on_inconclusive: Literal["fail", "pass"] = "fail"  # a gate whose threshold lies inside its 95% interval
    train: Optional[TrainConfig] = None  # `harness harden`
    tracking: TrackingConfig = TrackingConfig()  # MLflow; like engine, not part of what a result depends on

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        from harness.engines.devices import parse_devices

        try:
            parse_devices(self.device)
        except BadInput as e:
            raise ValueError(str(e)) from None  # "device: ...", like the gate paths below
        ids = [a.attack_id for a in self.attacks]
        if sum(isinstance(a, CorruptionConfig) for a in self.attacks) > 1:
            raise ValueError("list all corruptions in one `corruptions` entry")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"attack id {dup[0]!r} is used twice: give one of them its own `id:`")
        cert_ids = [c.certificate_id for c in self.certificates]
        dup = sorted({i for i in cert_ids if cert_ids.count(i) > 1})
        if dup:
            raise ValueError(f"certificate id {dup[0]!r} is used twice: give one of them its own `id:`")
        clash = sorted(set(cert_ids) & ({d.defense_id for d in self.defenses} | {p.probe_id for p in self.probes}))
        if clash:  # clean_accuracy:<id> would mean two things
            raise ValueError(f"certificate id {clash[0]!r} is also a defense's or probe's id: give the certificate its own `id:`")
        valid = self.metric_ids()
        for i, gate in enumerate(self.gates):
            if gate.metric not in valid:
                raise ValueError(f"gates[{i}].metric: unknown metric {gate.metric!r} (valid: {', '.join(valid)})")
        endpoint = self.model.source.startswith(("http://", "https://"))
        for i, p in enumerate(self.probes):
            if p.name != "rate-limit":
                continue
            if not endpoint:
                raise ValueError(f"probes[{i}]: rate-limit probes an HTTP endpoint's throttling, but model.source "
                                 f"{self.model.source!r} is not an endpoint (http://... or https://...)")
            explicit, most = p.build().burst, rate_limit_gate_max(self, p.probe_id)
            if explicit is not None and most is not None and explicit <= most:
                raise ValueError(f"probes[{i}].burst: a burst of {explicit} requests cannot show an endpoint that never throttles "
                                 f"is above the gate's max {most:g}: send at least {int(most) + 1} (or leave burst out)")
        if endpoint:  # no gradients and no torch modules: said now, before anything loads
            from harness.sources.endpoint import EndpointModule

            try:
                refuse_white_box(self, EndpointModule.black_box_reason)
            except BadInput as e:
                raise ValueError(f"{e.where}: {e.problem}") from None
        return self

    def metric_ids(self) -> list[str]:
        """Every metric this suite produces, in a stable order."""
        from harness.config.metric_ids import suite_metric_ids

        return suite_metric_ids(self)


def rate_limit_gate_max(cfg: "Config", probe_id: str) -> Optional[float]:
    """The largest `max` of the gates on `throttled_after:<probe_id>`, or None."""
    from harness.core.ids import metric_id

    maxes = [g.max for g in cfg.gates if g.metric == metric_id("throttled_after", probe_id) and g.max is not None]
    return max(maxes) if maxes else None


def rate_limit_burst(cfg: "Config", entry: ProbeConfig) -> int:
    """The requests a rate-limit entry sends at most: its `burst`, else one more than the largest gate
    max on its metric (an endpoint that never throttles then fails the gate), else DEFAULT_BURST."""
    from harness.attacks.privacy import DEFAULT_BURST, MAX_BURST

    probe = entry.build()
    if probe.burst is not None:
        return int(probe.burst)
    most = rate_limit_gate_max(cfg, entry.probe_id)
    return DEFAULT_BURST if most is None else min(MAX_BURST, max(1, math.floor(most) + 1))


def refuse_white_box(cfg: "Config", reason: Optional[str]) -> None:
    """A model without gradients (an ONNX graph that did not convert, an HTTP endpoint: `reason` says
    why) runs only what needs none: black-box attacks, corruptions, and the probes whose
    `black_box_refusal()` finds nothing to refuse (the rate-limit probe; model extraction with a
    `thief` of its own). Anything else is bad input, said before any work."""
    from harness.attacks import ATTACKS
    from harness.attacks.base import access_of

    if reason is None:
        return
    runs = sorted(n for n, a in ATTACKS.items() if access_of(a) != "white-box") + ["corruptions"]
    why = f"{cfg.model.source} runs as a black box ({reason})"
    for i, a in enumerate(cfg.attacks):
        if not isinstance(a, CorruptionConfig) and access_of(a.build()) == "white-box":
            raise BadInput(f"attacks[{i}]", f"{a.attack_id} needs gradients, but {why}; attacks that can run: {', '.join(runs)}")
    for i, p in enumerate(cfg.probes):  # a probe that can run on a black box says so (black_box_refusal)
        refusal = getattr(p.build(), "black_box_refusal", None)
        if refusal is None:
            from harness.attacks.privacy import PRIVACY

            runs = ", ".join(n for n, c in PRIVACY.items() if hasattr(c, "black_box_refusal"))
            raise BadInput(f"probes[{i}]", f"{p.name} needs the model's torch modules, but {why}; probes that can run: {runs}")
        refused = refusal()
        if refused is not None:
            key, problem = refused
            raise BadInput(f"probes[{i}].{key}", f"{problem}; {why}")
    if cfg.defenses:
        raise BadInput("defenses[0]", f"defenses need the model's torch modules, but {why}")
    for i, c in enumerate(cfg.certificates):  # smoothing only queries, but its soundness check attacks with gradients
        what = "interval bounds follow the network's layers" if c.name == "interval-bounds" else \
            "randomized smoothing's soundness check attacks the smoothed classifier with gradients"
        raise BadInput(f"certificates[{i}]", f"{what}, but {why}")


def _loc(loc: tuple) -> str:
    out = ""
    prev: Any = None
    for part in loc:
        skip_tag = isinstance(prev, int) and part in ("attack", "corruptions")  # the entry kind pydantic adds
        prev = part
        if isinstance(part, int):
            out += f"[{part}]"
        elif skip_tag or part in ("function-after", "function-before") or str(part).startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_error(e: ValidationError) -> tuple[str, str]:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    loc = tuple(p for p in err["loc"] if p not in ("Epsilon", "[function-before]", "function-before[parse_epsilon(), Epsilon]"))
    if err["type"] == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    elif err["type"] == "missing":
        msg = "this key is required"
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, _UnknownKey):  # the validator runs on the mapping; point the path at the key itself
        loc = (*loc, cause.key)
    return _loc(tuple(p for p in loc if not str(p).startswith("function-"))), msg


def parse_config(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInput(source, f"the config must be a mapping of keys (name, model, data, attacks, gates, ...), got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        where, msg = _format_error(e)
        raise BadInput(f"{source}: {where}" if where else source, msg) from None


def load_config(path: Optional[Union[str, Path]] = None) -> tuple[Config, Path, bytes]:
    """Reads and validates a YAML config; returns it, the directory relative paths start from, and its bytes."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(str(path), "config file not found") from None
    except OSError as e:
        raise BadInput(str(path), f"cannot read the config ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = " ".join(str(getattr(e, "problem", None) or e).split())  # a reader error spans two lines
        raise BadInput(str(path), f"not valid YAML{where}: {detail}") from None
    base = Path.cwd() if path == DEFAULT_CONFIG_PATH else path.resolve().parent
    return parse_config(raw, str(path)), base, text
