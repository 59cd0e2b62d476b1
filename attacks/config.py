"""Turns an attack entry of a config (name, norm, backend, knobs) into an attack value."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from .base import ATTACKS, attack_params

__all__ = ["build_attack"]


def _validated(cls: type, params: dict[str, Any], what: str):
    fields = attack_params(cls)
    for key in params:
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} for {what} (valid: {', '.join(fields) or 'none'})")
    try:
        return TypeAdapter(cls).validate_python(params)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{what} parameter {key!r}: {msg}" if key else f"{what}: {msg}") from None


def build_attack(name: str, norm: str, backend: str, params: dict[str, Any]):
    cls = ATTACKS.get(name)
    if norm not in cls.norms:
        raise ValueError(f"attack {name!r} does not support norm {norm!r} (valid: {', '.join(cls.norms)})")
    if backend == "native":
        return _validated(cls, params, f"attack {name!r}")
    from .adapters import ADAPTERS, require_installed

    require_installed(backend)  # a missing library is bad input, found before any work starts
    adapter = ADAPTERS.get(backend)
    return _validated(adapter, {"attack": name, **params}, f"{backend} attack {name!r}")
