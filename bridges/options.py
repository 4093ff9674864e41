"""Declared bridge options: ``Option``, ``REQUIRED``, ``OptionError``, and reading values from text.

This module owns what a bridge's ``OPTIONS`` declare and how a config table's
values are checked against them (``validate_options``): types in the config
file's own words, defaults copied per bridge, numbers and booleans read from
``${...}`` text, unknown keys with the closest known one. It must not know any
bridge, the reactor or the layer.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """A bridge option is missing, unknown or wrong; ``key`` names it, the message says what to do."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of an option that has none

# Words from the TOML config's point of view, since that is where users write options.
_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
               dict: "a table"}


# Booleans in text, spelled as systemd (and crossroads/config.py for its own keys) accept them.
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


@dataclass(frozen=True)
class Option:
    """One declared option: its type(s), default (``REQUIRED`` if none), help, and an optional ``check``.

    ``check(value)`` returns a problem ("must be between 1 and 65535") or None.
    ``from_string`` also accepts a number or boolean as text, which is what
    ``${...}`` interpolation in the config file produces (``port = "${PORT}"``).
    """

    type: type | tuple[type, ...]
    default: Any = REQUIRED
    help: str = ""
    check: Callable[[Any], str | None] | None = None
    from_string: bool = False

    def normalize(self, key: str, value: Any) -> Any:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if value is None and self.default is None:
            return None
        if self.from_string and isinstance(value, str) and str not in types:
            value = _from_text(value.strip(), types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)
            got = _TYPE_WORDS.get(type(value), type(value).__name__)
            quoted = isinstance(value, str) and not self.from_string and {int, float, bool} & set(types)
            hint = ": write it without quotes" if quoted else ""
            raise OptionError(key, f"must be {wanted}, not {value!r} ({got}){hint}")
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise OptionError(key, f"{problem} (got {value!r})")
        return value


def _from_text(text: str, types: tuple[type, ...]) -> Any:
    """The value a text holds for one of ``types``, or the text itself when it holds none."""
    for kind in types:
        if kind is bool and text.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.lower()]
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def as_option(spec: Option | tuple) -> Option:
    """An ``Option``, from itself or from the plain tuple ``(type, default, help, ...)``."""
    return spec if isinstance(spec, Option) else Option(*spec)


def validate_options(type_name: str, declared_options: dict[str, Option | tuple],
                     options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with defaults filled in and types checked against ``declared_options``; ``OptionError``
    names the first bad key. The config's generic keys, ``type`` and ``enabled``, are accepted and left out."""
    if not isinstance(options, dict):
        raise TypeError(f"{type_name} bridge options must be a dict, not {type(options).__name__}")
    declared = {key: as_option(spec) for key, spec in declared_options.items()}
    for key in options:
        if key not in ("type", "enabled") and key not in declared:
            close = difflib.get_close_matches(str(key), declared, 1)
            raise OptionError(key, f"unknown option for {type_name} bridges"
                                   + (f"; did you mean {close[0]!r}?" if close else "")
                                   + f" Known options: {', '.join(sorted(declared)) or 'none'}")
    result = {}
    for key, option in declared.items():
        if key in options:
            result[key] = option.normalize(key, options[key])
        elif option.default is REQUIRED:
            raise OptionError(key, f"is required by {type_name} bridges: add `{key} = ...` to the "
                                   f"bridge's table ({option.help or 'no help given'})")
        else:
            result[key] = copy.deepcopy(option.default)  # a list default must not be shared between bridges
    return result
