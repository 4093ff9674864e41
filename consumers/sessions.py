"""Channel sessions and ordering: the only state a consumer keeps between messages.

A channel session is a dict tied to a reply channel (one WebSocket, one MQTT
topic, one IRC channel), loaded before the consumer runs and saved after it,
when changed. It is one of the layer's key/value records, with expiry, so it
works the same on every backend (``kv_get``/``kv_set``, docs/spec/layer.md).
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
from collections.abc import Callable
from typing import Any

from crossroads.layer import base

from .channel import Channel, flush, send_buffer

log = logging.getLogger("crossroads.consumers")

SESSION_EXPIRY = 86400  # seconds a session outlives the last save
SESSION_KEY_PREFIX = "session:"
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


class SessionStore:
    """Sessions as the layer's key/value records (``session:{reply channel}``), on every backend.

    A load is one ``kv_get`` and a save one ``kv_set`` (on Redis one round trip each: sessions are
    on the hot path of every chat message); a session saved empty is deleted.
    """

    def __init__(self, sync_layer: Any, expiry: float = SESSION_EXPIRY) -> None:
        self.sync = sync_layer
        self.expiry = expiry

    def load(self, key: str) -> Session:
        return Session(key, self.sync.kv_get(SESSION_KEY_PREFIX + key))

    def save(self, session: Session) -> None:
        self.sync.kv_set(SESSION_KEY_PREFIX + session.key, dict(session), self.expiry)
        session.mark_saved()


def session_store(channel_layer: Any) -> SessionStore:
    """The session store of ``channel_layer`` (a layer, or one of its faces)."""
    raw = getattr(channel_layer, "layer", channel_layer)  # a face knows its layer
    if "kv" not in getattr(raw, "extensions", ()):
        raise TypeError(f"no sessions on {raw!r}: sessions need a layer with the key/value extension "
                        "(kv_get, kv_set; docs/spec/layer.md)")
    return SessionStore(raw.sync)


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
