"""What every bridge's ``messages.py`` shares, with no I/O: the shared keys, text from bytes, addresses, option
checks, the token bucket that paces what a bridge sends and the fair queue that orders it.

This module owns the pieces that are the same in every protocol: the keys
every ``*.receive`` message carries besides its protocol's own (``protocol``,
``sender``, ``room``, ``text``: docs/spec/layer.md, ARCHITECTURE decision 5),
decoding a payload into that ``text``, naming a peer by its address, reading a
``scheme://host[:port]`` option, and the small checks option tables declare.
It must stay pure like the ``messages.py`` files that import it: no Twisted,
no layer, no sockets. Limits that belong to the layer (its 1 MiB message) are
passed in by the caller, never copied here.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

Check = Callable[[Any], "str | None"]  # an option check: the problem in words, or None


# -- the shared keys of every message ----------------------------------------------------------------------------


def shared_keys(protocol: str, sender: str, room: str | None, text: str | None) -> dict[str, Any]:
    """The keys that let one consumer serve every protocol: who spoke, where, and what they said as text.

    ``text`` is None when what was said is not text (a binary frame, a non-UTF-8
    payload) or when nothing was said (a join, a connect).
    """
    return {"protocol": protocol, "sender": sender, "room": room, "text": text}


def text_of(data: bytes) -> str | None:
    """``data`` as text when it is UTF-8, else None: a payload that is not text has no ``text``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def describe_peer(address: Sequence[Any] | None) -> str:
    """A peer's ``[host, port]`` as ``"host:port"`` (IPv6 hosts in brackets); ``"unix"`` for a Unix socket's (None)."""
    if not address:
        return "unix"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- pacing what a bridge sends -----------------------------------------------------------------------------------


class TokenBucket:
    """Outgoing flood control: ``burst`` sends at once, then ``rate`` per second.

    Servers disconnect clients (IRC's "excess flood") or refuse them (Slack's
    429) when they send faster than they allow; a bucket lets a short answer
    out at once and paces a long one. ``take`` may go into debt (lines the
    bridge must send now, such as JOINs after a reconnect): the sends after
    them wait until it is paid.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a send may go (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1

    def claim(self, now: float) -> float:
        """``take`` when a send may go now (0.0), else the seconds ``wait`` gives, nothing taken: one call where a
        caller asking ``wait`` then ``take`` refilled twice (the Slack bridge asks once per post)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = float(self.burst)
        self.stamp = now
        if tokens >= 1:
            self.tokens = tokens - 1
            return 0.0
        self.tokens = tokens
        return (1 - tokens) / self.rate


class FairQueue:
    """What waits to be sent, one queue per target (an IRC channel, a nick), taken round robin.

    One FIFO for everything lets one loud target (a 500-line reply to one
    channel, paced at the server's flood rate) hold every other target's lines
    for minutes. Taking one item per target in turn keeps each target's order
    and the overall rate (the caller still paces every ``take`` through its
    bucket), while a quiet target waits for at most one item of each busy one.
    ``put`` refuses past ``per_target`` waiting for that target or ``total`` in
    all, and says which (the caller counts and logs).
    """

    FULL_TARGET, FULL_TOTAL = "target", "total"

    def __init__(self, per_target: int, total: int) -> None:
        self.per_target, self.total = per_target, total
        self._queues: dict[str, deque[Any]] = {}
        self._turns: deque[str] = deque()  # the targets with something waiting, the next one to send first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, target: str) -> int:
        queue = self._queues.get(target)
        return len(queue) if queue else 0

    def put(self, target: str, item: Any) -> str | None:
        """Queue ``item`` behind ``target``'s earlier ones; None, or why it was refused (``FULL_*``)."""
        if self._size >= self.total:
            return self.FULL_TOTAL
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = deque()
            self._turns.append(target)
        elif len(queue) >= self.per_target:
            return self.FULL_TARGET
        queue.append(item)
        self._size += 1
        return None

    def take(self) -> tuple[str, Any]:
        """The next ``(target, item)``: the oldest item of the target whose turn it is. Raises IndexError if empty."""
        target = self._turns.popleft()
        queue = self._queues[target]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._turns.append(target)  # its next item waits for every other target's turn
        else:
            del self._queues[target]
        return target, item

    def clear(self) -> int:
        """Drop everything; how many items were waiting."""
        dropped, self._size = self._size, 0
        self._queues.clear()
        self._turns.clear()
        return dropped


# -- which Host a listener answers to --------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a listening address only takes connections from this machine (127.0.0.0/8, ::1, localhost)."""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def check_allowed_host(entry: Any) -> str | None:
    """The problem with one ``allowed_hosts`` entry, or None: ``"*"``, a name or address, or ``"*.example.com"``."""
    if not isinstance(entry, str):
        return f"entries must be strings, not {entry!r}"
    if entry == "*" or re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+|[0-9A-Fa-f:]+", entry):
        return None
    return f"{entry!r} is not '*', a host name or address (no port), or '*.example.com'"


def effective_allowed_hosts(allowed: Sequence[str], bind_host: str | None) -> tuple[str, ...]:
    """What ``allowed_hosts`` means for a listener on ``bind_host`` (None: a Unix or systemd socket): as set, or
    when empty, the loopback names for a loopback listener (a DNS-rebinding page names its own host, and the
    browser then sends it) and any host otherwise (the bridge cannot know the names it is reached by)."""
    if allowed:
        return tuple(entry.lower() for entry in allowed)
    if bind_host is not None and is_loopback(bind_host):
        return LOOPBACK_NAMES
    return ("*",)


def host_refused(host: bytes | None) -> str:
    """The 400's reason for a Host that ``host_allowed`` refused, saying what to change."""
    shown = (host or b"").decode("latin-1")[:100]
    return (f"Host {shown!r} is not served here: add its name to allowed_hosts (on a loopback listener only "
            f"localhost, 127.0.0.1 and ::1 are, unless proxy_headers is on)")


def host_allowed(host: bytes | None, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` header (host[:port], IPv6 in brackets) names a host in ``allowed``.

    A request without Host (HTTP/1.0) has nothing to rebind and is allowed; a
    Host that cannot be read is not.
    """
    if "*" in allowed or host is None:
        return True
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        if rest and not re.fullmatch(r":\d{1,5}", rest):
            return False
    else:
        name, _, port = text.partition(":")
        if port and not port.isdigit():
            return False
    name = name.rstrip(".")
    if not name:
        return False
    for entry in allowed:
        if entry.startswith("*."):
            if name.endswith(entry[1:]) and len(name) > len(entry) - 1:
                return True
        elif name == entry:
            return True
    return False


# -- scheme://host[:port] ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    """A ``scheme://[user[:password]@]host[:port]`` option, split; what the protocol makes of it is the caller's."""

    scheme: str  # lowercased, one of the caller's schemes
    host: str  # IPv6 without its brackets
    port: int  # the scheme's default when the URL names none
    username: str = ""  # percent-decoded
    password: str = ""
    more: bool = False  # a path, query or fragment follows host:port


def split_url(url: str, default_ports: Mapping[str, int], *, shape: str) -> Url:
    """Split ``url`` whose scheme is a key of ``default_ports``; ValueError says what is wrong.

    ``shape`` is how the caller writes a right one (``"mqtt://host:port or
    mqtts://host:port"``), for the error when the scheme is not one of them.
    Whether credentials or a path may follow is for the caller to decide: see ``Url.more``. The messages
    leave the URL out (it may hold a password): the option check that reports them quotes the value.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "://" not in url or scheme not in default_ports:
        raise ValueError(f"must be {shape}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port: it must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("names no host")
    return Url(scheme, parts.hostname, port or default_ports[scheme], unquote(parts.username or ""),
               unquote(parts.password or ""), parts.path not in ("", "/") or bool(parts.query or parts.fragment))


# -- option checks -------------------------------------------------------------------------------------------------
# Each takes the value after its type was checked and returns the problem in words, or None; ``Option`` (in
# bridges/options.py) adds the key and the value to the message.


def positive(value: float) -> str | None:
    return None if value > 0 else "must be more than 0"


def positive_seconds(value: float) -> str | None:
    return None if value > 0 else "must be a positive number of seconds"


def seconds_or_off(value: float) -> str | None:
    return None if value >= 0 else "must be 0 (off) or a number of seconds"


def zero_or_more(value: float) -> str | None:
    return None if value >= 0 else "must be 0 (off) or more"


def port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port number from 0 to 65535 (0 picks a free one)"


def problem_of(parse: Callable[[Any], Any]) -> Check:
    """A check from a parser that raises ValueError saying what is wrong (``parse_server``, ``parse_broker``, ...)."""

    def check(value: Any) -> str | None:
        try:
            parse(value)
        except ValueError as exc:
            return str(exc)
        return None

    return check


def each(check: Check) -> Check:
    """A check of a list: the first problem ``check`` finds among its entries."""

    def check_all(values: Sequence[Any]) -> str | None:
        for value in values:
            problem = check(value)
            if problem:
                return problem
        return None

    return check_all


def payload_limit(layer_limit: int, headroom: int) -> Check:
    """A check of a payload size option: from 1 byte to what fits in one layer message with ``headroom`` to spare.

    ``layer_limit`` is the layer's own (``crossroads.layer.base.MAX_MESSAGE_SIZE``),
    handed in by the bridge: this module does not import the layer.
    """
    most = layer_limit - headroom

    def check(value: int) -> str | None:
        if 0 < value <= most:
            return None
        held = f"{layer_limit // 1048576} MiB" if layer_limit % 1048576 == 0 else f"{layer_limit} bytes"
        return f"must be from 1 to {most} bytes (the layer holds at most {held} per message)"

    return check
