"""bridges/mqtt/packets.py: stream framing and PUBLISH decoding, checked against packets paho itself encodes."""

from __future__ import annotations

import random

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from crossroads.bridges.mqtt import packets


class _Encoder(paho.Client):
    """paho's own PUBLISH encoder, with the packet kept instead of sent."""

    def __init__(self, protocol: int) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, protocol=protocol)
        self._sock = object()  # paho encodes only for a connected client
        self.encoded: bytes = b""

    def _packet_queue(self, command, packet, mid, qos, info=None):
        self.encoded = bytes(packet)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS


def encode(topic: bytes, payload: bytes, qos: int = 0, retain: bool = False, dup: bool = False, mid: int = 0,
           properties: Properties | None = None, protocol: int = paho.MQTTv5) -> bytes:
    encoder = _Encoder(protocol)
    encoder._send_publish(mid, topic, payload, qos, retain, dup, properties=properties)
    encoder._sock = None
    return encoder.encoded


def frame(packet_type: int, body: bytes) -> bytes:
    """A packet with the remaining length encoded as MQTT does (7 bits a byte, least significant first)."""
    out, length = bytearray([packet_type]), len(body)
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def decode(raw: bytes, v5: bool = True) -> packets.Publish:
    found, used = packets.split(raw)
    assert used == len(raw) and len(found) == 1
    return packets.decode_publish(*found[0], v5)


# -- split ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152])
def test_split_reads_every_width_of_remaining_length(size):
    raw = frame(0x30, b"x" * size)
    assert len(raw) - size - 1 == (1 if size < 128 else 2 if size < 16384 else 3 if size < 2097152 else 4)
    assert packets.split(raw) == ([(0x30, b"x" * size)], len(raw))


def test_split_waits_for_a_packet_cut_anywhere():
    stream = frame(0x30, b"a" * 200) + frame(0xD0, b"") + frame(0x90, b"\x00\x01\x00\x01")
    ends = [203, 205, len(stream)]
    for cut in range(len(stream) + 1):
        found, used = packets.split(stream[:cut])
        whole = [end for end in ends if end <= cut]
        assert used == (whole[-1] if whole else 0), cut
        assert len(found) == len(whole)
        rest, more = packets.split(stream[used:])  # the remainder, once it has all arrived, completes the stream
        assert len(rest) == 3 - len(whole) and used + more == len(stream)


def test_split_takes_a_bytearray_and_leaves_a_partial_tail():
    stream = bytearray(frame(0x30, b"one") + frame(0x30, b"two") + frame(0x30, b"three")[:4])
    found, used = packets.split(stream)
    assert found == [(0x30, b"one"), (0x30, b"two")] and used == 10
    assert all(type(body) is bytes for _, body in found)


def test_split_refuses_a_remaining_length_of_five_bytes():
    with pytest.raises(packets.MalformedPacket, match="four bytes"):
        packets.split(b"\x30\xff\xff\xff\xff\x01")
    assert packets.split(b"\x30\xff\xff\xff") == ([], 0)  # four length bytes, still open: wait for more


# -- decode_publish, against paho's encoder ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_decode_what_paho_encodes(protocol, qos):
    raw = encode(b"chat/room", b"hello", qos=qos, retain=True, dup=bool(qos), mid=qos and 513, protocol=protocol)
    publish = decode(raw, v5=protocol == paho.MQTTv5)
    assert publish == packets.Publish(b"chat/room", b"hello", qos, True, bool(qos), qos and 513, b"")


def test_decode_keeps_the_property_block_for_paho_to_read():
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "back/here"
    properties.CorrelationData = b"\x00\x01"
    properties.UserProperty = [("sender", "ann")]
    publish = decode(encode(b"a/b", b"\xff\xfe", qos=1, mid=7, properties=properties))
    assert (publish.topic, publish.payload, publish.mid) == (b"a/b", b"\xff\xfe", 7)
    read = Properties(PacketTypes.PUBLISH)
    read.unpack(publish.properties)
    assert (read.ResponseTopic, read.CorrelationData, read.UserProperty) == \
        ("back/here", b"\x00\x01", [("sender", "ann")])


def test_decode_agrees_with_paho_on_random_packets():
    rng = random.Random(5)
    for _ in range(500):
        protocol = rng.choice([paho.MQTTv5, paho.MQTTv311])
        qos = rng.randrange(3)
        topic = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 300)))
        payload = rng.randbytes(rng.choice([0, 1, 100, 127, 128, 20_000]))
        properties = None
        if protocol == paho.MQTTv5 and rng.random() < 0.5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = [("k", "v" * rng.randrange(200))]
            if rng.random() < 0.5:
                properties.MessageExpiryInterval = rng.randrange(2**32)
        raw = encode(topic, payload, qos=qos, retain=rng.random() < 0.5, dup=rng.random() < 0.5,
                     mid=rng.randrange(1, 65536) if qos else 0, properties=properties, protocol=protocol)
        header, body = packets.split(raw)[0][0]
        ours = packets.decode_publish(header, body, protocol == paho.MQTTv5)
        theirs = paho._packet.decode_publish(header, body, protocol)
        assert (ours.topic, ours.payload, ours.qos, ours.retain, ours.dup, ours.mid) == \
            (theirs.topic, theirs.payload, theirs.qos, theirs.retain, theirs.dup, theirs.mid)
        if properties is None:
            assert ours.properties == b""
        else:
            read = Properties(PacketTypes.PUBLISH)
            read.unpack(ours.properties)
            assert read.json() == theirs.properties.json()


@pytest.mark.parametrize(("header", "body", "v5", "says"), [
    (0x36, b"\x00\x01a", True, "QoS 3"),
    (0x30, b"\x00", True, "too short for its topic length"),
    (0x30, b"\x00\x05ab", True, "topic runs past its end"),
    (0x30, b"\x00\x00\x00", True, "without a topic"),
    (0x30, b"\x00\x00", False, "without a topic"),
    (0x32, b"\x00\x01a\x00", True, "too short for its packet identifier"),
    (0x32, b"\x00\x01a\x00\x00\x00", True, "packet identifier 0"),
    (0x30, b"\x00\x01a\x05\x01", True, "properties run past its end"),
    (0x30, b"\x00\x01a", True, "variable byte integer runs past"),
    (0x30, b"\x00\x01a\xff\xff\xff\xff\x01", True, "longer than four bytes"),
])
def test_malformed_publishes_are_refused_with_the_reason(header, body, v5, says):
    with pytest.raises(packets.MalformedPacket, match=says):
        packets.decode_publish(header, body, v5)


def test_without_v5_the_bytes_after_the_identifier_are_all_payload():
    # The same bytes read as MQTT 5 would take the first payload byte for a property length.
    body = b"\x00\x01a\x00\x09\x00payload"
    assert packets.decode_publish(0x32, body, False).payload == b"\x00payload"
    assert packets.decode_publish(0x32, body, True).payload == b"payload"
