"""The building blocks of the config schema: budgets as written ("8/255") and the strict model base."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.functional_serializers import PlainSerializer
from pydantic.functional_validators import BeforeValidator
from typing_extensions import Annotated

from harness.core.errors import BadInput

__all__ = ["Epsilon", "parse_epsilon", "EpsilonField", "Strict", "plain_knobs"]


@dataclass(frozen=True)
class Epsilon:
    """A budget as written in the config ("8/255", 0.1) and its value."""

    label: str
    value: float

    def __str__(self) -> str:
        return self.label


def parse_epsilon(v: Any) -> Epsilon:
    if isinstance(v, Epsilon):
        return v
    if isinstance(v, bool):
        raise ValueError(f"epsilon must be a number or a fraction like '8/255', got {v!r}")
    if isinstance(v, (int, float)):
        value, label = float(v), repr(v) if isinstance(v, float) else str(v)
    elif isinstance(v, str):
        text = v.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                value = float(num) / float(den)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"epsilon {v!r} does not parse: write a number or a fraction like '8/255'") from None
        label = "".join(text.split())
    else:
        raise ValueError(f"epsilon must be a number or a fraction like '8/255', got {type(v).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"epsilon {v!r} is not finite")
    if value < 0:
        raise ValueError(f"epsilon {v!r} is negative")
    return Epsilon(label, value)


# Serialized as written, so a dumped config parses back to the same labels and values.
EpsilonField = Annotated[Epsilon, BeforeValidator(parse_epsilon), PlainSerializer(lambda e: e.label, return_type=str)]


class _UnknownKey(ValueError):
    def __init__(self, key: Any, message: str) -> None:
        super().__init__(message)
        self.key = key


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise _UnknownKey(key, f"unknown key {key!r} (valid: {', '.join(cls.model_fields)})")
        elif data is not None and not isinstance(data, BaseModel):
            raise ValueError(f"expected a mapping with keys {', '.join(cls.model_fields)}, got {type(data).__name__}")
        return data


def _reraise(check, value) -> None:
    try:
        check(value)
    except BadInput as e:
        raise ValueError(e.problem) from None


def plain_knobs(params: dict[str, Any], what: str = "") -> dict[str, Any]:
    """A registered thing's knobs as the plain values attacks and defenses take: an `epsilon` written
    as a fraction ("8/255") becomes its float. ValueError (prefixed with `what`, e.g. "probe
    'clean-label'") on a budget that does not parse, is negative or is not finite."""
    v = params.get("epsilon")
    if isinstance(v, bool) or not isinstance(v, (str, int, float, Epsilon)):
        return dict(params)  # absent, or a type the thing's own validation names
    try:
        parsed = parse_epsilon(v)
    except ValueError as e:
        raise ValueError(f"{what}: {e}" if what else str(e)) from None
    return {**params, "epsilon": v if isinstance(v, (int, float)) else parsed.value}
