"""Signals sent around every consumer run, for metrics and per-message clean-up (database connections).

``consumer_started.connect(receiver)``; each receiver is called as
``receiver(message=..., consumer=...)`` (plus ``error=`` on ``consumer_finished``,
None when the consumer returned). A receiver that raises is logged and ignored:
it must not take the worker down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("crossroads.signals")


class Signal:
    def __init__(self, name: str) -> None:
        self.name = name
        # Replaced on connect/disconnect, never changed in place: a sender may read it to skip an empty send.
        self.receivers: list[Callable[..., Any]] = []
        self._lock = threading.Lock()

    def connect(self, receiver: Callable[..., Any]) -> Callable[..., Any]:
        """Add a receiver; usable as a decorator."""
        with self._lock:
            if receiver not in self.receivers:
                self.receivers = [*self.receivers, receiver]
        return receiver

    def disconnect(self, receiver: Callable[..., Any]) -> None:
        with self._lock:
            self.receivers = [r for r in self.receivers if r is not receiver]

    def send(self, **kwargs: Any) -> None:
        for receiver in self.receivers:  # a snapshot: connect/disconnect replace the list
            try:
                receiver(**kwargs)
            except Exception:
                log.exception("receiver %r of signal %s raised; ignored", receiver, self.name)


consumer_started = Signal("consumer_started")
consumer_finished = Signal("consumer_finished")
