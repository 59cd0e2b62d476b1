"""Turns an attack entry of a config (name, norm, backend, knobs) into an attack value."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from .base import ATTACKS, attack_params

__all__ = ["build_attack", "validated"]


def validated(cls: type, params: dict[str, Any], what: str):
    """An instance of the dataclass `cls` from config knobs; ValueError naming `what` and the valid knobs."""
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
    """A native attack, a native name run by a library (``backend: foolbox|art``), or, with a backend,
    a library's attack class by name. Imports a library only when the entry names its backend."""
    if backend != "native":
        from .adapters import ADAPTERS, library_attack, require_installed

        require_installed(backend)  # a missing library is bad input, found before any work starts
        if name not in ATTACKS:
            attack = library_attack(backend, name, params)
            if norm not in attack.norms:
                works = f"works in the {' and '.join(attack.norms)} norm, not {norm!r}" if attack.norms else "measures neither linf nor l2"
                raise ValueError(f"{backend} attack {name!r} {works}")
            return attack
    if name not in ATTACKS:
        hint = "; a foolbox or ART class name needs `backend: foolbox` or `backend: art`" if name[:1].isupper() else ""
        raise ValueError(f"unknown attack {name!r} (valid: {', '.join(ATTACKS.names())}{hint})")
    cls = ATTACKS.get(name)
    if norm not in cls.norms:
        raise ValueError(f"attack {name!r} does not support norm {norm!r} (valid: {', '.join(cls.norms)})")
    if backend == "native":
        return validated(cls, params, f"attack {name!r}")
    return validated(ADAPTERS.get(backend), {"attack": name, **params}, f"{backend} attack {name!r}")
