"""``Channel`` and ``Group``: the handles a consumer sends with, and the send buffer behind them.

Inside a consumer, sends are buffered and flushed in one batch when it returns,
even when it raised (Channels 1.x consumer atomicity): a consumer that fails
half-way still sends what it decided to send, and the batch costs one layer
round trip. ``dispatch.py`` opens and flushes the buffer; this module only
appends to it. Outside a consumer (no buffer open), and with
``immediately=True``, sends go straight to the layer.

The worker may hold the flushed sends of a thread's batch of messages to send
them together (``HeldSends``): then anything this module sends or changes at
once (an immediate send, a group membership change, another flush) first
releases what is held, so a later message's sends never overtake an earlier
one's.

Which layer: the one passed in, else the one the running consumer's message
came from, else the process default set with ``set_default_layer``.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from crossroads.layer import base

log = logging.getLogger("crossroads.consumers")

# The layer (its blocking face, or the layer for async consumers) of the message being consumed.
current_layer: contextvars.ContextVar[Any] = contextvars.ContextVar("crossroads_current_layer", default=None)
# The open send buffer: a list of ("send" | "group", name, content), or None outside a consumer.
send_buffer: contextvars.ContextVar[list | None] = contextvars.ContextVar("crossroads_send_buffer", default=None)
_default_layer: Any = None


class HeldSends:
    """Buffered sends of consumers that have returned, held to leave in one ``flush`` (see the module doc)."""

    __slots__ = ("sync_layer", "entries", "sources", "lost")

    def __init__(self, sync_layer: Any) -> None:
        self.sync_layer = sync_layer
        self.entries: list = []
        self.sources: list[Any] = []  # who sent them: str() of each names a consumer, for a failed send's log line
        self.lost = 0  # messages not delivered, over every release

    def add(self, buffer: list, source: Any) -> None:
        self.entries += buffer
        self.sources.append(source)

    def release(self) -> None:
        if not self.entries:
            return
        entries, sources = self.entries, self.sources
        self.entries, self.sources = [], []
        self.lost += flush(entries, self.sync_layer, sources[0] if len(sources) == 1 else _Sources(sources))


class _Sources:
    """The senders of held sends, as a failed send's log line names them: formatted only if one is written."""

    __slots__ = ("sources",)

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources

    def __str__(self) -> str:
        return f"{len(self.sources)} consumers ({', '.join(sorted({str(s) for s in self.sources}))})"


# The held sends of this thread's batch, or None when nothing is held.
held_sends: contextvars.ContextVar[HeldSends | None] = contextvars.ContextVar("crossroads_held_sends", default=None)


def release_held() -> None:
    """Send what is held now: before anything that must not overtake it."""
    held = held_sends.get()
    if held is not None and held.entries:
        held.release()


def set_default_layer(channel_layer: Any) -> None:
    """The layer ``Channel`` and ``Group`` use outside consumers (scripts, management code)."""
    global _default_layer
    _default_layer = channel_layer


def get_layer(explicit: Any = None) -> Any:
    """The blocking face of the layer to use now."""
    chosen = explicit or current_layer.get() or _default_layer
    if chosen is None:
        raise RuntimeError(
            "no channel layer: send from inside a consumer, pass channel_layer=..., "
            "or call crossroads.set_default_layer(layer.from_url(...)) first"
        )
    release_held()  # every immediate operation comes through here: earlier messages' held sends go first
    return getattr(chosen, "sync", chosen)


# What a buffered send keeps: validated and copied now, so errors surface at the call and later mutation is
# invisible. The copy keeps its serialized bytes, so the layer does not serialize it again when the buffer is
# flushed. The function itself, not a wrapper: a call less per send.
_copy = base.copy_message


class Channel:
    """A named channel to send to, e.g. ``message.reply_channel.send({"text": "hi"})``."""

    __slots__ = ("name", "channel_layer")

    def __init__(self, name: str, channel_layer: Any = None) -> None:
        self.name = base.check_channel_name(name)
        self.channel_layer = channel_layer

    def send(self, content: dict, immediately: bool = False) -> None:
        buffer = send_buffer.get()
        if buffer is None or immediately:
            get_layer(self.channel_layer).send(self.name, content)
        else:
            buffer.append(("send", self.name, _copy(content)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channel) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Channel({self.name!r})"


def _channel_name(channel: Channel | str) -> str:
    return channel.name if isinstance(channel, Channel) else channel


class Group:
    """A named set of channels; ``send`` reaches every member (full members are counted, not raised)."""

    __slots__ = ("name", "channel_layer")

    def __init__(self, name: str, channel_layer: Any = None) -> None:
        self.name = base.check_group_name(name)
        self.channel_layer = channel_layer

    def add(self, channel: Channel | str) -> None:
        get_layer(self.channel_layer).group_add(self.name, _channel_name(channel))

    def discard(self, channel: Channel | str) -> None:
        get_layer(self.channel_layer).group_discard(self.name, _channel_name(channel))

    def channels(self) -> list[str]:
        return get_layer(self.channel_layer).group_channels(self.name)

    def send(self, content: dict, immediately: bool = False) -> None:
        buffer = send_buffer.get()
        if buffer is None or immediately:
            get_layer(self.channel_layer).group_send(self.name, content)
        else:
            buffer.append(("group", self.name, _copy(content)))

    def __repr__(self) -> str:
        return f"Group({self.name!r})"


def flush(buffer: list, sync_layer: Any, source: Any) -> int:
    """Send what a consumer buffered, in order: runs of channel sends as one ``send_many``.

    A full channel or an unreachable layer is logged with ``source`` (the consumer: a str, or an object whose
    str() names it, so a name is only formatted for a log line) and counted in the return value (messages not
    delivered); it never raises.
    """
    release_held()  # a flush inside a consumer (ordered sessions) must not overtake held sends
    lost = 0
    batch: list[tuple[str, dict]] = []

    def send_batch() -> int:
        if not batch:
            return 0
        try:
            sync_layer.send_many(batch)
            return 0
        except base.ChannelFull as exc:
            log.warning("%s: %s", source, exc)
            return sum(exc.refused_counts.values())
        except base.LayerUnavailable as exc:
            log.error("%s: %d buffered message(s) not sent: %s", source, len(batch), exc)
            return len(batch)
        finally:
            batch.clear()

    for kind, name, content in buffer:
        if kind == "send":
            batch.append((name, content))
            continue
        lost += send_batch()
        try:
            lost += sync_layer.group_send(name, content).dropped
        except base.LayerUnavailable as exc:
            log.error("%s: group_send to %r not sent: %s", source, name, exc)
            lost += 1
    lost += send_batch()
    return lost
