"""MQTT framing on the bridge's read path: a byte stream cut into packets, and PUBLISH packets decoded.

This module owns the two wire formats the bridge reads itself instead of
leaving them to paho (bridge.py says why: paho reads a packet with three or
four system calls and builds objects a PUBLISH without properties does not
need). Everything else on the link, CONNACK, SUBACK, PINGRESP and the rest,
is still decoded by paho. Pure functions on bytes, no sockets; MQTT 5
sections 1.5.5 (variable byte integers), 2.1 (fixed header) and 3.3 (PUBLISH).
"""

from __future__ import annotations

from typing import NamedTuple

PUBLISH_TYPE = 0x30  # the packet type in the first byte's high nibble


class MalformedPacket(ValueError):
    """The broker sent bytes that are not MQTT: the link must be closed (MQTT 5 section 4.13)."""


class Publish(NamedTuple):
    """One PUBLISH packet as it came, before the bridge reads its topic as text."""

    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int  # 0 at QoS 0, which has no packet identifier
    properties: bytes  # MQTT 5: the property block with its length prefix; b"" when it has none


def split(buffer: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The whole packets at the start of ``buffer`` as (first byte, the bytes after the length), and how many
    bytes of ``buffer`` they took; what follows is the start of a packet that has not fully arrived."""
    packets = []
    start, end = 0, len(buffer)
    while end - start >= 2:
        length = buffer[start + 1]
        body = start + 2
        if length & 0x80:  # a remaining length over 127 takes more bytes: 7 bits each, least significant first
            length &= 0x7F
            shift = 7
            while True:
                if body >= end:
                    return packets, start
                byte = buffer[body]
                body += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("a remaining length longer than four bytes")
        if end - body < length:
            break
        packets.append((buffer[start], bytes(buffer[body:body + length])))
        start = body + length
    return packets, start


def decode_publish(header: int, body: bytes, v5: bool) -> Publish:
    """The PUBLISH whose first byte is ``header`` and whose bytes after the remaining length are ``body``."""
    qos = (header >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("a PUBLISH with QoS 3")
    if len(body) < 2:
        raise MalformedPacket("a PUBLISH too short for its topic length")
    end = 2 + ((body[0] << 8) | body[1])
    if end > len(body):
        raise MalformedPacket("a PUBLISH whose topic runs past its end")
    topic = body[2:end]
    if not topic:  # MQTT 5 topic aliases may leave it empty, but the bridge allows the broker none
        raise MalformedPacket("a PUBLISH without a topic")
    mid = 0
    if qos:
        if end + 2 > len(body):
            raise MalformedPacket("a PUBLISH too short for its packet identifier")
        mid = (body[end] << 8) | body[end + 1]
        if mid == 0:
            raise MalformedPacket("a PUBLISH at QoS 1 or 2 with packet identifier 0")
        end += 2
    properties = b""
    if v5:
        start = end
        length, end = _variable_integer(body, end)
        end += length
        if end > len(body):
            raise MalformedPacket("a PUBLISH whose properties run past its end")
        if length:
            properties = body[start:end]
    return Publish(topic, body[end:], qos, bool(header & 0x01), bool(header & 0x08), mid, properties)


def _variable_integer(data: bytes, at: int) -> tuple[int, int]:
    """The variable byte integer at ``data[at]`` and where the bytes after it start."""
    value, shift = 0, 0
    while True:
        if at >= len(data):
            raise MalformedPacket("a variable byte integer runs past the packet's end")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise MalformedPacket("a variable byte integer longer than four bytes")
