"""Routing: which consumer handles a message, by channel name and message fields.

``route("websocket.receive", consumer, path=r"^/chat/(?P<room>[^/]+)/$")`` matches
messages on that channel whose ``path`` matches the regex (``re.match``: anchored
at the start; add ``$`` to anchor the end). Named groups become keyword
arguments of the consumer. ``include(routes, path=r"^/chat")`` matches the prefix
and hands the rest of the value to its children, so an included routing table
does not repeat its mount point. The first route that matches wins.

Filters match str values; bytes values are decoded as UTF-8 (invalid bytes
never match), other types never match. A message without the filtered key
does not match that route.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from .exceptions import RouteError

Consumer = Callable[..., Any]
Match = tuple[Consumer, dict[str, Any]]


def _compile(filters: dict[str, str]) -> dict[str, re.Pattern]:
    compiled = {}
    for key, pattern in filters.items():
        if not isinstance(pattern, str):
            raise RouteError(f"filter {key}= must be a regex string, got {pattern!r}")
        try:
            compiled[key] = re.compile(pattern)
        except re.error as exc:
            raise RouteError(f"filter {key}={pattern!r} is not a valid regex: {exc}") from None
    return compiled


def _value(message: dict, key: str, rest: dict[str, str]) -> str | None:
    if key in rest:
        return rest[key]
    value = message.get(key)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class Route:
    """One channel (or several) to one consumer, with field filters."""

    def __init__(self, channels: str | Iterable[str], consumer: Consumer, **filters: str) -> None:
        self.channels = {channels} if isinstance(channels, str) else set(channels)
        if not self.channels:
            raise RouteError(f"route for {consumer!r} names no channel")
        if not callable(consumer):
            raise RouteError(f"route for {sorted(self.channels)} has a consumer that is not callable: {consumer!r}")
        self.consumer = consumer
        self.filters = _compile(filters)

    def match(self, channel: str, message: dict, rest: dict[str, str] | None = None) -> Match | None:
        if channel not in self.channels:
            return None
        kwargs: dict[str, Any] = {}
        for key, regex in self.filters.items():
            value = _value(message, key, rest or {})
            found = regex.match(value) if value is not None else None
            if found is None:
                return None
            kwargs.update(found.groupdict())
        return self.consumer, kwargs

    def __repr__(self) -> str:
        return f"route({sorted(self.channels)}, {getattr(self.consumer, '__qualname__', self.consumer)})"


def route(channels: str | Iterable[str], consumer: Consumer, **filters: str) -> Route:
    """Send messages on ``channels`` that match every filter to ``consumer``."""
    return Route(channels, consumer, **filters)


def route_class(consumer_class: type, **filters: str) -> Route:
    """Route every channel a class-based consumer declares (``consumer_class.channel_names()``)."""
    names = getattr(consumer_class, "channel_names", None)
    if names is None:
        raise RouteError(f"route_class needs a consumer class with channel_names(), got {consumer_class!r}")
    return Route(names(), consumer_class, **filters)


class Include:
    """A routing table mounted under prefix filters, which are stripped for its routes."""

    def __init__(self, routing: Any, **filters: str) -> None:
        self.router = Router(routing)
        self.filters = _compile(filters)
        self.channels = self.router.channels

    def match(self, channel: str, message: dict, rest: dict[str, str] | None = None) -> Match | None:
        if channel not in self.channels:
            return None
        rest = dict(rest or {})
        kwargs: dict[str, Any] = {}
        for key, regex in self.filters.items():
            value = _value(message, key, rest)
            found = regex.match(value) if value is not None else None
            if found is None:
                return None
            kwargs.update(found.groupdict())
            rest[key] = value[found.end():]
        matched = self.router.match(channel, message, rest)
        if matched is None:
            return None
        return matched[0], {**kwargs, **matched[1]}


def include(routing: Any, **filters: str) -> Include:
    """Mount another routing table (a list, a Router, or a dotted path to one) under prefix filters."""
    return Include(routing, **filters)


def import_object(path: str) -> Any:
    """Import ``module:attribute`` or ``module.attribute``."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise RouteError(f"{path!r} is not an import path: write 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RouteError(f"cannot import module {module_name!r} (from {path!r}): {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise RouteError(f"module {module_name!r} has no attribute {attribute!r} (from {path!r})") from None


class Router:
    """An ordered routing table; ``channels`` is every channel it consumes."""

    def __init__(self, routing: Any) -> None:
        if isinstance(routing, str):
            routing = import_object(routing)
        if isinstance(routing, Router):
            routing = routing.routes
        if isinstance(routing, (Route, Include)):
            routing = [routing]
        try:
            self.routes = list(routing)
        except TypeError:
            raise RouteError(f"a routing table is a list of route()/include(), got {routing!r}") from None
        for entry in self.routes:
            if not isinstance(entry, (Route, Include)):
                raise RouteError(f"routing entries must be route(), route_class() or include(), got {entry!r}")
        self.channels: set[str] = set().union(*(entry.channels for entry in self.routes)) if self.routes else set()
        # Channel -> consumer where the first entry naming the channel is a route without filters: it matches
        # every message there, so match() answers with a dict lookup (what nearly every worker routes), and so
        # does the dispatcher, without calling match(). Read-only after this.
        self.direct: dict[str, Consumer] = {}
        for channel in self.channels:
            first = next(entry for entry in self.routes if channel in entry.channels)
            if isinstance(first, Route) and not first.filters:
                self.direct[channel] = first.consumer

    def match(self, channel: str, message: dict, rest: dict[str, str] | None = None) -> Match | None:
        consumer = self.direct.get(channel)
        if consumer is not None:
            return consumer, {}
        for entry in self.routes:
            matched = entry.match(channel, message, rest)
            if matched is not None:
                return matched
        return None
