"""What a listening bridge writes to one client that reads slower than its consumers write: ``HeldWrites``.

This module owns the bound on memory a slow client can cost: a Twisted push
producer registered on the client's transport. Twisted pauses it when the
socket's send buffer is full (64 KiB waiting in the transport); what the
bridge writes meanwhile waits here, counted in bytes, and goes out as the
client reads. A client more than ``limit`` bytes behind, or reading nothing
for ``timeout`` seconds while something waits, is cut off through the
bridge's ``cut(why)`` (which logs, counts ``slow_clients`` and closes in its
protocol). ``on_pause`` / ``on_resume`` let the bridge stop reading from a
client whose answers are backed up, so a flood pushes back on its sender.
It must not know any protocol: HTTP streamed responses and WebSocket frames
both use it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Connection
from zope.interface import implementer

from crossroads.bridges.reactor import get_reactor
from crossroads.layer.base import MAX_MESSAGE_SIZE


def buffer_limit(value: int) -> str | None:
    """The option check of a ``limit``: at least one layer message, since one reply can be that large."""
    if value >= MAX_MESSAGE_SIZE:
        return None
    return f"must be at least {MAX_MESSAGE_SIZE} bytes (one reply can hold that much: the layer's limit)"


@implementer(IPushProducer)
class HeldWrites:
    """Writes to one client, held while its transport is full; ``write(item, size)`` instead of writing directly.

    ``send(item)`` writes one item to the transport. ``limit_name`` and
    ``timeout_name`` are the options the cut-off reasons quote. One per
    connection, idle most of its life: slotted, and its queue made only when
    something has to wait (an idle WebSocket costs ~1 KiB less).
    """

    __slots__ = ("cut", "held", "held_bytes", "limit", "limit_name", "on_pause", "on_resume", "paused", "send",
                 "stalled", "stopped", "timeout", "timeout_name")

    def __init__(self, send: Callable[[Any], None], cut: Callable[[str], None], *, limit: int, timeout: float,
                 limit_name: str, timeout_name: str, on_pause: Callable[[], None] | None = None,
                 on_resume: Callable[[], None] | None = None) -> None:
        self.send, self.cut = send, cut
        self.limit, self.timeout, self.limit_name, self.timeout_name = limit, timeout, limit_name, timeout_name
        self.on_pause, self.on_resume = on_pause, on_resume
        self.held: deque[tuple[Any, int]] | None = None  # made on the first write that has to wait
        self.held_bytes = 0
        self.paused = False
        self.stopped = False  # cut off or gone: nothing more is held or written
        self.stalled: Any = None  # the timeout's call while paused

    def write(self, item: Any, size: int) -> None:
        if self.stopped:
            return
        if self.paused or self.held:
            if self.held is None:
                self.held = deque()
            self.held.append((item, size))
            self.held_bytes += size
            if self.held_bytes > self.limit:
                self._cut(f"over {self.limit_name} ({self.limit} bytes) behind")
            return
        self.send(item)

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        if self.stopped:
            return
        self.paused = True
        if self.stalled is None and self.timeout > 0:
            self.stalled = get_reactor().callLater(self.timeout, self._cut,
                                                   f"reading nothing for {self.timeout_name} ({self.timeout:g} s)")
        if self.on_pause is not None:
            self.on_pause()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.stopped:
            return
        self.paused = False
        self._stop_timer()
        while self.held and not self.paused:  # a write can fill the buffer again, and pause us from inside
            item, size = self.held.popleft()
            self.held_bytes -= size
            self.send(item)
        if not self.paused and self.on_resume is not None:
            self.on_resume()

    def stopProducing(self) -> None:  # noqa: N802 (the transport is gone)
        self.stopped = True
        self._stop_timer()
        self.held = None
        self.held_bytes = 0

    def _cut(self, why: str) -> None:
        self.stopProducing()
        self.cut(why)

    def _stop_timer(self) -> None:
        if self.stalled is not None and self.stalled.active():
            self.stalled.cancel()
        self.stalled = None


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent to the socket at once when nothing is waiting to go before it.

    Twisted's ``write`` only buffers: it asks the reactor to watch the socket
    for writability (one epoll call), writes on the next loop iteration, and
    stops watching (another). A small reply to an idle socket costs three
    reactor round trips that way, a third of a WebSocket echo's CPU in the
    bridge; asyncio's transports try the socket first, and so does this. Only
    on plain TCP and Unix connections (TLS writes go through the TLS layer)
    with an empty buffer; what the socket does not take, or any error, is left
    to ``transport.write``, which buffers it, pauses producers and reports a
    lost connection as usual.
    """
    if (isinstance(transport, Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._tempDataBuffer and not transport.dataBuffer):
        written = transport.writeSomeData(data)
        if type(written) is int and written > 0:
            if written == len(data):
                return
            data = data[written:]
    transport.write(data)
