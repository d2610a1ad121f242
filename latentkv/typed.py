"""Settings read strictly by type: a value from --set, a flag or a recipe is either plainly of its
field's type or refused with one clear error, never guessed (`shrink=banana` is not true)."""

from __future__ import annotations

import dataclasses
import types
import typing

from latentkv.errors import LatentKVError

TRUE_FALSE = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def as_type(value, kind):
    """`value` as `kind` (bool, int, float, str), strictly: anything that is not plainly one is refused
    (ValueError), never guessed (`shrink=banana` is not True, `1.5` is not an int)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_FALSE:
            return TRUE_FALSE[value.strip().lower()]
        raise ValueError("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        raise ValueError("a whole number")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError("a word")
    return value  # tuples, lists, dicts: left to the config's own checks


def first_match(value, kinds):
    """(value as the first of `kinds` it plainly is, None) or (None, what each kind wanted)."""
    wanted = []
    for kind in kinds:
        if kind in (dict, list):
            if isinstance(value, kind):
                return value, None
            wanted.append("a mapping" if kind is dict else "a list")
            continue
        try:
            return as_type(value, kind), None
        except ValueError as exc:
            wanted.append(str(exc))
    return None, wanted


def typed_settings(config_cls, options: dict, what: str) -> dict:
    """A method's settings (from --set, flags or a recipe) converted to its config's field types,
    each checked strictly, so a wrong value is one clear error before any work."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    out = {}
    for name, value in options.items():
        if name not in names:
            out[name] = value
            continue
        hint = hints.get(name)
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        if value is None and type(None) in kinds:
            out[name] = None
            continue
        converted, wanted = first_match(value, [k for k in kinds if k is not type(None)])
        if wanted is None:
            out[name] = converted
        else:
            allowed = " or ".join(wanted) + (" (or none)" if type(None) in kinds else "")
            raise LatentKVError(f"The {what} setting {name} must be {allowed}, got {value!r}; fix that value (--set {name}=..., "
                                "its flag, or the recipe)")
    return out


def check_types(values: dict, kinds: dict, where: str) -> dict:
    """Values of a settings file converted to the kinds of `kinds` (name -> type or tuple of types,
    None among them allowing none); names not in `kinds` are left to the caller."""
    out = dict(values)
    for name, value in values.items():
        allowed = kinds.get(name)
        if allowed is None:
            continue
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if value is None and None in allowed:
            continue
        converted, wanted = first_match(value, [k for k in allowed if k is not None])
        if wanted is None:
            out[name] = converted
        else:
            raise LatentKVError(f"{where}: {name} must be {' or '.join(wanted)}, got {value!r}")
    return out
