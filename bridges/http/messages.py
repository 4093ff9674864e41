"""HTTP <-> channel messages, without I/O: what a request becomes, and what a consumer's reply may say.

This module owns the shape of ``http.request`` and ``http.disconnect`` (ASGI
1.0's keys plus the shared ``protocol``/``sender``/``room``/``text``), the
rules a reply on the reply channel must keep, the bridge's own error pages and
the access log line. It must not touch sockets, the reactor or the layer:
``bridge.py`` parses the wire with llhttp (httptools) and feeds this module plain
bytes, and writes out what it returns. docs/spec/http.md is its contract.

Two rules run through it. Everything a peer sends is checked here, and a
problem raises ``HttpError`` carrying the status to answer with (so the bridge
never has to decide wording or codes). Everything a consumer sends is checked
here too, and a problem raises ``BadReply``: the peer then gets a 500, because
writing a bad header through would let a consumer split the response.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from crossroads.bridges.protocol import describe_peer, shared_keys, text_of

PROTOCOL = "http"
REQUEST_CHANNEL = "http.request"
DISCONNECT_CHANNEL = "http.disconnect"
RETRY_AFTER = 1  # seconds a client is told to wait when the layer is full or down: workers catch up fast
TEXT_PLAIN = b"text/plain; charset=utf-8"

# RFC 9110 5.6.2: a header name (and a method) is a token.
_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# A single-reader channel of the layer (docs/spec/layer.md: names under 100 characters).
_FLOW_CHANNEL_RE = re.compile(r"^[a-zA-Z\d\-_.]+\?[\w\-.]*$", re.ASCII)
BODY_PART = 256 * 1024  # bytes of a streamed request body per message on its body_channel (about: reads add up)
FLOW_STEP = 256 * 1024  # body bytes written to a client between two reports on a response's flow_channel
_FORBIDDEN_RE = re.compile(rb"[\r\n\x00]")  # a value with these would split the response or truncate it in C parsers


class HttpError(Exception):
    """A request the bridge answers itself, with ``status`` and a one-line ``detail`` for the peer and the log."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BadReply(ValueError):
    """A consumer's reply that cannot be written as HTTP; the message names the key and the problem."""


# -- requests ------------------------------------------------------------------------------------------------


def http_version(version: bytes) -> str:
    """``b"HTTP/1.1"`` -> ``"1.1"``. Only 1.0 and 1.1 have a request line; anything else is a 400."""
    if version == b"HTTP/1.1":
        return "1.1"
    if version == b"HTTP/1.0":
        return "1.0"
    raise HttpError(400, f"unsupported HTTP version {version[:20]!r}")


def split_target(target: bytes) -> tuple[str, bytes]:
    """A request target -> (path percent-decoded and UTF-8 decoded, query string bytes as sent).

    Accepts origin-form (``/a%20b?x=1``), absolute-form (``http://host/a?x``,
    as sent to proxies) and ``*`` (``OPTIONS *``). A path that is not UTF-8
    once decoded is a 400 rather than a guess, so routes see exactly what was
    asked for.
    """
    raw, _, query = target.partition(b"?")
    raw = raw.partition(b"#")[0]  # a fragment is never meant for the server
    if raw == b"*":
        return "*", query
    lowered = raw[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = raw.split(b"//", 1)[1]
        slash = rest.find(b"/")
        raw = rest[slash:] if slash >= 0 else b"/"
    if not raw.startswith(b"/"):
        raise HttpError(400, f"request target {target[:60]!r} is neither a path nor an absolute URL")
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, f"path {raw[:60]!r} is not UTF-8 once percent-decoded") from None
    return path, query


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[list[bytes]]:
    """Headers as ASGI wants them: ``[name, value]`` byte pairs, names lowercased, order and duplicates kept.

    Names with ``_`` are dropped, as Daphne does: a proxy that strips a
    spoofed ``X-Real-IP`` would let ``X_Real_IP`` through, and frameworks that
    map headers to ``HTTP_X_REAL_IP`` cannot tell the two apart.
    """
    return [[name.lower(), value] for name, value in raw if b"_" not in name]


def _header(headers: Sequence[Sequence[bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def forwarded(headers: Sequence[Sequence[bytes]], client: list | None, scheme: str) -> tuple[list | None, str]:
    """The client and scheme a trusted proxy reports in ``X-Forwarded-For`` / ``-Port`` / ``-Proto``.

    Only for ``proxy_headers = true``: otherwise any client could claim any
    address. The first address of ``X-Forwarded-For`` is the original client
    (each proxy appends the one it saw); a value that is not ASCII is ignored.
    """
    forwarded_for = _header(headers, b"x-forwarded-for")
    if forwarded_for:
        try:
            host = forwarded_for.decode("ascii").split(",")[0].strip()
        except UnicodeDecodeError:
            host = ""
        if host:
            port = 0
            forwarded_port = _header(headers, b"x-forwarded-port")
            if forwarded_port and forwarded_port.strip().isdigit():
                port = int(forwarded_port.strip())
            client = [host, port]
    proto = _header(headers, b"x-forwarded-proto")
    if proto:
        proto_text = proto.split(b",")[0].strip().lower()
        if proto_text in (b"http", b"https"):
            scheme = proto_text.decode()
    return client, scheme


def request_message(*, reply_channel: str, method: bytes, target: bytes, version: bytes,
                    headers: Iterable[tuple[bytes, bytes]], body: bytes, client: list | None,
                    server: list | None, scheme: str = "http", root_path: str = "",
                    proxy_headers: bool = False) -> dict[str, Any]:
    """The ``http.request`` message for one complete request; ``HttpError`` when the request is unusable.

    ``headers`` are the raw (name, value) pairs in the order received;
    ``client`` and ``server`` are ``[host, port]`` or None (Unix socket).
    """
    if not _TOKEN_RE.match(method):
        raise HttpError(400, f"method {method[:20]!r} is not a token")
    path, query = split_target(target)
    asgi_headers = request_headers(headers)
    if proxy_headers:
        client, scheme = forwarded(asgi_headers, client, scheme)
    return {
        "reply_channel": reply_channel,
        "http_version": http_version(version),
        "method": method.decode("ascii").upper(),
        "scheme": scheme,
        "path": path,
        "query_string": query,
        "root_path": root_path,
        "headers": asgi_headers,
        "body": body,
        "client": client,
        "server": server,
        # the keys every *.receive carries, so protocol-neutral consumers work on HTTP too
        **shared_keys(PROTOCOL, describe_peer(client), path, text_of(body)),
    }


def disconnect_message(reply_channel: str, path: str) -> dict[str, Any]:
    """``http.disconnect``: the client left before its response was complete."""
    return {"reply_channel": reply_channel, "path": path, "protocol": PROTOCOL}


# -- a port shared with a WebSocket bridge -------------------------------------------------------------------


def head_end(data: bytes) -> int:
    """Where the request head in ``data`` ends (after its blank line); -1 while it is incomplete."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")  # a bare-LF head goes to HTTP too, which refuses it
    ends = [at + size for at, size in ((crlf, 4), (lf, 2)) if at >= 0]
    return min(ends) if ends else -1


def is_websocket_upgrade(head: bytes) -> bool:
    """Whether a request head asks to become a WebSocket (an ``Upgrade`` header listing ``websocket``).

    Only the routing of a connection is decided here: whether the handshake is
    valid (GET, ``Connection: Upgrade``, the key, the version) is for the
    WebSocket bridge to say, in its own error responses.
    """
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"upgrade":
            if any(token.strip().lower() == b"websocket" for token in value.split(b",")):
                return True
    return False


# -- replies -------------------------------------------------------------------------------------------------


@dataclass
class Response:
    """The start of a response (the first reply on a request's reply channel)."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content: bytes = b""
    more_content: bool = False
    flow_channel: str | None = None  # where the bridge reports how far the client read a streamed body

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, whatever the case the consumer wrote its name in."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass
class Chunk:
    """A later part of a streamed response (``more_content`` was true before it)."""

    content: bytes = b""
    more_content: bool = False


def _as_bytes(value: Any, what: str, encoding: str) -> bytes:
    if type(value) is bytes or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode(encoding)
        except UnicodeEncodeError:
            raise BadReply(f"{what} {value[:40]!r} cannot be encoded as {encoding}: send bytes") from None
    raise BadReply(f"{what} must be bytes or str, not {type(value).__name__}")


def _content(message: Mapping[str, Any]) -> tuple[bytes, bool]:
    """The body bytes of a reply and whether they came from ``text``."""
    if "content" in message and message["content"] is not None:
        return _as_bytes(message["content"], "content", "utf-8"), False
    text = message.get("text")
    if text is None:
        return b"", False
    if not isinstance(text, str):
        raise BadReply(f"text must be str, not {type(text).__name__} (send bytes as content)")
    return text.encode("utf-8"), True


def _more_content(message: Mapping[str, Any]) -> bool:
    more = message.get("more_content", False)
    if not isinstance(more, bool):
        raise BadReply(f"more_content must be true or false, not {more!r}")
    return more


def response_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """A reply's ``headers``, checked: a list of [name, value], each bytes (or str: latin-1), no CR, LF or NUL."""
    if not isinstance(headers, list | tuple):
        raise BadReply(f"headers must be a list of [name, value] pairs, not {type(headers).__name__}")
    checked = []
    for i, pair in enumerate(headers):
        if not (type(pair) is list or isinstance(pair, list | tuple)) or len(pair) != 2:
            raise BadReply(f"headers[{i}] must be a [name, value] pair, not {pair!r:.60}")
        name = _as_bytes(pair[0], f"headers[{i}] name", "latin-1")
        value = _as_bytes(pair[1], f"headers[{i}] value", "latin-1")
        if not _TOKEN_RE.match(name):
            raise BadReply(f"headers[{i}] name {name[:40]!r} is not a valid header name (letters, digits, "
                           "!#$%&'*+-.^_`|~; no spaces, colons, CR or LF)")
        if _FORBIDDEN_RE.search(value):
            raise BadReply(f"headers[{i}] value for {name.decode('latin-1')!r} contains CR, LF or NUL, "
                           "which would split the response")
        checked.append((name, value))
    return checked


def response_from_message(message: Any) -> Response:
    """The first reply to a request, checked; ``BadReply`` says what is wrong with it.

    ASGI 1.0 keys: ``status`` (int, default 200 here), ``headers``,
    ``content``, ``more_content``. The shared ``{"text": ...}`` works alone or
    with them: it is the content, UTF-8, and ``text/plain; charset=utf-8``
    unless a content-type is given.
    """
    if type(message) is not dict and not isinstance(message, Mapping):  # (the ABC asked only of what is no dict)
        raise BadReply(f"a reply must be a dict, not {type(message).__name__}")
    status = message.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise BadReply(f"status must be a whole number from 200 to 599, not {status!r}")
    headers = response_headers(message.get("headers") or [])
    content, from_text = _content(message)
    flow_channel = message.get("flow_channel")
    if flow_channel is not None and (not isinstance(flow_channel, str) or not _FLOW_CHANNEL_RE.match(flow_channel)):
        raise BadReply(f"flow_channel must be a single-reader channel name (like 'http.flow?a1b2'), "
                       f"not {flow_channel!r:.60}")
    response = Response(status, headers, content, _more_content(message), flow_channel)
    if from_text and response.header(b"content-type") is None:
        response.headers.append((b"content-type", TEXT_PLAIN))
    length = response.header(b"content-length")
    if length is not None and not response.more_content:
        if not length.strip().isdigit() or int(length) != len(content):
            raise BadReply(f"the content-length header says {length[:20]!r} but the content is {len(content)} bytes")
    return response


def chunk_from_message(message: Any) -> Chunk:
    """A later reply of a streamed response: ``content`` (or ``text``) and ``more_content``."""
    if not isinstance(message, Mapping):
        raise BadReply(f"a reply must be a dict, not {type(message).__name__}")
    if "status" in message or "headers" in message:
        raise BadReply("status and headers were already sent; later parts of a streamed response carry only "
                       "content (or text) and more_content")
    content, _ = _content(message)
    return Chunk(content, _more_content(message))


# -- what the bridge writes itself ---------------------------------------------------------------------------


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"


_REASONS: dict[int, bytes] = {}


def reason_bytes(status: int) -> bytes:
    """``reason(status)`` as the status line's bytes, looked up once per status (``HTTPStatus()`` is slow)."""
    found = _REASONS.get(status)
    if found is None:
        found = _REASONS[status] = reason(status).encode("latin-1")
    return found


def error_response(status: int, detail: str, *, retry_after: int | None = None) -> Response:
    """A short text/plain page for a status the bridge answers itself (400, 413, 431, 500, 503, 504)."""
    body = f"{status} {reason(status)}: {detail}\n".encode()
    headers = [(b"content-type", TEXT_PLAIN), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return Response(status, headers, body)


def error_bytes(status: int, detail: str) -> bytes:
    """A whole ``Connection: close`` response, for errors found before there is a request to answer."""
    response = error_response(status, detail)
    head = [f"HTTP/1.1 {status} {reason(status)}".encode()]
    head += [name + b": " + value for name, value in response.headers]
    head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + response.content


# -- the access log ------------------------------------------------------------------------------------------


_NEEDS_ESCAPE_RE = re.compile(rb'[^ !#-\[\]-~]')  # anything but printable ASCII, or a quote or backslash


def _log_field(value: bytes | str | None) -> str:
    """A quoted field of the combined format: escapes make a hostile User-Agent unable to forge a line."""
    if value is None or value in (b"", ""):
        return "-"
    if isinstance(value, bytes):
        if not _NEEDS_ESCAPE_RE.search(value):  # what nearly every client sends: the same, at a fifth of the cost
            return value.decode("ascii")
        value = value.decode("latin-1")
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


_stamp: list = [None, ""]  # the last whole second logged, and its stamp: lines of the same second share it


def _log_stamp(when: float) -> str:
    second = int(when)
    if _stamp[0] != second:
        _stamp[:] = [second, time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))]
    return _stamp[1]


def access_log_line(*, client_host: str | None, when: float, method: bytes | None, target: bytes | None,
                    version: bytes | None, status: int, length: int, referer: bytes | None = None,
                    user_agent: bytes | None = None) -> str:
    """One line of the combined log format (Apache's and nginx's), so the usual log tools read it.

    ``method`` is None when the request line itself could not be read: the
    request is then logged as ``"-"``.
    """
    stamp = _log_stamp(when)
    if method is None:
        request = "-"
    else:
        request = _log_field(b" ".join(part for part in (method, target, version) if part))
    return (f'{client_host or "-"} - - [{stamp}] "{request}" {status} {length or "-"} '
            f'"{_log_field(referer)}" "{_log_field(user_agent)}"')
