"""The reactor glue every bridge process shares: Twisted's asyncio reactor on one loop with the layer.

This module owns installing the asyncio reactor (``install_reactor``), finding
it at run time (``get_reactor``), routing Twisted's own log events to Python's
``logging``, and crossing between coroutines and Deferreds (``as_future``,
``as_deferred``). It must not know bridges, protocols or the layer.

The rule it exists for: never import ``twisted.internet.reactor`` at module
level (that installs Twisted's default reactor); call ``get_reactor()`` at run
time instead.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any

from twisted.internet.defer import Deferred


class ReactorError(RuntimeError):
    """No Twisted reactor is installed, or one other than the asyncio reactor is."""


def install_reactor(loop: asyncio.AbstractEventLoop | None = None, *, route_logs: bool = True) -> Any:
    """Install Twisted's asyncio reactor on ``loop`` (a new loop if None) and return it.

    Idempotent: when the asyncio reactor is already installed it is returned
    (``loop``, if given, must be the one it runs on). Raises ``ReactorError``
    when another reactor got there first. ``route_logs`` sends Twisted's own
    log events (unhandled errors in Deferreds, exceptions in protocols) to the
    ``twisted`` logger of the logging module, where the bridges log too.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = loop or asyncio.new_event_loop()
        asyncioreactor.install(loop)
        asyncio.set_event_loop(loop)  # for code that asks asyncio for "the" loop before the reactor runs
    reactor = get_reactor()
    if loop is not None and reactor._asyncioEventloop is not loop:
        raise ReactorError("the asyncio reactor is already installed on another event loop; pass that loop or none")
    if route_logs:
        _route_twisted_logs()
    return reactor


def get_reactor() -> Any:
    """The installed asyncio reactor; ``ReactorError`` if none is, or another kind is."""
    if "twisted.internet.reactor" not in sys.modules:
        raise ReactorError("no Twisted reactor is installed: call crossroads.bridges.base.install_reactor() first")
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        kind = f"{type(reactor).__module__}.{type(reactor).__name__}"
        raise ReactorError(
            f"Twisted's {kind} is installed, but bridges need its asyncio reactor (the layer's client runs on "
            "asyncio): something imported twisted.internet.reactor before "
            "crossroads.bridges.base.install_reactor() ran. "
            "Call install_reactor() first thing in the process."
        )
    return reactor


_twisted_logs_routed = False


def _route_twisted_logs() -> None:
    global _twisted_logs_routed
    if not _twisted_logs_routed:
        from twisted.logger import STDLibLogObserver, globalLogPublisher

        globalLogPublisher.addObserver(STDLibLogObserver(name="twisted"))
        _twisted_logs_routed = True


def as_future(awaitable: Awaitable[Any] | Deferred | None) -> asyncio.Future:
    """An asyncio future for a coroutine, a future, a Deferred (which asyncio cannot await itself) or None."""
    if isinstance(awaitable, Deferred):
        return awaitable.asFuture(asyncio.get_running_loop())
    if awaitable is None:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done
    return asyncio.ensure_future(awaitable)


def as_deferred(awaitable: Awaitable[Any] | Deferred) -> Deferred:
    """A Deferred for a coroutine, run as an asyncio task: how Twisted code calls ``start()`` or ``stop()``.

    (``Deferred.fromCoroutine`` would not do: it cannot await asyncio futures, which the layer's client uses.)
    """
    if isinstance(awaitable, Deferred):
        return awaitable
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))
