"""The channel layer contract shared by every backend.

This module owns what a layer *means*, independent of where messages live:
the name rules, the limits, the errors, the wire format of a stored message,
capacity lookup, and the counters. Backends (``memory.py``, ``redis.py``) own
storage and waiting; they must not re-implement anything here.

It also owns the rules of the key/value records every backend keeps beside
its channels (``kv_get``/``kv_set``/``kv_update``/``kv_delete``: channel
sessions, bridge health), and ``mask_url``, the one way anything of ours
prints a URL that may carry a password.

Theory of operation: a message is validated and serialized exactly once, at
``send``. The serialized bytes are what a backend stores, so the size limit is
checked on the real payload, mutation after ``send`` is invisible, and bytes
and str survive the trip because msgpack keeps them distinct.
"""

from __future__ import annotations

import math
import random
import re
import secrets
import string
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import ormsgpack

# ASGI 1.0 name rules. ASCII only: names become Redis keys and log fields.
CHANNEL_NAME_RE = re.compile(r"^[a-zA-Z\d\-_.]+((\?|\!)[\d\w\-_.]*)?$", re.ASCII)
GROUP_NAME_RE = re.compile(r"^[a-zA-Z\d\-_.]+$", re.ASCII)
MAX_NAME_LENGTH = 100  # names must be shorter than this

MAX_MESSAGE_SIZE = 1024 * 1024  # 1 MiB of serialized message (and of a key/value record's values)

# Key/value record names: channel-name characters plus ':', so a reply channel fits after a "session:" prefix.
KV_KEY_RE = re.compile(r"^[a-zA-Z\d\-_.:!?]+$", re.ASCII)
MAX_KV_KEY_LENGTH = 200

DEFAULT_CAPACITY = 100
DEFAULT_EXPIRY = 60
DEFAULT_GROUP_EXPIRY = 86400
DEFAULT_PREFIX = "crossroads"

# A stored entry is HEADER (expiry as a float of Unix seconds, length of the
# channel name that follows) + channel name + msgpack body. The name is only
# written for process-local channels, which share one queue per process prefix
# and must say which local channel they were sent to; elsewhere it is empty.
HEADER = struct.Struct(">dH")

_NEW_CHANNEL_ALPHABET = string.ascii_letters + string.digits


class LayerError(Exception):
    """Base class of every error a channel layer raises."""


class ChannelFull(LayerError):
    """The channel holds ``capacity`` messages already; the peer should retry later."""


class MessageTooLarge(LayerError):
    """The serialized message is over the 1 MiB limit."""


class InvalidChannelName(LayerError, ValueError):
    """A channel or group name breaks the naming rules, or is used where it may not be."""


class LayerUnavailable(LayerError):
    """The layer's backing store cannot be reached right now."""


class AuthenticationFailed(LayerUnavailable):
    """The backing store refused our credentials: the fix is the password, not a restart."""


class LayerErrors:
    """Every layer and face carries its exception classes as attributes, as ASGI 1.0 asked."""

    ChannelFull = ChannelFull
    MessageTooLarge = MessageTooLarge
    InvalidChannelName = InvalidChannelName
    LayerUnavailable = LayerUnavailable
    AuthenticationFailed = AuthenticationFailed
    extensions = ("groups", "flush", "stats", "receive_many", "send_many", "kv")


def refused_error(refused: list[str], total: int, capacity_for: Callable[[str], int]) -> ChannelFull:
    """The ``ChannelFull`` a ``send_many`` raises when some of its messages were refused.

    ``refused`` holds the channel of every refused message. Every other message
    was stored; ``refused_channels`` names the full channels (sorted) and
    ``refused_counts`` says how many messages each refused: within a channel
    the earliest are stored, so a sender knows exactly which ones to retry.
    """
    counts: dict[str, int] = {}
    for channel in refused:
        counts[channel] = counts.get(channel, 0) + 1
    channels = sorted(counts)
    if total == 1:
        error = ChannelFull(f"channel {refused[0]!r} is full (capacity {capacity_for(refused[0])})")
    else:
        error = ChannelFull(
            f"send_many: {len(refused)} of {total} messages refused by {len(channels)} full channel(s): "
            + ", ".join(channels[:5]) + (" ..." if len(channels) > 5 else "")
        )
    error.refused_channels = channels
    error.refused_counts = {channel: counts[channel] for channel in channels}
    return error


@dataclass
class GroupSendResult:
    """What ``group_send`` did: ``delivered`` members got the message, ``dropped`` were full."""

    delivered: int = 0
    dropped: int = 0


@dataclass
class Counters:
    """Per-layer-object counters, reported by ``stats()``.

    ``dropped`` counts messages the layer accepted for a member of a group but
    could not deliver (the member was full); ``expired`` counts messages
    discarded because nobody received them in time; ``refused`` counts sends
    that raised ``ChannelFull`` (the caller knows about those);
    ``undecryptable`` counts received messages sealed with a key this layer
    does not have (see ``sealing.py``).
    """

    sent: int = 0
    received: int = 0
    refused: int = 0
    dropped: int = 0
    expired: int = 0
    undecryptable: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def is_process_local(name: str) -> bool:
    return "!" in name


def queue_name(channel: str) -> str:
    """The queue a channel's messages live in: ``prefix!`` for process-local ones."""
    bang = channel.find("!")
    return channel if bang < 0 else channel[: bang + 1]


_valid_send_names: set[str] = set()  # names already checked, so hot channels skip the regex


def check_channel_name(name: Any, *, receive: bool = False) -> str:
    """Raise ``InvalidChannelName`` unless ``name`` may be sent to (or received from)."""
    if not receive and name in _valid_send_names and type(name) is str:
        return name
    if not isinstance(name, str):
        raise InvalidChannelName(f"channel name must be str, not {type(name).__name__}: {name!r}")
    if len(name) >= MAX_NAME_LENGTH:
        raise InvalidChannelName(f"channel name is {len(name)} characters; the limit is 99: {name[:40]!r}...")
    if not CHANNEL_NAME_RE.match(name):
        raise InvalidChannelName(
            f"invalid channel name {name!r}: use letters, digits, '-', '_' and '.', "
            "optionally followed by '?' or '!' and a local part"
        )
    if is_process_local(name):
        if receive and not name.endswith("!"):
            raise InvalidChannelName(
                f"cannot receive on {name!r}: receive on its process queue {queue_name(name)!r}, "
                "which returns messages with their full channel name"
            )
        if not receive and name.endswith("!"):
            raise InvalidChannelName(f"cannot send to {name!r}: a process-local channel needs a local part after '!'")
    if not receive and len(_valid_send_names) < 10000:  # bounded: '?' and '!' names are endless
        _valid_send_names.add(name)
    return name


def check_group_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidChannelName(f"group name must be str, not {type(name).__name__}: {name!r}")
    if len(name) >= MAX_NAME_LENGTH or not GROUP_NAME_RE.match(name):
        raise InvalidChannelName(
            f"invalid group name {name!r}: use up to 99 letters, digits, '-', '_' and '.'"
        )
    return name


def check_receive_channels(channels: Any) -> list[str]:
    if isinstance(channels, str):
        channels = [channels]
    channels = list(channels)
    if not channels:
        raise InvalidChannelName("receive needs at least one channel name")
    for name in channels:
        check_channel_name(name, receive=True)
    return channels


def check_max_messages(limit: Any) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"max_messages must be a positive integer, got {limit!r}")
    return limit


def new_channel_name(pattern: Any) -> str:
    """A fresh name for ``pattern``, which ends in ``?`` (single reader) or ``!`` (process-local).

    The random part has 16 characters from 62 (about 95 bits), so a name is
    never reused by accident and no existence check is needed.
    """
    if not isinstance(pattern, str) or not pattern or pattern[-1] not in "?!":
        raise InvalidChannelName(f"new_channel pattern must end with '?' or '!', got {pattern!r}")
    if pattern.count("?") + pattern.count("!") != 1:
        raise InvalidChannelName(f"new_channel pattern must contain exactly one '?' or '!', got {pattern!r}")
    name = pattern + "".join(secrets.choice(_NEW_CHANNEL_ALPHABET) for _ in range(16))
    return check_channel_name(name)


class Packed(dict):
    """A message copied through its serialized form (``copy_message``), keeping it: ``pack`` returns those bytes
    instead of serializing the copy again. Only a consumer's send buffer holds one, and nothing changes it."""

    __slots__ = ("packed",)
    packed: bytes


# Messages are written and read through ormsgpack (Rust), ~3x msgpack-python's speed on a bridge's 26-key
# message (pack 1.4 -> 0.4 us, unpack 3.3 -> 1.3 us on one core here), and the same bytes. Its options make it
# refuse what msgpack refuses (datetimes, dataclasses, enums, UUIDs, which ormsgpack would otherwise write its
# own way) and take keys that are not str, as msgpack does; whatever it still refuses (an IntEnum, nesting over
# its 254 levels, ext types to read) goes to msgpack, so every message means what it meant with msgpack alone.
_PACK = (ormsgpack.OPT_NON_STR_KEYS | ormsgpack.OPT_PASSTHROUGH_DATACLASS | ormsgpack.OPT_PASSTHROUGH_DATETIME
         | ormsgpack.OPT_PASSTHROUGH_ENUM | ormsgpack.OPT_PASSTHROUGH_UUID)
_UNPACK = ormsgpack.OPT_NON_STR_KEYS


def _packb(value: Any, field: str | None = None) -> bytes:
    """``value`` serialized (a message, or the record field named ``field``); ``TypeError`` says what is wrong."""
    try:
        return ormsgpack.packb(value, option=_PACK)
    except TypeError:  # ormsgpack.MsgpackEncodeError is one
        pass
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        what = "message" if field is None else f"field {field!r}"  # formatted only on failure
        raise TypeError(f"{what} cannot be serialized ({exc}); use dicts, lists, str, bytes, numbers, bools and "
                        "None") from exc


def unpack(body: bytes) -> Any:
    """A message (or a record's field) read back from its serialized form: the function itself, no wrapper, as
    each message received calls it."""
    try:
        return ormsgpack.unpackb(body, option=_UNPACK)
    except ValueError:  # ormsgpack.MsgpackDecodeError is one: msgpack reads it, or says why not
        return msgpack.unpackb(body, raw=False, strict_map_key=False)


def pack(message: Any) -> bytes:
    """Serialize a message; raise ``MessageTooLarge`` over 1 MiB and ``TypeError`` for non-dicts."""
    if type(message) is Packed:
        return message.packed
    if not isinstance(message, dict):
        raise TypeError(f"a message must be a dict, not {type(message).__name__}")
    try:
        body = ormsgpack.packb(message, option=_PACK)  # _packb's first try, inline: once per message packed
    except TypeError:  # _packb tries ormsgpack again, then msgpack, and says what is wrong
        body = _packb(message)
    if len(body) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(f"message is {len(body)} bytes serialized; the limit is {MAX_MESSAGE_SIZE}")
    return body


def copy_message(message: Any) -> Packed:
    """A deep copy of ``message`` through its serialized form, validated as ``pack`` validates (its errors), that
    keeps the serialized bytes for the send it is made for."""
    body = pack(message)
    try:
        content = ormsgpack.unpackb(body, option=_UNPACK)  # unpack(body), inline: once per buffered send
    except ValueError:
        content = unpack(body)
    copy = Packed(content)
    copy.packed = body
    return copy


def make_entry(channel: str, body: bytes, expires_at: float) -> bytes:
    """The stored form of a message: header, channel name if process-local, body."""
    return entry_head(channel, expires_at) + body


def entry_head(channel: str, expires_at: float) -> bytes:
    """What comes before the body in ``make_entry``: the same for every message of one send to one channel."""
    if is_process_local(channel):
        name = channel.encode()
        return HEADER.pack(expires_at, len(name)) + name
    return HEADER.pack(expires_at, 0)


def read_entry(entry: bytes, queue: str) -> tuple[float, str, bytes]:
    """Split a stored entry into (expires_at, channel, body); ``queue`` names plain channels."""
    expires_at, name_len = HEADER.unpack_from(entry)
    start = HEADER.size
    if name_len:
        return expires_at, entry[start : start + name_len].decode(), entry[start + name_len :]
    return expires_at, queue, entry[start:]


def check_kv_key(key: Any) -> str:
    if not isinstance(key, str):
        raise InvalidChannelName(f"key/value key must be str, not {type(key).__name__}: {key!r}")
    if len(key) > MAX_KV_KEY_LENGTH or not KV_KEY_RE.match(key):
        raise InvalidChannelName(
            f"invalid key/value key {key[:40]!r}: use up to {MAX_KV_KEY_LENGTH} letters, digits and '-_.:!?'"
        )
    return key


def check_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return ttl


def pack_fields(fields: Any) -> dict[str, bytes]:
    """Serialize a record's values one by one (so one field can change alone); the names must be str.

    The values together may hold up to 1 MiB, like a message; ``TypeError`` for
    what msgpack cannot carry, ``MessageTooLarge`` over the limit.
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"key/value fields must be a dict, not {type(fields).__name__}")
    packed: dict[str, bytes] = {}
    size = 0
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"key/value field names must be str, not {type(name).__name__}: {name!r}")
        packed[name] = _packb(value, name)
        size += len(name) + len(packed[name])
    if size > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(f"key/value record is {size} bytes serialized; the limit is {MAX_MESSAGE_SIZE}")
    return packed


def unpack_fields(packed: Mapping[str, bytes]) -> dict[str, Any]:
    return {name: unpack(value) for name, value in packed.items()}


# The password in scheme://user:password@host, or in a ?password= query (redis-py reads both).
URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*?:([^/?#@\s]+)@|[?&](?:sentinel_)?password=([^&#\s]+)")


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``****``: for anything we print or log."""
    def mask(found: re.Match) -> str:
        start, end = found.span(1) if found.group(1) else found.span(2)
        return found.group(0)[: start - found.start()] + "****" + found.group(0)[end - found.start() :]

    return URL_PASSWORD.sub(mask, text) if "://" in text or "password=" in text else text


def glob_to_regex(pattern: str) -> str:
    """Capacity patterns use ``*`` as the only wildcard: '?' and '!' are literal name characters."""
    return "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"


@dataclass
class LayerOptions:
    """The options every backend accepts (see docs/spec/layer.md)."""

    capacity: int = DEFAULT_CAPACITY
    channel_capacity: dict[str, int] = field(default_factory=dict)
    # A process queue (``name!``) holds the replies of every connection of one process, so a broadcast
    # to a thousand sockets of one bridge lands a thousand messages on it at once: its default is larger.
    process_capacity: int | None = None  # None: 100 x capacity
    expiry: float = DEFAULT_EXPIRY
    group_expiry: float = DEFAULT_GROUP_EXPIRY
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {self.capacity!r}")
        if self.process_capacity is None:
            self.process_capacity = 100 * self.capacity
        if not isinstance(self.process_capacity, int) or self.process_capacity < 1:
            raise ValueError(f"process_capacity must be a positive integer, got {self.process_capacity!r}")
        if self.expiry <= 0 or self.group_expiry <= 0:
            raise ValueError("expiry and group_expiry must be positive numbers of seconds")
        if not GROUP_NAME_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} may hold only letters, digits, '-', '_' and '.'")
        self._capacity_rules: list[tuple[re.Pattern, int]] = []
        for pattern, capacity in dict(self.channel_capacity).items():
            if not isinstance(capacity, int) or capacity < 1:
                raise ValueError(f"channel_capacity[{pattern!r}] must be a positive integer, got {capacity!r}")
            self._capacity_rules.append((re.compile(glob_to_regex(pattern)), capacity))
        self._capacity_cache: dict[str, int] = {}

    def capacity_for(self, channel: str) -> int:
        """The first matching ``channel_capacity`` pattern wins; else ``process_capacity`` or ``capacity``."""
        try:
            return self._capacity_cache[channel]
        except KeyError:
            pass
        capacity = self.process_capacity if "!" in channel else self.capacity
        for regex, value in self._capacity_rules:
            if regex.match(channel):
                capacity = value
                break
        if len(self._capacity_cache) < 10000:  # bounded: '?' names are endless
            self._capacity_cache[channel] = capacity
        return capacity


def backoff_delays(initial: float = 0.05, cap: float = 5.0) -> Iterator[float]:
    """Reconnect delays: exponential, capped, with jitter so many clients do not retry in step."""
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)
