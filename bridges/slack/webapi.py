"""The Web API calls of replies, on a small HTTP/1.1 client of our own: keep-alive connections, llhttp parsing.

This module owns one thing: POSTing a JSON body to ``{api_url}{method}`` with the bot token and handing back
what Slack answered (``status``, the parsed JSON object, ``Retry-After``), judging nothing; the bridge maps
the answer as docs/spec/slack.md says. It is used for the calls made once per reply (``chat.postMessage``,
``chat.update``, ``chat.postEphemeral``, ``reactions.add``); slack-sdk makes every other call.

Why not slack-sdk's ``AsyncWebClient``, or aiohttp's client under it: a post is the one call made per event,
and one ``chat.postMessage`` through the SDK took ~690,000 instructions of the client (callgrind,
bench/slack_post.py: its argument and header building, the retry-state loop, aiohttp's ``ClientRequest`` and
``ClientResponse``, a ``SlackResponse``), aiohttp's client alone with headers built once ~480,000, and this
client ~160,000 (0.23x the SDK's): one pre-built request head and the body written to an idle connection,
the answer fed to llhttp (httptools, which the HTTP bridge parses with already). Since the calls' timeouts are
checked by one timer instead of an ``asyncio.timeout`` each, ~89,000 (with 20 calls in flight). ``send`` hands
the outcome to a callback, called by the connection that read the answer (``call`` awaits it): the bridge
starts a channel's next post from there, with no task, coroutine or semaphore per post.

What it does not do (none of it is needed for Slack's Web API): proxies, redirects, compression, 1xx
answers, an answer without a length that ends at the close. A request written on a kept-alive connection
that the server has closed meanwhile is sent again once on a new one, as aiohttp does; every other failure
raises an ``OSError`` (``ConnectionError`` when refused, reset or answered with what is not HTTP, an
``ssl.SSLError`` for a certificate the system's CAs, or ``ssl_context``'s, do not trust) or ``TimeoutError``
once ``timeout`` passed: the bridge tries those again, as network errors.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

CONNECTIONS = 100  # calls in flight at once, each on its own connection (aiohttp's default pool size)


class WebAPI:
    """JSON POSTs to Slack's Web API with the bot token, on up to ``CONNECTIONS`` kept-alive connections."""

    def __init__(self, api_url: str, token: str, *, timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(api_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        default_port = self.port == (443 if self.tls else 80)
        host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # an IPv6 literal
            host_header = f"[{self.host}]" if default_port else f"[{self.host}]:{self.port}"
        self.path = parts.path or "/"
        # Everything of a request but its method's path, the body's length and the body, built once.
        self.fields = (f"Host: {host_header}\r\nAuthorization: Bearer {token}\r\n"
                       "Content-Type: application/json; charset=utf-8\r\nUser-Agent: crossroads\r\n"
                       "Content-Length: ").encode("latin-1")
        self.heads: dict[str, bytes] = {}
        self.timeout = timeout
        self.idle: list[_Connection] = []  # kept-alive, most recently used last
        self.busy = 0  # calls holding one of the CONNECTIONS slots (writing, connecting or waiting for an answer)
        self.waiting: deque[_Call] = deque()  # calls waiting for a slot, oldest (and so soonest due) first
        self.connecting: set[asyncio.Task] = set()
        self.closed = False
        # The deadlines of calls in flight, checked by one timer a few times per ``timeout`` rather than one timer
        # per call (asyncio.timeout's context and TimerHandle were ~5% of the bridge's CPU in a flood with replies).
        self.answering: set[_Connection] = set()
        self.sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def call(self, method: str, args: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        """POST ``args`` as JSON to ``method`` (``"chat.postMessage"``); Slack's status, JSON answer, Retry-After."""
        future = asyncio.get_running_loop().create_future()

        def done(error: BaseException | None, status: int, answer: dict[str, Any], retry_after: str | None) -> None:
            if future.done():  # the caller was cancelled
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((status, answer, retry_after))

        self.send(method, args, done)
        return await future

    def send(self, method: str, args: dict[str, Any], done: Done) -> None:
        """POST ``args`` as JSON to ``method``; ``done(error, status, answer, retry_after)`` is called with the
        outcome later (never from within ``send``): ``error`` None and Slack's status, JSON answer and Retry-After
        (read from an answer that is not 200 only: None with a 200), or the ``OSError`` / ``TimeoutError`` that ended
        the call (and 0, {}, None).

        Why callbacks and not only ``call``: a coroutine, its future and a semaphore per post were a fifth of the
        bridge's instructions per reply; the bridge starts a channel's next post from ``done``. Raises what
        serializing ``args`` raises (``TypeError``), before anything is sent.
        """
        head = self.heads.get(method)
        if head is None:
            head = self.heads[method] = f"POST {self.path}{method} HTTP/1.1\r\n".encode("latin-1") + self.fields
        try:
            body = orjson.dumps(args)  # ~15x json.dumps for a post's few keys (setup.cfg pins orjson)
        except TypeError:  # what orjson refuses and json writes (an int over 64 bits, a lone surrogate)
            body = json.dumps(args).encode()
        loop = self.loop
        if loop is None:  # the loop of the first call; not per call: Python 3.11's get_running_loop() is a getpid()
            loop = self.loop = asyncio.get_running_loop()
        # Deadlines on time.monotonic() itself, not loop.time() (a Python method per call that returns it).
        call = (b"%s%d\r\n\r\n%s" % (head, len(body), body), done, time.monotonic() + self.timeout)
        if self.busy >= CONNECTIONS:  # this one's timeout runs while it waits for a slot
            self.waiting.append(call)
            self._watch()
            return
        self.busy += 1
        idle = self.idle
        if idle and not idle[-1].lost:  # the usual case, _start and _write inline
            connection = idle.pop()
            connection.deadline = call[2]
            self.answering.add(connection)
            if self.sweeper is None:
                self.sweeper = loop.call_later(self._sweep_every(), self._sweep)
            connection.request(call)
            return
        self._start(call)

    def _start(self, call: _Call) -> None:
        """Write ``call`` to an idle connection, or to a new one (``call`` holds a slot)."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.lost:
                self._write(connection, call)
                return
            connection.close()  # closed by the server while idle
        task = self.loop.create_task(self._connect_for(call))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _connect_for(self, call: _Call) -> None:
        try:
            connection = await asyncio.wait_for(self._connect(), max(call[2] - time.monotonic(), 0))
        except Exception as exc:  # OSError, TimeoutError
            self._finish(call, exc)
            return
        self._write(connection, call)

    def _write(self, connection: _Connection, call: _Call) -> None:
        connection.api = self
        connection.deadline = call[2]
        self.answering.add(connection)
        self._watch()
        connection.request(call)

    def _watch(self) -> None:
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(self._sweep_every(), self._sweep)

    def _answered(self, connection: _Connection, call: _Call, status: int, raw: bytes, retry_after: str | None) -> None:
        """``connection``'s answer to ``call`` came whole (llhttp's ``on_message_complete``)."""
        self.answering.discard(connection)
        if connection.keep_alive and not self.closed:
            self.idle.append(connection)
        else:
            connection.close()
        try:
            answer = orjson.loads(raw)
        except ValueError:  # orjson.JSONDecodeError is one
            answer = None
        if not isinstance(answer, dict):  # a proxy's error page, say
            answer = {"ok": False, "error": f"HTTP {status} with an answer that is not a JSON object"}
        self._finish(call, None, status, answer, retry_after)

    def _failed(self, connection: _Connection, call: _Call, exc: Exception) -> None:
        """``connection`` failed ``call``: lost, not HTTP, or timed out."""
        self.answering.discard(connection)
        connection.close()
        if isinstance(exc, _Stale):
            if connection.used and not self.closed:
                self._start(call)  # closed by the server while idle: once more on a fresh connection
                return
            exc = ConnectionError("the Web API closed the connection before answering")
        self._finish(call, exc)

    def _finish(self, call: _Call, error: BaseException | None, status: int = 0, answer: dict[str, Any] | None = None,
                retry_after: str | None = None) -> None:
        """Free ``call``'s slot for the next waiting call, then tell its caller."""
        self.busy -= 1
        while self.waiting and self.busy < CONNECTIONS:
            self.busy += 1
            self._start(self.waiting.popleft())
        try:
            call[1](error, status, answer if answer is not None else {}, retry_after)
        except Exception as exc:  # the caller's bug must not fail this connection (llhttp's callback, say)
            self.loop.call_exception_handler({"message": "a Web API call's callback failed", "exception": exc})

    def _sweep_every(self) -> float:
        return min(1.0, self.timeout / 4)  # a call times out at most a quarter of its timeout (or 1 s) late

    def _sweep(self) -> None:
        """Fail the calls whose ``timeout`` passed with ``TimeoutError`` (their connections closed); again later while
        calls are in flight or waiting."""
        loop = self.loop
        now = time.monotonic()
        for connection in [c for c in self.answering if c.deadline <= now]:
            self.answering.discard(connection)
            connection.time_out()
        while self.waiting and self.waiting[0][2] <= now:
            call = self.waiting.popleft()
            self.busy += 1  # as _finish frees it
            self._finish(call, TimeoutError("no Web API connection was free in time"))
        self.sweeper = loop.call_later(self._sweep_every(), self._sweep) if self.answering or self.waiting else None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            _Connection, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.tls else None)
        return connection

    def close(self) -> None:
        """Close the idle connections; calls in flight end with theirs."""
        self.closed = True
        if self.sweeper is not None and not self.answering and not self.waiting:
            self.sweeper.cancel()
            self.sweeper = None
        for connection in self.idle:
            connection.close()
        self.idle.clear()


Done = Callable[[BaseException | None, int, dict[str, Any], str | None], None]


# One call on its way: the whole request, who is told the outcome (``done``), and the loop's time it is due by.
# A tuple, not a class: one is made per call, and a class's __init__ was ~2% of a reply's instructions.
_Call = tuple[bytes, Done, float]


class _Stale(ConnectionError):
    """The connection closed before a byte of the answer came: the request may be sent again on another."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, the answer parsed by llhttp as it arrives.

    Why no ``on_header``: llhttp calls it for every header of every answer (two bytes objects and a Python call
    each, and Slack sends about twenty), for the one header we read, Retry-After, which comes with a 429. So the
    answer's bytes are kept as they come, and the head is read for Retry-After only when the status is not 200.
    """

    def __init__(self) -> None:
        self.body: list[bytes] = []  # the current answer's body, as llhttp hands it over
        self.on_body = self.body.append  # llhttp's callback: the list's own method, no Python call per piece
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.api: WebAPI | None = None
        self.call: _Call | None = None
        self.lost = False
        self.used = False  # an answer was read on it: a request it loses unanswered may be sent again on another
        self.keep_alive = True
        self.chunks: list[bytes] = []  # the current answer's bytes as read (none yet: not started)
        self.deadline = 0.0  # the time.monotonic() by which the current answer must have come

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, call: _Call) -> None:
        self.call = call
        if self.lost:
            self._fail(_Stale())
            return
        self.chunks.clear()
        self.body.clear()
        self.transport.write(call[0])

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"a Web API answer that is not HTTP ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.keep_alive = False
        if self.chunks:
            self._fail(ConnectionError(f"the Web API connection was lost mid-answer ({exc or 'closed'})"))
        else:
            self._fail(_Stale())

    def _fail(self, exc: Exception) -> None:
        call, self.call = self.call, None
        if call is not None:
            self.api._failed(self, call, exc)

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def time_out(self) -> None:
        self.keep_alive = False
        self._fail(TimeoutError("the Web API did not answer in time"))
        if self.transport is not None:
            self.transport.abort()

    # llhttp's callbacks (and on_body, set in __init__)

    def on_message_complete(self) -> None:
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.used = True
        call, self.call = self.call, None
        if call is not None:
            status = self.parser.get_status_code()
            self.api._answered(self, call, status, b"".join(self.body),
                               None if status == 200 else _retry_after_of(b"".join(self.chunks)))


class _RetryAfter:
    """llhttp's header callback for ``_retry_after_of``: the last Retry-After value."""

    def __init__(self) -> None:
        self.value: str | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self.value = value.decode("latin-1")


def _retry_after_of(answer: bytes) -> str | None:
    """The Retry-After header of a whole answer's bytes (the last one if there are several; None without one), read
    again by llhttp, with a header callback this time: only for an answer that is not 200, so rarely."""
    found = _RetryAfter()
    try:
        httptools.HttpResponseParser(found).feed_data(answer)
    except httptools.HttpParserError:  # it parsed once already; a second reading cannot fail otherwise
        return None
    return found.value
