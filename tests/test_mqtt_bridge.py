"""The MQTT bridge against a real mosquitto (started per test on free ports, plain and TLS).

As in tests/test_websocket_bridge.py, the bridge runs on Twisted's asyncio
reactor on a loop of its own (the ``reactor``/``run`` fixtures), with
consumers from tests/apps/mqtt_echo.py run by an in-process Worker. Outside
clients are paho clients with their own network thread (``Peer``) and the
``mosquitto_pub``/``mosquitto_sub`` command-line clients. One test stops Redis
under a QoS 1 stream; one runs ``crossroads bridge`` and ``crossroads worker``
as separate processes. Every wait has a deadline; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import subprocess
import threading
from contextlib import asynccontextmanager

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import MosquittoServer, RedisServer, free_port, require_binary, running_in_process, take, wait_until_async

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.mqtt.bridge import MqttBridge

# -- helpers -------------------------------------------------------------------------------------------------


class Peer:
    """An outside MQTT client: paho with its own network thread, recording every message it receives."""

    def __init__(self, port: int, *, protocol: int = paho.MQTTv5, client_id: str = "", username: str = "",
                 password: str = "") -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        if username:
            self.client.username_pw_set(username, password)
        self.received: queue.Queue = queue.Queue()
        self.subscribed = threading.Event()
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.on_message = lambda client, userdata, message: self.received.put(message)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(10), "the peer could not connect to mosquitto"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, **properties) -> None:
        props = None
        if properties:
            props = Properties(PacketTypes.PUBLISH)
            for name, value in properties.items():
                setattr(props, name, value)
        self.client.publish(topic, payload, qos, properties=props).wait_for_publish(10)

    async def take(self, timeout: float = 10) -> paho.MQTTMessage:
        try:
            return await asyncio.to_thread(self.received.get, timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the peer received nothing within {timeout} s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def bridging(broker: str, options: dict | None = None, *, channel_layer=None, worker: bool = True,
                   name: str = "mq"):
    """A started MqttBridge, connected and subscribed, and a Worker running apps.mqtt_echo on the same layer."""
    channel_layer = channel_layer or layer.from_url("memory://", capacity=1000)
    bridge = MqttBridge(name, {"broker": broker, "reply_topic": "{topic}/reply", **(options or {})}, channel_layer)
    async with running_in_process(bridge, "apps.mqtt_echo:routes" if worker else None):
        if worker:
            assert (await take(channel_layer, "test.links"))["subscriptions"] is not None
        else:
            await wait_until_async(lambda: bridge.link.connected, "the bridge to connect")
        yield bridge


ECHO = [{"topic": "echo/#", "qos": 1}]


# -- receive and reply -------------------------------------------------------------------------------------


def test_receive_and_reply_over_mqtt5_with_properties(run, mosquitto_server):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/alice", "héllo", qos=1, ContentType="text/plain",
                             UserProperty=[("sender", "alice"), ("x", "1")])
                reply = await peer.take()
                received = await take(bridge.layer, "test.mqtt")
                return bridge, reply, received, bridge.health
            finally:
                peer.close()

    bridge, reply, received, health = run(scenario())
    assert health["state"] == "connected"
    assert reply.topic == "echo/alice/reply" and reply.payload == "héllo".encode()
    assert received["topic"] == "echo/alice" and received["payload"] == "héllo".encode()
    assert received["text"] == "héllo" and received["qos"] == 1 and received["retain"] is False
    assert received["protocol"] == "mqtt" and received["room"] == "echo/alice" and received["sender"] == "alice"
    assert received["properties"] == {"content_type": "text/plain", "user_properties": [["sender", "alice"],
                                                                                         ["x", "1"]]}
    assert received["dup"] is False and received["mid"] > 0 and received["session"] == "crossroads-mq"
    assert received["reply_channel"].startswith("mqtt.mq.")
    assert bridge.counters["replies"] == 1 and bridge.counters["errors"] == 0


def test_receive_and_reply_over_mqtt311_with_the_mosquitto_clients(run, mosquitto_server, tmp_path):
    pub, sub = require_binary("mosquitto_pub"), require_binary("mosquitto_sub")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00raw")
    port = str(mosquitto_server.port)

    async def scenario():
        # MQTT 3.1.1 has no noLocal: subscribe so that the bridge's own replies are not under it
        async with bridging(mosquitto_server.url, {"subscribe": ["echo/+"], "protocol": "3.1.1",
                                                   "sender_level": 2}) as bridge:
            listener = subprocess.Popen([sub, "-p", port, "-V", "mqttv311", "-i", "outside-sub", "-q", "1",
                                         "-t", "echo/+/reply", "-C", "2", "-F", "%t %x"],
                                        stdout=subprocess.PIPE, text=True)
            try:
                await asyncio.to_thread(mosquitto_server.wait_for_log, "Sending SUBACK to outside-sub")
                for args in (["-m", "plain text"], ["-f", str(binary)]):
                    subprocess.run([pub, "-p", port, "-V", "mqttv311", "-q", "1", "-t", "echo/bob", *args],
                                   check=True, timeout=10)
                    await take(bridge.layer, "test.mqtt")  # one at a time: the two replies keep this order
                out, _ = await asyncio.to_thread(listener.communicate, timeout=10)
            finally:
                listener.kill()
            return out

    out = run(scenario())
    assert out.splitlines() == ["echo/bob/reply " + b"plain text".hex(), "echo/bob/reply " + b"\xff\xfe\x00raw".hex()]


def test_received_message_keys_for_binary_and_sender_level(run, mosquitto_server):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO, "sender_level": 2}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.publish("echo/carol/x", b"\xc3\x28", qos=0)
                return await take(bridge.layer, "test.mqtt")
            finally:
                peer.close()

    received = run(scenario())
    assert received["text"] is None and received["payload"] == b"\xc3\x28"  # not UTF-8: bytes only
    assert received["sender"] == "carol" and received["qos"] == 0 and received["mid"] == 0


def test_response_topic_and_correlation_data(run, mosquitto_server, caplog):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO, "reply_topic": ""}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("answers/#")
                for n in (1, 2):
                    peer.publish("echo/req", f"question {n}", ResponseTopic=f"answers/{n}",
                                 CorrelationData=bytes([n, 0, 255]))
                replies = [await peer.take(), await peer.take()]
                first, second = [await take(bridge.layer, "test.mqtt") for _ in range(2)]
                # no response topic and no reply_topic: nowhere to publish; logged and counted
                peer.publish("echo/plain", "lost")
                await take(bridge.layer, "test.mqtt")
                await wait_until_async(lambda: bridge.counters.get("invalid_replies") == 1, "the refused reply")
                return replies, first, second
            finally:
                peer.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        replies, first, second = run(scenario())
    by_topic = {r.topic: r for r in replies}
    for n in (1, 2):
        assert by_topic[f"answers/{n}"].payload == f"question {n}".encode()
        assert by_topic[f"answers/{n}"].properties.CorrelationData == bytes([n, 0, 255])
    assert first["properties"]["response_topic"] == "answers/1"
    assert first["properties"]["correlation_data"] == bytes([1, 0, 255])
    assert first["reply_channel"] != second["reply_channel"]  # each request is answered to its requester
    assert "nowhere to publish a reply to 'echo/plain'" in caplog.text


def test_qos2_is_delivered_and_answered(run, mosquitto_server):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": [{"topic": "echo/#", "qos": 2}], "qos": 2}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply", qos=2)
                peer.publish("echo/q2", "exactly", qos=2)
                reply = await peer.take()
                received = await take(bridge.layer, "test.mqtt")
                got_more, _ = await bridge.layer.receive(["test.mqtt"], timeout=0)
                return reply, received, got_more
            finally:
                peer.close()

    reply, received, got_more = run(scenario())
    assert received["qos"] == 2 and received["text"] == "exactly" and got_more is None
    assert reply.qos == 2 and reply.payload == b"exactly"


def test_group_broadcast_reaches_several_topics(run, mosquitto_server):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": [{"topic": "room/#", "qos": 1}]}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("room/+/reply")
                for member in ("a", "b", "c"):
                    peer.publish(f"room/{member}", "join")
                    await take(bridge.layer, "test.joined")
                peer.publish("room/a", "hello all")
                return sorted([(m.topic, m.payload) for m in [await peer.take() for _ in range(3)]])
            finally:
                peer.close()

    assert run(scenario()) == [("room/a/reply", b"hello all"), ("room/b/reply", b"hello all"),
                               ("room/c/reply", b"hello all")]


def test_reply_channels_of_the_least_recent_topics_are_forgotten(run, mosquitto_server, monkeypatch):
    import crossroads.bridges.mqtt.bridge as mqtt_bridge

    monkeypatch.setattr(mqtt_bridge, "TOPIC_TARGETS", 2)

    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO}, worker=False) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                for topic in ("echo/1", "echo/2", "echo/1", "echo/3"):  # echo/2 is the least recent when 3 comes
                    peer.publish(topic, "x")
                channels = {}
                for _ in range(4):
                    message = await take(bridge.layer, "mqtt.receive")
                    channels.setdefault(message["topic"], message["reply_channel"])
                peer.subscribe("echo/+/reply")
                for topic in ("echo/2", "echo/1", "echo/3"):
                    await bridge.layer.send(channels[topic], {"text": f"to {topic}"})
                replies = sorted([(m.topic, m.payload) for m in [await peer.take(), await peer.take()]])
                await wait_until_async(lambda: bridge.counters["unknown_replies"] == 1, "the forgotten reply channel")
                return replies
            finally:
                peer.close()

    assert run(scenario()) == [("echo/1/reply", b"to echo/1"), ("echo/3/reply", b"to echo/3")]


# -- publishing: the allow-list, mqtt.publish, invalid replies ------------------------------------------------


def test_allow_list_mqtt_publish_and_invalid_replies(run, mosquitto_server, caplog):
    options = {"subscribe": [{"topic": "to/#", "qos": 1}, {"topic": "publish/#", "qos": 1},
                             {"topic": "bad/#", "qos": 1}],
               "allow_publish": ["allowed/#", "notes/+"]}

    async def scenario():
        async with bridging(mosquitto_server.url, options) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("#")
                peer.publish("to/x", "allowed/here")
                peer.publish("to/y", "forbidden/there")
                peer.publish("publish/z", "notes/1")
                peer.publish("bad/q", "anything")
                await bridge.layer.send("mqtt.publish", {"topic": "wild/#", "text": "no"})
                await bridge.layer.send("mqtt.publish", {"topic": "notes/2/deeper", "text": "no"})
                got = []
                while len(got) < 3 + 4:  # the four requests come back to us too (we subscribed to #)
                    message = await peer.take()
                    got.append((message.topic, message.payload, message.properties))
                await wait_until_async(lambda: bridge.counters.get("refused_topics") == 2, "the refused topics")
                await wait_until_async(lambda: bridge.counters.get("invalid_replies") == 3, "the invalid replies")
                return got
            finally:
                peer.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        got = run(scenario())
    published = {(topic, payload) for topic, payload, _ in got}
    assert ("allowed/here", b"redirected") in published
    assert ("notes/1", b"published") in published
    assert ("bad/q/reply", b"ok") in published
    assert not any(topic.startswith(("forbidden", "wild", "a/")) for topic, _ in published)
    assert [p.UserProperty for t, _, p in got if t == "notes/1"] == [[("by", "consumer")]]
    assert "topic 'forbidden/there' is not in allow_publish" in caplog.text
    assert "wildcard" in caplog.text


def test_oversized_payload_is_dropped_acknowledged_and_counted(run, mosquitto_server, caplog):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO, "max_payload": 100}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/big", b"x" * 101)
                peer.publish("echo/small", b"x" * 100)
                reply = await peer.take()
                return bridge, reply
            finally:
                peer.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        bridge, reply = run(scenario())
    assert reply.topic == "echo/small/reply"
    assert bridge.counters["oversized"] == 1 and bridge.counters["bad_input"] == 1
    assert "101-byte payload on 'echo/big' is over max_payload (100)" in caplog.text


def test_the_broker_keeps_packets_the_layer_could_never_hold_from_the_bridge(run, mosquitto_server):
    # MQTT 5 Maximum Packet Size in CONNECT: a 2 MB message is dropped by mosquitto for this client, so the bridge
    # never buffers it; the message after it arrives.
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/huge", b"x" * 2_000_000)
                peer.publish("echo/after", b"small")
                reply = await peer.take()
                return bridge, reply
            finally:
                peer.close()

    bridge, reply = run(scenario())
    assert reply.topic == "echo/after/reply"
    assert bridge.counters["received"] == 1 and "oversized" not in bridge.counters


def test_a_message_too_large_for_the_layer_is_dropped_and_the_rest_of_its_batch_arrives(run, mosquitto_server,
                                                                                        caplog):
    # The payload is under max_payload, but its user properties take the channel message over the layer's 1 MiB.
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                heavy = Properties(PacketTypes.PUBLISH)
                # 1,080,000 bytes: over the layer's 1 MiB, under the Maximum Packet Size the bridge asks for
                heavy.UserProperty = [(f"p{i}", "x" * 60_000) for i in range(18)]  # strings are at most 64 KiB
                sent = [peer.client.publish("echo/heavy", b"h", 1, properties=heavy),
                        peer.client.publish("echo/light", b"l", 1)]  # sent together: one read, one batch
                for info in sent:
                    info.wait_for_publish(10)
                reply = await peer.take()
                await wait_until_async(lambda: bridge.counters.get("oversized") == 1, "the oversized message")
                return bridge, reply
            finally:
                peer.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        bridge, reply = run(scenario())
    assert reply.topic == "echo/light/reply"
    assert bridge.counters["bad_input"] == 1
    assert "message on 'echo/heavy' is too large for the layer" in caplog.text


# -- the link: TLS, broker restarts, queued publishes -------------------------------------------------------


def test_tls_listener_with_a_generated_certificate(run, mosquitto_server, mqtt_tls):
    async def scenario():
        async with bridging(mosquitto_server.tls_url, {"subscribe": ECHO, "ca_file": mqtt_tls["ca"]}) as bridge:
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/secure", "over tls")
                assert (await peer.take()).payload == b"over tls"
            finally:
                peer.close()
        # without our CA the broker's certificate is not trusted: no link, and health says why
        untrusted = MqttBridge("mq", {"broker": mosquitto_server.tls_url}, layer.from_url("memory://"))
        await untrusted.start()
        try:
            await wait_until_async(lambda: "CERTIFICATE_VERIFY_FAILED" in untrusted.health["reason"], "a TLS failure")
            return bridge, untrusted.health
        finally:
            await untrusted.stop(timeout=5)

    bridge, health = run(scenario())
    assert health["state"] == "degraded"


def test_username_and_password(run, tmp_path):
    broker = MosquittoServer(tmp_path / "auth", users={"bridge": "s3cret", "peer": "peer"}).start()

    async def scenario():
        refused = MqttBridge("mq", {"broker": broker.url, "username": "bridge", "password": "wrong"},
                             layer.from_url("memory://"))
        await refused.start()
        try:
            await wait_until_async(lambda: "refused the connection" in refused.health["reason"], "the broker's refusal")
            health = refused.health
        finally:
            await refused.stop(timeout=5)
        async with bridging(broker.url, {"subscribe": ECHO, "username": "bridge", "password": "s3cret"}):
            peer = Peer(broker.port, username="peer", password="peer")
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/auth", "let in")
                return health, (await peer.take()).payload
            finally:
                peer.close()

    try:
        health, payload = run(scenario())
    finally:
        broker.stop()
    assert health["state"] == "degraded"
    assert "cannot connect (the broker refused the connection: Not authorized)" in health["reason"]
    assert payload == b"let in"


def test_broker_restart_resubscribes_and_flushes_queued_publishes(run, mosquitto_server):
    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": ECHO, "allow_publish": ["queued/#"]}) as bridge:
            mosquitto_server.stop()
            down = await take(bridge.layer, "test.links")
            # published while the broker is away: kept, then flushed on reconnect (retained, for the late peer)
            await bridge.layer.send("mqtt.publish", {"topic": "queued/1", "text": "waited", "retain": True})
            await wait_until_async(lambda: bridge.counters.get("queued") == 1, "the publish to be queued")
            mosquitto_server.start()
            up = await take(bridge.layer, "test.links")
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("queued/#")
                queued = await peer.take()
                peer.subscribe("echo/+/reply")
                peer.publish("echo/again", "still here")  # reaches the bridge only if it subscribed again
                reply = await peer.take()
            finally:
                peer.close()
            return bridge, down, up, queued, reply, bridge.health

    bridge, down, up, queued, reply, health = run(scenario())
    assert health["state"] == "connected"
    assert "reason" in down and down["protocol"] == "mqtt" and "subscriptions" not in down
    assert up["session_present"] is False and up["subscriptions"] == [["echo/#", 1]]
    assert (queued.topic, queued.payload) == ("queued/1", b"waited")
    assert (reply.topic, reply.payload) == ("echo/again/reply", b"still here")
    assert bridge.counters["connects"] == 2


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return header, await reader.readexactly(length)


def test_a_malformed_packet_from_the_broker_is_counted_logged_and_the_link_made_again(run, caplog):
    # mosquitto never sends a malformed packet: this "broker" answers CONNECT and SUBSCRIBE properly, then sends
    # a PUBLISH whose topic runs past its end (then, on the next connection, a good one).
    connections = []

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        try:
            assert (await read_packet(reader))[0] == 0x10  # CONNECT
            writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK: no session, success, no properties
            header, body = await read_packet(reader)
            assert header == 0x82  # SUBSCRIBE
            writer.write(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK: its packet id, granted QoS 1
            if len(connections) == 1:
                writer.write(b"\x30\x05\x00\x09echo")  # a topic of 9 bytes in a packet of 5
            else:
                writer.write(b"\x30\x09\x00\x04echo\x00hi")  # topic "echo", no properties, payload "hi"
            await writer.drain()
            await reader.read()  # until the bridge closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def scenario():
        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with bridging(f"mqtt://127.0.0.1:{port}", {"subscribe": [{"topic": "echo", "qos": 1}]},
                                worker=False) as bridge:
                message = await take(bridge.layer, "mqtt.receive")
                return bridge, message
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        bridge, message = run(scenario(), timeout=30)
    assert (message["topic"], message["payload"]) == ("echo", b"hi")
    assert len(connections) == 2 and bridge.counters["bad_input"] == 1
    assert "a malformed packet (a PUBLISH whose topic runs past its end); closing the link" in caplog.text


def test_a_broker_that_stops_answering_is_dropped_by_keepalive(run, mosquitto_server):
    """paho's keepalive runs on the reactor (loop_misc): a frozen broker is noticed, and the link comes back."""
    import os
    import signal

    async def scenario():
        options = {"subscribe": ECHO, "keepalive": 1, "connect_timeout": 2, "reconnect_max": 0.5}
        async with bridging(mosquitto_server.url, options) as bridge:
            os.kill(mosquitto_server.process.pid, signal.SIGSTOP)
            try:
                down = await take(bridge.layer, "test.links", timeout=20)
            finally:
                os.kill(mosquitto_server.process.pid, signal.SIGCONT)
            up = await take(bridge.layer, "test.links", timeout=20)
            peer = Peer(mosquitto_server.port)
            try:
                peer.subscribe("echo/+/reply")
                peer.publish("echo/awake", "again")
                return down, up, (await peer.take()).payload
            finally:
                peer.close()

    down, up, payload = run(scenario(), timeout=60)
    assert down["reason"] == "connection lost" and up["subscriptions"] == [["echo/#", 1]]
    assert payload == b"again"


def test_queue_while_the_broker_is_away_is_bounded(run, tmp_path, caplog):
    broker = MosquittoServer(tmp_path / "late")  # its port is chosen, but nothing listens yet

    async def scenario():
        channel_layer = layer.from_url("memory://")
        bridge = MqttBridge("mq", {"broker": broker.url, "allow_publish": ["out/#"], "queue_limit": 2,
                                   "reconnect_max": 0.5}, channel_layer)
        await bridge.start()
        try:
            for n in (1, 2, 3):
                await channel_layer.send("mqtt.publish", {"topic": f"out/{n}", "text": f"m{n}", "retain": True})
            await wait_until_async(lambda: bridge.counters.get("queued") == 3, "three queued publishes")
            assert bridge.health["state"] == "degraded" and "cannot connect" in bridge.health["reason"]
            broker.start()
            await take(channel_layer, "mqtt.connect")
            peer = Peer(broker.port)
            try:
                peer.subscribe("out/#")
                got = sorted([(m.topic, m.payload) for m in [await peer.take(), await peer.take()]])
            finally:
                peer.close()
            return bridge, got
        finally:
            await bridge.stop(timeout=5)
            broker.stop()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.mqtt"):
        bridge, got = run(scenario())
    assert got == [("out/2", b"m2"), ("out/3", b"m3")]  # the oldest was dropped
    assert bridge.counters["outbound_dropped"] == 1
    assert "dropped 1 publish(es) waiting for the broker (the queue is full" in caplog.text


# -- nothing lost at QoS 1 and 2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
def test_refused_messages_are_not_acknowledged_and_come_back_in_the_next_session(run, mosquitto_server, qos):
    """The layer is full: the bridge holds the acks; stopped and started again, the broker redelivers."""
    channel_layer = layer.from_url("memory://", capacity=3)
    options = {"subscribe": [{"topic": "load/#", "qos": qos}], "client_id": "held-acks"}

    async def scenario():
        peer = Peer(mosquitto_server.port)
        try:
            bridge = MqttBridge("mq", {"broker": mosquitto_server.url, **options}, channel_layer)
            await bridge.start()
            await take(channel_layer, "mqtt.connect")
            for n in range(6):
                peer.publish("load/x", str(n), qos=qos)
            await wait_until_async(lambda: bridge.counters["refused"] >= 1, "the full layer to refuse")
            await bridge.stop(timeout=5)
            first = [await take(channel_layer, "mqtt.receive") for _ in range(3)]
            again = MqttBridge("mq", {"broker": mosquitto_server.url, **options}, channel_layer)
            await again.start()
            try:
                await take(channel_layer, "mqtt.connect")
                rest = [await take(channel_layer, "mqtt.receive") for _ in range(3)]
            finally:
                await again.stop(timeout=5)
            return first, rest
        finally:
            peer.close()
            await channel_layer.close()

    first, rest = run(scenario())
    assert [m["text"] for m in first + rest] == [str(n) for n in range(6)]
    assert all(not m["dup"] for m in first) and all(m["dup"] for m in rest)  # the broker sent those again
    assert all(m["qos"] == qos and m["session"] == "held-acks" for m in first + rest)


def test_a_qos0_flood_faster_than_the_consumer_waits_in_the_broker_instead_of_being_dropped(run, mosquitto_server):
    """3,000 QoS 0 messages at once into a channel of 10: the bridge stops reading, none is lost or reordered."""
    channel_layer = layer.from_url("memory://", capacity=1000, channel_capacity={"mqtt.receive": 10})

    async def scenario():
        async with bridging(mosquitto_server.url, {"subscribe": [{"topic": "flood/#", "qos": 0}]},
                            channel_layer=channel_layer, worker=False) as bridge:
            await asyncio.to_thread(mosquitto_server.wait_for_log, "Sending SUBACK to crossroads-mq")
            publisher = Peer(mosquitto_server.port)
            try:
                for n in range(3000):
                    publisher.client.publish("flood/x", str(n).encode(), qos=0)
                received = []
                while len(received) < 3000:
                    channel, message = await channel_layer.receive(["mqtt.receive"], timeout=10)
                    assert channel == "mqtt.receive", f"only {len(received)} of 3,000 arrived"
                    received.append(int(message["payload"]))
            finally:
                publisher.close()
            return bridge, received

    bridge, received = run(scenario())
    assert received == list(range(3000))
    assert bridge.counters["dropped"] == 0 and bridge.counters["refused"] > 0  # it was held back, not dropped


def test_qos1_stream_survives_redis_stopping(run, mosquitto_server, tmp_path):
    """Redis stops mid-stream and comes back: every message arrives at least once; repeats say so."""
    redis = RedisServer(tmp_path / "redis").start()
    total = 200

    async def scenario():
        channel_layer = layer.from_url(redis.url, prefix="mqtt-redis", capacity=total * 2)
        bridge = MqttBridge("mq", {"broker": mosquitto_server.url, "subscribe": [{"topic": "load/#", "qos": 1}],
                                   "client_id": "redis-stop"}, channel_layer)
        await bridge.start()
        peer = Peer(mosquitto_server.port)
        try:
            await take(channel_layer, "mqtt.connect")
            redis_down = threading.Event()

            def publish_all():  # the second half waits until Redis is down, so some surely meet it stopped
                for n in range(total):
                    if n == total // 2:
                        assert redis_down.wait(20)
                    peer.publish("load/n", str(n), qos=1)

            publishing = asyncio.ensure_future(asyncio.to_thread(publish_all))
            await wait_until_async(lambda: bridge.counters["sent"] >= 30, "the first messages to be stored")
            try:  # stop Redis, keeping what it stored (as a maintenance restart would)
                redis.command("SHUTDOWN", "SAVE")
            except Exception:
                pass  # the connection drops as it shuts down
            await asyncio.to_thread(redis.process.wait, 10)
            redis_down.set()
            await wait_until_async(lambda: bridge.counters["refused"] >= 1, "the bridge to meet the stopped layer")
            redis.start()
            await publishing
            got = []
            while len({m["text"] for m in got}) < total:
                got.extend(m for _, m in await channel_layer.receive_many(["mqtt.receive"], 100, timeout=20))
                assert got, "nothing received"
            return bridge, got
        finally:
            peer.close()
            await bridge.stop(timeout=5)
            await channel_layer.close()
            redis.stop()

    bridge, got = run(scenario(), timeout=60)
    assert {m["text"] for m in got} == {str(n) for n in range(total)}
    firsts = list(dict.fromkeys(m["text"] for m in got))
    assert firsts == [str(n) for n in range(total)]  # held messages kept their place: the broker's order
    seen = set()
    for message in got:  # a repeat has the session, mid and payload of an earlier arrival, and says dup
        identity = (message["session"], message["mid"], message["payload"])
        assert message["dup"] or identity not in seen, f"a repeat without dup: {message}"
        seen.add(identity)
    assert bridge.counters["refused"] >= 1


# -- options and deployment ---------------------------------------------------------------------------------


def test_options_are_checked(tmp_path):
    for options, problem in [
        ({"broker": "http://x"}, "broker: must be mqtt://host:port or mqtts://host:port"),
        ({"broker": "mqtt://x", "subscribe": [{"topic": "a/#/b"}]}, "'#' must be a whole level and the last one"),
        ({"broker": "mqtt://x", "subscribe": [{"topic": "a", "qos": 3}]}, "qos of 'a' must be 0, 1 or 2"),
        ({"broker": "mqtt://x", "reply_topic": "{topic}/+"}, "reply_topic: "),
        ({"broker": "mqtt://x", "allow_publish": ["a/b#"]}, "allow_publish: "),
        ({"broker": "mqtt://x", "protocol": "4"}, "protocol: must be 5 or \"3.1.1\""),
        ({}, "broker: is required"),
    ]:
        with pytest.raises(OptionError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            MqttBridge.validate_options(options)


def echo_daemon_config(tmp_path, layer_url: str, prefix: str, broker_url: str) -> str:
    """The config file of an MQTT echo run as daemons: bridge ``mq`` takes echo/# at QoS 1 from ``broker_url``,
    answers go to <topic>/reply, the consumers are apps.mqtt_echo, the layer ``layer_url`` under ``prefix``."""
    from test_cli import write_config

    return str(write_config(tmp_path, f"""[layer]
url = "{layer_url}"
prefix = "{prefix}"

[routing]
app = "apps.mqtt_echo:routes"

[bridges.mq]
type = "mqtt"
broker = "{broker_url}"
subscribe = [{{topic = "echo/#", qos = 1}}]
reply_topic = "{{topic}}/reply"
"""))


def test_bridge_and_worker_daemons_over_redis(tmp_path, redis_server, mosquitto_server, daemons):
    from test_daemons import bridge_and_worker

    pub, sub = require_binary("mosquitto_pub"), require_binary("mosquitto_sub")
    config = echo_daemon_config(tmp_path, redis_server.url, f"mqttdaemons{free_port()}", mosquitto_server.url)
    bridge, worker = bridge_and_worker(tmp_path, daemons, "mq", config)
    port = str(mosquitto_server.port)
    listener = subprocess.Popen([sub, "-p", port, "-i", "daemon-sub", "-q", "1", "-t", "echo/+/reply", "-C", "3",
                                 "-v"], stdout=subprocess.PIPE, text=True)
    try:
        mosquitto_server.wait_for_log("Sending SUBACK to daemon-sub")
        mosquitto_server.wait_for_log("Sending SUBACK to crossroads-mq")  # READY=1 comes before the link
        for n in range(3):
            subprocess.run([pub, "-p", port, "-q", "1", "-t", f"echo/d{n}", "-m", f"hello {n}"], check=True,
                           timeout=10)
        out, _ = listener.communicate(timeout=20)
    finally:
        listener.kill()
    assert sorted(out.splitlines()) == [f"echo/d{n}/reply hello {n}" for n in range(3)]
    bridge.terminate()
    worker.terminate()


def test_the_echo_example_answers_over_mqtt(tmp_path, mosquitto_server):
    """examples/echo as shipped, all-in-one (`crossroads run`), with its ports and broker pointed at ours."""
    from pathlib import Path

    from test_daemons import Daemon

    pub, sub = require_binary("mosquitto_pub"), require_binary("mosquitto_sub")
    example = Path(__file__).resolve().parent.parent / "examples" / "echo"
    text = (example / "crossroads.toml").read_text()
    text = text.replace("mqtt://127.0.0.1:1883", mosquitto_server.url)
    text = text.replace('type = "irc"', 'type = "irc"\nenabled = false')  # its IRC side: test_irc_bridge.py
    text = text.replace("port = 8000", f"port = {free_port()}").replace("port = 8001", f"port = {free_port()}")
    config = tmp_path / "crossroads.toml"
    config.write_text(text)
    (tmp_path / "echo.py").write_text((example / "echo.py").read_text())  # beside its config, as shipped
    gateway = Daemon(tmp_path, "run", "run", "--config", str(config))
    try:
        gateway.wait_ready()
        port = str(mosquitto_server.port)
        listener = subprocess.Popen([sub, "-p", port, "-i", "echo-sub", "-t", "echo/+/reply", "-C", "1", "-v"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            mosquitto_server.wait_for_log("Sending SUBACK to echo-sub")
            mosquitto_server.wait_for_log("Sending SUBACK to crossroads-broker")  # READY=1 comes before the link
            subprocess.run([pub, "-p", port, "-q", "1", "-t", "echo/me", "-m", "hello"], check=True, timeout=10)
            out, _ = listener.communicate(timeout=20)
        finally:
            listener.kill()
        assert out.splitlines() == ["echo/me/reply hello"]
        gateway.terminate()
    finally:
        gateway.close()
