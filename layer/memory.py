"""The in-process channel layer (``memory://``).

Owns queues, groups and waiting for one process. It is shared at once by
worker threads (blocking face, ``layer.sync``) and by bridges on an event loop
(async face), so every piece of state sits behind one ``threading.Lock`` and
no method ever holds that lock while it waits.

Waiting never polls. A receiver that finds nothing registers a waiter on each
queue it listens to. ``send`` hands the entry straight to the oldest waiter of
that queue, under the lock, and wakes it after releasing the lock (a
``threading.Event`` for a thread, ``call_soon_threadsafe`` for a coroutine).
Because the hand-off is decided under the lock, a message can neither be
delivered twice nor vanish between a timeout and a wake-up: a receiver that
times out or is cancelled checks, under the lock, whether it was handed
something, and returns it or puts it back at the head of its queue. A
receiver woken but not yet running takes later sends to its queues too, up
to the number it asked for, with no wake-up of their own: a bridge sending a
burst wakes one worker thread for it, not one per message (a thread's
wake-up costs context switches and a fight for the GIL: on the WebSocket
echo, 1.2 context switches per message before this, 0.4 after).

Expiry is checked where an item is read, and swept once in a while (at most every
``SWEEP_EVERY`` seconds, by whoever adds a record, a group member or a queue): a
process that runs for weeks would otherwise keep every channel session of every
connection it ever had, and every member of a group nobody sends to.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import base
from .base import ChannelFull, Counters, GroupSendResult, LayerOptions

log = logging.getLogger("crossroads.layer.memory")

Entry = tuple[float, str, bytes]  # (expires_at, channel, body)
SWEEP_EVERY = 30.0  # seconds between sweeps of what expired unread


class _Waiter:
    __slots__ = ("entries", "limit", "queues", "wake")

    def __init__(self, queues: list[str], wake: Callable[[], None], limit: int) -> None:
        self.queues = queues
        self.entries: list[Entry] = []  # handed to it under the lock, in order; its wake-up is then on its way
        self.limit = limit
        self.wake = wake


class MemoryLayer(base.LayerErrors):
    """An in-process layer; ``MemoryLayer.sync`` is the blocking face with the same methods."""

    def __init__(self, **options: Any) -> None:
        self.options = LayerOptions(**options)
        self.counters = Counters()
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Entry]] = {}
        self._waiters: dict[str, deque[_Waiter]] = {}
        self._handed: dict[str, deque[_Waiter]] = {}  # queue -> woken receivers not yet running, with room for more
        self._groups: dict[str, dict[str, float]] = {}
        self._records: dict[str, tuple[float, dict[str, bytes]]] = {}  # key -> (expires_at, packed fields)
        self.sweep_every = SWEEP_EVERY
        self._swept = time.time()
        self.sync = _SyncFace(self)

    def __repr__(self) -> str:
        return "MemoryLayer()"

    # -- the core, shared by both faces; *_locked methods need self._lock --

    def _prepare(self, channel: str, message: dict) -> Entry:
        base.check_channel_name(channel)
        return (time.time() + self.options.expiry, channel, base.pack(message))

    def _put_locked(self, entry: Entry, woken: list[_Waiter], *, front: bool = False) -> bool:
        """Hand ``entry`` to a waiter or queue it; False if its queue is full."""
        queue = base.queue_name(entry[1])
        handed = None if front else self._handed.get(queue)
        if handed:  # a receiver woken, not yet running, with room: it takes this too, with no wake-up of its own
            waiter = handed[0]
            waiter.entries.append(entry)
            if len(waiter.entries) >= waiter.limit:
                self._unhand_locked(waiter)
            return True
        waiters = self._waiters.get(queue)
        if waiters:
            waiter = waiters.popleft()
            self._unregister_locked(waiter)
            waiter.entries.append(entry)
            woken.append(waiter)
            if waiter.limit > 1:
                for name in waiter.queues:
                    self._handed.setdefault(name, deque()).append(waiter)
            return True
        items = self._queues.get(queue)
        if items is None:
            self._maybe_sweep_locked()
            items = self._queues[queue] = deque()
        if not front and len(items) >= self.options.capacity_for(entry[1]):
            self._expire_locked(items)
            if len(items) >= self.options.capacity_for(entry[1]):
                return False
        if front:
            items.appendleft(entry)
        else:
            items.append(entry)
        return True

    def _expire_locked(self, items: deque[Entry]) -> None:
        now = time.time()
        while items and items[0][0] < now:
            items.popleft()
            self.counters.expired += 1

    def _maybe_sweep_locked(self) -> None:
        now = time.time()
        if now >= self._swept + self.sweep_every:
            self._swept = now
            self._sweep_locked(now)

    def _sweep_locked(self, now: float) -> None:
        """Drop what expired unread: records, group members (and groups left empty), queued messages."""
        for key in [key for key, (expires_at, _) in self._records.items() if expires_at < now]:
            del self._records[key]
        for group in list(self._groups):
            members = self._groups[group]
            for channel in [channel for channel, expires_at in members.items() if expires_at < now]:
                del members[channel]
            if not members:
                del self._groups[group]
        for queue in list(self._queues):
            items = self._queues[queue]
            self._expire_locked(items)
            if not items:
                del self._queues[queue]

    def _take_locked(self, queues: list[str], limit: int) -> list[Entry]:
        """Pop up to ``limit`` unexpired entries; the starting queue is random for fairness."""
        taken: list[Entry] = []
        start = random.randrange(len(queues)) if len(queues) > 1 else 0
        now = time.time()
        for i in range(len(queues)):
            queue = queues[(start + i) % len(queues)]
            items = self._queues.get(queue)
            while items and len(taken) < limit:
                entry = items.popleft()
                if entry[0] < now:
                    self.counters.expired += 1
                else:
                    taken.append(entry)
            if items is not None and not items:
                del self._queues[queue]
            if len(taken) >= limit:
                break
        self.counters.received += len(taken)
        return taken

    def _register_locked(self, waiter: _Waiter) -> None:
        for queue in waiter.queues:
            self._waiters.setdefault(queue, deque()).append(waiter)

    def _unhand_locked(self, waiter: _Waiter) -> None:
        """``waiter`` takes no more entries by hand: it is full, or running."""
        _remove_waiter(self._handed, waiter)

    def _unregister_locked(self, waiter: _Waiter) -> None:
        _remove_waiter(self._waiters, waiter)

    @staticmethod
    def _wake(woken: list[_Waiter]) -> None:
        for waiter in woken:
            waiter.wake()

    def _send_entries(self, entries: list[Entry]) -> list[Entry]:
        """Store entries; return the ones refused because their queue was full."""
        woken: list[_Waiter] = []
        refused: list[Entry] = []
        with self._lock:
            for entry in entries:
                if not self._put_locked(entry, woken):
                    refused.append(entry)
            self.counters.sent += len(entries) - len(refused)
            self.counters.refused += len(refused)
        self._wake(woken)
        return refused

    def _send(self, channel: str, message: dict) -> None:
        if self._send_entries([self._prepare(channel, message)]):
            raise ChannelFull(f"channel {channel!r} is full (capacity {self.options.capacity_for(channel)})")

    def _send_many(self, items: Iterable[tuple[str, dict]]) -> None:
        entries = [self._prepare(channel, message) for channel, message in items]
        refused = self._send_entries(entries)
        if refused:
            raise base.refused_error([entry[1] for entry in refused], len(entries), self.options.capacity_for)

    def _try_take(self, channels: Any, limit: int) -> tuple[list[str], list[Entry]]:
        queues = [base.queue_name(c) for c in base.check_receive_channels(channels)]
        base.check_max_messages(limit)
        with self._lock:
            return queues, self._take_locked(queues, limit)

    def _finish_wait(self, waiter: _Waiter, limit: int) -> list[Entry]:
        """After a wait ends for any reason: what the waiter was handed, plus more up to ``limit``."""
        with self._lock:
            if not waiter.entries:
                self._unregister_locked(waiter)
                return []
            self._unhand_locked(waiter)
            taken = waiter.entries
            self.counters.received += len(taken)
            if limit > len(taken):
                taken += self._take_locked(waiter.queues, limit - len(taken))
            return taken

    def _requeue(self, entries: list[Entry]) -> None:
        """Put entries taken by a cancelled receiver back at the head of their queues."""
        woken: list[_Waiter] = []
        with self._lock:
            self.counters.received -= len(entries)
            for entry in reversed(entries):
                self._put_locked(entry, woken, front=True)
        self._wake(woken)

    def _receive_blocking(self, channels: Any, limit: int, timeout: float | None) -> list[Entry]:
        queues, taken = self._try_take(channels, limit)
        if taken or (timeout is not None and timeout <= 0):
            return taken
        event = threading.Event()
        waiter = _Waiter(queues, event.set, limit)
        with self._lock:
            taken = self._take_locked(queues, limit)
            if taken:
                return taken
            self._register_locked(waiter)
        event.wait(timeout)
        return self._finish_wait(waiter, limit)

    async def _receive_async(self, channels: Any, limit: int, timeout: float | None) -> list[Entry]:
        queues, taken = self._try_take(channels, limit)
        if taken or (timeout is not None and timeout <= 0):
            return taken
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        waiter = _Waiter(queues, wake, limit)
        with self._lock:
            taken = self._take_locked(queues, limit)
            if taken:
                return taken
            self._register_locked(waiter)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self._requeue(self._finish_wait(waiter, 0))  # what it was handed goes back, in order
            raise
        return self._finish_wait(waiter, limit)

    def _decode(self, entry: Entry) -> tuple[str, dict]:
        return entry[1], base.unpack(entry[2])

    def _group_add(self, group: str, channel: str) -> None:
        base.check_group_name(group)
        base.check_channel_name(channel)
        with self._lock:
            self._maybe_sweep_locked()
            self._groups.setdefault(group, {})[channel] = time.time() + self.options.group_expiry

    def _group_discard(self, group: str, channel: str) -> None:
        base.check_group_name(group)
        base.check_channel_name(channel)
        with self._lock:
            members = self._groups.get(group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del self._groups[group]

    def _members_locked(self, group: str) -> list[str]:
        members = self._groups.get(group)
        if not members:
            return []
        now = time.time()
        for channel in [c for c, expires_at in members.items() if expires_at < now]:
            del members[channel]
        return list(members)

    def _group_channels(self, group: str) -> list[str]:
        base.check_group_name(group)
        with self._lock:
            return self._members_locked(group)

    def _group_send(self, group: str, message: dict) -> GroupSendResult:
        base.check_group_name(group)
        body = base.pack(message)
        expires_at = time.time() + self.options.expiry
        result = GroupSendResult()
        woken: list[_Waiter] = []
        with self._lock:
            for channel in self._members_locked(group):
                if self._put_locked((expires_at, channel, body), woken):
                    result.delivered += 1
                else:
                    result.dropped += 1
            self.counters.sent += result.delivered
            self.counters.dropped += result.dropped
        self._wake(woken)
        if result.dropped:
            log.warning("group_send to %r dropped %d of %d deliveries: members full", group,
                        result.dropped, result.dropped + result.delivered)
        return result

    def _kv_get(self, key: str) -> dict[str, Any]:
        base.check_kv_key(key)
        with self._lock:
            found = self._records.get(key)
            if found is not None and found[0] < time.time():
                del self._records[key]
                found = None
        return {} if found is None else base.unpack_fields(found[1])

    def _kv_set(self, key: str, fields: dict, ttl: float, *, replace: bool = True) -> None:
        base.check_kv_key(key)
        packed = base.pack_fields(fields)
        expires_at = time.time() + base.check_ttl(ttl)
        with self._lock:
            self._maybe_sweep_locked()
            found = self._records.get(key)
            if not replace and found is not None and found[0] >= time.time():
                packed = {**found[1], **packed}
            if packed:
                self._records[key] = (expires_at, packed)
            else:
                self._records.pop(key, None)

    def _kv_delete(self, key: str) -> None:
        base.check_kv_key(key)
        with self._lock:
            self._records.pop(key, None)

    def _flush(self) -> None:
        with self._lock:
            self._queues.clear()
            self._groups.clear()
            self._records.clear()

    def _stats(self) -> dict[str, Any]:
        with self._lock:
            pending = {queue: len(items) for queue, items in self._queues.items() if items}
            return {"backend": "memory", "pending": pending, **self.counters.as_dict()}

    # -- the async face --

    async def send(self, channel: str, message: dict) -> None:
        self._send(channel, message)

    async def send_many(self, items: Iterable[tuple[str, dict]]) -> None:
        self._send_many(items)

    async def receive(self, channels: Any, timeout: float | None = None) -> tuple[str | None, dict | None]:
        taken = await self._receive_async(channels, 1, timeout)
        return self._decode(taken[0]) if taken else (None, None)

    async def receive_many(
        self, channels: Any, max_messages: int, timeout: float | None = None
    ) -> list[tuple[str, dict]]:
        return [self._decode(entry) for entry in await self._receive_async(channels, max_messages, timeout)]

    async def new_channel(self, pattern: str) -> str:
        return base.new_channel_name(pattern)

    async def group_add(self, group: str, channel: str) -> None:
        self._group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        self._group_discard(group, channel)

    async def group_channels(self, group: str) -> list[str]:
        return self._group_channels(group)

    async def group_send(self, group: str, message: dict) -> GroupSendResult:
        return self._group_send(group, message)

    async def kv_get(self, key: str) -> dict[str, Any]:
        return self._kv_get(key)

    async def kv_set(self, key: str, fields: dict, ttl: float) -> None:
        self._kv_set(key, fields, ttl)

    async def kv_update(self, key: str, fields: dict, ttl: float) -> None:
        self._kv_set(key, fields, ttl, replace=False)

    async def kv_delete(self, key: str) -> None:
        self._kv_delete(key)

    async def flush(self) -> None:
        self._flush()

    async def stats(self) -> dict[str, Any]:
        return self._stats()

    async def close(self) -> None:
        pass


class _SyncFace(base.LayerErrors):
    """The blocking face of a ``MemoryLayer``: the same methods, called from threads."""

    def __init__(self, layer: MemoryLayer) -> None:
        self.layer = layer

    def send(self, channel: str, message: dict) -> None:
        self.layer._send(channel, message)

    def send_many(self, items: Iterable[tuple[str, dict]]) -> None:
        self.layer._send_many(items)

    def receive(self, channels: Any, timeout: float | None = None) -> tuple[str | None, dict | None]:
        taken = self.layer._receive_blocking(channels, 1, timeout)
        return self.layer._decode(taken[0]) if taken else (None, None)

    def receive_many(self, channels: Any, max_messages: int, timeout: float | None = None) -> list[tuple[str, dict]]:
        taken = self.layer._receive_blocking(channels, max_messages, timeout)
        return [self.layer._decode(entry) for entry in taken]

    def new_channel(self, pattern: str) -> str:
        return base.new_channel_name(pattern)

    def group_add(self, group: str, channel: str) -> None:
        self.layer._group_add(group, channel)

    def group_discard(self, group: str, channel: str) -> None:
        self.layer._group_discard(group, channel)

    def group_channels(self, group: str) -> list[str]:
        return self.layer._group_channels(group)

    def group_send(self, group: str, message: dict) -> GroupSendResult:
        return self.layer._group_send(group, message)

    def kv_get(self, key: str) -> dict[str, Any]:
        return self.layer._kv_get(key)

    def kv_set(self, key: str, fields: dict, ttl: float) -> None:
        self.layer._kv_set(key, fields, ttl)

    def kv_update(self, key: str, fields: dict, ttl: float) -> None:
        self.layer._kv_set(key, fields, ttl, replace=False)

    def kv_delete(self, key: str) -> None:
        self.layer._kv_delete(key)

    def flush(self) -> None:
        self.layer._flush()

    def stats(self) -> dict[str, Any]:
        return self.layer._stats()

    def close(self) -> None:
        pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _remove_waiter(lines: dict[str, deque], waiter: Any) -> None:
    """Take ``waiter`` out of the line of each of its queues in ``lines``, dropping lines left empty."""
    for queue in waiter.queues:
        line = lines.get(queue)
        if line is None:
            continue
        try:
            line.remove(waiter)
        except ValueError:
            pass
        if not line:
            del lines[queue]
