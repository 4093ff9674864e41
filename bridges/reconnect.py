"""Keeping a client bridge connected to its remote server, with backoff: the ``Reconnector``.

This module owns the attempts to reach one server (an MQTT broker, an IRC
server, Slack), the delays between them, and reporting each outcome to the
bridge's ``Health`` (under the server's ``describe`` as the problem's source)
and counters. It must not know the protocol spoken once connected, nor close a
connection: that is the bridge's ``close_protocol()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from crossroads.bridges.health import describe
from crossroads.bridges.reactor import as_future
from crossroads.layer.base import backoff_delays

if TYPE_CHECKING:
    from crossroads.bridges.base import Bridge


class Reconnector:
    """Keeps a client bridge connected to a remote server (an MQTT broker, an IRC server, Slack).

    ``connect()`` makes one attempt: it returns (a coroutine or a Deferred)
    once connected, or raises. Failures wait ``crossroads.layer.base.backoff_delays``
    (exponential, jittered, capped), each logged once with its delay, and mark
    the bridge degraded until an attempt succeeds. The bridge calls
    ``connection_lost(reason)`` when an established connection ends, and the
    attempts resume; a connection that lasted ``stable_after`` seconds (default:
    ``cap``) starts the delays afresh, one that dropped at once does not, so a
    flapping server is not hammered. ``sleep`` is replaceable for tests.
    Make one with ``Bridge.reconnector(...)``: ``Bridge.stop()`` then stops it.
    """

    def __init__(self, bridge: Bridge, connect: Callable[[], Awaitable[Any] | Deferred], describe: str, *,
                 initial: float = 0.5, cap: float = 30.0, stable_after: float | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.bridge = bridge  # counts and logs its attempts
        self.health = bridge.health_owner  # hears of every attempt's outcome
        self.connect = connect
        self.describe = describe  # names the server in logs and health, e.g. "broker 10.0.0.5:1883"
        self.initial, self.cap = initial, cap
        self.stable_after = cap if stable_after is None else stable_after
        self.connection: Any = None  # what the last successful connect() returned, while connected
        self.failures = 0  # consecutive failed attempts
        self._sleep = sleep
        self._lost = asyncio.Event()
        self._lost_reason: Any = None
        self._task: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None

    def start(self) -> None:
        if self._task is None:
            self.health.connecting(self.describe)
            self._task = asyncio.ensure_future(self._run())

    def connection_lost(self, reason: Any = None) -> None:
        """Call when the connection ends (from a protocol's ``connectionLost``): reconnecting starts."""
        self.connection = None
        self._lost_reason = reason
        self._lost.set()

    async def stop(self) -> None:
        """Stop attempting (an attempt in progress is cancelled); closing ``connection`` is the bridge's job."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.health.forget(self.describe)  # given up, not recovered: stop() reports the state

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delays = backoff_delays(self.initial, self.cap)
        me = asyncio.current_task()
        while self._task is me:  # stop() clears _task before it cancels us
            self._lost.clear()  # before the attempt: a connection may be lost before connect() returns
            try:
                connection = await as_future(self.connect())
            except Exception as exc:
                if self._task is not me:  # stopped: connect() turned our cancel into an error, do not retry
                    return
                self.failures += 1
                self.bridge.count("connect_failures")
                delay = next(delays)
                self.health.set_problem(self.describe, f"cannot connect ({describe(exc)}); attempt {self.failures} "
                                                       f"failed, retrying in {delay:.2f} s")
                await self._sleep(delay)
                continue
            self.connection, connected_at = connection, loop.time()
            if self._task is not me:
                # stop() cancelled the attempt as it completed, and connect() returned anyway (Python 3.11's
                # asyncio.wait_for does that when the future it waits on is already done). Stop here, or
                # stop() waits for us forever: the bridge closes the connection, as for any connection.
                return
            self.bridge.count("connects")
            self.bridge.log.info("%s: connected to %s after %d failed attempt(s)", self.bridge.label, self.describe,
                                 self.failures)
            self.failures = 0
            self.health.connected(self.describe)  # "starting" -> "connected" after a first attempt, too
            await self._lost.wait()
            self.connection = None
            if loop.time() - connected_at >= self.stable_after:
                delays = backoff_delays(self.initial, self.cap)
            delay = next(delays)
            self.health.set_problem(self.describe, f"connection lost ({describe(self._lost_reason)}); "
                                                   f"reconnecting in {delay:.2f} s")
            await self._sleep(delay)
