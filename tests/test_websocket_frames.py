"""bridges/websocket/frames.py: the whole data frames it reads and builds, and every frame it leaves to Autobahn.

Pure (no sockets): client frames are built here byte by byte from RFC 6455
section 5.2; unmasking is held to Autobahn's own masker, and the frames built
to the websockets library's parser. tests/test_websocket_bridge.py checks the hand-over to Autobahn
on a real connection.
"""

from __future__ import annotations

import os
import random

import pytest
from autobahn.websocket.xormasker import create_xor_masker
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from crossroads.bridges.websocket import frames

MASK = b"\x11\x22\x33\x44"


def client_frame(payload: bytes, first: int = 0x81, *, mask: bytes | None = MASK,
                 length_bytes: int | None = None) -> bytes:
    """A client frame: ``first`` (FIN, RSV, opcode), the length in the smallest encoding (or ``length_bytes``)."""
    n = len(payload)
    size = length_bytes if length_bytes is not None else (0 if n < 126 else 2 if n < 65536 else 8)
    masked = 0x80 if mask is not None else 0
    if size == 0:
        head = bytes((first, masked | n))
    else:
        head = bytes((first, masked | (126 if size == 2 else 127))) + n.to_bytes(size, "big")
    if mask is None:
        return head + payload
    return head + mask + create_xor_masker(mask, n).process(payload) if n else head + mask


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 127, 2047, 2048, 2049, 65535, 65536, 100_000])
def test_whole_text_and_binary_frames_are_read(size):
    text = ("é" * size)[:size]
    data = os.urandom(size)
    both = client_frame(text.encode("utf-8")) + client_frame(data, 0x82)
    payload, offset = frames.read_frame(both, 0, 0)
    assert payload == text and type(payload) is str and offset == len(client_frame(text.encode("utf-8")))
    assert frames.read_frame(both, offset, 0) == (data, len(both))


def test_back_to_back_frames_are_read_in_turn_from_their_offsets():
    messages = [f"message {i}".encode() for i in range(10)]
    data = b"".join(client_frame(m) for m in messages)
    offset, got = 0, []
    while offset < len(data):
        payload, offset = frames.read_frame(data, offset, 0)
        got.append(payload.encode())
    assert got == messages


@pytest.mark.parametrize("size", [0, 10, 200, 70_000])
def test_a_frame_still_arriving_is_left_to_autobahn(size):
    data = client_frame(b"x" * size)
    for cut in [*range(min(len(data), 20)), len(data) - 1]:
        assert frames.read_frame(data[:cut], 0, 0) is None


@pytest.mark.parametrize(("why", "data"), [
    ("ping", client_frame(b"hi", 0x89)),
    ("pong", client_frame(b"hi", 0x8A)),
    ("close", client_frame(b"\x03\xe8", 0x88)),
    ("first fragment", client_frame(b"part", 0x01)),
    ("continuation", client_frame(b"part", 0x00)),
    ("last continuation", client_frame(b"part", 0x80)),
    ("compressed (RSV1)", client_frame(b"x", 0xC1)),
    ("RSV2", client_frame(b"x", 0xA1)),
    ("reserved opcode", client_frame(b"x", 0x83)),
    ("unmasked", client_frame(b"hello", mask=None)),
    ("length 10 in two bytes", client_frame(b"x" * 10, length_bytes=2)),
    ("length 200 in eight bytes", client_frame(b"x" * 200, length_bytes=8)),
    ("invalid UTF-8", client_frame(b"ok \xff\xfe")),
    ("a surrogate in UTF-8", client_frame(b"\xed\xa0\x80")),
    ("UTF-8 cut inside a character", client_frame("é".encode()[:1])),
])
def test_what_autobahn_must_judge_is_left_to_it(why, data):
    assert frames.read_frame(data, 0, 0) is None, why
    assert frames.read_frame(client_frame(b"before") + data, 0, 0) == ("before", len(client_frame(b"before")))


def test_a_binary_frame_need_not_be_utf8():
    assert frames.read_frame(client_frame(b"\xff\xfe", 0x82), 0, 0)[0] == b"\xff\xfe"


def test_a_frame_over_the_limit_is_left_to_autobahn_and_the_limit_itself_is_read():
    assert frames.read_frame(client_frame(b"x" * 1001), 0, 1000) is None
    assert frames.read_frame(client_frame(b"x" * 1000), 0, 1000)[0] == "x" * 1000
    assert frames.read_frame(client_frame(b"x" * 1001), 0, 0)[0] == "x" * 1001  # 0: no limit, as Autobahn


def test_unmask_is_autobahns_xor_at_every_size_around_the_switch():
    rng = random.Random(17)
    for size in [*range(1, 40), *range(2040, 2060), 5000, 70_000]:
        mask, payload = rng.randbytes(4), rng.randbytes(size)
        assert frames.unmask(mask, payload) == create_xor_masker(mask, size).process(payload)


def parsed_by_websockets(data: bytes) -> Frame:
    """``data`` read as a server frame by the websockets library's own parser (a client's view of it)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        assert not reader.buffer, "the frame is exactly its bytes"
        return done.value
    raise AssertionError("websockets wants more bytes than the frame has")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70_000])
@pytest.mark.parametrize("binary", [False, True])
def test_data_frame_is_one_whole_unmasked_frame_to_a_client(size, binary):
    payload = os.urandom(size) if binary else ("é" * size)[:size].encode("utf-8")
    frame = parsed_by_websockets(frames.data_frame(payload, binary))
    assert frame.opcode == (Opcode.BINARY if binary else Opcode.TEXT)
    assert frame.fin and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
    assert frame.data == payload
