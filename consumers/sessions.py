"""Channel sessions and ordering: the only state a consumer keeps between messages.

A channel session is a dict tied to a reply channel (one WebSocket, one MQTT
topic, one IRC channel), loaded before the consumer runs and saved after it,
when changed. It lives beside the layer: in process for ``memory://``, as a
Redis hash with expiry for ``redis://`` (on the shard of the reply channel).
Values must be what a message may hold (msgpack types).

``@enforce_ordering`` runs a connection's messages in their ``order`` even
when several workers take them out of order: a message that is early waits on
a private channel and is replayed when its turn comes (as Channels 1.x did).
``@enforce_ordering(slight=True)`` only holds messages back until the connect
(order 0) has run, as Channels 1.x's slight ordering did.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from crossroads.layer import base

from .channel import Channel, flush, send_buffer

log = logging.getLogger("crossroads.consumers")

SESSION_EXPIRY = 86400  # seconds a session outlives the last save
NEXT_ORDER_KEY = "__next_order"


class Session(dict):
    """A session's data; ``modified`` compares it with what was loaded."""

    def __init__(self, key: str, data: dict) -> None:
        super().__init__(data)
        self.key = key
        self._loaded = base.pack(dict(data))

    @property
    def modified(self) -> bool:
        return base.pack(dict(self)) != self._loaded

    def mark_saved(self) -> None:
        self._loaded = base.pack(dict(self))


class MemorySessionStore:
    def __init__(self, expiry: float = SESSION_EXPIRY) -> None:
        self.expiry = expiry
        self._data: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def load(self, key: str) -> Session:
        with self._lock:
            found = self._data.get(key)
        if found is None or found[0] < time.time():
            return Session(key, {})
        return Session(key, base.unpack(found[1]))

    def save(self, session: Session) -> None:
        with self._lock:
            if session:
                self._data[session.key] = (time.time() + self.expiry, base.pack(dict(session)))
            else:
                self._data.pop(session.key, None)
        session.mark_saved()


class RedisSessionStore:
    """One hash per session, field -> msgpack value, replaced atomically on save."""

    def __init__(self, redis_layer: Any, expiry: float = SESSION_EXPIRY) -> None:
        self.sync = redis_layer.sync
        self.prefix = f"{redis_layer.options.prefix}:s:"
        self.expiry = int(expiry)

    def load(self, key: str) -> Session:
        (fields,) = self.sync.execute_beside(key, [("HGETALL", self.prefix + key)])
        pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
        return Session(key, {name.decode(): base.unpack(value)["v"] for name, value in pairs})

    def save(self, session: Session) -> None:
        redis_key = self.prefix + session.key
        commands: list[tuple] = [("MULTI",), ("DEL", redis_key)]
        if session:
            # each value packed alone (wrapped: a message body must be a dict)
            values = [part for name, value in session.items() for part in (name, base.pack({"v": value}))]
            commands += [("HSET", redis_key, *values), ("EXPIRE", redis_key, self.expiry)]
        self.sync.execute_beside(session.key, [*commands, ("EXEC",)])
        session.mark_saved()


def session_store(channel_layer: Any) -> MemorySessionStore | RedisSessionStore:
    """The session store beside ``channel_layer`` (made once per layer object)."""
    raw = getattr(channel_layer, "layer", channel_layer)  # a face knows its layer
    store = getattr(raw, "_session_store", None)
    if store is None:
        from crossroads.layer.memory import MemoryLayer

        if isinstance(raw, MemoryLayer):
            store = MemorySessionStore()
        elif hasattr(raw, "ring"):
            store = RedisSessionStore(raw)
        else:
            raise TypeError(f"no session store for {raw!r}: sessions need a memory:// or redis:// layer")
        raw._session_store = store
    return store


def _reply_name(message: Any, decorator: str) -> str:
    if message.reply_channel is None:
        raise ValueError(f"@{decorator} needs a message with a reply_channel; {message.channel.name} has none")
    return message.reply_channel.name


def channel_session(func: Callable) -> Callable:
    """Load ``message.channel_session`` before the consumer and save it after, if changed (even on error)."""
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_inner(message: Any, *args: Any, **kwargs: Any) -> Any:
            store = session_store(message.channel_layer)
            message.channel_session = await asyncio.to_thread(store.load, _reply_name(message, "channel_session"))
            try:
                return await func(message, *args, **kwargs)
            finally:
                if message.channel_session.modified:
                    await asyncio.to_thread(store.save, message.channel_session)
        return async_inner

    @functools.wraps(func)
    def inner(message: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(message.channel_session, Session):  # already loaded by an outer decorator
            return func(message, *args, **kwargs)
        store = session_store(message.channel_layer)
        message.channel_session = store.load(_reply_name(message, "channel_session"))
        try:
            return func(message, *args, **kwargs)
        finally:
            if message.channel_session.modified:
                store.save(message.channel_session)
    return inner


def _wait_channel(reply_channel: str) -> str:
    return "crossroads.wait." + hashlib.sha1(reply_channel.encode()).hexdigest()[:24]


def enforce_ordering(func: Callable | None = None, *, slight: bool = False) -> Callable:
    """Run messages of one reply channel strictly in their ``order`` (0, 1, 2, ...).

    An early message is parked on a wait channel; an old or repeated one is
    dropped with a log line. After each in-order message its buffered sends are
    flushed, the session is saved, and the parked messages are sent back to
    their channels to try again. Decorate the ``*.connect`` consumer too: it is
    order 0, and every later message waits for it.

    ``slight=True`` (Channels 1.x's slight ordering): only order 0 must come
    first; once it has run, the others run as they come, in any order and
    several at once, and only a repeated order 0 is dropped. Used bare or
    called: ``@enforce_ordering`` and ``@enforce_ordering(slight=True)``.
    """
    if func is None:
        return functools.partial(enforce_ordering, slight=slight)

    def may_run(order: int, expected: int) -> bool:
        return order == expected or (slight and expected > 0 and order > 0)

    @functools.wraps(func)
    def inner(message: Any, *args: Any, **kwargs: Any) -> Any:
        reply = _reply_name(message, "enforce_ordering")
        order = message.content.get("order")
        if not isinstance(order, int):
            raise ValueError(f"@enforce_ordering needs an integer 'order' key on {message.channel.name}")
        store = session_store(message.channel_layer)
        session = message.channel_session = store.load(reply)
        expected = session.get(NEXT_ORDER_KEY, 0)
        sync_layer = getattr(message.channel_layer, "sync", message.channel_layer)
        if not may_run(order, expected) and order < expected:
            log.warning("dropped %s order %d for %s: already past it (next is %d)",
                        message.channel.name, order, reply, expected)
            return None
        if not may_run(order, expected):
            sync_layer.send(_wait_channel(reply), {"channel": message.channel.name, "content": message.content})
            # The message it waits for may have finished while this one parked: if so, replay now.
            if may_run(order, store.load(reply).get(NEXT_ORDER_KEY, 0)):
                _replay(sync_layer, reply)
            return None
        try:
            return func(message, *args, **kwargs)
        finally:
            # What this message sent must leave before the next one may run (on another thread, maybe),
            # or the next one's sends could overtake it.
            buffer = send_buffer.get()
            if buffer:
                flush(buffer, sync_layer, f"{message.channel.name} order {order}")
                buffer.clear()
            session[NEXT_ORDER_KEY] = max(expected, order + 1)  # slight: a late message never winds it back
            store.save(session)
            if not slight or order == 0:  # under slight ordering only the connect's arrival releases anything
                _replay(sync_layer, reply)
    return inner


def _replay(sync_layer: Any, reply: str) -> None:
    for _, parked in _drain(sync_layer, _wait_channel(reply)):
        Channel(parked["channel"], sync_layer).send(parked["content"], immediately=True)


def _drain(sync_layer: Any, channel: str) -> list[tuple[str, dict]]:
    got: list[tuple[str, dict]] = []
    while batch := sync_layer.receive_many([channel], 100, timeout=0):
        got += batch
    return got
