"""The HTTP bridge: llhttp (httptools) parsing inside our own Twisted protocol in front, the channel layer behind.

This module owns the I/O of HTTP: framing each connection's requests (llhttp
checks every head, strictly: see ``HttpChannel``), the limits (413, 431, 408,
504, 503), the reply channel of each request, writing responses (streamed
ones too, under ``max_response_buffer``), and the access log (logger
``crossroads.http.access``). What a request or a reply means belongs to
``messages.py``; replies, counters and stopping belong to ``bridges.base``;
how it listens (TCP, a Unix socket, a socket from systemd, TLS) to
``bridges.listening``. docs/spec/http.md is the contract.

Theory of operation: ``HttpChannel`` parses a connection and hands one
complete request at a time to ``HttpBridge.request_received`` (what the
client pipelines behind it waits, unparsed). The bridge registers the
request as a reply target, sends ``http.request`` from a spawned task, and
arms the ``http_timeout``. The first reply starts the response; with
``more_content`` the request stays registered for the chunks. A request
leaves the targets when its response is complete, when the bridge answered
it itself, or when its client left (then ``http.disconnect`` follows its
``http.request`` into the layer). twisted.web is no longer used but for its
chunked-body decoder: its parser and Request objects cost about 28 us a
request where llhttp takes 2 (see the commit that made the change).

Two flows are paced between bridge and consumer. A body over ``max_body`` (up to ``max_upload``)
does not wait for the whole request: ``http.request`` goes when the head is in, with a
``body_channel``, and the body follows one part at a time, reading from the client paused while a
part waits for the layer; replies wait until the request is whole (as twisted.web wrote no response
before, and a client still sending may not be reading). A streamed response that names a ``flow_channel``
hears how far its client has read (``ResponseFlow``), so its consumer need not outrun ``max_response_buffer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httptools
from twisted.internet import protocol
from twisted.internet.interfaces import ITCPTransport
from twisted.web import http  # only its chunked decoder

from crossroads.bridges.base import Bridge, Option, OptionError, as_future, get_reactor
from crossroads.bridges.flow import HeldWrites, buffer_limit, write_now
from crossroads.bridges.listening import (
    ALLOWED_HOSTS,
    ListeningBridge,
    address_of,
    allowed_hosts,
    busy_response,
    listen,
    listen_options,
    server_address,
    tcp_port,
    uses_tls,
)
from crossroads.bridges.protocol import host_allowed, host_refused, positive_seconds, zero_or_more
from crossroads.layer import ChannelFull, LayerUnavailable, MessageTooLarge
from crossroads.layer.base import backoff_delays, new_channel_name

from . import messages

access_log = logging.getLogger("crossroads.http.access")




def _header_limit(value: int) -> str | None:
    return None if value >= 1024 else "must be at least 1024 bytes (browsers send cookies)"


class ResponseFlow(HeldWrites):
    """A streamed response's parts, held while its client does not read, up to ``max_response_buffer`` bytes.

    ASGI 1.0 gives a consumer no way to wait for a slow client: it sends
    every part at once. The transport pauses this producer when the socket's
    send buffer is full; the parts that come meanwhile wait (bridges/flow.py)
    and are written as the client reads. A client further behind than
    ``max_response_buffer``, or reading nothing for ``idle_timeout``, is cut
    off (logged, counted in ``slow_clients``); its consumer hears ``http.disconnect``.
    """

    def __init__(self, bridge: HttpBridge, request: HttpRequest, flow_channel: str | None = None,
                 written: int = 0) -> None:
        self.bridge, self.request = bridge, request
        self.complete = False  # the last part has come: finish once it is written
        # With a flow_channel the consumer waits for these reports instead of sending every part at once.
        self.flow_channel = flow_channel
        self.written = self.reported = written  # body bytes handed to the transport; the last count reported
        options = bridge.options
        super().__init__(self._send, self.cut_off, limit=options["max_response_buffer"],
                         timeout=options["idle_timeout"], limit_name="max_response_buffer",
                         timeout_name="idle_timeout", on_resume=self._written)

    def _send(self, content: bytes) -> None:
        self.request.write(content)
        self.written += len(content)
        if self.flow_channel is not None and self.written - self.reported >= messages.FLOW_STEP:
            self.reported = self.written
            self.bridge.tell_flow(self.flow_channel, {"written": self.written})

    def write_part(self, content: bytes, last: bool) -> None:
        self.complete = last
        direct = not (self.paused or self.held)
        self.write(content, len(content))
        if last and direct:
            self.done()

    def _written(self) -> None:
        if self.complete and not self.held:
            self.done()

    def done(self) -> None:
        self._stop_timer()
        self.request.channel.transport.unregisterProducer()
        self.bridge._finish(self.request)

    def cut_off(self, why: str) -> None:
        request = self.request
        self.bridge.count("slow_clients")
        self.bridge.log.warning("%s: cut off %s during the streamed response to %s %s: %s", self.bridge.label,
                                request.channel.peer, request.method.decode("latin-1"), request.path_text, why)
        request.channel.transport.abortConnection()


_NO_BODY_STATUSES = frozenset((204, 304))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refused(Exception):
    """Raised from a parser callback after the connection refused the request: stops llhttp at once."""


class HttpRequest:
    """One request of a connection, and the reply target of its reply channel; it writes its own response."""

    def __init__(self, channel: HttpChannel) -> None:
        self.channel = channel
        self.bridge: HttpBridge = channel.bridge
        self.method = b""
        self.uri = b""
        self.clientproto = b"HTTP/1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []  # as received, in order, duplicates kept
        self.names: list[bytes] = []  # raw_headers' names lowercased (looked up 5 times a request: lowered once)
        self.body: list[bytes] = []
        self.body_size = 0
        self.persistent = True  # the connection stays open after the response
        self.local_id: str | None = None  # set while replies for it are expected
        self.response_started = False
        self.flow: ResponseFlow | None = None  # while a streamed response is being written
        self.sending: asyncio.Task | None = None  # the task storing http.request, awaited before http.disconnect
        self.stored = False  # http.request is in the layer (known once ``sending`` is done)
        self.path_text = ""
        self.client_host: str | None = None  # for the access log; the proxy's client when proxy_headers is on
        self.finished = False  # its response is complete
        self.disconnected = False  # its client left first
        self.code = 0
        self.chunked = False  # the response is sent with Transfer-Encoding: chunked
        self.body_allowed = True  # not for HEAD, 204, 304
        self.sent_length = 0  # body bytes written, for the access log
        # A body over max_body (up to max_upload) streamed on body_channel as it arrives:
        self.body_channel: str | None = None
        self.body_pending = bytearray()  # arrived, not yet sent: at most about one part
        self.body_sending: asyncio.Task | None = None  # the part on its way to the layer
        self.body_complete = False  # the whole body has arrived
        self.body_unwanted = False  # the consumer answered before the body was complete: the rest is dropped
        self.early_replies: list[dict] = []  # replies that came before the request was complete

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (``name`` lowercase)."""
        try:
            return self.raw_headers[self.names.index(name)][1]
        except ValueError:
            return None

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The status line and headers: chunked to HTTP/1.1 when the length is not known, as twisted.web did."""
        self.code = status
        self.body_allowed = self.method != b"HEAD" and status not in _NO_BODY_STATUSES
        has_length = False
        has_connection = self.persistent  # a closing HTTP/1.1 response says so, unless the consumer's headers do
        lines = [b"%s %d %s\r\n" % (self.clientproto, status, messages.reason_bytes(status))]
        for pair in headers:
            lines.append(b"%s: %s\r\n" % pair)
            name = pair[0].lower()
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                has_connection = True
        if self.clientproto == b"HTTP/1.1":
            if not has_length and self.body_allowed:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            if not has_connection:
                lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Write the status line and headers of a response whose body follows in parts."""
        self.channel.send(self.head(status, headers))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        """Write a whole response in one write (one send to the socket, as a rule), then finish it."""
        data = self.head(status, headers)
        if content and self.body_allowed:
            self.sent_length = len(content)
            data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(content), content) if self.chunked else content
        elif self.chunked:
            data += b"0\r\n\r\n"
        self.chunked = False  # its last chunk is written already
        self.channel.send(data)

    def write(self, data: bytes) -> None:
        if self.disconnected or not data or not self.body_allowed:
            return
        self.sent_length += len(data)
        if self.chunked:
            self.channel.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.channel.transport.write(data)

    def finish(self) -> None:
        if self.finished or self.disconnected:
            return
        self.finished = True
        if self.chunked:
            self.channel.transport.write(b"0\r\n\r\n")
        self.bridge.log_access(self, self.code, self.sent_length)
        self.channel.request_done(self)


class BoundedChunkedDecoder(http._ChunkedTransferDecoder):
    """twisted.web's de-chunker, refusing a chunk larger than what is left of ``max_body`` from its size line.

    (llhttp reports a chunk's start but not its size, so chunked bodies are de-chunked here.)
    """

    def __init__(self, channel: HttpChannel, request: HttpRequest) -> None:
        super().__init__(self._data, self._finished)
        self.channel, self.request = channel, request

    def _data(self, data: bytes) -> None:
        self.request.body_size += len(data)
        self.request.body.append(data)

    def _finished(self, rest: bytes) -> None:
        self.channel.chunked_rest = rest

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        limit = self.channel.bridge.options["max_body"]
        if self.request.body_size + self.length > limit:
            self.channel.refuse(413, f"a chunk of {self.length} bytes takes the body over max_body ({limit} bytes)")
            self._buffer.clear()  # nothing more of this body is read
            return False
        return True


class HttpChannel(protocol.Protocol):
    """One client connection: llhttp (httptools) parses, this protocol frames, limits and answers in order.

    llhttp, Node's parser, is strict against request smuggling by design: it
    refuses a line ended by a bare LF, obs-fold continuation lines, two
    lengths, ``Transfer-Encoding`` with ``Content-Length`` or not ending in
    ``chunked``. We add what it leaves to the server: HTTP versions other than
    1.0/1.1, ``Transfer-Encoding`` on HTTP/1.0, a second ``Transfer-Encoding``,
    an HTTP/1.1 request without exactly one ``Host``, and the limits.

    llhttp sees each request head (we cut the bytes at the head's blank line,
    so we always know where a body starts); a ``Content-Length`` body is fed
    to it by the length, a chunked body is de-chunked here (twisted.web's
    decoder, bounded), so a chunk over ``max_body`` is refused at its size line.
    One request is answered at a time, as twisted.web did: what a client
    pipelines behind it waits unparsed (reading stops past 16 KiB) until its
    response is complete, so responses go out in order.
    """

    PIPELINE_BUFFER = 16384  # bytes read ahead of the request being answered before the client is not read
    ABORT_AFTER = 15.0  # seconds an idle connection being closed may take to read what it was sent (twisted.web's)
    MAX_HEADERS = 500

    def connectionMade(self) -> None:
        self.bridge: HttpBridge = self.factory.bridge
        options = self.bridge.options
        self.max_head = options["max_header_bytes"]
        self.refused = False
        # The same for every request of the connection: asked of the transport once.
        self.client = address_of(self.transport.getPeer())
        self.server = server_address(self.transport.getHost(), options)
        self.peer = messages.describe_peer(self.client)
        self.closed = asyncio.get_running_loop().create_future()  # close_protocol() waits for it
        self.reactor = get_reactor()
        # header_timeout, from a head's first byte to its last: one timer per connection, not per request (arming
        # and cancelling one per request was a quarter of the parsing's cost). It checks head_began when it fires.
        self.head_timer: Any = None
        self.head_began: float | None = None  # while a head is arriving
        self.body_timer: Any = None  # every header_timeout while a body arrives: is it at min_body_rate?
        self.body_bytes = 0  # of the body arriving now
        self.parser = httptools.HttpRequestParser(self)
        self.request: HttpRequest | None = None  # the one being parsed
        self.active: HttpRequest | None = None  # the one being answered; bytes after it wait in pending
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.reading_paused = False  # past PIPELINE_BUFFER bytes pipelined behind the request being answered
        self.paused_for_layer = False  # reading paused while a streamed body's part waits for the layer
        self.body_left = 0  # of a Content-Length body
        self.decoder: BoundedChunkedDecoder | None = None  # while a chunked body arrives
        self.chunked_rest: bytes | None = None  # what followed a chunked body's end
        self.head_size = 0  # bytes of the head being parsed so far
        self.head_tail = b""  # the last bytes of a head arriving in parts, where its blank line may begin
        self.headers_done = False
        self.completed = False  # the message fed to llhttp just completed
        self.header_count = 0
        self.hosts = 0
        self.transfer_encodings = 0
        self.closing = False
        self.last_data = self.reactor.seconds()
        self.idle_call: Any = self.reactor.callLater(options["idle_timeout"], self._idle_check)
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.bridge.channels.add(self)

    # -- bytes out --

    def send(self, data: bytes) -> None:
        """Write to the client: straight to the socket when nothing waits before it (``flow.write_now``)."""
        write_now(self.transport, data)

    # -- bytes in --

    def dataReceived(self, data: bytes) -> None:
        if self.refused or self.closing:
            return
        self.last_data = self.reactor.seconds()
        if self.active is not None:  # pipelined behind the request being answered: parsed once it is
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > self.PIPELINE_BUFFER and not self.reading_paused:
                self.reading_paused = True
                self.transport.pauseProducing()
            return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        while data and not (self.refused or self.closing):
            if self.active is not None:  # a request completed in this read: the rest waits for its response
                self.pending.append(data)
                self.pending_size += len(data)
                return
            if self.decoder is not None:  # a chunked body
                self.body_bytes += len(data)
                self.chunked_rest = None
                try:
                    self.decoder.dataReceived(data)
                except http._MalformedChunkedDataError as exc:
                    self.refuse(400, f"malformed HTTP request: bad chunked framing ({str(exc).rstrip('.')})")
                    return
                if self.refused or self.chunked_rest is None:
                    return
                data, self.decoder = self.chunked_rest, None
                self.parser = httptools.HttpRequestParser(self)  # llhttp never saw the chunked body
                self._complete()
            elif self.headers_done:  # a Content-Length body
                piece, data = data[:self.body_left], data[self.body_left:]
                self.body_left -= len(piece)
                self.body_bytes += len(piece)
                self._feed(piece)
            else:  # a head: llhttp gets it up to its blank line, so where the body starts is known
                if self.head_began is None:  # a head begins: it has header_timeout to end
                    self.head_began = self.reactor.seconds()
                    if self.head_timer is None:
                        self.head_timer = self.reactor.callLater(self.bridge.options["header_timeout"],
                                                                 self._head_check)
                joined = self.head_tail + data
                end = joined.find(b"\r\n\r\n")
                cut = len(data) if end < 0 else end + 4 - len(self.head_tail)
                if self.head_size + cut > self.max_head:
                    self.refuse(431, f"request line and headers over max_header_bytes ({self.max_head} bytes)")
                    return
                self.head_size += cut
                self.head_tail = joined[-3:] if end < 0 else b""
                piece, data = data[:cut], data[cut:]
                self._feed(piece)
            if self.completed and not self.refused:
                self._complete()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade (or CONNECT) asked of the HTTP bridge: it is answered as a request, then the connection ends.
            if self.request is not None:
                self.request.persistent = False
            self.parser = httptools.HttpRequestParser(self)
        except httptools.HttpParserCallbackError:
            if not self.refused:
                raise
        except httptools.HttpParserError as exc:
            if not self.refused:
                self.refuse(400, f"malformed HTTP request: {str(exc).rstrip('.')}")

    # -- llhttp's callbacks --

    def on_message_begin(self) -> None:
        self.request = HttpRequest(self)
        self.headers_done = False
        self.header_count = self.hosts = self.transfer_encodings = 0

    def on_url(self, url: bytes) -> None:
        self.request.uri += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.MAX_HEADERS:
            self.refuse(431, f"more than {self.MAX_HEADERS} header lines")
            raise _Refused
        lowered = name.lower()
        if lowered == b"host":
            self.hosts += 1
        elif lowered == b"transfer-encoding":
            # Smuggling: a proxy may honour another one of several. llhttp refuses most such pairs, not all.
            self.transfer_encodings += 1
            if self.transfer_encodings > 1:
                self.refuse(400, "more than one Transfer-Encoding header")
                raise _Refused
        self.request.raw_headers.append((name, value.strip(b" \t")))
        self.request.names.append(lowered)

    def on_headers_complete(self) -> None:
        request, parser = self.request, self.parser
        self.head_began = None  # (its timer stays, for the next head)
        self.headers_done = True
        version = parser.get_http_version()
        request.method = parser.get_method()
        if version not in ("1.1", "1.0"):
            self.refuse(400, f"HTTP version {version} is not served (1.0 and 1.1 are)")
            raise _Refused
        request.clientproto = b"HTTP/" + version.encode()
        request.persistent = version == "1.1" and parser.should_keep_alive()  # HTTP/1.0: closed after, as before
        if version == "1.1" and self.hosts != 1:  # RFC 9112 3.2: a server MUST answer 400
            self.refuse(400, "no Host header in an HTTP/1.1 request" if not self.hosts else "more than one Host header")
            raise _Refused
        options = self.bridge.options
        limit, upload = options["max_body"], options["max_upload"]
        length = request.header(b"content-length")
        if self.transfer_encodings:
            if version == "1.0":  # HTTP/1.0 has none (RFC 9112 6.1): a 1.0 proxy would frame the body by closing
                self.refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
                raise _Refused
            self.decoder = BoundedChunkedDecoder(self, request)  # llhttp accepts only "..., chunked" here
        elif length is not None and int(length) > limit:
            # Before answering "Expect: 100-continue", and before reading any of the body.
            if int(length) > upload:
                over = f"max_upload ({upload} bytes)" if upload else f"max_body ({limit} bytes)"
                self.refuse(413, f"content-length {int(length)} is over {over}")
                raise _Refused
            if not self.bridge.start_streamed_request(self, request):
                raise _Refused
            self.body_left = int(length)
        else:
            self.body_left = int(length) if length is not None else 0
        has_body = self.decoder is not None or self.body_left > 0
        if has_body and options["min_body_rate"]:
            self.body_bytes = 0
            self.body_timer = self.reactor.callLater(options["header_timeout"], self._check_body_rate, 0)
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and version == "1.1":
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self.request
        request.body_size += len(body)
        if request.body_channel is not None:
            if not request.body_unwanted:
                request.body_pending += body
                if len(request.body_pending) >= messages.BODY_PART:
                    self.bridge.push_body(request)
            return
        request.body.append(body)

    def on_message_complete(self) -> None:
        self.completed = True  # answered by _parse once llhttp returns, not from inside its callback

    def _complete(self) -> None:
        """The request being parsed is whole: answer it (the bytes after it wait until it is answered)."""
        request, self.request = self.request, None
        if self.body_timer is not None:
            if self.body_timer.active():
                self.body_timer.cancel()
            self.body_timer = None
        self.headers_done = False
        self.head_size = 0
        self.head_tail = b""
        self.completed = False
        self.active = request
        if request.body_channel is not None:
            self.bridge.streamed_body_complete(request)
        else:
            self.bridge.request_received(request)

    # -- answering, in order --

    def request_done(self, request: HttpRequest) -> None:
        """The response to the request being answered is complete: close, or parse what the client sent next."""
        if request is not self.active:
            return
        self.active = None
        if not request.persistent:
            self.closing = True
            self.transport.loseConnection()
            return
        self.last_data = self.reactor.seconds()
        if self.idle_call is None:
            self.idle_call = self.reactor.callLater(self.bridge.options["idle_timeout"], self._idle_check)
        if self.reading_paused:
            self.reading_paused = False
            if not self.paused_for_layer:
                self.transport.resumeProducing()
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self._parse(data)

    # -- timers --

    def _idle_check(self) -> None:
        self.idle_call = None
        if self.active is not None:
            return  # a request is being answered: request_done starts idle_timeout again
        idle = self.bridge.options["idle_timeout"]
        quiet = self.reactor.seconds() - self.last_data
        if quiet >= idle:
            # As twisted.web: an idle connection is closed, not answered, and aborted if what it was sent last
            # is still unread ABORT_AFTER later (a client that reads nothing would hold the socket otherwise).
            self.closing = True
            self.transport.loseConnection()
            self.idle_call = self.reactor.callLater(self.ABORT_AFTER, self.transport.abortConnection)
        else:
            self.idle_call = self.reactor.callLater(idle - quiet, self._idle_check)

    def _head_check(self) -> None:
        self.head_timer = None
        if self.head_began is None or self.refused:
            return  # no head arriving: the next one arms it again
        timeout = self.bridge.options["header_timeout"]
        left = self.head_began + timeout - self.reactor.seconds()
        if left > 0:  # a later head than the one it was armed for
            self.head_timer = self.reactor.callLater(left, self._head_check)
            return
        self.bridge.count("slow_requests")
        self.refuse(408, f"request head not complete within header_timeout ({timeout:g} s)")

    def _check_body_rate(self, before: int) -> None:
        self.body_timer = None
        if not self.headers_done or self.refused or self.active is not None:
            return  # the body is in: nothing to watch until the next one
        options = self.bridge.options
        window, rate = options["header_timeout"], options["min_body_rate"]
        if self.paused_for_layer:  # we stopped reading, not the client: measure the next window afresh
            self.body_timer = self.reactor.callLater(window, self._check_body_rate, self.body_bytes)
            return
        if self.body_bytes - before < rate * window:
            self.bridge.count("slow_requests")
            self.refuse(408, f"request body arriving slower than min_body_rate ({rate} bytes/s over {window:g} s)")
            return
        self.body_timer = self.reactor.callLater(window, self._check_body_rate, self.body_bytes)

    def _stop_timers(self) -> None:
        for name in ("head_timer", "body_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    # -- the end --

    def pause_for_layer(self) -> None:
        """Stop reading while a streamed body's part waits for the layer."""
        if not self.paused_for_layer:
            self.paused_for_layer = True
            self.transport.pauseProducing()

    def resume_for_layer(self) -> None:
        """Read again once the layer took the part (unless pipelined bytes hold reading too)."""
        if self.paused_for_layer:
            self.paused_for_layer = False
            if not self.reading_paused:
                self.transport.resumeProducing()

    def refuse(self, status: int, problem: str, bad_input: bool = True) -> None:
        """Answer with an error before (or instead of) a request reaching the layer, and close."""
        if self.refused:
            return
        self.refused = True
        self._stop_timers()
        if bad_input:
            self.bridge.bad_input(self.peer, problem)
        data = messages.error_bytes(status, problem)
        self.transport.write(data)
        request = self.request
        if request is not None and not request.method and request.uri:  # the request line was read
            request.method = self.parser.get_method()
            request.clientproto = b"HTTP/" + self.parser.get_http_version().encode()
        self.bridge.log_access(request, status, len(data), client_host=self.peer.rsplit(":", 1)[0].strip("[]"))
        self.transport.loseConnection()

    def loseConnection(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_timers()
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        self.idle_call = None
        self.decoder = None
        active, self.active = self.active, None
        if active is not None and not active.finished:
            active.disconnected = True  # (the transport stops a streamed response's producer itself)
            self.bridge.request_lost(active)
        parsing, self.request = self.request, None
        if parsing is not None and parsing.local_id is not None:  # a streamed body was still arriving
            parsing.disconnected = True
            self.bridge.request_lost(parsing)
        self.bridge.channels.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


class Deadlines:
    """The requests waiting for their response to start, each due ``timeout`` seconds after it began to wait.

    One reactor timer for them all, not one each (arming and cancelling a
    timer per request cost about 4% of a hello request): every request waits
    the same ``timeout``, so the one waiting longest is due first. The timer is
    armed for it; firing after it was answered, it is armed again for the next
    one, so under load it fires about once per ``timeout``, and a request is
    still answered exactly when it is due.
    """

    def __init__(self, timeout: float, expired: Callable[[HttpRequest], None]) -> None:
        self.timeout, self.expired = timeout, expired
        self.waiting: dict[HttpRequest, float] = {}  # in the order they began to wait, so by when they are due
        self.timer: Any = None
        self.reactor: Any = None  # get_reactor()'s, once (it imports on every call)

    def add(self, request: HttpRequest) -> None:
        reactor = self.reactor = self.reactor or get_reactor()
        self.waiting.pop(request, None)  # (to the end: it waits anew)
        self.waiting[request] = reactor.seconds() + self.timeout
        if self.timer is None:
            self.timer = reactor.callLater(self.timeout, self._check)

    def discard(self, request: HttpRequest) -> None:
        self.waiting.pop(request, None)

    def _check(self) -> None:
        self.timer = None
        reactor = self.reactor
        now = reactor.seconds()
        while self.waiting:
            request, due = next(iter(self.waiting.items()))
            if due > now:
                self.timer = reactor.callLater(due - now, self._check)
                return
            del self.waiting[request]
            self.expired(request)

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class HttpFactory(protocol.ServerFactory):
    protocol = HttpChannel

    def __init__(self, bridge: HttpBridge) -> None:
        self.bridge = bridge


class PortSplitter(protocol.Protocol):
    """A connection on a port shared with a WebSocket bridge, until its first request head has arrived.

    Then the connection is handed over for good: to the WebSocket bridge when
    the head asks for ``Upgrade: websocket``, to HTTP otherwise (a later
    request on the same keep-alive connection stays HTTP, as browsers open a
    new connection for every WebSocket). The hand-over swaps the transport's
    protocol, so no wrapper stays in the way of the bytes that follow.
    """

    def __init__(self, factory: PortSplitterFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.timer: Any = None

    def connectionMade(self) -> None:
        bridge = self.factory.bridge
        bridge.undecided.add(self)
        # A client that never finishes its head is closed, as twisted.web closes an idle connection (browsers
        # open sockets ahead of need, so this is not logged as bad input).
        self.timer = get_reactor().callLater(bridge.options["idle_timeout"], self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        bridge = self.factory.bridge
        if self.buffer:  # a head begun and not finished within header_timeout: answered, as HTTP would
            bridge.count("slow_requests")
            problem = f"request head not complete within header_timeout ({bridge.options['header_timeout']:g} s)"
            bridge.bad_input(messages.describe_peer(address_of(self.transport.getPeer())), problem)
            self.transport.write(messages.error_bytes(408, problem))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self.buffer and data and self.timer is not None:  # the head began: it has header_timeout to end
            self.timer.reset(min(self.factory.bridge.options["header_timeout"],
                                 self.timer.getTime() - get_reactor().seconds()))
        self.buffer += data
        end = messages.head_end(self.buffer)
        if end >= 0 and messages.is_websocket_upgrade(self.buffer[:end]):
            self.hand_over(self.factory.websocket)
        elif end >= 0 or len(self.buffer) > self.factory.bridge.options["max_header_bytes"]:
            self.hand_over(self.factory.http)  # which answers an oversized head with 431

    def hand_over(self, factory: protocol.Factory) -> None:
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        self._forget()
        inner = factory.buildProtocol(self.transport.getPeer())
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self.transport.wrappedProtocol = inner  # TLS hands decrypted bytes to whatever it wraps
        else:
            self.transport.protocol = inner  # Twisted's TCP and Unix transports read this on every event
        inner.makeConnection(self.transport)
        inner.dataReceived(self.buffer)

    def connectionLost(self, reason: Any = None) -> None:
        self._forget()

    def _forget(self) -> None:
        self.factory.bridge.undecided.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class PortSplitterFactory(protocol.ServerFactory):
    def __init__(self, bridge: HttpBridge, http: protocol.Factory, websocket: protocol.Factory) -> None:
        self.bridge, self.http, self.websocket = bridge, http, websocket

    def buildProtocol(self, addr: Any) -> PortSplitter:
        return PortSplitter(self)


class HttpBridge(ListeningBridge):
    """Serves HTTP/1.0 and 1.1; each request is an ``http.request`` message, each reply part of its response."""

    type_name = "http"
    OPTIONS = {
        **listen_options(8000),
        "root_path": Option(str, "", "the prefix the site is mounted at behind a proxy (ASGI root_path)"),
        "http_timeout": Option(float, 60.0, "seconds to wait for a response to start before answering 504",
                               positive_seconds, from_string=True),
        "max_body": Option(int, 500_000, "the largest request body accepted, in bytes (413 above it)",
                           lambda v: None if v >= 0 else "must be 0 or more", from_string=True),
        "max_upload": Option(int, 0, "the largest request body streamed to the consumer in parts on a "
                                     "body_channel, when over max_body (413 above it); 0: none",
                             lambda v: None if v >= 0 else "must be 0 or more", from_string=True),
        "max_header_bytes": Option(int, 16384, "the largest request line plus headers, in bytes (431 above it)",
                                   _header_limit, from_string=True),
        "header_timeout": Option(float, 10.0, "seconds from a request head's first byte to its last (else 408); "
                                              "also the window min_body_rate is measured over",
                                 positive_seconds, from_string=True),
        "min_body_rate": Option(int, 1024, "bytes a second a request body must arrive at, over each "
                                           "header_timeout (else 408); 0 never checks", zero_or_more,
                                from_string=True),
        "idle_timeout": Option(float, 60.0, "seconds an idle keep-alive connection, or a slow request, is kept",
                               positive_seconds, from_string=True),
        "allowed_hosts": ALLOWED_HOSTS,
        "proxy_headers": Option(bool, False, "trust X-Forwarded-For/-Port/-Proto for the client and scheme",
                                from_string=True),
        "max_response_buffer": Option(int, 4 * 1024 * 1024, "the most bytes of a streamed response held for a "
                                                             "client reading slower than its consumer writes; past "
                                                             "it the client is cut off", buffer_limit,
                                      from_string=True),
        "websocket": Option(str, "", "the name of a websocket bridge ([bridges.NAME]) that serves this port's "
                                     "Upgrade: websocket requests; both then run in one process"),
    }

    def __init__(self, name: str, options: dict[str, Any], layer: Any) -> None:
        super().__init__(name, options, layer)
        self.channels: set[HttpChannel] = set()
        self.accepting = False
        self.listening: Any = None
        self.port: int | None = None  # the TCP port listened on, once open (useful with port = 0)
        self.scheme = "https" if uses_tls(self.options) else "http"
        self.allowed_hosts = allowed_hosts(self.options, self.options, behind_proxy=self.options["proxy_headers"])
        self._idle: asyncio.Event | None = None
        self._disconnects: set[asyncio.Task] = set()  # close_protocol() lets them reach the layer
        self.deadlines = Deadlines(self.options["http_timeout"], self._timed_out)  # each request's http_timeout
        self._outbox: list[tuple[HttpRequest, dict]] = []  # requests of this loop turn, not yet sent
        self._outbox_task: asyncio.Task | None = None  # the task that will send them
        for counter in ("timeouts", "bad_replies", "slow_clients"):  # HTTP's own, shown from the start
            self.count(counter, 0)
        self.websocket: Any = None  # the WebsocketBridge sharing this port, once linked
        self.undecided: set[PortSplitter] = set()  # shared-port connections whose first request head is coming

    # -- a WebSocket bridge on this port --

    @classmethod
    def companions(cls, options: dict[str, Any]) -> list[str]:
        return [options["websocket"]] if options.get("websocket") else []

    def attach_companions(self, bridges: dict[str, Bridge]) -> None:
        from crossroads.bridges.websocket.bridge import WebsocketBridge  # only when a port is shared

        name = self.options["websocket"]
        if not name:
            return
        other = bridges.get(name)
        if not isinstance(other, WebsocketBridge):
            problem = (f"names [bridges.{name}], which is a {other.type_name} bridge" if other is not None
                       else f"names [bridges.{name}], which is not running in this process")
            raise OptionError("websocket", f"{problem}: name a websocket bridge of the same config file")
        other.share_port_of(self)
        self.websocket = other

    # -- listening --

    async def open_protocol(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        factory: Any = HttpFactory(self)
        if self.websocket is not None:
            factory = PortSplitterFactory(self, factory, self.websocket.factory)
        # TLS (https) wraps the WebSocket bridge's too, and max_connections counts both.
        self.listening = await listen(factory, self.options, self, busy_response())
        self.port = tcp_port(self.listening)
        self.accepting = True

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self.listening is not None:
            await as_future(self.listening.stopListening())
        # Requests in flight get their response (or their 504 at http_timeout) before replies are drained.
        await self._idle.wait()

    async def close_protocol(self) -> None:
        for splitter in list(self.undecided):
            splitter.transport.abortConnection()  # nothing of theirs reached the layer
        channels = list(self.channels)
        for channel in channels:
            channel.loseConnection()  # after what is buffered has been written
        self.deadlines.stop()
        await asyncio.gather(*(channel.closed for channel in channels))
        # Connections cut here may have had responses in flight: their consumers still hear of it.
        await asyncio.gather(*self._disconnects, return_exceptions=True)

    # -- requests --

    def request_received(self, request: HttpRequest) -> None:
        self.count("received")
        body = b"".join(request.body)
        channel = request.channel
        client = channel.client
        request.client_host = client[0] if client else None
        if not self.accepting:
            self.respond_error(request, 503, "shutting down, try again", retry_after=messages.RETRY_AFTER, close=True)
            return
        host = request.header(b"host")
        if not host_allowed(host, self.allowed_hosts):
            problem = host_refused(host)
            self.bad_input(request.channel.peer, problem)
            self.respond_error(request, 400, problem, close=True)
            return
        request.local_id = self.register(request)
        self._idle.clear()
        try:
            message = messages.request_message(
                reply_channel=self.reply_channel(request.local_id), method=request.method, target=request.uri,
                version=request.clientproto, headers=request.raw_headers, body=body, client=client,
                server=channel.server, scheme=self.scheme, root_path=self.options["root_path"],
                proxy_headers=self.options["proxy_headers"])
        except messages.HttpError as exc:
            self.bad_input(request.channel.peer, exc.detail)
            # What follows a request we could not read is not trusted either.
            self.respond_error(request, exc.status, exc.detail, close=True)
            return
        request.path_text = message["path"]
        if message["client"]:
            request.client_host = message["client"][0]
        self.deadlines.add(request)
        # The requests of one loop turn go to the layer together: one task and one send_many for the lot.
        self._outbox.append((request, message))
        if self._outbox_task is None:
            self._outbox_task = self.spawn(self._forward_outbox(), "forwarding requests")
        request.sending = self._outbox_task

    # -- request bodies over max_body, streamed on a body_channel --

    def start_streamed_request(self, channel: HttpChannel, request: HttpRequest) -> bool:
        """Send ``http.request`` now, with a ``body_channel`` for the body to come; False if refused instead."""
        self.count("received")
        client = channel.client
        request.client_host = client[0] if client else None
        if not self.accepting:
            channel.refuse(503, "shutting down, try again", bad_input=False)
            return False
        host = request.header(b"host")
        if not host_allowed(host, self.allowed_hosts):  # as request_received checks a whole request
            channel.refuse(400, host_refused(host))
            return False
        try:
            message = messages.request_message(
                reply_channel="http.pending!", method=request.method, target=request.uri,
                version=request.clientproto, headers=request.raw_headers, body=b"", client=client,
                server=channel.server, scheme=self.scheme,
                root_path=self.options["root_path"], proxy_headers=self.options["proxy_headers"])
        except messages.HttpError as exc:
            channel.refuse(exc.status, exc.detail)
            return False
        request.local_id = self.register(request)
        self._idle.clear()
        request.body_channel = new_channel_name(f"http.body.{self.name}?")
        message["reply_channel"] = self.reply_channel(request.local_id)
        message["body_channel"] = request.body_channel
        request.path_text = message["path"]
        if message["client"]:
            request.client_host = message["client"][0]
        request.sending = self.spawn(self._forward_streamed(channel, request, message),
                                     f"forwarding a request from {message['sender']}")
        return True

    async def _forward_streamed(self, channel: HttpChannel, request: HttpRequest, message: dict) -> bool:
        accepted = request.stored = await self.send_to_layer(messages.REQUEST_CHANNEL, message)
        if not accepted:
            self._release(request)
            channel.refuse(503, "busy, try again", bad_input=False)
        return accepted

    def push_body(self, request: HttpRequest) -> None:
        """Send what arrived of a streamed body; one part at a time, reading paused while one waits."""
        if request.body_sending is not None and not request.body_sending.done():
            if len(request.body_pending) >= messages.BODY_PART:
                request.channel.pause_for_layer()
            return
        last = request.body_complete
        part = bytes(request.body_pending)
        request.body_pending.clear()
        request.body_sending = self.spawn(self._send_body(request, part, last), "sending a part of a request body")

    async def _send_body(self, request: HttpRequest, part: bytes, last: bool) -> None:
        if request.sending is None:
            return
        await request.sending
        if not request.stored:
            return
        for delay in backoff_delays(0.01, 1.0):
            if request.body_unwanted or request.disconnected:
                return
            try:
                await self.layer.send(request.body_channel, {"content": part, "more_content": not last})
                break
            except (ChannelFull, LayerUnavailable):  # the consumer reads slower than the client sends
                await asyncio.sleep(delay)
        request.body_sending = None  # this task is done sending: push_body must not wait for it
        request.channel.resume_for_layer()
        if not last and (request.body_pending or request.body_complete):
            self.push_body(request)

    def streamed_body_complete(self, request: HttpRequest) -> None:
        """The whole request has arrived: the last part goes out, and the response may be written now."""
        request.body_complete = True
        if not request.body_unwanted:
            self.push_body(request)
        self.deadlines.add(request)
        early, request.early_replies = request.early_replies, []
        for reply in early:
            if request.local_id is not None:
                self.handle_reply(request.local_id, reply)

    async def _forward_outbox(self) -> None:
        """Send the requests of a loop turn, in one batch; each the layer refused is answered 503."""
        batch, self._outbox, self._outbox_task = self._outbox, [], None
        try:
            stored = await self.send_many_to_layer(messages.REQUEST_CHANNEL, [message for _, message in batch])
        except MessageTooLarge:  # nothing was stored: one at a time, so only the one too large is refused
            for request, message in batch:
                await self._forward(request, message)
            return
        for i, (request, _) in enumerate(batch):
            request.stored = i < stored
            if not request.stored:
                self.respond_error(request, 503, "busy, try again", retry_after=messages.RETRY_AFTER)

    async def _forward(self, request: HttpRequest, message: dict) -> None:
        try:
            request.stored = await self.send_to_layer(messages.REQUEST_CHANNEL, message)
        except MessageTooLarge:
            self.bad_input(request.channel.peer if request.channel else message["sender"],
                           "request too large for the layer")
            self.respond_error(request, 413, "request too large for the channel layer", close=True)
            return
        if not request.stored:
            self.respond_error(request, 503, "busy, try again", retry_after=messages.RETRY_AFTER)

    def _timed_out(self, request: HttpRequest) -> None:
        if not request.response_started:
            self.log.warning("%s: no response to %s %s within http_timeout (%s s): answered 504", self.label,
                             request.method.decode("latin-1"), request.path_text, self.options["http_timeout"])
            self.count("timeouts")
            self.respond_error(request, 504, "the application did not respond in time")

    def request_lost(self, request: HttpRequest) -> None:
        """The client left; if its response was not complete, the consumer hears of it after the request."""
        self.deadlines.discard(request)
        local_id = request.local_id
        if local_id is None:
            return
        flow = request.flow
        if flow is not None and flow.flow_channel is not None and not (flow.complete and not flow.held):
            self.tell_flow(flow.flow_channel, {"gone": True})
        if request.body_channel is not None and not request.body_complete and not request.body_unwanted:
            self.tell_flow(request.body_channel, {"closed": True})  # the consumer reading it stops waiting
        self._release(request)
        task = self.spawn(self._disconnect(request, self.reply_channel(local_id)), "sending http.disconnect")
        self._disconnects.add(task)
        task.add_done_callback(self._disconnects.discard)

    def tell_flow(self, channel: str, report: dict) -> None:
        """Tell a streaming consumer how far its client read (or that it left); a lost report only slows it."""
        async def send() -> None:
            try:
                await self.layer.send(channel, report)
            except (ChannelFull, LayerUnavailable) as exc:
                self.count("flow_reports_lost")
                self.log.debug("%s: a flow report to %s was not sent: %s", self.label, channel, exc)

        self.spawn(send(), "reporting a streamed response's progress")

    async def _disconnect(self, request: HttpRequest, reply_channel: str) -> None:
        if request.sending is None:
            return
        await request.sending
        if not request.stored:  # its request never reached the layer
            return
        await self.send_to_layer_persistently(messages.DISCONNECT_CHANNEL,
                                              messages.disconnect_message(reply_channel, request.path_text))

    def _release(self, request: HttpRequest) -> None:
        """Stop expecting replies for a request."""
        self.deadlines.discard(request)
        if request.local_id is not None:
            self.unregister(request.local_id)
            request.local_id = None
        if not self.targets and self._idle is not None:
            self._idle.set()

    # -- responses --

    def respond_error(self, request: HttpRequest, status: int, detail: str, *, retry_after: int | None = None,
                      close: bool = False) -> None:
        """Answer a request with one of the bridge's own error pages, unless its response already started."""
        self._release(request)
        if request.response_started or request.finished or request.disconnected:
            return
        response = messages.error_response(status, detail, retry_after=retry_after)
        if close:
            request.persistent = False  # the connection closes after the response
            response.headers.append((b"connection", b"close"))
        self._write(request, response)

    def _write(self, request: HttpRequest, response: messages.Response) -> None:
        request.response_started = True
        headers = response.headers
        if not response.more_content and response.header(b"content-length") is None:
            headers = [*headers, (b"content-length", b"%d" % len(response.content))]
        if not response.more_content:
            self._release(request)
            if not request.disconnected:
                request.respond(response.status, headers, response.content)
                request.finish()
            return
        request.start(response.status, headers)
        # The producer is registered before the first part is written, so a transport it fills pauses it.
        request.flow = ResponseFlow(self, request, response.flow_channel, len(response.content))
        request.channel.transport.registerProducer(request.flow, True)
        request.write(response.content)

    def _finish(self, request: HttpRequest) -> None:
        self._release(request)
        if not request.disconnected:
            request.finish()

    def handle_reply(self, local_id: str, message: dict) -> None:
        request: HttpRequest = self.targets[local_id]
        if request.finished or request.disconnected:
            self._release(request)
            return
        if request.body_channel is not None and not request.body_complete:
            # The response is written only once the request is whole (as twisted.web did): the reply waits for
            # the body's end. A consumer that answers first reads no more of it, so the rest is read and dropped.
            request.early_replies.append(message)
            if len(request.early_replies) > 1000:  # a consumer streaming its answer to a stalled upload
                request.channel.transport.abortConnection()
                return
            request.body_unwanted = True
            request.body_pending.clear()
            request.channel.resume_for_layer()
            return
        if not request.response_started:
            try:
                response = messages.response_from_message(message)
            except messages.BadReply as exc:
                self._bad_reply(request, exc)
                self.respond_error(request, 500, "the application sent an invalid response")
                return
            self._write(request, response)
            return
        try:
            chunk = messages.chunk_from_message(message)
        except messages.BadReply as exc:
            # The status is out already: all that is left is to cut the response short, so it is not taken as
            # whole. A chunked body without its last chunk shows that; a body ended by closing needs a reset.
            self._bad_reply(request, exc)
            self._release(request)
            if request.chunked:
                request.channel.loseConnection()
            else:
                request.channel.transport.abortConnection()
            return
        request.flow.write_part(chunk.content, last=not chunk.more_content)

    def _bad_reply(self, request: HttpRequest, problem: Exception) -> None:
        self.count("bad_replies")
        self.log.error("%s: invalid reply to %s %s: %s", self.label, request.method.decode("latin-1"),
                       request.path_text, problem)

    # -- the access log --

    def log_access(self, request: HttpRequest | None, status: int, length: int, *,
                   client_host: str | None = None) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        method = target = version = referer = user_agent = None
        if request is not None:
            if request.method:  # the request line has been read
                method, target, version = request.method, request.uri, request.clientproto
            client_host = request.client_host or client_host
            referer, user_agent = request.header(b"referer"), request.header(b"user-agent")
        line = messages.access_log_line(
            client_host=client_host, when=time.time(), method=method, target=target, version=version, status=status,
            length=length, referer=referer, user_agent=user_agent)
        # What access_log.info(line) does, less its look up the stack for the caller (always here): a third of its
        # cost, a few per cent of a hello request's. Handlers, filters and propagation are the logger's as ever.
        access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, None, None,
                                                "log_access"))
