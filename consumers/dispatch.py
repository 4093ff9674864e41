"""Deliver one message to its consumer: route it, run it, flush what it sent, handle what it raised.

The worker and the test ``Client`` both run messages through a ``Dispatcher``,
so what a user tests is what production runs. It must not receive from the
layer or own threads: that is the worker's job.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from crossroads.layer import base

from . import channel as channel_module
from .channel import HeldSends, flush, held_sends
from .exceptions import ConsumeLater, DenyConnection
from .message import Message
from .routing import Router
from .signals import consumer_finished, consumer_started

log = logging.getLogger("crossroads.worker")

MAX_CONSUME_LATER = 10  # requeues of one message before it is dropped
RETRIES_KEY = "__consume_later"  # how many times ConsumeLater requeued this message
# A peer behind these channels waits for an answer: a message no route matches gets this one at once, not the
# bridge's timeout (a browser asks every site for /favicon.ico; a 504 after 60 s helps nobody).
UNROUTED_ANSWERS = {
    "http.request": ({"status": 404, "text": "Not Found: no route matches this path\n"}, "answered 404"),
    "websocket.connect": ({"accept": False}, "rejected (403)"),
}


# Upper bounds (seconds) of the consumer duration histogram's buckets, Prometheus' own defaults but finer below
# 5 ms, where a quick consumer lives; the last bucket, +Inf, is implied.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ConsumerStats:
    """One (channel, consumer) pair's runs: how many, how long in all, and how many ended in each bucket."""

    __slots__ = ("channel", "consumer", "count", "seconds", "buckets")

    def __init__(self, channel: str, consumer: str) -> None:
        self.channel = channel
        self.consumer = consumer
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # not cumulative; the last is over the top bound

    def add(self, elapsed: float) -> None:
        self.count += 1
        self.seconds += elapsed
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, elapsed)] += 1


@dataclass
class DispatchCounters:
    consumed: int = 0
    errors: int = 0
    unrouted: int = 0
    requeued: int = 0
    gave_up: int = 0  # messages dropped after MAX_CONSUME_LATER requeues
    undelivered: int = 0  # buffered sends lost to a full channel or an unreachable layer
    slow: int = 0  # consumers the worker's watchdog reported running past [worker] slow_consumer
    invalid: int = 0  # messages dropped unrun: their reply_channel is not a channel name
    unrouted_channels: set[str] = field(default_factory=set)
    invalid_channels: set[str] = field(default_factory=set)  # channels an invalid message came on (logged once)
    # (channel, consumer) -> its runs; read by the metrics endpoint. Counted from several threads without a
    # lock, as the fields above: an increment lost to a race undercounts by one, never runs a counter back.
    by_consumer: dict[tuple[str, Any], ConsumerStats] = field(default_factory=dict)


def consumer_name(consumer: Any) -> str:
    return f"{getattr(consumer, '__module__', '?')}.{getattr(consumer, '__qualname__', repr(consumer))}"


class Dispatcher:
    """Runs messages through ``router`` on ``channel_layer`` (a layer from ``layer.from_url``)."""

    def __init__(self, router: Any, channel_layer: Any) -> None:
        self.router = router if isinstance(router, Router) else Router(router)
        self.layer = channel_layer
        self.sync = getattr(channel_layer, "sync", channel_layer)
        self.counters = DispatchCounters()
        self._async: dict[Any, bool] = {}  # consumer -> is it ``async def``: asked once, not per message

    def prepare(self, channel: str, content: dict) -> tuple[Any, dict, Message, int] | None:
        """Route a message: (consumer, kwargs, message, retries), or None when no route matches."""
        retries = content.pop(RETRIES_KEY, 0)
        consumer = self.router.direct.get(channel)  # the usual route (Router.direct): a lookup, not a call
        if consumer is not None:
            try:
                return consumer, {}, Message(content, channel, self.layer), retries
            except base.InvalidChannelName as exc:
                return self._invalid(channel, exc)
        matched = self.router.match(channel, content)
        if matched is None:
            self.counters.unrouted += 1
            answer, answered = UNROUTED_ANSWERS.get(channel, (None, ""))
            if answer is not None and isinstance(content.get("reply_channel"), str):
                self._answer_unrouted(channel, content["reply_channel"], answer)
            if channel not in self.counters.unrouted_channels:  # once per channel, not per message
                self.counters.unrouted_channels.add(channel)
                log.warning("no route matches a message on %s (%skeys: %s)%s; unrouted messages on it are counted, "
                            "not logged again", channel, f"path {content['path']!r}, " if "path" in content else "",
                            ", ".join(sorted(content)) or "none", f", {answered}" if answered else "")
            return None
        consumer, kwargs = matched
        try:
            return consumer, kwargs, Message(content, channel, self.layer), retries
        except base.InvalidChannelName as exc:
            return self._invalid(channel, exc)

    def _invalid(self, channel: str, exc: base.InvalidChannelName) -> None:
        """A message whose reply_channel no reply could reach (a hostile or broken sender): dropped unrun, counted,
        logged once per channel, so that the thread that took it goes on with the rest of its batch."""
        self.counters.invalid += 1
        if channel not in self.counters.invalid_channels:
            self.counters.invalid_channels.add(channel)
            log.warning("dropped a message on %s without running its consumer: its reply_channel is not a channel "
                        "(%s); later ones on it are counted (invalid), not logged", channel, exc)
        return None

    def _answer_unrouted(self, channel: str, reply_channel: str, answer: dict) -> None:
        try:
            self.sync.send(reply_channel, dict(answer))
        except (base.ChannelFull, base.LayerUnavailable) as exc:  # the bridge's own timeout answers instead
            self.counters.undelivered += 1
            log.warning("could not answer an unrouted message on %s: %s", channel, exc)

    def is_async(self, consumer: Any) -> bool:
        try:
            known = self._async.get(consumer)
        except TypeError:  # an unhashable callable: ask every time
            return inspect.iscoroutinefunction(consumer)
        if known is None:
            known = self._async[consumer] = inspect.iscoroutinefunction(consumer)
        return known

    def handle(self, channel: str, content: dict) -> None:
        """Route and run a message here, in this thread."""
        prepared = self.prepare(channel, content)
        if prepared is not None:
            self.run(*prepared)

    def run(self, consumer: Any, kwargs: dict, message: Message, retries: int) -> float:
        """Run a prepared consumer in this thread; an ``async def`` one on a loop of its own. Returns the seconds
        it ran (the worker's measure of a quick consumer, so it reads no clock of its own)."""
        consuming = _Consuming(self, consumer, message, retries)
        with consuming:
            result = consumer(message, **kwargs) if kwargs else consumer(message)  # most routes capture nothing
            if result is not None and inspect.isawaitable(result):
                asyncio.run(_await(result))
        return consuming.elapsed

    async def handle_async(self, consumer: Any, kwargs: dict, message: Message, retries: int) -> None:
        """Run a prepared ``async def`` consumer on the running loop."""
        with _Consuming(self, consumer, message, retries):
            await consumer(message, **kwargs)

    def holding(self) -> _Holding:
        """Around a batch of messages run in this thread (``with``): their buffered sends leave together when the
        batch is done (one ``send_many`` per run of channel sends), or earlier, before anything sent at once."""
        return _Holding(self)

    def consuming(self, consumer: Any, message: Message, retries: int) -> _Consuming:
        """Around one consumer run (``with``): the send buffer, the signals, and every exception it may raise."""
        return _Consuming(self, consumer, message, retries)

    def _stats(self, channel: str, consumer: Any) -> ConsumerStats:
        """The runs of (channel, consumer), counted from the first; an unhashable callable's under its name."""
        try:
            return self.counters.by_consumer.setdefault((channel, consumer),
                                                        ConsumerStats(channel, consumer_name(consumer)))
        except TypeError:
            name = consumer_name(consumer)
            return self.counters.by_consumer.setdefault((channel, name), ConsumerStats(channel, name))

    def _consume_later(self, message: Message, name: str, retries: int) -> None:
        if retries >= MAX_CONSUME_LATER:
            self.counters.gave_up += 1
            log.error("consumer %s raised ConsumeLater %d times on %s; message dropped", name, retries + 1,
                      message.channel.name)
            return
        try:
            self.sync.send(message.channel.name, {**message.content, RETRIES_KEY: retries + 1})
            self.counters.requeued += 1
        except (base.ChannelFull, base.LayerUnavailable) as exc:
            self.counters.gave_up += 1
            log.error("consumer %s raised ConsumeLater on %s but the message could not be requeued: %s",
                      name, message.channel.name, exc)


async def _await(awaitable: Any) -> Any:
    return await awaitable


class _Holding:
    """What ``Dispatcher.holding`` returns (a class: no generator per batch)."""

    __slots__ = ("dispatcher", "held", "token", "layer_token")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def __enter__(self) -> None:
        self.held = HeldSends(self.dispatcher.sync)
        self.token = held_sends.set(self.held)
        # The batch's consumers find their layer set already: _Consuming sets it only when it differs.
        self.layer_token = channel_module.current_layer.set(self.dispatcher.layer)

    def __exit__(self, *exc_info: object) -> None:
        channel_module.current_layer.reset(self.layer_token)
        held_sends.reset(self.token)
        try:
            self.held.release()
        finally:
            self.dispatcher.counters.undelivered += self.held.lost


class _Consuming:
    """What ``Dispatcher.consuming`` returns: a class rather than a generator-based context manager, which costs
    a generator and two extra calls per message. Entering opens the send buffer and sends ``consumer_started``;
    leaving counts the run, flushes (or holds) what it sent, and sends ``consumer_finished``. ``ConsumeLater``,
    ``DenyConnection`` and any other ``Exception`` end here; ``BaseException`` (interrupts, a cancelled task)
    still passes through, after the buffer is flushed."""

    __slots__ = ("dispatcher", "consumer", "message", "retries", "buffer", "layer_token", "buffer_token", "started",
                 "elapsed")

    def __init__(self, dispatcher: Dispatcher, consumer: Any, message: Message, retries: int) -> None:
        self.dispatcher = dispatcher
        self.consumer = consumer
        self.message = message
        self.retries = retries

    def __enter__(self) -> None:
        self.buffer: list = []
        layer = self.dispatcher.layer
        current_layer = channel_module.current_layer
        self.layer_token = None if current_layer.get() is layer else current_layer.set(layer)
        self.buffer_token = channel_module.send_buffer.set(self.buffer)
        if consumer_started.receivers:  # most workers connect none: skip the call and its keyword arguments
            consumer_started.send(message=self.message, consumer=self.consumer)
        self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> bool:
        dispatcher, consumer, message, buffer = self.dispatcher, self.consumer, self.message, self.buffer
        counters = dispatcher.counters
        error: BaseException | None = None
        handled = True
        try:
            if kind is None:
                counters.consumed += 1
            elif issubclass(kind, ConsumeLater):
                dispatcher._consume_later(message, consumer_name(consumer), self.retries)
            elif issubclass(kind, DenyConnection):
                counters.consumed += 1
                if message.reply_channel is not None:
                    buffer.append(("send", message.reply_channel.name, {"close": True}))
            elif issubclass(kind, Exception):
                error = exc
                counters.errors += 1
                log.error("consumer %s raised on a message on %s; the worker carries on", consumer_name(consumer),
                          message.channel.name, exc_info=exc)
            else:
                handled = False  # an interrupt or a cancellation: it goes on up, once the run is wound up
        finally:
            self.elapsed = elapsed = time.perf_counter() - self.started
            channel = message._channel_name  # not message.channel: that Channel is built only if something reads it
            try:  # the lookup here, not in a method: a call less per message
                stats = counters.by_consumer[(channel, consumer)]
            except (KeyError, TypeError):
                stats = dispatcher._stats(channel, consumer)
            stats.add(elapsed)
            channel_module.send_buffer.reset(self.buffer_token)
            if self.layer_token is not None:
                channel_module.current_layer.reset(self.layer_token)
            if buffer:  # this run names the sender in a failed send's log line (see __str__)
                held = held_sends.get()
                if held is not None:
                    held.add(buffer, self)
                else:
                    counters.undelivered += flush(buffer, dispatcher.sync, self)
            if consumer_finished.receivers:
                consumer_finished.send(message=message, consumer=consumer, error=error)
        return handled

    def __str__(self) -> str:
        """The consumer that buffered some sends, for the log line of one that fails: formatted only then, so a run
        is its own sender's name and no object is made per message for it."""
        return f"consumer {consumer_name(self.consumer)} on {self.message._channel_name}"
