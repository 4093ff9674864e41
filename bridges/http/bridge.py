"""The HTTP bridge: twisted.web's HTTP/1.x parser (made strict) in front, the channel layer behind.

This module owns the I/O of HTTP: the limits
twisted.web does not enforce the way users expect (413, 431, 504, 503), the
reply channel of each request, writing responses (streamed ones too), and the
access log (logger ``crossroads.http.access``). What a request or a reply
means belongs to ``messages.py``; replies, counters and stopping belong to
``bridges.base``; how it listens (TCP, a Unix socket, a socket from systemd, TLS)
to ``bridges.listening``. docs/spec/http.md is the contract.

Theory of operation: twisted.web's ``HTTPChannel`` parses each connection and
hands one complete request at a time (it buffers pipelined ones) to
``HttpRequest.process``. The bridge registers the request as a reply target,
sends ``http.request`` from a spawned task, and arms the ``http_timeout``. The
first reply starts the response; with ``more_content`` the request stays
registered for the chunks. A request leaves the targets when its response is
complete, when the bridge answered it itself, or when its client left (then
``http.disconnect`` follows its ``http.request`` into the layer).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

from twisted.internet import protocol
from twisted.web import http

from crossroads.bridges.base import Bridge, Option, OptionError, as_future, get_reactor
from crossroads.bridges.flow import HeldWrites, buffer_limit
from crossroads.bridges.listening import (
    ListeningBridge,
    address_of,
    busy_response,
    listen,
    listen_options,
    server_address,
    tcp_port,
    uses_tls,
)
from crossroads.bridges.protocol import positive_seconds, zero_or_more
from crossroads.layer import MessageTooLarge

from . import messages

access_log = logging.getLogger("crossroads.http.access")




def _header_limit(value: int) -> str | None:
    return None if value >= 1024 else "must be at least 1024 bytes (browsers send cookies)"


class ResponseFlow(HeldWrites):
    """A streamed response's parts, held while its client does not read, up to ``max_response_buffer`` bytes.

    ASGI 1.0 gives a consumer no way to wait for a slow client: it sends
    every part at once. twisted.web pauses this producer when the socket's
    send buffer is full; the parts that come meanwhile wait (bridges/flow.py)
    and are written as the client reads. A client further behind than
    ``max_response_buffer``, or reading nothing for ``idle_timeout``, is cut
    off (logged, counted in ``slow_clients``); its consumer hears ``http.disconnect``.
    """

    def __init__(self, bridge: HttpBridge, request: HttpRequest) -> None:
        self.bridge, self.request = bridge, request
        self.complete = False  # the last part has come: finish once it is written
        options = bridge.options
        super().__init__(request.write, self.cut_off, limit=options["max_response_buffer"],
                         timeout=options["idle_timeout"], limit_name="max_response_buffer",
                         timeout_name="idle_timeout", on_resume=self._written)
        if getattr(request.channel, "_waitingForTransport", False):  # already full: twisted.web will not tell us
            self.pauseProducing()

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
        self.request.unregisterProducer()
        self.bridge._finish(self.request)

    def cut_off(self, why: str) -> None:
        request = self.request
        self.bridge.count("slow_clients")
        self.bridge.log.warning("%s: cut off %s during the streamed response to %s %s: %s", self.bridge.label,
                                request.channel.peer, request.method.decode("latin-1"), request.path_text, why)
        request.channel.transport.abortConnection()


class HttpRequest(http.Request):
    """One request of a connection, and the reply target of its reply channel."""

    _parsePOSTFormSubmission = False  # the body goes to the consumer as it came
    defaultContentType = None  # the consumer decides the content type; twisted.web would say text/html

    def __init__(self, channel: HttpChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.bridge: HttpBridge = channel.bridge
        self.raw_headers: list[tuple[bytes, bytes]] = []  # as received: twisted.web's Headers merge duplicates
        self.body_size = 0
        self.local_id: str | None = None  # set while replies for it are expected
        self.response_started = False
        self.flow: ResponseFlow | None = None  # while a streamed response is being written
        self.timeout_call: Any = None
        self.sending: asyncio.Task | None = None  # the task storing http.request, awaited before http.disconnect
        self.path_text = ""
        self.client_host: str | None = None  # for the access log; the proxy's client when proxy_headers is on
        self.transfer_encoding = False  # a Transfer-Encoding header was received: a second one is refused

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # max_body bounds it, so never a temporary file

    def handleContentChunk(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.bridge.options["max_body"]:  # a chunked body, whose size was not announced
            self.channel.refuse(413, f"body over max_body ({self.bridge.options['max_body']} bytes)")
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.channel.refused:  # a head refused at its end (no Host) still ends in here when it has no body
            super().requestReceived(command, path, version)

    def process(self) -> None:
        if not self.channel.refused:  # a chunked body's end may be parsed in the same read as its refusal
            self.bridge.request_received(self)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.bridge.request_lost(self)


class BoundedChunkedDecoder(http._ChunkedTransferDecoder):
    """twisted.web's de-chunker, refusing a chunk larger than what is left of ``max_body`` from its size line.

    twisted.web would read such a chunk (up to ~512 KB of it) before the
    body's size, counted in ``handleContentChunk``, crossed the limit.
    """

    def __init__(self, channel: HttpChannel, request: HttpRequest) -> None:
        super().__init__(request.handleContentChunk, channel._finishRequestBody)
        self.channel, self.request = channel, request

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        limit = self.channel.bridge.options["max_body"]
        if self.request.body_size + self.length > limit:
            self.channel.refuse(413, f"a chunk of {self.length} bytes takes the body over max_body ({limit} bytes)")
            self._buffer.clear()  # nothing more of this body is read
            return False
        return True


class HttpChannel(http.HTTPChannel):
    """twisted.web's parser, made strict (issue 14 §3), with our answers to what it refuses and to the limits it lacks.

    Stricter than twisted.web, as llhttp (Node's parser) is against request
    smuggling: a line ended by a bare LF, an obs-fold continuation line, a
    second ``Transfer-Encoding``, ``Transfer-Encoding`` on HTTP/1.0, and an
    HTTP/1.1 request without exactly one ``Host`` are 400.
    """

    requestFactory = HttpRequest

    def connectionMade(self) -> None:
        self.bridge: HttpBridge = self.factory.bridge
        self.totalHeadersSize = self.MAX_LENGTH = self.bridge.options["max_header_bytes"]
        self.timeOut = self.bridge.options["idle_timeout"]
        self.refused = False
        self.peer = messages.describe_peer(address_of(self.transport.getPeer()))
        self.closed = asyncio.get_running_loop().create_future()  # close_protocol() waits for it
        self.head_timer: Any = None  # from a request head's first byte until its last: header_timeout
        self.body_timer: Any = None  # every header_timeout while a body arrives: is it at min_body_rate?
        self.body_bytes = 0  # of the body arriving now, at the last check
        self.bridge.channels.add(self)
        super().connectionMade()

    # Once refused, nothing more of this connection is parsed: what it still sends is dropped until it closes.
    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        # idle_timeout restarts with every byte, so a head trickled a byte at a time would never end: the whole
        # head must come within header_timeout of its first byte (line mode: a head, not a body, is arriving).
        if self.line_mode and self.head_timer is None and data:
            self.head_timer = get_reactor().callLater(self.bridge.options["header_timeout"], self._head_too_slow)
        super().dataReceived(data)
        # What is left unparsed of a head, after its last CRLF, is a line still arriving: an LF in it ends that line
        # with a bare LF, which twisted.web would wait on (for a CRLF that never comes) until a timeout. A CR at its
        # end may be the first of a CRLF. (Inside a nested call, from a response finished while a request was being
        # parsed, the buffer is the outer call's to parse: the outer call checks it.)
        if self.line_mode and not self.refused and not self._busyReceiving and b"\n" in self._buffer:
            buffer = self._buffer
            end = buffer.rfind(b"\r\n")
            if b"\n" in buffer[end + 2 if end >= 0 else 0:] and not self.transport.disconnecting:
                self.refuse(400, "a request line or header line ended by a bare LF (not CRLF)")

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            self.body_bytes += len(data)
            super().rawDataReceived(data)

    def _head_too_slow(self) -> None:
        self.head_timer = None
        self.bridge.count("slow_requests")
        timeout = self.bridge.options["header_timeout"]
        self.refuse(408, f"request head not complete within header_timeout ({timeout:g} s)")

    def _check_body_rate(self, before: int) -> None:
        self.body_timer = None
        if self.line_mode or self.refused:
            return  # the body is in: nothing to watch until the next one
        options = self.bridge.options
        window, rate = options["header_timeout"], options["min_body_rate"]
        if self.body_bytes - before < rate * window:
            self.bridge.count("slow_requests")
            self.refuse(408, f"request body arriving slower than min_body_rate ({rate} bytes/s over {window:g} s)")
            return
        self.body_timer = get_reactor().callLater(window, self._check_body_rate, self.body_bytes)

    def _stop_timers(self) -> None:
        for name in ("head_timer", "body_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse(431, f"request line and headers over max_header_bytes ({self.totalHeadersSize} bytes)")
            return
        if b"\n" in line:
            self.refuse(400, "a request line or header line ended by a bare LF (not CRLF)")
            return
        if line[:1] in (b" ", b"\t") and not self._HTTPChannel__first_line:  # twisted.web's state: a header line
            # RFC 9112 5.2: obs-fold is refused; a proxy joining it differently would see other headers than we do.
            self.refuse(400, "a header continuation line (obs-fold)")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, f"a request or header line over max_header_bytes ({self.MAX_LENGTH} bytes)")

    def headerReceived(self, line: bytes) -> bool:
        if self.refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(431, f"more than {self.maxHeaders} header lines")
            return False
        name, colon, value = line.partition(b":")
        if colon and name.lower() == b"transfer-encoding":
            # Smuggling: twisted.web took "chunked" then "identity" as chunked, a proxy may honour the last one.
            # HTTP/1.0 has no Transfer-Encoding (RFC 9112 6.1): a 1.0 proxy would frame the body by closing.
            if self.requests[-1].transfer_encoding:
                self.refuse(400, "more than one Transfer-Encoding header")
                return False
            if self._version == b"HTTP/1.0":
                self.refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
                return False
            self.requests[-1].transfer_encoding = True
        if not super().headerReceived(line):
            return False
        if isinstance(self._transferDecoder, http._ChunkedTransferDecoder) and \
                not isinstance(self._transferDecoder, BoundedChunkedDecoder):
            self._transferDecoder = BoundedChunkedDecoder(self, self.requests[-1])
        self.requests[-1].raw_headers.append((name, value.strip(b" \t")))
        return True

    def allHeadersReceived(self) -> None:
        self._stop_timers()
        if self._version == b"HTTP/1.1":
            hosts = self.requests[-1].requestHeaders.getRawHeaders(b"host", [])
            if len(hosts) != 1:  # RFC 9112 3.2: a server MUST answer 400
                self.refuse(400, "no Host header in an HTTP/1.1 request" if not hosts else "more than one Host header")
                return
        options = self.bridge.options
        if options["min_body_rate"] and (self.length or self._transferDecoder is not None):
            self.body_bytes = 0
            self.body_timer = get_reactor().callLater(options["header_timeout"], self._check_body_rate, 0)
        limit = self.bridge.options["max_body"]
        if self.length is not None and self.length > limit:
            # Before twisted.web answers "Expect: 100-continue", and before reading any of the body.
            self.refuse(413, f"content-length {self.length} is over max_body ({limit} bytes)")
            return
        super().allHeadersReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's one answer to everything it cannot parse; ours says so in words and is counted.
        self.refuse(400, "malformed HTTP request")

    def refuse(self, status: int, problem: str) -> None:
        """Answer with an error before (or instead of) a request reaching the layer, and close."""
        if self.refused:
            return
        self.refused = True
        self.bridge.bad_input(self.peer, problem)
        data = messages.error_bytes(status, problem)
        self.transport.write(data)
        request = self.requests[-1] if self.requests else None
        command = getattr(self, "_command", None)
        self.bridge.log_access(request, status, len(data), client_host=self.peer.rsplit(":", 1)[0].strip("[]"),
                               method=command, target=getattr(self, "_path", None),
                               version=getattr(self, "_version", None))
        self.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self._stop_timers()
        super().connectionLost(reason)
        self.bridge.channels.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


class HttpFactory(protocol.ServerFactory):
    protocol = HttpChannel

    def __init__(self, bridge: HttpBridge) -> None:
        self.bridge = bridge

    def log(self, request: HttpRequest) -> None:
        """Called by twisted.web when a response is finished: one access log line."""
        self.bridge.log_access(request, request.code, request.sentLength)


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
        self._idle: asyncio.Event | None = None
        self._disconnects: set[asyncio.Task] = set()  # close_protocol() lets them reach the layer
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
        await asyncio.gather(*(channel.closed for channel in channels))
        # Connections cut here may have had responses in flight: their consumers still hear of it.
        await asyncio.gather(*self._disconnects, return_exceptions=True)

    # -- requests --

    def request_received(self, request: HttpRequest) -> None:
        self.count("received")
        request.content.seek(0)
        body = request.content.read()
        transport = request.channel.transport
        client = address_of(transport.getPeer())
        request.client_host = client[0] if client else None
        if not self.accepting:
            self.respond_error(request, 503, "shutting down, try again", retry_after=messages.RETRY_AFTER, close=True)
            return
        request.local_id = self.register(request)
        self._idle.clear()
        try:
            message = messages.request_message(
                reply_channel=self.reply_channel(request.local_id), method=request.method, target=request.uri,
                version=request.clientproto, headers=request.raw_headers, body=body, client=client,
                server=server_address(transport.getHost(), self.options),
                scheme=self.scheme, root_path=self.options["root_path"], proxy_headers=self.options["proxy_headers"])
        except messages.HttpError as exc:
            self.bad_input(request.channel.peer, exc.detail)
            # What follows a request we could not read is not trusted either.
            self.respond_error(request, exc.status, exc.detail, close=True)
            return
        request.path_text = message["path"]
        if message["client"]:
            request.client_host = message["client"][0]
        request.timeout_call = get_reactor().callLater(self.options["http_timeout"], self._timed_out, request)
        request.sending = self.spawn(self._forward(request, message), f"forwarding a request from {message['sender']}")

    async def _forward(self, request: HttpRequest, message: dict) -> bool:
        try:
            accepted = await self.send_to_layer(messages.REQUEST_CHANNEL, message)
        except MessageTooLarge:
            self.bad_input(request.channel.peer if request.channel else message["sender"],
                           "request too large for the layer")
            self.respond_error(request, 413, "request too large for the channel layer", close=True)
            return False
        if not accepted:
            self.respond_error(request, 503, "busy, try again", retry_after=messages.RETRY_AFTER)
        return accepted

    def _timed_out(self, request: HttpRequest) -> None:
        request.timeout_call = None
        if not request.response_started:
            self.log.warning("%s: no response to %s %s within http_timeout (%s s): answered 504", self.label,
                             request.method.decode("latin-1"), request.path_text, self.options["http_timeout"])
            self.count("timeouts")
            self.respond_error(request, 504, "the application did not respond in time")

    def request_lost(self, request: HttpRequest) -> None:
        """The client left; if its response was not complete, the consumer hears of it after the request."""
        if request.timeout_call is not None and request.timeout_call.active():
            request.timeout_call.cancel()
        request.timeout_call = None
        local_id = request.local_id
        if local_id is None:
            return
        self._release(request)
        task = self.spawn(self._disconnect(request, self.reply_channel(local_id)), "sending http.disconnect")
        self._disconnects.add(task)
        task.add_done_callback(self._disconnects.discard)

    async def _disconnect(self, request: HttpRequest, reply_channel: str) -> None:
        if request.sending is None or not await request.sending:  # its request never reached the layer
            return
        await self.send_to_layer_persistently(messages.DISCONNECT_CHANNEL,
                                              messages.disconnect_message(reply_channel, request.path_text))

    def _release(self, request: HttpRequest) -> None:
        """Stop expecting replies for a request."""
        if request.timeout_call is not None and request.timeout_call.active():
            request.timeout_call.cancel()
        request.timeout_call = None
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
        if request.response_started or request.finished or request._disconnected:
            return
        response = messages.error_response(status, detail, retry_after=retry_after)
        if close:
            request.channel.persistent = False  # twisted.web closes after the response
            response.headers.append((b"connection", b"close"))
        self._write(request, response)

    def _write(self, request: HttpRequest, response: messages.Response) -> None:
        request.response_started = True
        request.setResponseCode(response.status)
        for name, value in response.headers:
            request.responseHeaders.addRawHeader(name, value)
        if not response.more_content and response.header(b"content-length") is None:
            request.responseHeaders.setRawHeaders(b"content-length", [str(len(response.content)).encode()])
        request.write(response.content)
        if not response.more_content:
            self._finish(request)
        elif not request._disconnected:
            request.flow = ResponseFlow(self, request)
            request.registerProducer(request.flow, True)

    def _finish(self, request: HttpRequest) -> None:
        self._release(request)
        if not request._disconnected:
            request.finish()

    def handle_reply(self, local_id: str, message: dict) -> None:
        request: HttpRequest = self.targets[local_id]
        if request.finished or request._disconnected:
            self._release(request)
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

    def log_access(self, request: HttpRequest | None, status: int, length: int, *, client_host: str | None = None,
                   method: bytes | None = None, target: bytes | None = None, version: bytes | None = None) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        headers = request.requestHeaders if request is not None else None

        def header(name: bytes) -> bytes | None:
            values = headers.getRawHeaders(name) if headers is not None else None
            return values[0] if values else None

        if request is not None and request.method is not http.Request.method:  # twisted.web has parsed it
            method, target, version = request.method, request.uri, request.clientproto
            client_host = request.client_host or client_host
        access_log.info("%s", messages.access_log_line(
            client_host=client_host, when=time.time(), method=method, target=target, version=version, status=status,
            length=length, referer=header(b"referer"), user_agent=header(b"user-agent")))
