"""The ordered way into the layer for what peers send: the ``Inlet``.

This module owns the queue between a peer (a WebSocket connection, an IRC
server, an MQTT broker link) and the layer: messages go in in the order the
peer sent them, one batch in the layer at a time (consecutive messages to one
channel travel in one ``send_many_to_layer``), refusals are either reported to
the bridge (which refuses in its protocol) or held and retried in order, a
message too large for the layer is handled once, and high/low water marks tell
the bridge when to stop and start reading its peer again. It must not know any
protocol: the bridge's callbacks say what a refusal or an oversized message
means to its peer. The counters and the ``layer`` health problem are kept by
``Bridge.send_to_layer`` / ``send_many_to_layer``, which the inlet calls.

Why one batch at a time: two sends in flight at once may be stored in either
order (on Redis they travel on different connections), and the order a peer
said things in is what consumers rely on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from crossroads.layer import MessageTooLarge
from crossroads.layer.base import backoff_delays

if TYPE_CHECKING:
    from crossroads.bridges.base import Bridge


class Inlet:
    """One ordered queue of a peer's messages into the layer; ``put(channel, item)`` from any callback.

    ``build(channel, item)`` makes the message when its turn comes (default:
    ``item`` is the message), or returns None to skip it. After each send:
    ``stored(channel, item, message)`` for each message the layer took, and
    ``refused(channel, item)`` for each it refused (full or down). Without
    ``retry_while``, a refused message is then dropped from the queue (the
    bridge told its peer to repeat it); with it, refused messages stay at the
    front and are tried again, with backoff, as long as ``retry_while()`` is
    true (a peer that cannot be asked to repeat, or one that waits for an
    acknowledgement). ``stored_all(channel, pairs)``, when given instead of
    ``stored``, gets a send's stored ``(item, message)`` pairs at once, in
    order (a bridge that settles per batch). ``too_large(channel, item)`` handles a message over the
    layer's limit (default: ``bad_input`` from ``peer``, which may be a function
    of the message); it is neither stored nor refused. Channels in
    ``persistent`` go through ``send_to_layer_persistently`` (events such as a
    disconnect, which no peer can repeat). With ``high`` set, ``on_full()`` is
    called when that many wait and ``on_room()`` once no more than ``low`` do:
    the bridge stops reading its peer in between (``paused`` says which).
    """

    __slots__ = ("_forwarding", "_queue", "batch", "bridge", "build", "high", "low", "on_full", "on_room", "paused",
                 "peer", "persistent", "refused", "retry_while", "stored", "stored_all", "too_large",
                 "what")  # one per connection

    def __init__(self, bridge: Bridge, what: str, *, peer: str | Callable[[dict], str] = "a peer",
                 build: Callable[[str, Any], dict | None] | None = None,
                 stored: Callable[[str, Any, dict], None] | None = None,
                 stored_all: Callable[[str, list[tuple[Any, dict]]], None] | None = None,
                 refused: Callable[[str, Any], None] | None = None,
                 too_large: Callable[[str, Any], None] | None = None,
                 retry_while: Callable[[], bool] | None = None, batch: int = 1, persistent: Collection[str] = (),
                 high: int = 0, low: int = 0, on_full: Callable[[], None] | None = None,
                 on_room: Callable[[], None] | None = None) -> None:
        self.bridge, self.what, self.peer = bridge, what, peer
        self.build, self.stored, self.refused, self.too_large = build, stored, refused, too_large
        self.stored_all = stored_all
        self.retry_while, self.batch = retry_while, batch
        self.persistent = frozenset(persistent)  # the same object when it is one: pass a constant, it is shared
        self.high, self.low, self.on_full, self.on_room = high, low, on_full, on_room
        self.paused = False  # past ``high`` and not yet down to ``low``: the bridge is not reading its peer
        # Made by the first put and dropped when forwarding empties it: an empty deque is ~600 bytes, and an idle
        # WebSocket connection has an inlet for life.
        self._queue: deque[tuple[str, Any]] | None = None
        self._forwarding = False

    def __len__(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def put(self, channel: str, item: Any) -> None:
        """Queue one message (or what ``build`` makes one of) for ``channel``, behind every earlier one."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append((channel, item))
        if self.high and not self.paused and len(queue) >= self.high:
            self.paused = True
            if self.on_full is not None:
                self.on_full()
        if not self._forwarding:
            self._forwarding = True
            self.bridge.spawn(self._forward(), self.what)

    async def _forward(self) -> None:
        queue, build = self._queue, self.build
        retry = None
        size = self.batch  # as many at once as the layer took last time, doubling while it takes all
        try:
            while queue:
                channel = queue[0][0]
                limit = 1 if channel in self.persistent else size  # persistent: each waits for room on its own
                entries: list[tuple[Any, dict]] = []
                while queue and queue[0][0] == channel:
                    item = queue.popleft()[1]
                    message = item if build is None else build(channel, item)
                    if message is not None:
                        entries.append((item, message))
                        if len(entries) >= limit:
                            break
                if not entries:
                    continue
                taken, oversized = await self._send(channel, entries)
                stored = self.stored
                if stored is not None or self.stored_all is not None:
                    if oversized:
                        took = [entry for index, entry in enumerate(entries[:taken]) if index not in oversized]
                    else:  # the usual case: no index to look up
                        took = entries[:taken] if taken < len(entries) else entries
                    if self.stored_all is not None:
                        self.stored_all(channel, took)
                    else:
                        for item, message in took:
                            stored(channel, item, message)
                held = entries[taken:]
                if held and self.refused is not None:
                    for item, _ in held:
                        self.refused(channel, item)
                size = min(self.batch, size * 2) if not held else max(1, taken)
                if not held or self.retry_while is None:
                    retry = None
                    self._check_room()
                    continue
                queue.extendleft((channel, item) for item, _ in reversed(held))
                if not self.retry_while():
                    return  # stopping: what is held stays unsent, the bridge knows what that means to its peer
                # A full channel empties in milliseconds when a worker is behind, so the first retries come
                # fast; a layer that stays down is tried less and less often. Progress starts them anew.
                retry = retry if retry and not taken else backoff_delays(0.002, 2.0)
                await asyncio.sleep(next(retry))
        finally:
            self._forwarding = False
            if not queue:
                self._queue = None
            self._check_room()

    async def _send(self, channel: str, entries: list[tuple[Any, dict]]) -> tuple[int, set[int]]:
        """Send a batch; return how many of its first messages were taken, and which of those were too large."""
        bridge = self.bridge
        if len(entries) > 1:
            try:
                return await bridge.send_many_to_layer(channel, [message for _, message in entries]), set()
            except MessageTooLarge:
                pass  # nothing was stored: find which, one by one
        oversized: set[int] = set()
        for index, (item, message) in enumerate(entries):
            try:
                if channel in self.persistent:
                    stored = await bridge.send_to_layer_persistently(channel, message)
                else:
                    stored = await bridge.send_to_layer(channel, message)
            except MessageTooLarge:
                oversized.add(index)
                self._too_large(channel, item, message)
                continue
            if not stored:
                return index, oversized
        return len(entries), oversized

    def _too_large(self, channel: str, item: Any, message: dict) -> None:
        if self.too_large is not None:
            self.too_large(channel, item)
        else:
            peer = self.peer if isinstance(self.peer, str) else self.peer(message)
            self.bridge.bad_input(peer, f"{channel} too large for the layer")

    def _check_room(self) -> None:
        if self.paused and len(self) <= self.low:
            self.paused = False
            if self.on_room is not None:
                self.on_room()
