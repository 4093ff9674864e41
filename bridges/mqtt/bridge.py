"""The MQTT bridge: paho-mqtt, driven by Twisted's asyncio reactor, feeding ``messages.py``.

This module owns the I/O of one client link to a broker: opening the socket
(off the reactor thread), driving paho through its socket callbacks
(``on_socket_open`` / ``on_socket_close`` / ``on_socket_register_write`` /
``on_socket_unregister_write``, then ``loop_write`` / ``loop_misc`` and
reads of its own, below; no ``loop_start()`` thread), subscribing again on every
(re)connect, passing PUBLISHes into the layer in the broker's order and
acknowledging each only once the layer stored it, and publishing replies
(queued while the broker is away). It must not decide what a message or a reply means (that is
``messages.py``) nor how replies reach it (``bridges/base.py``).
docs/spec/mqtt.md is the contract with consumers.

Why paho is subclassed (``_PahoClient``): it reads the socket itself, in
64 KiB pieces, and decodes PUBLISH packets with ``packets.py``; paho's own
read path took three or four system calls and several objects per message,
half of the bridge's CPU in a flood (docs/benchmarks.md, "MQTT"). Every other
packet still goes to paho's handlers. Since paho never sees a PUBLISH, it
cannot answer a QoS 2 one with PUBREC at once, as it does even with
``manual_ack=True`` (once PUBREC is sent the broker never sends that PUBLISH
again, so a message the layer then refused would be lost): PUBREC waits for
``ack()`` like PUBACK, and every PUBREL is answered with PUBCOMP. The subclass
also hands paho the socket this module opened in a thread
(``_create_socket``), so that paho's blocking connect never runs on the
reactor. These are paho 2.x internals (setup.cfg pins ``<3``);
tests/test_mqtt_bridge.py covers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket as PahoMalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from crossroads.bridges.base import REQUIRED, Bridge, Inlet, Option, OptionError, get_reactor
from crossroads.bridges.protocol import payload_limit, positive
from crossroads.layer.base import MAX_MESSAGE_SIZE

from . import messages as m
from . import packets

FORWARD_BATCH = 500  # messages sent into the layer at once (the broker's order kept)
READ_SIZE = 65536  # bytes asked of the socket per read
MAX_PACKET = MAX_MESSAGE_SIZE + 65536  # MQTT 5 Maximum Packet Size we ask of the broker: room for the headers
READ_BURST = 4  # reads per readable event before the reactor serves others
# Messages read from the broker and not yet stored: past INBOUND_HIGH the bridge stops reading its socket
# (TCP pushes back on the broker, which queues for us) until the layer has taken it below INBOUND_LOW.
INBOUND_HIGH, INBOUND_LOW = 2000, 500
TOPIC_TARGETS = 100_000  # reply channels of topics remembered (the most recently received)
REQUEST_TARGETS = 10_000  # reply channels of requests (MQTT 5 response topics) remembered, likewise
_MISC_INTERVAL = 1.0  # seconds between paho's loop_misc calls (keepalive pings and their timeouts)


_max_payload = payload_limit(MAX_MESSAGE_SIZE, 65536)  # room for the topic and properties in the same message


def _qos(value: int) -> str | None:
    return None if value in (0, 1, 2) else "must be 0, 1 or 2"


def _keepalive(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be 0 (off) to 65535 seconds"


def _sender_level(value: int) -> str | None:
    return None if value >= 0 else "must be 0 (the whole topic) or a topic level, counting from 1"


# -- paho, held to the bridge's acknowledgement rules ----------------------------------------------------------


class _PahoClient(paho.Client):
    """paho's Client, reading for itself, holding QoS 2's PUBREC until ``ack()`` and using a socket opened
    elsewhere (see the module)."""

    premade_socket: socket.socket | None = None
    on_publish_packet: Callable[[packets.Publish], None]  # every PUBLISH, in the broker's order
    _unread: bytearray  # bytes read from the socket that do not make a whole packet yet (one per socket)

    def _create_socket(self) -> Any:
        sock, self.premade_socket = self.premade_socket, None
        if sock is None:  # paho must never open (and block on) a socket itself
            raise OSError("no socket was opened for this attempt")
        self._unread = bytearray()  # a new stream
        return sock

    def read_available(self, reads: int, paused: Callable[[], bool]) -> MQTTErrorCode:
        """paho's ``loop_read``, but reading up to ``reads`` times 64 KiB, until the socket has nothing more or
        ``paused()``, and handling every whole packet in what it read.

        paho reads a packet with three or four system calls (its first byte, each byte of its length, the
        rest), one packet per ``loop_read``, and dresses each PUBLISH in objects (MQTTMessage, Properties,
        its topic matcher) before its callback: together about half of the bridge's CPU in a QoS 0 flood.
        PUBLISH is decoded by ``packets.py``; every other packet is handed to paho's own handlers.
        """
        for _ in range(reads):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            if paused():
                break
            try:
                data = self._sock_recv(READ_SIZE)
            except BlockingIOError:
                break
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            if not data:
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            with self._msgtime_mutex:  # paho's keepalive counts from the last bytes received
                self._last_bytes_received = paho.time_func()
            unread = self._unread
            unread += data
            try:
                found, used = packets.split(unread)
            except packets.MalformedPacket:
                return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
            del unread[:used]
            for header, body in found:
                rc = self._handle(header, body)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle(self, header: int, body: bytes) -> MQTTErrorCode:
        if header & 0xF0 == packets.PUBLISH_TYPE:
            # Every QoS alike: acknowledged by ack() once the layer stored it (a QoS 2 PUBREC too).
            self.on_publish_packet(packets.decode_publish(header, body, self._protocol == paho.MQTTv5))
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._in_packet = {"command": header, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": len(body), "packet": bytearray(body), "to_process": 0, "pos": 0}
        try:
            return self._packet_handle()
        except PahoMalformedPacket as exc:
            raise packets.MalformedPacket(str(exc)) from exc

    def _handle_pubrel(self) -> MQTTErrorCode:
        result = paho._packet.decode_pubrel(self._in_packet["command"], self._in_packet["packet"], self._protocol)
        return self._send_pubcomp(result.mid)  # the message was stored before our PUBREC: complete it

    def ack(self, mid: int, qos: int) -> MQTTErrorCode:
        if qos == 2:
            return self._send_pubrec(mid)
        return super().ack(mid, qos)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


@implementer(IReadDescriptor, IWriteDescriptor)
class _Watcher:
    """paho's socket as the reactor sees it: readable calls ``loop_read``, writable ``loop_write``."""

    def __init__(self, bridge: MqttBridge, sock: Any) -> None:
        self.bridge, self.sock = bridge, sock
        self._fileno = sock.fileno()  # kept: the reactor removes us by it after paho closed the socket

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return self.bridge.label

    def doRead(self) -> None:
        self.bridge._readable(self)

    def doWrite(self) -> None:
        self.bridge._writable(self)

    def connectionLost(self, reason: Any) -> None:
        pass  # paho reports link loss through on_disconnect


def _properties_to_paho(properties: dict[str, Any]) -> Properties | None:
    if not properties:
        return None
    out = Properties(PacketTypes.PUBLISH)
    for key, value in properties.items():
        if key == "response_topic":
            out.ResponseTopic = value
        elif key == "correlation_data":
            out.CorrelationData = value
        elif key == "content_type":
            out.ContentType = value
        elif key == "user_properties":
            out.UserProperty = [tuple(pair) for pair in value]
        elif key == "payload_format":
            out.PayloadFormatIndicator = value
        elif key == "message_expiry":
            out.MessageExpiryInterval = value
    return out


def _properties_from_paho(properties: Any) -> dict[str, Any]:
    if properties is None:
        return {}
    found: dict[str, Any] = {}
    for key, name in (("response_topic", "ResponseTopic"), ("correlation_data", "CorrelationData"),
                      ("content_type", "ContentType"), ("payload_format", "PayloadFormatIndicator"),
                      ("message_expiry", "MessageExpiryInterval")):
        if hasattr(properties, name):
            found[key] = getattr(properties, name)
    if hasattr(properties, "UserProperty"):
        found["user_properties"] = [[name, value] for name, value in properties.UserProperty]
    return found


class MqttBridge(Bridge):
    """A client of one MQTT broker: subscriptions in, replies and ``mqtt.publish`` out."""

    type_name = "mqtt"
    OPTIONS = {
        "broker": Option(str, REQUIRED, "the broker: mqtt://host:port, or mqtts://host:port for TLS", m.check_broker),
        "subscribe": Option(list, [], "topic filters to subscribe to: [{topic = \"chat/#\", qos = 1}, ...]",
                            m.check_subscriptions),
        "reply_topic": Option(str, "", "where replies go when neither the reply nor the request names a topic; "
                                       "{topic} is the incoming topic", m.check_reply_topic),
        "allow_publish": Option(list, [], "topic filters consumers may name in a reply's topic or on mqtt.publish",
                                m.check_topic_filters),
        "publish_channel": Option(str, m.PUBLISH, "the channel of publish requests the bridge consumes; \"\" for none"),
        "qos": Option(int, 1, "the QoS of replies and publishes that do not give one", _qos, from_string=True),
        "client_id": Option(str, "", "the MQTT client id; default crossroads-{bridge name}"),
        "username": Option(str, "", "user name for the broker (from ${...}, not the file)"),
        "password": Option(str, "", "password for the broker (from ${...} or ${credential:...})"),
        "protocol": Option((str, int), "5", "MQTT version: 5 or \"3.1.1\"", m.check_protocol),
        "keepalive": Option(int, 60, "seconds between keepalive pings", _keepalive, from_string=True),
        "clean_start": Option(bool, False, "start a fresh session on every connect (loses unacknowledged messages)",
                              from_string=True),
        "session_expiry": Option(int, 86400, "MQTT 5: seconds the broker keeps the session after a disconnect",
                                 lambda v: None if 0 <= v < 2**32 else "must be 0 to 4294967295",
                                 from_string=True),
        "inflight": Option(int, 100, "MQTT 5 receive maximum: unacknowledged QoS 1/2 messages the broker may send",
                           lambda v: None if 0 < v < 65536 else "must be 1 to 65535", from_string=True),
        "ca_file": Option(str, "", "PEM CA certificates to verify an mqtts:// broker (default: the system's)"),
        "cert_file": Option(str, "", "PEM client certificate for mqtts://, if the broker asks for one"),
        "key_file": Option(str, "", "PEM private key of cert_file"),
        "max_payload": Option(int, 256 * 1024, "larger incoming payloads are dropped (acknowledged and counted)",
                              _max_payload, from_string=True),
        "sender_property": Option(str, "sender", "the MQTT 5 user property naming the sender"),
        "sender_level": Option(int, 0, "the topic level naming the sender when the property is absent (1 = first); "
                                       "0 = the whole topic", _sender_level, from_string=True),
        "queue_limit": Option(int, 1000, "publishes kept while the broker is away; the oldest are dropped beyond",
                              lambda v: None if v > 0 else "must be positive", from_string=True),
        "queue_age": Option(float, 60.0, "seconds a publish waits for the broker before it is dropped", positive,
                            from_string=True),
        "connect_timeout": Option(float, 10.0, "seconds for TCP, TLS and CONNACK", positive, from_string=True),
        "reconnect_max": Option(float, 30.0, "the longest wait between reconnect attempts, in seconds", positive,
                                from_string=True),
    }

    # -- lifecycle --

    async def open_protocol(self) -> None:
        options = self.options
        self.broker = m.parse_broker(options["broker"])
        self.protocol = m.protocol_level(options["protocol"])
        self.client_id = options["client_id"] or f"crossroads-{self.name}"
        self.subscriptions = m.parse_subscriptions(options["subscribe"])
        self.persistent = not options["clean_start"]
        self.tls = self._tls_context() if self.broker.tls else None
        self.accepting = True
        self.link_up = False
        self.generation = 0  # one per socket: acks of an older socket's messages are not sent
        # PUBLISHes into the layer in the broker's order, (socket generation, Incoming) each, acknowledged only
        # once stored. What the layer refuses is held, ahead of what came later, and tried again while the
        # link lasts (a QoS 0 message too: with reading paused, the broker waits for us instead of us dropping
        # what a slower worker has no room for yet). Past INBOUND_HIGH waiting, the broker socket is not read.
        self.inbound = Inlet(self, "forwarding messages from the broker", batch=FORWARD_BATCH,
                             build=self._inbound_message, stored=self._inbound_stored, refused=self._inbound_held,
                             too_large=self._inbound_too_large, retry_while=lambda: self.accepting,
                             high=INBOUND_HIGH, low=INBOUND_LOW, on_full=self._pause_reading,
                             on_room=self._resume_reading)
        self.outbound = m.OutboundQueue(options["queue_limit"], options["queue_age"])
        # Reply targets, least recently received first: topic -> (local id, reply channel), and likewise by
        # local id for requests with a response topic.
        self.topics: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.requests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.watcher: _Watcher | None = None
        self.misc: LoopingCall | None = None
        self._connack: asyncio.Future | None = None
        self._suback: dict[int, asyncio.Future] = {}
        self._closed: asyncio.Future | None = None  # set when paho closes the socket
        self.client = self._make_client()
        self.link = self.reconnector(self._connect, str(self.broker), initial=0.5, cap=options["reconnect_max"])
        self.link.start()
        self._publisher: asyncio.Task | None = None
        if options["publish_channel"] and options["allow_publish"]:
            self._publisher = asyncio.ensure_future(self._consume_publishes(options["publish_channel"]))

    async def stop_accepting(self) -> None:
        # New PUBLISHes are no longer taken (nor acknowledged: the broker keeps them for the next session).
        self.accepting = False
        if self._publisher is not None:
            await asyncio.gather(self._publisher, return_exceptions=True)

    async def close_protocol(self) -> None:
        if self.link_up and self.client.socket() is not None:
            self.link_up = False
            self.client.disconnect()  # written by loop_write, which then closes the socket
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), 2.0)
            except TimeoutError:
                self.log.warning("%s: the broker did not take our DISCONNECT; closing the socket", self.label)
            await self.send_to_layer(m.DISCONNECT, self._disconnect_message("bridge stopped"))
        self._close_socket()
        left = len(self.outbound)
        if left:
            self.count("dropped", left)
            self.log.warning("%s: stopped with %d publish(es) still waiting for the broker", self.label, left)

    # -- the link --

    def _tls_context(self) -> ssl.SSLContext:
        options = self.options
        try:
            context = ssl.create_default_context(cafile=options["ca_file"] or None)
        except (OSError, ssl.SSLError) as exc:
            raise OptionError("ca_file", f"cannot read {options['ca_file']!r}: {exc}") from None
        if options["cert_file"]:
            try:
                context.load_cert_chain(options["cert_file"], options["key_file"] or None)
            except (OSError, ssl.SSLError) as exc:
                raise OptionError("cert_file", f"cannot load {options['cert_file']!r} with its key: {exc}") from None
        elif options["key_file"]:
            raise OptionError("key_file", "needs cert_file")
        return context

    def _make_client(self) -> _PahoClient:
        v5 = self.protocol == 5
        client = _PahoClient(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=None if v5 else not self.persistent,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True)
        client.suppress_exceptions = False
        username = self.options["username"] or self.broker.username
        if username:
            client.username_pw_set(username, self.options["password"] or self.broker.password or None)
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closing
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        client.on_connect = self._connacked
        client.on_subscribe = self._subacked
        client.on_disconnect = self._disconnected
        client.on_publish_packet = self._received
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.ReceiveMaximum = self.options["inflight"]
            # Packets the layer could never hold are not worth reading: the broker drops them instead of
            # making us buffer up to MQTT's 256 MB each. (MQTT 3.1.1 cannot say this.)
            properties.MaximumPacketSize = MAX_PACKET
            if self.persistent:
                properties.SessionExpiryInterval = self.options["session_expiry"]
            client.connect_async(self.broker.host, self.broker.port, self.options["keepalive"],
                                 clean_start=not self.persistent, properties=properties)
        else:
            client.connect_async(self.broker.host, self.broker.port, self.options["keepalive"])
        return client

    def _open_socket(self) -> socket.socket:
        """TCP and TLS, blocking: runs in a thread."""
        timeout = self.options["connect_timeout"]
        sock = socket.create_connection((self.broker.host, self.broker.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.broker.host)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _connect(self) -> MqttBridge:
        """One attempt: socket, CONNECT/CONNACK, SUBSCRIBE/SUBACK; then the link is up and queued publishes go."""
        loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_socket))
        try:
            sock = await asyncio.shield(opening)
        except asyncio.CancelledError:  # stopped meanwhile: close what the thread opens
            opening.add_done_callback(lambda done: done.exception() is None and done.result().close())
            raise
        self._connack = loop.create_future()
        self.client.premade_socket = sock
        try:
            rc = self.client.reconnect()  # paho sends CONNECT on our socket; the reactor reads the CONNACK
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"sending CONNECT failed: {paho.error_string(rc)}")
            generation = self.generation  # this socket's
            session_present = await asyncio.wait_for(asyncio.shield(self._connack), self.options["connect_timeout"])
            granted = await self._subscribe()
            if self.generation != generation or self.watcher is None:
                # Lost in the same read as the SUBACK (the broker closed, or sent what made us close it): no
                # future was left to fail, so say it here, and the reconnector tries again.
                raise ConnectionError("the link closed just after subscribing")
        except BaseException:
            self._close_socket()
            raise
        self.link_up = True
        if not session_present and self.persistent:
            self.log.info("%s: the broker had no session for %r: messages sent while we were away are lost",
                          self.label, self.client_id)
        self._flush_outbound()
        self.spawn(self.send_to_layer_persistently(m.CONNECT, m.connect_message(
            bridge=self.name, broker=str(self.broker), client_id=self.client_id, session_present=session_present,
            subscriptions=granted)), "sending mqtt.connect")
        return self

    async def _subscribe(self) -> list[list[Any]]:
        """Subscribe to every filter (again: a broker without our session forgot them); [[filter, qos], ...]."""
        if not self.subscriptions:
            return []
        if self.protocol == 5:
            # noLocal: never receive our own publishes, so a reply topic under a subscription cannot loop.
            wanted = [(s.topic, SubscribeOptions(qos=s.qos, noLocal=True)) for s in self.subscriptions]
        else:
            wanted = [(s.topic, s.qos) for s in self.subscriptions]
        rc, mid = self.client.subscribe(wanted)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"sending SUBSCRIBE failed: {paho.error_string(rc)}")
        self._suback[mid] = asyncio.get_running_loop().create_future()
        try:
            codes = await asyncio.wait_for(asyncio.shield(self._suback[mid]), self.options["connect_timeout"])
        finally:
            self._suback.pop(mid, None)
        granted, refused = [], []
        for subscription, code in zip(self.subscriptions, codes, strict=False):
            if code.is_failure:
                refused.append(f"{subscription.topic!r} ({code})")
            else:
                granted.append([subscription.topic, code.value])
        if refused:
            self.set_problem("subscriptions", "the broker refused " + ", ".join(refused))
        else:
            self.clear_problem("subscriptions")
        return granted

    def _close_socket(self) -> None:
        if self.client.socket() is not None:
            self.client._sock_close()  # paho's own close: on_socket_close unregisters it from the reactor
        self._socket_closing(self.client, None, None)

    # paho's socket callbacks: the reactor watches what paho asks it to

    def _socket_opened(self, client: Any, userdata: Any, sock: Any) -> None:
        self.generation += 1
        self.watcher = _Watcher(self, sock)
        self._closed = asyncio.get_running_loop().create_future()
        if not self.inbound.paused:  # else on_room adds it, once the layer has taken enough of what waits
            get_reactor().addReader(self.watcher)
        self.misc = LoopingCall(self._misc)
        self.misc.clock = get_reactor()
        self.misc.start(_MISC_INTERVAL, now=False)

    def _socket_closing(self, client: Any, userdata: Any, sock: Any) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            get_reactor().removeReader(watcher)
            get_reactor().removeWriter(watcher)
        if self.misc is not None and self.misc.running:
            self.misc.stop()
        self.misc = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self.watcher is not None:
            get_reactor().addWriter(self.watcher)

    def _no_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self.watcher is not None:
            get_reactor().removeWriter(self.watcher)

    def _readable(self, watcher: _Watcher) -> None:
        client = self.client
        if _QUICKACK is not None:
            # Acknowledge what we read at once. Brokers write with Nagle's algorithm on (mosquitto's default,
            # set_tcp_nodelay false): after a PUBACK to one of our replies, the broker holds the next
            # PUBLISH until our delayed ACK, 40 ms later. Linux turns quick ACKs off again by itself, so
            # every read asks anew. (bench/chat.py: MQTT -> IRC took 44 ms without this, under 1 ms with.)
            with contextlib.suppress(OSError):
                watcher.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        try:
            rc = client.read_available(READ_BURST, lambda: self.inbound.paused)
        except packets.MalformedPacket as exc:
            self.bad_input(str(self.broker), f"a malformed packet ({exc}); closing the link")
            self._lose_link("the broker sent a malformed packet")
            return
        except Exception:
            self.count("errors")
            self.log.exception("%s: reading from the broker failed; closing the link", self.label)
            self._lose_link("the bridge failed reading")
            return
        sock = client.socket()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.watcher is watcher and isinstance(sock, ssl.SSLSocket) \
                and sock.pending() > 0 and not self.inbound.paused:
            # Decrypted bytes left after a full burst: the file descriptor will not signal them, so come back.
            get_reactor().callLater(0, self._readable, watcher)

    def _writable(self, watcher: _Watcher) -> None:
        try:
            self.client.loop_write()
        except Exception:
            self.count("errors")
            self.log.exception("%s: writing to the broker failed; closing the link", self.label)
            self._lose_link("the bridge failed writing")

    def _misc(self) -> None:
        try:
            self.client.loop_misc()
        except Exception:
            self.count("errors")
            self.log.exception("%s: paho's loop_misc failed", self.label)

    def _lose_link(self, reason: str) -> None:
        was_up = self.link_up
        self._close_socket()
        self._link_down(reason, was_up)

    # paho's protocol callbacks

    def _connacked(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        future = self._connack
        if future is None or future.done():
            return
        if reason_code.is_failure:
            future.set_exception(ConnectionRefusedError(f"the broker refused the connection: {reason_code}"))
        else:
            future.set_result(bool(flags.session_present))

    def _subacked(self, client: Any, userdata: Any, mid: int, codes: list, properties: Any) -> None:
        future = self._suback.get(mid)
        if future is not None and not future.done():
            future.set_result(codes)

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            reason = f"the broker disconnected us ({reason_code})"
        else:
            reason = "connection lost"
        self._socket_closing(client, userdata, None)
        self._link_down(reason, self.link_up)

    def _link_down(self, reason: str, was_up: bool) -> None:
        self.link_up = False
        error = ConnectionError(f"the link to the broker closed: {reason}")
        for future in [self._connack, *self._suback.values()]:
            if future is not None and not future.done():
                future.set_exception(error)
        if was_up and self.accepting:
            self.link.connection_lost(reason)
            self.spawn(self.send_to_layer_persistently(m.DISCONNECT, self._disconnect_message(reason)),
                       "sending mqtt.disconnect")

    def _disconnect_message(self, reason: str) -> dict[str, Any]:
        return m.disconnect_message(bridge=self.name, broker=str(self.broker), client_id=self.client_id,
                                    reason=reason)

    # -- into the layer --

    def _received(self, publish: packets.Publish) -> None:
        self.count("received")
        generation = self.generation
        try:
            topic = publish.topic.decode()
        except UnicodeDecodeError:
            self.bad_input(str(self.broker), f"a message on a topic that is not UTF-8 ({publish.topic[:100]!r})")
            self._ack(generation, publish.mid, publish.qos)
            return
        if not self.accepting:
            return  # not acknowledged: the broker keeps it for our next session
        if len(publish.payload) > self.options["max_payload"]:
            self.count("oversized")
            self.bad_input(str(self.broker), f"{len(publish.payload)}-byte payload on {topic!r} is over "
                                             f"max_payload ({self.options['max_payload']}); dropped")
            self._ack(generation, publish.mid, publish.qos)  # redelivering it would not make it smaller
            return
        properties = {}
        if publish.properties:
            read = Properties(PacketTypes.PUBLISH)
            read.unpack(publish.properties)
            properties = _properties_from_paho(read)
        incoming = m.Incoming(topic, publish.payload, publish.qos, publish.retain, publish.mid, publish.dup, properties)
        self.inbound.put(m.RECEIVE, (generation, incoming))

    def _inbound_message(self, channel: str, item: tuple[int, m.Incoming]) -> dict[str, Any] | None:
        generation, incoming = item
        if incoming.qos and self.persistent and generation != self.generation:
            return None  # its socket is gone unacknowledged: the broker sends it again
        options = self.options
        return m.receive_message(incoming, reply_channel=self._reply_channel_of(incoming), session=self.client_id,
                                 sender=m.sender_of(incoming, options["sender_property"], options["sender_level"]))

    def _inbound_stored(self, channel: str, item: tuple[int, m.Incoming], message: dict) -> None:
        incoming = item[1]
        if incoming.qos:  # once per message: QoS 0 has nothing to acknowledge, so no call for it
            self._ack(item[0], incoming.mid, incoming.qos)

    def _inbound_held(self, channel: str, item: tuple[int, m.Incoming]) -> None:
        # A layer that went down may have stored it before failing to say so: the next attempt of a QoS 1/2
        # message carries dup, as a broker's redelivery does (docs/spec/mqtt.md).
        incoming = item[1]
        incoming.dup = incoming.dup or bool(incoming.qos)

    def _inbound_too_large(self, channel: str, item: tuple[int, m.Incoming]) -> None:
        # A topic and properties that, with the payload, are over the layer's limit: acknowledged and dropped,
        # like any oversized payload (redelivering it would not make it smaller).
        generation, incoming = item
        self.count("oversized")
        self.bad_input(str(self.broker), f"message on {incoming.topic!r} is too large for the layer")
        self._ack(generation, incoming.mid, incoming.qos)

    def _pause_reading(self) -> None:
        # TCP pushes back on the broker, which queues for us, until the layer has taken enough.
        if self.watcher is not None:
            get_reactor().removeReader(self.watcher)

    def _resume_reading(self) -> None:
        if self.watcher is not None:
            get_reactor().addReader(self.watcher)
            # TLS may hold decrypted bytes the file descriptor will not signal: read now rather than wait.
            get_reactor().callLater(0, self._readable, self.watcher)

    def _reply_channel_of(self, incoming: m.Incoming) -> str:
        """The reply channel of a message: one per topic, or one per request with an MQTT 5 response topic.

        Reply targets are remembered least-recently-received first out, so a stream over endless topics (a
        sensor id per topic) or requests cannot grow the process without bound.
        """
        if incoming.properties.get("response_topic") is None:
            known = self.topics.get(incoming.topic)  # most messages: a topic seen before
            if known is not None:
                self.topics.move_to_end(incoming.topic)
                return known[1]
        target = m.target_of(incoming)
        if target.response_topic is None and incoming.properties.get("response_topic") is not None:
            self.bad_input(str(self.broker), f"unusable response topic "
                                             f"{incoming.properties['response_topic']!r} on {incoming.topic!r}")
        local_id = m.reply_id(target.topic, target.response_topic, target.correlation_data)
        if target.response_topic is None:
            recent, key, limit = self.topics, target.topic, TOPIC_TARGETS
        else:
            recent, key, limit = self.requests, local_id, REQUEST_TARGETS
        if key in recent:
            recent.move_to_end(key)
            return recent[key][1]
        self.register(target, local_id)
        recent[key] = (local_id, self.reply_channel(local_id))
        if len(recent) > limit:
            self.unregister(recent.popitem(last=False)[1][0])
        return recent[key][1]

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        if qos and generation == self.generation and self.client.socket() is not None:
            self.client.ack(mid, qos)

    # -- out to the broker --

    def handle_reply(self, local_id: str, message: dict) -> None:
        target: m.ReplyTarget = self.targets[local_id]
        options = self.options
        try:
            publish = m.interpret_reply(message, target, reply_topic=options["reply_topic"],
                                        allow_publish=options["allow_publish"], default_qos=options["qos"])
        except m.InvalidReply as exc:
            self._refuse(f"a reply to {target.topic!r}", exc)
            return
        self._publish(publish)

    async def _consume_publishes(self, channel: str) -> None:
        def publish_all(batch: list[tuple[str, dict]]) -> None:
            for _, message in batch:
                try:
                    publish = m.interpret_publish(message, allow_publish=self.options["allow_publish"],
                                                  default_qos=self.options["qos"])
                except m.InvalidReply as exc:
                    self._refuse(f"a message on {channel}", exc)
                    continue
                self._publish(publish)

        # A bounded wait, so stop_accepting() ends the loop without cancelling a receive in flight
        # (cancelling one on Redis can lose the message being popped).
        await self.receive_batches([channel], 100, publish_all, channel, timeout=1.0, running=lambda: self.accepting)

    def _refuse(self, what: str, exc: m.InvalidReply) -> None:
        self.count("refused_topics" if isinstance(exc, m.RefusedTopic) else "invalid_replies")
        self.count("dropped")
        self.log.warning("%s: not publishing %s: %s", self.label, what, exc)

    def _publish(self, publish: m.Publish) -> None:
        publish = m.drop_v5_only(publish, self.protocol)
        if not self.link_up:
            dropped = self.outbound.push(publish)
            self.count("queued")
            if dropped:
                self._outbound_dropped(dropped)
            return
        info = self.client.publish(publish.topic, publish.payload, publish.qos, publish.retain,
                                   _properties_to_paho(publish.properties))
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and publish.qos == 0:
            self._outbound_dropped(1)
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.count("errors")
            self.log.warning("%s: publishing to %r failed: %s", self.label, publish.topic, paho.error_string(info.rc))
        else:
            self.count("published")  # QoS 1/2 without a connection: paho sends it on reconnect

    def _flush_outbound(self) -> None:
        waiting, expired = self.outbound.take()
        if expired:
            self._outbound_dropped(expired, "too old")
        for publish in waiting:
            self._publish(publish)

    def _outbound_dropped(self, n: int, why: str = "the queue is full") -> None:
        self.count("outbound_dropped", n)
        self.count("dropped", n)
        self.log.warning("%s: dropped %d publish(es) waiting for the broker (%s; queue_limit %d, queue_age %.0f s)",
                         self.label, n, why, self.options["queue_limit"], self.options["queue_age"])
