"""The bridge base: ``Bridge``, what every protocol bridge shares, so each protocol package only translates.

This module owns a bridge's life on the reactor: start and graceful stop, the
one reply queue of a bridge and its demultiplexing to connections, sending into
the layer without losing anything at the edge, and the counters. Its neighbours
own the rest, and this module re-exports their names for bridge authors:
``reactor.py`` (installing the asyncio reactor, coroutines and Deferreds),
``options.py`` (declared options), ``health.py`` (the health state),
``reconnect.py`` (the ``Reconnector``), ``inlet.py`` (the ordered queue of
peers' messages into the layer) and ``registry.py`` (finding a bridge class by
type name). It must not know any protocol (``bridges/<protocol>/``), how a
layer stores messages (``layer/``), or how the application is configured and
run (``crossroads/``); it never closes the layer, which its caller owns.

Two rules for bridge code: never import ``twisted.internet.reactor`` at module
level (that installs Twisted's default reactor: call ``get_reactor()`` at run
time), and never block, because the layer, Twisted and every connection share
one asyncio loop. Everything async here is a coroutine on that loop;
``as_deferred`` and ``as_future`` cross between coroutines and Deferreds.

Theory of operation: ``start()`` makes the bridge's process queue
``{type}.{name}.{random}!`` and runs ONE receive loop on it; each reply's local
part names the connection or target it goes to. Replies for one local id are
handed over in the order received, even when a handler is async. ``stop()``
stops taking input, sends a wake-up message to the bridge's own queue (so every
reply queued before it is still delivered, and a Redis receive is never
cancelled mid-pop), waits for the handlers, then closes connections.
docs/bridges.md is the guide to writing a bridge on this base.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, ClassVar

from twisted.internet.defer import Deferred

from crossroads.bridges.health import HEALTH_STATES, Health, describe
from crossroads.bridges.inlet import Inlet
from crossroads.bridges.options import REQUIRED, Option, OptionError, validate_options
from crossroads.bridges.reactor import ReactorError, as_deferred, as_future, get_reactor, install_reactor
from crossroads.bridges.reconnect import Reconnector
from crossroads.bridges.registry import ENTRY_POINT_GROUP, BridgeTypeError, available_bridge_types, load_bridge_class
from crossroads.layer import ChannelFull, LayerError, LayerUnavailable
from crossroads.layer.base import backoff_delays

__all__ = [  # the bridge-author API, wherever each name lives
    "COUNTERS", "ENTRY_POINT_GROUP", "HEALTH_STATES", "LAYER_CALM", "REQUIRED", "Bridge", "BridgeTypeError",
    "Health", "Inlet", "Option", "OptionError", "ReactorError", "Reconnector", "as_deferred", "as_future",
    "available_bridge_types", "get_reactor", "install_reactor", "load_bridge_class",
]

COUNTERS = ("received", "sent", "refused", "replies", "unknown_replies", "dropped", "bad_input", "errors",
            "connects", "connect_failures")

_BRIDGE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$", re.ASCII)  # part of the reply queue's name
_LOCAL_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$", re.ASCII)  # the layer's rule for the part after '!'
_UNKNOWN_IDS_REMEMBERED = 1000  # bounds the "log each unknown local id once" memory
# Seconds the layer must take every message before its problem is cleared: a channel that fills and
# empties many times a second under a flood is one problem, logged once, not a line per batch.
LAYER_CALM = 1.0


# -- the bridge ----------------------------------------------------------------------------------------------


class Bridge:
    """Base class of every bridge. Subclasses set ``type_name`` and ``OPTIONS`` and implement the hooks.

    Hooks, all called on the loop: ``open_protocol()`` (listen or connect),
    ``stop_accepting()`` (take no new input), ``close_protocol()`` (close what
    is left), and ``handle_reply(local_id, message)``, which may return an
    awaitable or Deferred: later replies for that local id wait for it.
    """

    type_name: ClassVar[str] = "bridge"
    OPTIONS: ClassVar[dict[str, Option | tuple]] = {}  # name -> Option(type, default, help, check)
    reply_batch: ClassVar[int] = 100  # replies taken from the queue per receive

    def __init__(self, name: str, options: dict[str, Any], layer: Any) -> None:
        if not isinstance(name, str) or not _BRIDGE_NAME_RE.match(name):
            raise ValueError(f"bridge name {name!r}: use 1 to 40 letters, digits, '-' and '_'")
        self.name = name
        self.options = self.validate_options(options)
        self.layer = layer
        self.log = logging.getLogger(f"crossroads.bridges.{self.type_name}")
        self.label = f"{self.type_name} bridge {name!r}"  # starts every log line, so operators can grep one bridge
        self.targets: dict[str, Any] = {}  # local id -> connection or target; use register()/unregister()
        self.health_owner = Health(self.log, self.label)  # the one owner of the health state
        self.health_listeners: list[Callable[[dict[str, Any]], None]] = self.health_owner.listeners
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._lifecycle = "new"  # new, starting, running, stopping, stopped: set with _set_lifecycle()
        self._prefix: str | None = None
        self._last_id = 0
        self._stop_id = "stop." + secrets.token_hex(8)  # the local id of stop()'s wake-up message
        self._reply_task: asyncio.Task | None = None
        self._pending: dict[str, deque[dict]] = {}  # local id -> replies queued behind an async handler
        self._reply_tasks: set[asyncio.Task] = set()
        self._spawned: set[asyncio.Task] = set()
        self._unknown_logged: OrderedDict[str, None] = OrderedDict()
        self._reconnectors: list[Reconnector] = []
        self._backlogs: dict[str, deque] = {}  # channel -> events waiting for room, see send_to_layer_persistently
        self._refused_since_ok = 0
        self._last_refusal = self._last_stored = 0.0  # time.monotonic() of the layer's last refusal, last store
        self._calm_check: asyncio.TimerHandle | None = None
        self._stopping: asyncio.Future | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.health_owner.state}>"

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in and types checked; ``OptionError`` names the first bad key.

        The config's generic keys, ``type`` and ``enabled``, are accepted and left out.
        """
        return validate_options(cls.type_name, cls.OPTIONS, options)

    # -- hooks for subclasses --

    async def open_protocol(self) -> None:
        """Listen or connect; called by ``start()`` once replies can be received."""

    async def stop_accepting(self) -> None:
        """Take no new input (close listening ports, unsubscribe); may wait for requests in flight."""

    async def close_protocol(self) -> None:
        """Close every connection left; called after the replies in hand were delivered."""

    def handle_reply(self, local_id: str, message: dict) -> Awaitable[Any] | Deferred | None:
        """Deliver one reply to ``self.targets[local_id]``, in the peer's protocol."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle_reply(local_id, message)")

    # -- bridges that work together in one process --

    @classmethod
    def companions(cls, options: dict[str, Any]) -> list[str]:
        """Names of the bridges that must run in this bridge's process (a WebSocket bridge sharing its port)."""
        return []

    def attach_companions(self, bridges: dict[str, Bridge]) -> None:
        """Called before ``start()`` with every bridge of the process by name; find the companions here.

        Raise ``OptionError`` naming the option when a companion is missing or of the wrong type.
        """

    # -- lifecycle --

    async def start(self) -> None:
        """Make the reply queue, start receiving from it, then ``open_protocol()``. Once per Bridge object."""
        if self._lifecycle != "new":
            raise RuntimeError(f"{self.label} was started before; make a new bridge object to start again")
        self._set_lifecycle("starting")
        try:
            local = await self.layer.new_channel(f"{self.type_name}.{self.name}!")
            self._prefix = local.replace("!", ".") + "!"  # the layer's random part, moved in front of the '!'
            self._reply_task = asyncio.ensure_future(self._receive_replies())
            await self.open_protocol()
        except BaseException as exc:
            await self._halt_replies()
            self._set_lifecycle("stopped", f"start failed: {describe(exc)}")
            raise
        if self._lifecycle == "starting":  # not if stop() was called meanwhile
            self._set_lifecycle("running")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully within about ``timeout`` seconds; calling it again waits for the same stop.

        Order: reconnectors stop, ``stop_accepting()``, messages in flight to
        the layer finish, replies already queued are delivered and their
        handlers finish, ``close_protocol()``. A step that overruns is cut short
        and logged. The layer stays open: its owner closes it.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(timeout))
        await asyncio.shield(self._stopping)

    async def _stop(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        if self._lifecycle in ("new", "stopped"):  # never started, or its start failed: nothing to stop
            self._lifecycle = "stopped"
            return
        self._set_lifecycle("stopping")
        for reconnector in self._reconnectors:  # bounded too: a connect() that ignores its cancel must not hang us
            await self._within(reconnector.stop(), left(), f"stopping the reconnector of {reconnector.describe}")
        await self._within(self.stop_accepting(), left(), "stop_accepting()")
        if self._spawned:  # peer messages on their way into the layer: let them be stored or refused
            await asyncio.wait(set(self._spawned), timeout=left())
            for task in self._spawned:
                task.cancel()
        await self._drain_replies(left())
        await self._within(self.close_protocol(), max(left(), 1.0), "close_protocol()")
        if self._calm_check is not None:
            self._calm_check.cancel()
            self._calm_check = None
        self._set_lifecycle("stopped", "stopped on request")

    async def _within(self, awaitable: Awaitable[Any], timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(as_future(awaitable), timeout)
        except TimeoutError:
            self.log.warning("%s: %s did not finish within the stop timeout; carrying on without it", self.label, what)
        except Exception:
            self.count("errors")
            self.log.exception("%s: %s failed while stopping", self.label, what)

    async def _drain_replies(self, timeout: float) -> None:
        task = self._reply_task
        if task is None or task.done():
            return
        try:
            # Queued behind every reply already sent to us, so FIFO delivers those first.
            await self.layer.send(self.reply_channel(self._stop_id), {})
        except LayerError as exc:
            self.log.warning("%s: cannot wake the reply loop through the layer (%s); replies still queued are "
                             "dropped", self.label, describe(exc))
            await self._halt_replies()
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            self.log.warning("%s: replies were still being delivered at the stop timeout; the rest are dropped",
                             self.label)
            await self._halt_replies()

    async def _halt_replies(self) -> None:
        tasks = [t for t in (self._reply_task, *self._reply_tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- health and counters --

    @property
    def health(self) -> dict[str, Any]:
        """``{"state": ..., "reason": ..., "since": unix_time}``; state is one of ``HEALTH_STATES``."""
        return self.health_owner.as_dict()

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters; see docs/bridges.md for what each counts."""
        return dict(self._counters)

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def status(self) -> dict[str, Any]:
        """Everything ``crossroads status`` shows for this bridge."""
        return {"name": self.name, "type": self.type_name, "health": self.health, "counters": self.counters,
                "reply_queue": self._prefix, "targets": len(self.targets)}

    def set_problem(self, source: str, reason: str) -> None:
        """Mark the bridge degraded because of ``source`` (``"layer"``, a server...) until ``clear_problem``."""
        self.health_owner.set_problem(source, reason)

    def clear_problem(self, source: str, note: str = "") -> None:
        self.health_owner.clear_problem(source, note)

    def bad_input(self, peer: str, problem: str) -> None:
        """Count and log input a peer got wrong; the bridge answers the peer in its protocol itself."""
        self.count("bad_input")
        self.log.warning("%s: bad input from %s: %s", self.label, peer, problem)

    def _set_lifecycle(self, lifecycle: str, reason: str | None = None) -> None:
        self._lifecycle = lifecycle
        self.health_owner.set_lifecycle(lifecycle, reason)

    # -- into the layer --

    async def send_to_layer(self, channel: str, message: dict) -> bool:
        """Send a peer's message; False if the layer is full or down, and the bridge must refuse in its protocol.

        Sends made in one loop tick are stored in the order they were made.
        ``MessageTooLarge``, ``TypeError`` and ``InvalidChannelName`` propagate:
        retrying would not help, so the bridge tells the peer (or fixes itself).
        """
        try:
            await self.layer.send(channel, message)
        except (ChannelFull, LayerUnavailable) as exc:
            self._layer_took(channel, 0, 1, exc)
            return False
        self._layer_took(channel, 1, 0)
        return True

    async def send_many_to_layer(self, channel: str, messages: list[dict]) -> int:
        """Send peers' messages to one channel in one batch; return how many were stored: the first ones, in order.

        The rest were refused (the channel is full or the layer down) and the
        bridge must refuse them in its protocol. A layer that failed during the
        call may have stored some of those: a peer that repeats them can cause
        duplicates, as with ``send_to_layer``. ``MessageTooLarge``, ``TypeError``
        and ``InvalidChannelName`` propagate with nothing stored. One batch at a
        time keeps the order: concurrent batches may be stored in either order.
        """
        try:
            await self.layer.send_many([(channel, message) for message in messages])
        except ChannelFull as exc:
            refused = exc.refused_counts.get(channel, 0)
            self._layer_took(channel, len(messages) - refused, refused, exc)
            return len(messages) - refused
        except LayerUnavailable as exc:
            self._layer_took(channel, 0, len(messages), exc)
            return 0
        self._layer_took(channel, len(messages), 0)
        return len(messages)

    def _layer_took(self, channel: str, stored: int, refused: int, exc: Exception | None = None) -> None:
        """Count a send's outcome. The layer is this bridge's problem from its first refusal until it has
        taken every message for ``LAYER_CALM`` seconds (and taken at least one)."""
        now = time.monotonic()
        if stored:
            self.count("sent", stored)
            self._last_stored = now
        if refused:  # a batch the layer took in part is still refused in part: the problem stands
            self.count("refused", refused)
            self._refused_since_ok += refused
            self._last_refusal = now
            if isinstance(exc, ChannelFull):
                why = f"channel {channel!r} is full (are the workers keeping up?)"
            else:
                why = f"unavailable ({describe(exc)})"
            self.set_problem("layer", why + "; refusing peers' messages until it accepts them again")
        elif self.health_owner.has_problem("layer"):
            self._layer_calm()

    def _layer_calm(self) -> None:
        """Clear the layer problem if it has been calm long enough, or look again when it will have been."""
        if not self.health_owner.has_problem("layer") or self._last_stored <= self._last_refusal:
            return  # nothing stored since the last refusal: the next store looks again
        quiet = time.monotonic() - self._last_refusal
        if quiet >= LAYER_CALM:
            self.clear_problem("layer", f" after refusing {self._refused_since_ok} message(s)")
            self._refused_since_ok = 0
        elif self._calm_check is None:
            self._calm_check = asyncio.get_running_loop().call_later(LAYER_CALM - quiet, self._calm_checked)

    def _calm_checked(self) -> None:
        self._calm_check = None
        if self._lifecycle not in ("stopping", "stopped"):
            self._layer_calm()

    async def send_to_layer_persistently(self, channel: str, message: dict, within: float = 10.0) -> bool:
        """Send an event no peer can be asked to repeat (a disconnect), waiting for room in the channel.

        When many connections close at once, their disconnects find the channel
        full; giving up at once would leave consumers never hearing of them (and
        group memberships standing until they expire). So a refused event joins
        the bridge's backlog for that channel, and one task sends the backlog in
        order as the layer makes room: first come, first stored, none starved by
        the others' retries. Only when the layer took none of it for ``within``
        seconds is the backlog given up: False, each counted as ``dropped``, logged.
        """
        backlog = self._backlogs.get(channel)
        if backlog is None and await self.send_to_layer(channel, message):
            return True
        backlog = self._backlogs.get(channel)  # again: another event may have started one while we sent
        if backlog is None:
            backlog = self._backlogs[channel] = deque()
            self.spawn(self._send_backlog(channel, backlog), f"sending the backlog of {channel}")
        stored = asyncio.get_running_loop().create_future()
        backlog.append((message, stored, within))
        return await stored

    async def _send_backlog(self, channel: str, backlog: deque) -> None:
        delays = backoff_delays(0.01, 0.5)
        refused_since: float | None = None
        try:
            while backlog:
                message, stored, within = backlog[0]
                if stored.done():  # its sender was cancelled
                    backlog.popleft()
                elif await self.send_to_layer(channel, message):
                    backlog.popleft()
                    stored.set_result(True)
                    refused_since, delays = None, backoff_delays(0.01, 0.5)
                elif refused_since is not None and time.monotonic() - refused_since >= within:
                    dropped = [entry for entry in backlog if not entry[1].done()]
                    backlog.clear()
                    for _, waiting, _ in dropped:
                        waiting.set_result(False)
                    self.count("dropped", len(dropped))
                    self.log.warning("%s: the layer refused %s for %.0f s; %s", self.label, channel, within,
                                     "its consumer will not hear of it" if len(dropped) == 1 else
                                     f"{len(dropped)} events dropped, their consumers will not hear of them")
                else:
                    refused_since = refused_since or time.monotonic()
                    await asyncio.sleep(next(delays))
        finally:
            del self._backlogs[channel]
            for _, waiting, _ in backlog:  # cancelled (the bridge stopped): their senders learn it
                if not waiting.done():
                    waiting.cancel()

    def spawn(self, coroutine: Awaitable[Any], what: str = "a task") -> asyncio.Task:
        """Run a coroutine from a synchronous (Twisted) callback; its failure is logged and counted, and
        ``stop()`` lets it finish before draining replies."""
        task = asyncio.ensure_future(coroutine)
        self._spawned.add(task)
        task.add_done_callback(partial(self._spawned_done, what))
        return task

    def _spawned_done(self, what: str, task: asyncio.Task) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.count("errors")
            self.log.error("%s: %s failed", self.label, what, exc_info=task.exception())

    def reconnector(self, connect: Callable[[], Awaitable[Any] | Deferred], describe: str,
                    **options: Any) -> Reconnector:
        """A ``Reconnector`` this bridge stops when it stops; call its ``start()`` from ``open_protocol()``."""
        reconnector = Reconnector(self, connect, describe, **options)
        self._reconnectors.append(reconnector)
        return reconnector

    # -- replies --

    @property
    def prefix(self) -> str:
        """The bridge's process queue, ``{type}.{name}.{random}!``; every reply channel starts with it."""
        if self._prefix is None:
            raise RuntimeError(f"{self.label} has no reply queue before start()")
        return self._prefix

    def reply_channel(self, local_id: str) -> str:
        """The reply channel that reaches ``handle_reply(local_id, ...)``."""
        if not isinstance(local_id, str) or not _LOCAL_ID_RE.match(local_id):
            raise ValueError(f"local id {local_id!r}: use letters, digits, '-', '_' and '.'")
        channel = self.prefix + local_id
        if len(channel) >= 100:
            raise ValueError(f"reply channel {channel!r} is over the layer's 99 characters: shorten the local id")
        return channel

    def register(self, target: Any, local_id: str | None = None) -> str:
        """Route replies for ``local_id`` (a fresh one if None) to ``target``; returns the local id.

        Fresh ids are never reused, so a late reply to a closed connection
        cannot reach a newer one. Give a stable id for stable targets (an IRC
        channel, an MQTT topic) so their reply channel can sit in a Group.
        """
        if local_id is None:
            self._last_id += 1
            local_id = str(self._last_id)
        elif not _LOCAL_ID_RE.match(local_id) or local_id.startswith("stop."):
            raise ValueError(f"local id {local_id!r}: use letters, digits, '-', '_' and '.', not starting 'stop.'")
        self.targets[local_id] = target
        return local_id

    def unregister(self, local_id: str) -> Any:
        """Stop routing replies for ``local_id``; later ones count as ``unknown_replies``. Returns the target."""
        return self.targets.pop(local_id, None)

    async def receive_batches(self, channels: list[str], size: int, handle: Callable[[list[tuple[str, dict]]], Any],
                              source: str, timeout: float | None = None,
                              running: Callable[[], bool] = lambda: True) -> None:
        """Receive from ``channels``, up to ``size`` messages per round trip, handing each batch to ``handle``,
        until ``handle`` returns True or ``running()`` is false (checked between receives: give a ``timeout``
        so it is). The layer retries outages itself, so a receive that fails is unexpected, but must not end
        the loop: it is counted in ``errors`` and retried with backoff, the bridge degraded by ``source``.

        The reply queue is received this way; so are channels a bridge consumes, like MQTT's ``mqtt.publish``.
        """
        retry = None
        while running():
            try:
                batch = await self.layer.receive_many(channels, size, timeout=timeout)
            except Exception as exc:
                self.count("errors")
                retry = retry or backoff_delays(0.1, 5.0)
                delay = next(retry)
                self.set_problem(source, f"receiving from {', '.join(map(repr, channels))} failed ({exc!r}); "
                                         f"retrying in {delay:.2f} s")
                await asyncio.sleep(delay)
                continue
            if retry is not None:
                retry = None
                self.clear_problem(source)
            if handle(batch):
                return

    async def _receive_replies(self) -> None:
        prefix = self.prefix

        def deliver(batch: list[tuple[str, dict]]) -> bool:
            stopping = False
            for channel, message in batch:
                local_id = channel[len(prefix):]
                if local_id == self._stop_id:
                    stopping = True  # the rest of this batch is in hand too: deliver it
                else:
                    self._dispatch(local_id, message)
            return stopping

        await self.receive_batches([prefix], self.reply_batch, deliver, "replies")
        if self._reply_tasks:
            await asyncio.gather(*self._reply_tasks, return_exceptions=True)

    def _dispatch(self, local_id: str, message: dict) -> None:
        pending = self._pending.get(local_id)
        if pending is not None:  # an async handler for this id is still running: keep the order
            pending.append(message)
            return
        awaitable = self._call_handler(local_id, message)
        if awaitable is not None:
            self._pending[local_id] = deque()
            task = asyncio.ensure_future(self._finish_in_order(local_id, awaitable))
            self._reply_tasks.add(task)
            task.add_done_callback(self._reply_tasks.discard)

    def _call_handler(self, local_id: str, message: dict) -> Awaitable[Any] | None:
        """Hand one reply to ``handle_reply``; return what is left to await, if anything."""
        if local_id not in self.targets:
            self._unknown_reply(local_id)
            return None
        try:
            result = self.handle_reply(local_id, message)
        except Exception:
            self._reply_failed(local_id)
            return None
        if result is not None and (isinstance(result, Deferred) or inspect.isawaitable(result)):
            return result
        self.count("replies")
        return None

    async def _finish_in_order(self, local_id: str, awaitable: Awaitable[Any] | None) -> None:
        pending = self._pending[local_id]
        try:
            while awaitable is not None or pending:
                if awaitable is not None:
                    try:
                        await as_future(awaitable)
                    except asyncio.CancelledError:
                        self.count("dropped")  # cut short by stop(), like the replies still pending
                        raise
                    except Exception:
                        self._reply_failed(local_id)
                    else:
                        self.count("replies")
                awaitable = self._call_handler(local_id, pending.popleft()) if pending else None
        finally:
            del self._pending[local_id]
            if pending:  # cut short by stop()
                self.count("dropped", len(pending))

    def _unknown_reply(self, local_id: str) -> None:
        self.count("unknown_replies")
        self.count("dropped")
        if local_id in self._unknown_logged:
            return
        self._unknown_logged[local_id] = None
        if len(self._unknown_logged) > _UNKNOWN_IDS_REMEMBERED:
            self._unknown_logged.popitem(last=False)
        self.log.warning("%s: dropped a reply to %s%s: nothing is registered for it (its connection closed?); "
                         "further replies to it are counted, not logged", self.label, self.prefix, local_id)

    def _reply_failed(self, local_id: str) -> None:
        self.count("errors")
        self.count("dropped")
        self.log.exception("%s: handling a reply for local id %r failed", self.label, local_id)
