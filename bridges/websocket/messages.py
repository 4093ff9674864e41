"""WebSocket <-> channel messages, with no sockets and no reactor (ASGI 1.0 ``websocket.*``).

This module owns the translation of one WebSocket connection's life into
``websocket.connect`` / ``websocket.receive`` / ``websocket.disconnect``
messages, the origin policy, and the meaning of what a consumer sends on the
connection's reply channel. It must not touch sockets, Autobahn or the
reactor: ``bridge.py`` feeds it what the peer said and carries out the
``Action`` objects it returns. docs/spec/websocket.md is its contract.

Two rules run through it. Every message to the layer is built here, so its
keys and types are the spec's in one place. And every reply from a consumer is
judged here, by ``ConnectionState.interpret``: a valid one becomes actions
(``Accept``, ``Send``, ``Close``, ``Reject``) for the bridge to perform in
order; an invalid one raises ``InvalidReply`` and changes nothing, so a
consumer's mistake is logged and counted by the bridge, never performed half
way.

Theory of operation: a connection is HANDSHAKE (the HTTP upgrade is held until
the consumer answers), then OPEN, then CLOSED (we sent or got a close, or
refused the handshake). Before accept, ``{"accept": True}`` accepts, a
``text``/``bytes`` frame accepts implicitly (as ASGI 1.0 said), and
``{"accept": False}`` or ``{"close": ...}`` rejects with 403. Once open, frames
are sent and ``close`` closes. Once closed, replies are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from crossroads.bridges.protocol import describe_peer, shared_keys

PROTOCOL = "websocket"
CONNECT, RECEIVE, DISCONNECT = "websocket.connect", "websocket.receive", "websocket.disconnect"

# Close codes the bridge itself uses (RFC 6455 section 7.4.1, and IANA's registry for 1012-1014).
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
INVALID_PAYLOAD, POLICY_VIOLATION, MESSAGE_TOO_BIG = 1007, 1008, 1009
INTERNAL_ERROR, TRY_AGAIN_LATER = 1011, 1013

# HTTP statuses of a refused handshake.
BAD_REQUEST, FORBIDDEN, UNAVAILABLE, GATEWAY_TIMEOUT = 400, 403, 503, 504

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def close_code_allowed(code: int) -> bool:
    """Whether a consumer may close with ``code``: the codes RFC 6455 lets an endpoint put in a close frame.

    1004 (reserved), 1005 and 1006 (only reported, never sent) and 1015 (TLS
    failures, reported only) are not; 3000-3999 are registered, 4000-4999 private.
    """
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


# -- the handshake ---------------------------------------------------------------------------------------------


class BadHandshake(ValueError):
    """The upgrade request cannot become a ``websocket.connect`` message; answer ``status`` and log ``reason``."""

    def __init__(self, reason: str, status: int = BAD_REQUEST) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Handshake:
    """What the peer asked for in its upgrade request, in the spec's types."""

    scheme: str  # "ws" or "wss"
    path: str  # percent-decoded
    query_string: bytes  # as sent, not decoded
    root_path: str
    headers: list[list[bytes]]  # [name lowercased, value], in order, duplicates kept
    client: list[Any] | None  # [host, port]
    server: list[Any] | None  # [host, port]
    subprotocols: list[str] = field(default_factory=list)

    @cached_property  # (every websocket.receive carries it: formatted once per connection, not per frame)
    def sender(self) -> str:
        """The client's address as the shared ``sender`` key: ``host:port`` (``[v6]:port`` for IPv6), ``unix`` for
        a client on a Unix socket, which has no address (``client`` is None)."""
        return describe_peer(self.client)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def without_headers(self) -> Handshake:
        """This handshake with no headers: once ``websocket.connect`` has them, later messages need only the rest,
        and a connection holds its handshake for life (the headers are ~1 KiB of small objects)."""
        return replace(self, headers=[])


def parse_handshake(head: bytes, *, secure: bool, client: tuple[str, int] | None, server: tuple[str, int] | None,
                    root_path: str = "") -> Handshake:
    """Read the raw HTTP upgrade request (request line and headers, up to the blank line).

    Autobahn has validated the WebSocket parts already (version, key, upgrade);
    this keeps what it does not: raw header order and duplicates, the path's
    bytes. Raises ``BadHandshake`` (400) for a request that is not HTTP/1.1
    text, or whose path is not UTF-8 once percent-decoded.
    """
    lines = head.split(b"\r\n")
    try:
        method, target, version = lines[0].split(b" ")
    except ValueError:
        raise BadHandshake(f"malformed request line {lines[0][:100]!r}") from None
    if method != b"GET" or not version.startswith(b"HTTP/1."):
        raise BadHandshake(f"an upgrade must be a GET over HTTP/1.1, not {lines[0][:100]!r}")
    headers: list[list[bytes]] = []
    for line in lines[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            raise BadHandshake("obsolete folded header lines are not accepted (RFC 7230 section 3.2.4)")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadHandshake(f"malformed header line {line[:100]!r}")
        headers.append([name.lower(), value.strip(b" \t")])
    raw_path, _, query = target.partition(b"?")
    if not raw_path.startswith(b"/"):
        raise BadHandshake(f"the request target must be a path starting with '/', not {target[:100]!r}")
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadHandshake("the path is not UTF-8 once percent-decoded") from None
    offered: list[str] = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            offered += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    return Handshake(scheme="wss" if secure else "ws", path=path, query_string=query, root_path=root_path,
                     headers=headers, client=list(client) if client else None,
                     server=list(server) if server else None, subprotocols=offered)


# -- the origin policy -----------------------------------------------------------------------------------------


def _origin_parts(origin: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of an Origin value or an ``allowed_origins`` entry; port None when absent."""
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {origin!r}") from None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def check_allowed_origin(entry: str) -> str | None:
    """The problem with one ``allowed_origins`` entry, or None (used to validate the option)."""
    if entry in ("*", "null"):
        return None
    if "://" in entry:
        try:
            scheme, host, _ = _origin_parts(entry)
        except ValueError as exc:
            return str(exc)
        if scheme not in _DEFAULT_PORTS or not host or urlsplit(entry).path not in ("", "/"):
            return f"{entry!r} is not an origin like 'https://chat.example.com' or 'https://example.com:8443'"
        return None
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+", entry):
        return f"{entry!r} is not '*', 'null', an origin like 'https://example.com', a host, or '*.example.com'"
    return None


def origin_allowed(origin: bytes | None, host: bytes | None, allowed: list[str]) -> bool:
    """Whether a handshake with this ``Origin`` header may go on (against cross-site WebSocket hijacking).

    A browser always sends Origin; a missing one means a non-browser client,
    which could forge any Origin anyway, so it is allowed. Otherwise the origin
    must be the same as the ``Host`` the browser connected to (host and port),
    or match an entry of ``allowed``: ``"*"`` (any), ``"null"`` (sandboxed or
    file: pages), an origin ``"https://example.com[:port]"`` (scheme, host and
    port must match), a host ``"example.com"`` or ``"*.example.com"`` (any
    scheme and port).
    """
    if origin is None:
        return True
    text = origin.decode("latin-1").strip()
    if "*" in allowed:
        return True
    if text == "null":
        return "null" in allowed
    try:
        scheme, name, port = _origin_parts(text)
    except ValueError:
        return False
    if scheme not in _DEFAULT_PORTS or not name:
        return False
    port = port or _DEFAULT_PORTS[scheme]
    if host is not None:
        host_name, _, host_port = host.decode("latin-1").strip().lower().rpartition(":")
        if not host_name or host_port.endswith("]") or not host_port.isdigit():  # no port given: "h" or "[v6]"
            host_name, host_port = host.decode("latin-1").strip().lower(), str(_DEFAULT_PORTS[scheme])
        if host_name.strip("[]") == name and int(host_port) == port:
            return True
    for entry in allowed:
        if "://" in entry:
            e_scheme, e_name, e_port = _origin_parts(entry)
            if (e_scheme, e_name, e_port or _DEFAULT_PORTS[e_scheme]) == (scheme, name, port):
                return True
        elif entry.startswith("*."):
            if name.endswith(entry[1:].lower()):
                return True
        elif entry.lower() == name:
            return True
    return False


# -- messages to the layer -------------------------------------------------------------------------------------


def connect_message(reply_channel: str, handshake: Handshake) -> dict[str, Any]:
    """``websocket.connect``: order 0, with every spec key, the subprotocols offered and the shared keys."""
    return {
        "reply_channel": reply_channel,
        "scheme": handshake.scheme,
        "path": handshake.path,
        "query_string": handshake.query_string,
        "root_path": handshake.root_path,
        "headers": [list(pair) for pair in handshake.headers],
        "client": handshake.client,
        "server": handshake.server,
        "subprotocols": list(handshake.subprotocols),
        "order": 0,
        **shared_keys(PROTOCOL, handshake.sender, handshake.path, None),
    }


def receive_message(reply_channel: str, handshake: Handshake, payload: str | bytes, order: int) -> dict[str, Any]:
    """``websocket.receive`` for one whole message: ``text`` (str) or ``bytes``, the other None."""
    if not isinstance(payload, (str, bytes)):
        raise TypeError(f"a frame's payload is str or bytes, not {type(payload).__name__}")
    is_text = isinstance(payload, str)
    return {
        "reply_channel": reply_channel,
        "path": handshake.path,
        "bytes": None if is_text else payload,
        "order": order,
        **shared_keys(PROTOCOL, handshake.sender, handshake.path, payload if is_text else None),
    }


def disconnect_message(reply_channel: str, handshake: Handshake, code: int, order: int) -> dict[str, Any]:
    """``websocket.disconnect``: the close code (1006 when the connection dropped without one) and the last order."""
    return {
        "reply_channel": reply_channel,
        "path": handshake.path,
        "code": code,
        "order": order,
        **shared_keys(PROTOCOL, handshake.sender, handshake.path, None),
    }


# -- replies from consumers ------------------------------------------------------------------------------------


class InvalidReply(ValueError):
    """A reply the spec does not allow; it is ignored as a whole (the bridge logs and counts it)."""


@dataclass(frozen=True)
class Accept:
    """Finish the held handshake with 101, speaking ``subprotocol`` (None: none)."""

    subprotocol: str | None = None


@dataclass(frozen=True)
class Reject:
    """Refuse the held handshake with an HTTP status."""

    status: int = FORBIDDEN


@dataclass(frozen=True)
class Send:
    """Send one message: a text frame for str, a binary one for bytes."""

    payload: str | bytes


@dataclass(frozen=True)
class Close:
    """Start the closing handshake with ``code``."""

    code: int = NORMAL


Action = Accept | Reject | Send | Close

HANDSHAKE, OPEN, CLOSED = "handshake", "open", "closed"


class ConnectionState:
    """One connection's phase, its ``order`` counter, and what consumers' replies mean in that phase."""

    def __init__(self, subprotocols_offered: list[str] | None = None) -> None:
        self.phase = HANDSHAKE
        self.offered = list(subprotocols_offered or [])
        self.last_order = 0  # of the last message the layer stored: websocket.connect has 0; frames 1, 2, ...

    def next_order(self) -> int:
        """The ``order`` of the next ``websocket.receive``, or of the ``websocket.disconnect`` after the last one.

        It is used up only when the layer stores that message (``stored``): a
        refused frame leaves no gap, so consumers see orders 0, 1, 2, ... always.
        """
        return self.last_order + 1

    def stored(self, order: int) -> None:
        """The layer stored the message with ``order``."""
        self.last_order = order

    def opened(self) -> None:
        self.phase = OPEN

    def closed(self) -> None:
        self.phase = CLOSED

    def interpret(self, reply: Any) -> list[Action]:
        """The actions a reply asks for, in the order to perform them; ``InvalidReply`` if it is not valid.

        The phase moves on as the actions would move it, so replies must be
        interpreted in the order they arrived.
        """
        if not isinstance(reply, dict):
            raise InvalidReply(f"a reply must be a dict, not {type(reply).__name__}")
        accept = reply.get("accept")
        if accept is not None and not isinstance(accept, bool):
            raise InvalidReply(f"'accept' must be true or false, not {accept!r}")
        subprotocol = reply.get("subprotocol")
        if subprotocol is not None:
            if not isinstance(subprotocol, str):
                raise InvalidReply(f"'subprotocol' must be a string, not {subprotocol!r}")
            if subprotocol not in self.offered:
                raise InvalidReply(f"'subprotocol' {subprotocol!r} was not offered by the client "
                                   f"(offered: {', '.join(self.offered) or 'none'})")
        text, data = reply.get("text"), reply.get("bytes")
        if text is not None and data is not None:
            raise InvalidReply("a reply carries 'text' or 'bytes', not both (ASGI 1.0: such a reply is ignored)")
        if text is not None and not isinstance(text, str):
            raise InvalidReply(f"'text' must be a string, not {type(text).__name__}")
        if data is not None and not isinstance(data, bytes):
            raise InvalidReply(f"'bytes' must be bytes, not {type(data).__name__}")
        close = reply.get("close", False)
        if close is None or close is False:
            close_code = None
        elif close is True:
            close_code = NORMAL
        elif isinstance(close, int) and not isinstance(close, bool) and close_code_allowed(close):
            close_code = close
        else:
            raise InvalidReply(f"'close' must be true, false or a close code (1000-1003, 1007-1014, 3000-4999), "
                               f"not {close!r}")
        payload = text if text is not None else data

        actions: list[Action] = []
        if self.phase == HANDSHAKE:
            if accept is False or (close_code is not None and payload is None and not accept):
                self.phase = CLOSED
                return [Reject(FORBIDDEN)]
            if accept or payload is not None:
                actions.append(Accept(subprotocol))
                self.phase = OPEN
        if self.phase == OPEN:
            if payload is not None:
                actions.append(Send(payload))
            if close_code is not None:
                actions.append(Close(close_code))
                self.phase = CLOSED
        return actions
