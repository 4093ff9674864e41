"""The WebSocket bridge: Autobahn (on Twisted's asyncio reactor) feeding ``messages.py``.

This module owns the I/O of WebSocket connections (listening is
``bridges.listening``'s: TCP, a Unix socket, a socket from systemd, TLS):
holding each upgrade until a consumer answers ``websocket.connect``, passing
frames into the layer one at a time per connection, performing the actions
``messages.ConnectionState`` derives from replies, and the timers (handshake,
idle, ping). It must not decide what a message or a reply means (that is
``messages.py``) nor how replies reach it (``bridges/base.py``).
docs/spec/websocket.md is the contract with consumers.

Why the handshake is held: Autobahn's ``onConnect`` may return a Deferred, and
the HTTP 101 (or the 403/503/504) is written only when it fires. So the
consumer decides, as ASGI 1.0 says, and a full layer refuses the upgrade itself
(503) instead of accepting a socket nobody will serve.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from types import FunctionType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred

from crossroads.bridges.base import Inlet, Option, as_future, get_reactor
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
from crossroads.bridges.protocol import (
    describe_peer,
    each,
    host_allowed,
    host_refused,
    payload_limit,
    positive_seconds,
    seconds_or_off,
)
from crossroads.layer.base import MAX_MESSAGE_SIZE

from . import frames
from . import messages as m

_CLOSE_WAIT = 5.0  # close_protocol() waits this long for peers to answer our close frames
RETRY_AFTER = "5"  # seconds, on a 503: when a client (or a proxy) should try the upgrade again
INLET_HIGH, INLET_LOW = 32, 8  # frames of one client waiting for the layer: stop reading it / read it again
_LAYER_BEHIND, _CLIENT_BEHIND = 1, 2  # why a client is not read: its frames wait for the layer / its answers for it

# What Autobahn keeps of the upgrade (the raw request and response, headers parsed twice, the key): ~2 KiB a
# connection it only reads during the handshake (``processHandshake``). Freed once the connection is open.
_HANDSHAKE_LEFTOVERS = ("http_request_data", "http_status_line", "http_headers", "http_request_uri",
                        "http_request_path", "http_request_params", "http_request_host", "websocket_origin",
                        "websocket_protocols", "websocket_extensions", "_wskey", "http_response_data")

_TICK = 0.05  # seconds: Autobahn's timers due within one share a reactor call (see _TimerWheel)
CLOSING_SLACK = 65536  # bytes past max_message_size a client may send after our close frame, before it is cut
_PERSISTENT = frozenset((m.DISCONNECT,))  # one for every connection's inlet

_message_size = payload_limit(MAX_MESSAGE_SIZE, 4096)  # leave room for the message's other keys


def _origin(entry: Any) -> str | None:
    return f"entries must be strings, not {entry!r}" if not isinstance(entry, str) else m.check_allowed_origin(entry)


class _Timer:
    """One of Autobahn's timers on a ``_TimerWheel``. ``cancel()`` is all Autobahn asks of it, also after it ran."""

    __slots__ = ("args", "func", "tick", "wheel")

    def __init__(self, wheel: _TimerWheel, tick: int, func: Any, args: tuple) -> None:
        self.wheel, self.tick, self.func, self.args = wheel, tick, func, args

    def cancel(self) -> None:
        if self.func is not None:
            self.wheel.cancel(self)


class _SendQueue(list):
    """Autobahn's queue of chopped or synchronous writes (``sendData``), which the bridge never asks for: a list
    (56 bytes empty) instead of Autobahn's deque (~760), one per connection. ``append``, ``len`` and ``popleft``
    are all Autobahn uses of it, and it holds at most a few writes."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _TimerWheel:
    """Stands in for Autobahn's batched timer (``factory._batched_timer``): its timers (pings, their timeouts, the
    closing handshake's) due in the same ``_TICK`` share one reactor call, and fire at most a tick late.

    Every open connection has a ping timer, and a reactor call costs ~0.5 KiB;
    connections opened about together share one, and so do their later pings.
    Autobahn's own batches leave their reactor call scheduled when every timer
    in it was cancelled; here cancelling the last one cancels the call, so a
    closed connection leaves nothing on the reactor.
    """

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.ticks: dict[int, tuple[Any, dict[_Timer, None]]] = {}  # tick -> its reactor call, its timers in order

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Timer:
        if kwargs:
            func = functools.partial(func, **kwargs)
        reactor = get_reactor()
        now = reactor.seconds()
        tick = math.ceil((now + delay) / _TICK)
        timer = _Timer(self, tick, func, args)
        entry = self.ticks.get(tick)
        if entry is None:
            entry = self.ticks[tick] = (reactor.callLater(max(0.0, tick * _TICK - now), self._fire, tick), {})
        entry[1][timer] = None
        return timer

    def cancel(self, timer: _Timer) -> None:
        timer.func = timer.args = None
        entry = self.ticks.get(timer.tick)
        if entry is not None:  # (None: its tick is firing now)
            entry[1].pop(timer, None)
            if not entry[1]:
                del self.ticks[timer.tick]
                entry[0].cancel()

    def _fire(self, tick: int) -> None:
        _, timers = self.ticks.pop(tick)  # timers set or cancelled from here on do not touch this tick's dict
        for timer in timers:
            func, args = timer.func, timer.args
            if func is None:
                continue  # cancelled by one that fired before it
            timer.func = timer.args = None
            try:
                func(*args)
            except Exception:  # one failing timer must not keep the others of its tick from firing
                self.log.exception("a WebSocket timer failed")


class WebsocketConnection(WebSocketServerProtocol):
    """One WebSocket peer: its held handshake, its queue into the layer, its timers."""

    # Set on the instance only when they change: an idle connection's attribute dict stays smaller.
    flow: HeldWrites | None = None  # what waits for a client that reads slower than its consumer writes (once open)
    too_slow = False  # cut off for not reading: its consumer hears 1008
    closing_budget: int | None = None  # bytes the client may still send once we sent our close (close_with)
    reading_held = 0  # why the client is not read: _LAYER_BEHIND | _CLIENT_BEHIND
    fast_frames = False  # whole data frames read and sent by frames.py (set per factory by _connection_class)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_queue = _SendQueue()
        self.bridge: WebsocketBridge = self.factory.bridge
        self.peer_address = address_of(self.transport.getPeer())  # None on a Unix socket
        self.peer_name = describe_peer(self.peer_address)
        self.handshake: m.Handshake | None = None
        self.asgi: m.ConnectionState | None = None  # (Autobahn owns self.state)
        self.local_id: str | None = None
        self.reply_to = ""
        self.held: Deferred | None = None  # fires with the subprotocol (accept) or fails (reject)
        # (channel, payload or close code) into the layer in the order they happened; the disconnect, which
        # nobody can be asked to repeat, waits for room in its channel for a while.
        # Past INLET_HIGH frames waiting for the layer the client is not read (TCP holds it back) until no more
        # than INLET_LOW wait: a client sending faster than the layer takes costs a few frames, not gigabytes.
        self.inlet = Inlet(self.bridge, f"forwarding messages from {self.peer_name}", build=self._message,
                           stored=self._stored, refused=self._refused, too_large=self._too_large,
                           persistent=_PERSISTENT, high=INLET_HIGH, low=INLET_LOW,
                           on_full=self._layer_behind, on_room=self._layer_caught_up)
        self.connect_stored = False
        self.refusing = False  # the layer refused a frame: later frames are not sent (no gap in their order)
        self.last_activity = time.monotonic()
        self.closed = asyncio.get_running_loop().create_future()  # close_protocol() waits for it
        self.bridge.connections.add(self)
        reactor = get_reactor()
        self.handshake_timer = reactor.callLater(self.bridge.options["handshake_timeout"], self._handshake_timed_out)
        self.idle_timer = None
        self.bad_close = False  # the client closed with a code no endpoint may send: it got 1002, so does its consumer

    # -- the handshake --

    def onConnect(self, request: Any) -> Deferred:
        bridge = self.bridge
        if not bridge.accepting:
            raise ConnectionDeny(m.UNAVAILABLE, "shutting down, try again")
        try:
            handshake = m.parse_handshake(self.http_request_data, secure=bridge.secure, client=self.peer_address,
                                          server=server_address(self.transport.getHost(), bridge.listen_options),
                                          root_path=bridge.options["root_path"])
        except m.BadHandshake as exc:
            bridge.bad_input(self.peer_name, exc.reason)
            raise ConnectionDeny(exc.status, exc.reason) from None
        host = handshake.header(b"host")
        if not host_allowed(host, bridge.allowed_hosts):
            problem = host_refused(host)
            bridge.bad_input(self.peer_name, problem)
            raise ConnectionDeny(m.BAD_REQUEST, problem)
        origin = handshake.header(b"origin")
        if not m.origin_allowed(origin, handshake.header(b"host"), bridge.options["allowed_origins"]):
            bridge.bad_input(self.peer_name, f"origin {origin.decode('latin-1')!r} is not allowed "
                                             f"(same-origin or allowed_origins only)")
            raise ConnectionDeny(m.FORBIDDEN, "origin not allowed")
        self.handshake = handshake
        self.asgi = m.ConnectionState(handshake.subprotocols)
        self.local_id = bridge.register(self)
        self.reply_to = bridge.reply_channel(self.local_id)
        self.held = Deferred()
        bridge.count("received")
        self.inlet.put(m.CONNECT, None)
        return self.held

    def refuse(self, status: int, reason: str) -> None:
        """Answer the held handshake with an HTTP error (once)."""
        if self.held is not None and not self.held.called:
            self.asgi.closed()
            self._cancel_handshake_timer()
            self.held.errback(ConnectionDeny(status, reason))

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:  # noqa: N803
        if code == m.UNAVAILABLE and not responseHeaders:  # busy or stopping: say when to come back
            responseHeaders = [("Retry-After", RETRY_AFTER)]
        super().failHandshake(reason, code, responseHeaders)

    def _handshake_timed_out(self) -> None:
        self.handshake_timer = None
        if self.held is not None and not self.held.called:
            self.bridge.count("handshake_timeouts")
            self.bridge.log.warning("%s: no answer to websocket.connect from %s within %.3g s: 504",
                                    self.bridge.label, self.peer_name, self.bridge.options["handshake_timeout"])
            self.refuse(m.GATEWAY_TIMEOUT, "no answer from the application")
        elif self.held is None and self.asgi is None:  # the request itself never came in time
            self.bridge.bad_input(self.peer_name, "no complete upgrade request within the handshake timeout")
            self.dropConnection(abort=True)

    def _cancel_handshake_timer(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    def onOpen(self) -> None:
        self._cancel_handshake_timer()
        self.last_activity = time.monotonic()
        # Twisted pauses the flow when 64 KiB wait in the socket's send buffer. Then frames wait in the flow, up
        # to max_send_buffer, and the client's own frames are not read: an echo flood from a client that does
        # not read pushes back on it instead of growing the bridge (and its pings go unanswered for as long).
        options = self.bridge.options
        self.flow = HeldWrites(self._send_frame, self._cut_off, limit=options["max_send_buffer"],
                               timeout=options["send_timeout"], limit_name="max_send_buffer",
                               timeout_name="send_timeout", on_pause=self._client_behind,
                               on_resume=self._client_caught_up)
        self.registerProducer(self.flow, True)
        for name in _HANDSHAKE_LEFTOVERS:  # Autobahn keeps them for its test suite; nothing reads them once open
            setattr(self, name, None)
        if self.bridge.options["idle_timeout"] > 0:
            self.idle_timer = get_reactor().callLater(self.bridge.options["idle_timeout"], self._check_idle)

    # -- frames in --

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N803 (Autobahn's name)
        # Autobahn validated UTF-8 already (invalid text closes with 1007 before we see it).
        self._received(payload if isBinary else payload.decode("utf-8"))

    def _received(self, payload: str | bytes) -> None:
        """One whole message from the client, read by Autobahn (``onMessage``) or by ``frames.read_frame``."""
        self.bridge.count("received")
        self.last_activity = time.monotonic()
        if self.asgi is None or self.asgi.phase != m.OPEN:
            return  # we are closing it: the consumer gets websocket.disconnect, not what came after
        self.inlet.put(m.RECEIVE, payload)

    def _message(self, channel: str, item: Any) -> dict[str, Any] | None:
        """The message for the inlet's next item, made when its turn comes; None to skip it."""
        order = self.asgi.next_order()  # orders stay contiguous: a refused frame does not use one up
        if channel == m.CONNECT:
            message = m.connect_message(self.reply_to, self.handshake)
            self.handshake = self.handshake.without_headers()  # the connect is built once: no one reads them again
            return message
        if channel == m.RECEIVE:
            if self.refusing:  # the layer refused an earlier frame: the peer got 1013 and retries them all
                self.bridge.count("refused")
                return None
            return m.receive_message(self.reply_to, self.handshake, item, order)
        if not self.connect_stored:  # the consumer never heard of this connection
            return None
        return m.disconnect_message(self.reply_to, self.handshake, item, order)

    def _stored(self, channel: str, item: Any, message: dict) -> None:
        self.asgi.stored(message["order"])
        self.connect_stored = self.connect_stored or channel == m.CONNECT

    def _refused(self, channel: str, item: Any) -> None:
        if channel == m.CONNECT:
            self.refuse(m.UNAVAILABLE, "server busy, try again later")
        elif channel == m.RECEIVE:
            self.refusing = True
            self.close_with(m.TRY_AGAIN_LATER, "server busy, try again later")

    def _too_large(self, channel: str, item: Any) -> None:
        self.bridge.bad_input(self.peer_name, f"{channel} too large for the layer")
        if channel == m.CONNECT:
            self.refuse(431, "request headers too large")
        else:
            self.close_with(m.MESSAGE_TOO_BIG, "message too large")

    # -- replies out (called by WebsocketBridge.handle_reply, in order) --

    def perform(self, action: m.Action) -> None:
        if isinstance(action, m.Accept):
            self._cancel_handshake_timer()
            self.held.callback(action.subprotocol)  # writes the 101 and opens the connection, synchronously
        elif isinstance(action, m.Reject):
            self.refuse(action.status, "rejected by the application")
        elif isinstance(action, m.Send):
            if self.transport is not None and self.flow is not None:
                self.last_activity = time.monotonic()
                is_binary = isinstance(action.payload, bytes)
                payload = action.payload if is_binary else action.payload.encode("utf-8")
                self.flow.write((payload, is_binary), len(payload))
        elif isinstance(action, m.Close):
            self.close_with(action.code, "")

    def _hold_reading(self, why: int) -> None:
        if not self.reading_held and self.transport is not None:
            self.transport.pauseProducing()
        self.reading_held |= why

    def _release_reading(self, why: int) -> None:
        if self.reading_held & why:
            self.reading_held &= ~why
            if not self.reading_held and self.transport is not None:
                self.transport.resumeProducing()

    def _layer_behind(self) -> None:
        self._hold_reading(_LAYER_BEHIND)

    def _layer_caught_up(self) -> None:
        self._release_reading(_LAYER_BEHIND)

    def _client_behind(self) -> None:
        self._hold_reading(_CLIENT_BEHIND)

    def _client_caught_up(self) -> None:
        self._release_reading(_CLIENT_BEHIND)

    def _send_frame(self, frame: tuple[bytes, bool]) -> None:
        if self.state == self.STATE_OPEN:
            payload, binary = frame
            if (self.fast_frames and self._perMessageCompress is None and not self.send_queue
                    and len(payload) <= self.maxMessagePayloadSize):
                write_now(self.transport, frames.data_frame(payload, binary))
            else:  # Autobahn's own way: compressed, queued behind its writes, or over the limit (it raises)
                self.sendMessage(payload, isBinary=binary)

    def _cut_off(self, why: str) -> None:
        """Close (1008) a client that reads too little of what its consumer sends; what waited for it is dropped."""
        bridge = self.bridge
        self.too_slow = True
        bridge.count("slow_clients")
        bridge.log.warning("%s: closed %s (%s): %s", bridge.label, self.peer_name,
                           self.handshake.path if self.handshake else "?", why)
        self.close_with(m.POLICY_VIOLATION, "too slow: reads less than it is sent")
        # The close frame waits behind what the socket holds; a client that reads nothing never answers it.
        get_reactor().callLater(1.0, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and not self.closed.done():
            self.dropConnection(abort=True)

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with any code a server may send (Autobahn's sendClose allows fewer)."""
        if self.asgi is not None:
            self.asgi.closed()
        if self.state == self.STATE_OPEN:  # Autobahn's own state: not closing yet
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123] or None, isReply=False)
            # Room for a whole message the client had in flight when it was told, and for its close frame.
            self.closing_budget = self.bridge.options["max_message_size"] + CLOSING_SLACK

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        # Once our close is sent, Autobahn reads on until the client's close or its 1 s closeHandshakeTimeout,
        # dropping data frames: a client that floods without reading (so never sees our close) would be read and
        # parsed as fast as loopback carries it for that second, ~300 MB. Past its budget it is cut at once.
        if self.closing_budget is not None:
            self.closing_budget -= len(data)
            if self.closing_budget < 0:
                self.closing_budget = None
                self.bridge.count("closing_cut")
                self.bridge.log.info("%s: cut off: still sending, over max_message_size past our close frame",
                                     self.peer_name)
                self.transport.abortConnection()
                return
        # Whole data frames are read here (frames.read_frame) while Autobahn holds nothing half-read; from the first
        # frame read_frame does not take, the bytes are Autobahn's, so it answers every error and rarer case itself.
        if (self.state == self.STATE_OPEN and self.fast_frames and self.current_frame is None and not self.data
                and not self.inside_message and self._perMessageCompress is None):
            offset, end, limit = 0, len(data), self.maxFramePayloadSize
            while offset < end and self.state == self.STATE_OPEN:
                frame = frames.read_frame(data, offset, limit)
                if frame is None:
                    break
                payload, offset = frame
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()  # as Autobahn does on any data frame
                self._received(payload)
            if offset:
                if offset == end:
                    return
                data = data[offset:]
        super().dataReceived(data)

    # -- timers --

    def _check_idle(self) -> None:
        idle = self.bridge.options["idle_timeout"]
        quiet = time.monotonic() - self.last_activity
        if quiet >= idle:
            self.idle_timer = None
            self.bridge.count("idle_closed")
            self.close_with(m.GOING_AWAY, "idle timeout")
        else:
            self.idle_timer = get_reactor().callLater(idle - quiet, self._check_idle)

    # -- the end --

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:  # noqa: N803
        # A code an endpoint may not send (999, 1005, 5000, ...): Autobahn answers 1002, then takes the client's frame
        # for the reply to its own and aborts the TCP connection, so the 1002 was lost in a reset. Answer 1002 and
        # close once it is written (the client has closed its side already: the handshake is complete).
        refused = code is not None and not (code in self.CLOSE_STATUS_CODES_ALLOWED or 3000 <= code <= 4999)
        if not refused or self.state != self.STATE_OPEN:  # (in reply to our close, Autobahn closes gracefully)
            return super().onCloseFrame(code, reasonRaw)
        self.bad_close = True
        self.bridge.bad_input(self.peer_name, f"closed with code {code}, which is not allowed: answered 1002")
        self.close_with(m.PROTOCOL_ERROR, f"invalid close code {code}")
        self.wasClean = True
        self.dropConnection(abort=False)  # after the close frame
        return True

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N803
        if self.asgi is not None:
            self.asgi.closed()
        local = getattr(self, "localCloseCode", None)
        if local in (m.INVALID_PAYLOAD, m.MESSAGE_TOO_BIG) and getattr(self, "failedByMe", False):
            why = (getattr(self, "localCloseReason", None) or b"").decode("utf-8", "replace")
            self.bridge.bad_input(self.peer_name, f"closed with {local} ({why})")  # Autobahn found it: we count it
        if self.held is not None and self.local_id is not None:
            if self.too_slow:
                code = m.POLICY_VIOLATION  # we closed it, whether or not the client answered
            elif self.bad_close:
                code = m.PROTOCOL_ERROR
            elif not wasClean:
                code = 1006  # RFC 6455: closed abnormally, without a close frame
            self.inlet.put(m.DISCONNECT, code if code is not None else 1005)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self._cancel_handshake_timer()
        for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):  # Autobahn may leave these
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        if self.local_id is not None:
            self.bridge.unregister(self.local_id)
        self.bridge.connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


def _connection_class(factory: WebSocketServerFactory) -> type[WebsocketConnection]:
    """``WebsocketConnection`` with the factory's protocol options as class attributes, once per factory.

    Autobahn copies its ~30 protocol options from the factory onto every
    connection unless the connection has them already (``_connectionMade``).
    Shared on the class, they leave an idle connection's attribute dict under
    86 entries: a 128-slot table instead of a 256-slot one, ~1.8 KiB less each.
    The options are set once, in ``make_factory``, before any connection.
    """
    options = {name: getattr(factory, name) for name in WebsocketConnection.CONFIG_ATTRS}
    options = {name: staticmethod(value) if isinstance(value, FunctionType) else value  # not made methods
               for name, value in options.items()}  # (perMessageCompressionAccept is a function)
    # frames.py reads and builds frames as Autobahn would only with its defaults: no logging or timing of frames,
    # masked client frames required and unmasked, UTF-8 validated, server frames neither masked nor fragmented.
    fast = (not factory.logOctets and not factory.logFrames and not factory.trackTimings
            and factory.requireMaskedClientFrames and factory.applyMask and factory.utf8validateIncoming
            and not factory.maskServerFrames and not factory.autoFragmentSize)
    return type(WebsocketConnection.__name__, (WebsocketConnection,),
                {**options, "fast_frames": fast, "__module__": __name__})


class WebsocketBridge(ListeningBridge):
    """Serves WebSocket clients (TCP, a Unix socket, a systemd socket; TLS) for ASGI 1.0 consumers."""

    type_name = "websocket"
    OPTIONS = {
        **listen_options(8001),
        "root_path": Option(str, "", "the path prefix the app is mounted at behind a proxy, passed as root_path"),
        "allowed_hosts": ALLOWED_HOSTS,
        "allowed_origins": Option(list, [], "origins allowed besides the same origin: '*', 'null', "
                                            "'https://host[:port]', 'host', '*.host'", each(_origin)),
        "max_message_size": Option(int, 1_000_000, "the largest message (bytes) a client may send; "
                                                   "larger closes with 1009", _message_size, from_string=True),
        "handshake_timeout": Option(float, 10.0, "seconds to receive the upgrade and the app's answer (else 504)",
                                    positive_seconds, from_string=True),
        "idle_timeout": Option(float, 0.0, "close (1001) a connection with no message either way for this "
                                           "many seconds; 0 never", seconds_or_off, from_string=True),
        "ping_interval": Option(float, 20.0, "send a ping after this many seconds of silence; 0 never",
                                seconds_or_off, from_string=True),
        "ping_timeout": Option(float, 20.0, "drop a connection whose pong does not come within this many seconds",
                               seconds_or_off, from_string=True),
        "max_send_buffer": Option(int, 4 * 1024 * 1024, "bytes of messages held for a client that reads slower "
                                                        "than its consumer sends; past it the client is closed "
                                                        "(1008)", buffer_limit, from_string=True),
        "send_timeout": Option(float, 60.0, "close (1008) a client that reads nothing for this many seconds while "
                                            "messages wait for it; 0 never", seconds_or_off, from_string=True),
    }

    def __init__(self, name: str, options: dict[str, Any], layer: Any) -> None:
        super().__init__(name, options, layer)
        self.secure = uses_tls(self.options)
        self.listen_options = self.options  # whose listening options are in force: the HTTP bridge's on its port
        self.allowed_hosts = allowed_hosts(self.options, self.listen_options)
        self.accepting = False
        self.connections: set[WebsocketConnection] = set()
        self.listening: Any = None
        self.port: int | None = 0  # the TCP port listened on, once open (None on a Unix socket)
        self.factory: WebSocketServerFactory | None = None
        self.shares_port_of: Any = None  # the HttpBridge whose listener hands us its upgrade requests

    def share_port_of(self, http_bridge: Any) -> None:
        """Serve the upgrade requests of an HTTP bridge's port instead of listening (its ``websocket`` option).

        Its port, address and TLS are then ours: this bridge's listening options
        (``listen_options``) are not used.
        """
        self.shares_port_of = http_bridge
        self.listen_options = http_bridge.options
        self.allowed_hosts = allowed_hosts(self.options, self.listen_options,
                                           behind_proxy=http_bridge.options["proxy_headers"])
        self.secure = uses_tls(http_bridge.options)
        self.factory = self.make_factory()

    def make_factory(self) -> WebSocketServerFactory:
        factory = WebSocketServerFactory(server="crossroads")
        factory.bridge = self
        size = self.options["max_message_size"]
        factory.setProtocolOptions(
            maxMessagePayloadSize=size, maxFramePayloadSize=size,
            openHandshakeTimeout=0,  # ours covers the held handshake too (504), see WebsocketConnection
            failByDrop=False,  # send 1007/1009 close frames so clients learn why, instead of a bare TCP drop
            autoPingInterval=self.options["ping_interval"], autoPingTimeout=self.options["ping_timeout"],
            allowedOrigins=["*"], allowNullOrigin=True,  # origins are checked by messages.origin_allowed
        )
        factory._batched_timer = _TimerWheel(self.log)
        factory.isSecure = self.secure
        factory.protocol = _connection_class(factory)
        return factory

    async def open_protocol(self) -> None:
        if self.shares_port_of is not None:
            self.accepting = True  # the HTTP bridge's listener hands connections to self.factory
            return
        factory = self.factory = self.make_factory()
        self.accepting = True
        self.listening = await listen(factory, self.options, self, busy_response())
        self.port = factory.port = tcp_port(self.listening)

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self.listening is not None:
            await as_future(self.listening.stopListening())

    async def close_protocol(self) -> None:
        connections = list(self.connections)
        for connection in connections:
            if connection.held is not None and not connection.held.called:
                connection.refuse(m.UNAVAILABLE, "shutting down, try again")
            elif connection.asgi is not None and connection.asgi.phase == m.OPEN:
                connection.close_with(m.GOING_AWAY, "server shutting down")
            else:
                connection.dropConnection(abort=False)
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=_CLOSE_WAIT)
        for connection in connections:
            if not connection.closed.done():
                connection.dropConnection(abort=True)
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=1.0)

    def handle_reply(self, local_id: str, message: dict) -> None:
        connection: WebsocketConnection = self.targets[local_id]
        try:
            actions = connection.asgi.interpret(message)
        except m.InvalidReply as exc:
            self.count("invalid_replies")
            self.log.warning("%s: ignored an invalid reply for %s (%s): %s", self.label, connection.peer_name,
                             connection.handshake.path if connection.handshake else "?", exc)
            return
        for action in actions:
            connection.perform(action)
