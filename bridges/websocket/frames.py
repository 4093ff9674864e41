"""RFC 6455 framing for the common case, with no sockets and no reactor: whole data frames read and built.

This module owns the shortcut past Autobahn's frame machinery for what a chat
or echo client sends nearly always: one unfragmented, masked text or binary
frame, uncompressed, within the size limit, arriving whole. ``read_frame``
takes such a frame (its payload unmasked, text decoded) and refuses anything
else by returning None, leaving it to Autobahn (``bridge.py`` hands it the
bytes from there on): control frames, fragments, a frame still arriving,
reserved bits or opcodes, an unmasked or oversized frame, a non-minimal
length, text that is not UTF-8. So every error and every rarer case is still
Autobahn's, answered exactly as before; only frames it would have delivered
untouched are read here. ``data_frame`` builds what Autobahn's ``sendMessage``
sends for one unfragmented, uncompressed server message (server frames are not
masked).

Why: Autobahn spends ~40 µs of Python per echo message on its state machine,
eager debug-log formatting, a masker object per frame, an event emitter and
traffic counters nobody reads; these two functions take a few.
"""

from __future__ import annotations

from autobahn.websocket.xormasker import create_xor_masker

_TEXT, _BINARY = 0x81, 0x82  # first byte of a whole (FIN) text / binary frame with no reserved bits set
_MASKED = 0x80
_INT_UNMASK = 2048  # bytes up to which one big-int XOR unmasks fastest; above, Autobahn's C masker is faster


def unmask(mask: bytes, payload: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 section 5.3)."""
    n = len(payload)
    if n > _INT_UNMASK:
        return create_xor_masker(mask, n).process(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def read_frame(data: bytes, offset: int, limit: int) -> tuple[str | bytes, int] | None:
    """The whole client data frame starting at ``data[offset]``: (its text or bytes, the offset after it).

    None when that frame is not one this module takes (see the module
    docstring): the caller hands ``data[offset:]`` to Autobahn. ``limit`` is
    the largest payload allowed (``maxFramePayloadSize``, also the message
    limit, since the frame is the whole message); 0 means none.
    """
    end = len(data)
    if end - offset < 6:  # the smallest masked frame: 2 header bytes and the mask
        return None
    first = data[offset]
    if first != _TEXT and first != _BINARY:
        return None
    second = data[offset + 1]
    if not second & _MASKED:
        return None  # a client's frames must be masked: Autobahn fails the connection
    length = second & 0x7F
    start = offset + 2
    if length == 126:
        length = int.from_bytes(data[start:start + 2], "big")
        start += 2
        if length < 126:
            return None  # not the minimal encoding: a protocol error, Autobahn's to answer
    elif length == 127:
        length = int.from_bytes(data[start:start + 8], "big")
        start += 8
        if length < 65536 or length > 0x7FFFFFFFFFFFFFFF:
            return None
    if 0 < limit < length:
        return None  # Autobahn closes with 1009
    payload_start = start + 4
    stop = payload_start + length
    if stop > end:
        return None  # still arriving
    payload = data[payload_start:stop]
    if length:
        payload = unmask(data[start:payload_start], payload)
    if first == _BINARY:
        return payload, stop
    try:
        return payload.decode("utf-8"), stop
    except UnicodeDecodeError:
        return None  # Autobahn closes with 1007


def data_frame(payload: bytes, binary: bool) -> bytes:
    """One unfragmented, unmasked, uncompressed server frame carrying ``payload`` (text already UTF-8)."""
    first = _BINARY if binary else _TEXT
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big") + payload
    return bytes((first, 127)) + length.to_bytes(8, "big") + payload
