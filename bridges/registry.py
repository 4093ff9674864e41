"""Finding bridge classes: the ``crossroads.bridges`` entry-point group, and ``module:Class`` paths.

This module owns turning a config table's ``type`` into a ``Bridge`` subclass,
with errors that list the registered types and the closest match. It must not
know any bridge beyond the ``Bridge`` base it checks against.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crossroads.bridges.base import Bridge

ENTRY_POINT_GROUP = "crossroads.bridges"


class BridgeTypeError(ValueError):
    """A bridge type names nothing loadable, or something that is not a Bridge."""


def available_bridge_types() -> dict[str, str]:
    """Registered bridge types: name -> ``module:Class``, from the ``crossroads.bridges`` entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_bridge_class(type_name: str) -> type[Bridge]:
    """The Bridge class for a registered type name, or for a ``package.module:ClassName`` path."""
    if ":" in type_name:
        module_name, _, attribute = type_name.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise BridgeTypeError(f"bridge type {type_name!r}: cannot import {module_name!r} ({exc})") from exc
        for part in attribute.split("."):
            found = getattr(found, part, None)
        if found is None:
            raise BridgeTypeError(f"bridge type {type_name!r}: module {module_name!r} has no {attribute!r}")
    else:
        registered = list(entry_points(group=ENTRY_POINT_GROUP))
        values = sorted({ep.value for ep in registered if ep.name == type_name})
        if not values:
            names = sorted({ep.name for ep in registered})
            close = difflib.get_close_matches(type_name, names, 1)
            raise BridgeTypeError(
                f"unknown bridge type {type_name!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                + (f" Available types: {', '.join(names)}." if names else
                   f" No bridge types are registered in the {ENTRY_POINT_GROUP!r} entry point group: is crossroads "
                   "installed (pip install -e .)?")
                + " A bridge class that is not registered can be named as 'package.module:ClassName'."
            )
        if len(values) > 1:
            raise BridgeTypeError(f"bridge type {type_name!r} is registered by several packages ({', '.join(values)});"
                                  " name the one you want as 'package.module:ClassName'")
        try:
            found = next(ep for ep in registered if ep.name == type_name).load()
        except ImportError as exc:
            raise BridgeTypeError(f"bridge type {type_name!r} ({values[0]}) cannot be loaded: {exc}; "
                                  "is the package it needs installed?") from exc
    from crossroads.bridges.base import Bridge  # not at the top: base re-exports this module's names

    if not (isinstance(found, type) and issubclass(found, Bridge)):
        raise BridgeTypeError(f"bridge type {type_name!r} is {found!r}, "
                              "not a subclass of crossroads.bridges.base.Bridge")
    return found
