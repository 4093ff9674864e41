"""A bridge's health: the one owner of its state, the problems behind it, and who hears of changes.

This module owns ``Health``: the bridge's lifecycle as health sees it, the
problems by source (``"layer"``, a server, a channel), the servers still being
connected to for the first time, the state derived from those three, and the
listeners told of each change. The bridge (its lifecycle and its sends into the
layer) and its reconnectors report here; nothing else computes a state. It must
not know protocols, the reactor or the layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

HEALTH_STATES = ("starting", "connected", "degraded", "stopping", "stopped")


def describe(error: Any) -> str:
    """An error (or a Twisted Failure) in a few words, for a problem's reason or a log line."""
    if isinstance(error, Failure):
        error = error.value
    return str(error) or type(error).__name__


class Health:
    """One of ``HEALTH_STATES``, why, and since when (Unix time; it changes only with the state).

    ``set_lifecycle`` follows the bridge (new, starting, running, stopping,
    stopped); ``set_problem`` / ``clear_problem`` degrade it by source;
    ``connecting`` / ``connected`` keep it "starting" until a server was
    reached once. Every change calls each of ``listeners`` with ``as_dict()``.
    """

    def __init__(self, log: logging.Logger, label: str) -> None:
        self.log, self.label = log, label
        self.state, self.reason, self.since = "stopped", "not started", time.time()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.lifecycle = "new"
        self.problems: dict[str, str] = {}  # source -> reason, while degraded
        self.first_connects: set[str] = set()  # servers not connected to yet

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "since": self.since}

    def set_lifecycle(self, lifecycle: str, reason: str | None = None) -> None:
        self.lifecycle = lifecycle
        if lifecycle == "stopped":  # what was wrong or pending ended with the bridge
            self.problems.clear()
            self.first_connects.clear()
        self._refresh(reason)

    def set_problem(self, source: str, reason: str) -> None:
        if self.problems.get(source) != reason:
            self.problems[source] = reason
            self.log.warning("%s: %s: %s", self.label, source, reason)
            self._refresh()

    def clear_problem(self, source: str, note: str = "") -> None:
        """``note`` follows "SOURCE recovered" as it is: start it with a separator (" after ...", ": ...")."""
        if self.problems.pop(source, None) is not None:
            self.log.info("%s: %s recovered%s", self.label, source, note)
            self._refresh()

    def has_problem(self, source: str) -> bool:
        return source in self.problems

    def connecting(self, server: str) -> None:
        """``server`` is being connected to for the first time: the bridge is "starting" until it is reached."""
        self.first_connects.add(server)
        self._refresh()

    def connected(self, server: str) -> None:
        """``server`` was reached: it is neither pending nor a problem any more."""
        self.first_connects.discard(server)
        self.clear_problem(server)
        self._refresh()

    def forget(self, server: str) -> None:
        """Attempts to reach ``server`` stopped (the bridge is stopping): neither pending nor a problem."""
        self.first_connects.discard(server)
        self.problems.pop(server, None)

    def _refresh(self, reason: str | None = None) -> None:
        lifecycle = self.lifecycle
        if lifecycle in ("new", "stopped"):  # keeps its reason ("start failed: ...") unless given a new one
            state, reason = "stopped", reason or (self.reason if self.state == "stopped" else "")
        elif lifecycle == "stopping":
            state, reason = "stopping", "stop requested"
        elif self.problems:
            state, reason = "degraded", "; ".join(f"{source}: {why}" for source, why in self.problems.items())
        elif self.first_connects:
            state, reason = "starting", "connecting to " + ", ".join(sorted(self.first_connects))
        elif lifecycle == "starting":
            state, reason = "starting", "starting"
        else:
            state, reason = "connected", "running"
        if (state, reason) == (self.state, self.reason):
            return
        if state != self.state:
            self.since = time.time()
            if state != "degraded":  # set_problem() logged the degradation already
                self.log.info("%s is %s: %s", self.label, state, reason)
        self.state, self.reason = state, reason
        for listener in list(self.listeners):
            try:
                listener(self.as_dict())
            except Exception:
                self.log.exception("%s: a health listener failed", self.label)
