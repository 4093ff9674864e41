"""The pure parts of the layer contract: names, limits, the stored entry format, options."""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import enum
import itertools
import uuid

import pytest

from crossroads import layer
from crossroads.layer import base
from crossroads.layer.redis import glob_to_lua, public_url


@pytest.mark.parametrize("name", ["a", "http.request", "A-b_c.9", "x?", "x?abc", "x!y", "x!", "x!y.z-1_2", "a" * 99])
def test_valid_channel_names(name):
    assert base.check_channel_name(name, receive=name.endswith("!")) == name


@pytest.mark.parametrize("name", ["", "a b", "a" * 100, "a!b!c", "a?b!c", "é", "a\nb", "a/b", "?x", "!x"])
def test_invalid_channel_names(name):
    with pytest.raises(layer.InvalidChannelName):
        base.check_channel_name(name)


def test_process_local_names_send_and_receive_rules():
    base.check_channel_name("bridge!conn1")
    base.check_channel_name("bridge!", receive=True)
    with pytest.raises(layer.InvalidChannelName, match="receive on its process queue 'bridge!'"):
        base.check_channel_name("bridge!conn1", receive=True)
    with pytest.raises(layer.InvalidChannelName, match="needs a local part"):
        base.check_channel_name("bridge!")
    assert base.queue_name("bridge!conn1") == "bridge!"
    assert base.queue_name("plain") == "plain"


def test_group_names():
    assert base.check_group_name("chat.room-1") == "chat.room-1"
    for bad in ("chat!x", "chat?x", "", "a" * 100, 5):
        with pytest.raises(layer.InvalidChannelName):
            base.check_group_name(bad)


def test_new_channel_names_are_fresh():
    names = {base.new_channel_name("http.response?") for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.startswith("http.response?") and len(n) == len("http.response?") + 16 for n in names)


def test_size_limit_is_on_the_serialized_bytes():
    # 1 MiB of bytes is over the limit once msgpack adds its header
    with pytest.raises(layer.MessageTooLarge, match="1048576"):
        base.pack({"b": b"x" * base.MAX_MESSAGE_SIZE})
    body = base.pack({"b": b"x" * (base.MAX_MESSAGE_SIZE - 10)})
    assert len(body) <= base.MAX_MESSAGE_SIZE


def test_a_copied_message_keeps_its_serialized_form_and_pack_errors():
    original = {"text": "hi", "items": [1, {"b": b"\x00"}]}
    copy = base.copy_message(original)
    assert copy == original and copy is not original and copy["items"] is not original["items"]
    assert base.pack(copy) is copy.packed and copy.packed == base.pack(original)
    original["items"].append(2)  # later changes to the original are not in the copy, nor in what it sends
    assert base.unpack(base.pack(copy)) == {"text": "hi", "items": [1, {"b": b"\x00"}]}
    with pytest.raises(TypeError, match="cannot be serialized"):
        base.copy_message({"x": object()})
    with pytest.raises(TypeError, match="must be a dict"):
        base.copy_message(["not", "a", "dict"])
    with pytest.raises(layer.MessageTooLarge):
        base.copy_message({"b": b"x" * base.MAX_MESSAGE_SIZE})


def test_pack_after_a_failure_or_a_large_message_and_from_many_threads_is_exact():
    # Whatever pack() did before (raised, packed a large message) and from any thread, the next message's bytes
    # are exactly msgpack's.
    import msgpack
    expected = msgpack.packb({"text": "next"}, use_bin_type=True)
    for bad in ({"x": object()}, {"n": 2 ** 70}, {"b": b"x" * base.MAX_MESSAGE_SIZE}):
        with pytest.raises((TypeError, layer.MessageTooLarge)):
            base.pack(bad)
        assert base.pack({"text": "next"}) == expected
    assert len(base.pack({"b": b"x" * 300_000})) > 300_000
    assert base.pack({"text": "next"}) == expected
    messages = [{"i": i, "text": "x" * (i % 7), "nested": {"list": list(range(i % 5))}} for i in range(2000)]

    def pack_all(offset: int) -> bool:
        return all(base.pack(m) == msgpack.packb(m, use_bin_type=True) for m in messages[offset:] + messages[:offset])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(pack_all, [0, 500, 1000, 1500]))


class Colour(enum.IntEnum):
    RED = 1


class Plain(enum.Enum):
    RED = 1


def _nested(depth: int) -> list:
    top = current = []
    for _ in range(depth):
        current.append([])
        current = current[0]
    return top


@pytest.mark.parametrize("message", [
    {"s": "é" * 40, "long": "x" * 70_000, "b": b"\x00\xff" * 200, "i": [0, -1, -32, -33, 127, 128, 255, 256, 65535,
     65536, 2**32, 2**64 - 1, -2**63], "f": [0.5, -1e300, float("inf")], "none": None, "t": True, "f0": False},
    {1: "int key", None: "none key", b"k": "bytes key", 1.5: "float key", (1, 2): "tuple key"},
    {"tuple": (1, "a"), "bytearray": bytearray(b"x"), "memoryview": memoryview(b"y"),
     "sub": collections.OrderedDict(a=1)},
    {"intenum": Colour.RED}, {"deep": _nested(300)},  # what only msgpack writes: through it, as before
])
def test_pack_writes_exactly_what_msgpack_writes(message):
    import msgpack
    body = base.pack(message)
    assert body == msgpack.packb(message, use_bin_type=True)
    if (1, 2) not in message:  # msgpack cannot read a map with an array key back
        assert repr(base.unpack(body)) == repr(msgpack.unpackb(body, raw=False, strict_map_key=False))


@pytest.mark.parametrize("value", [datetime.datetime(2026, 1, 1), datetime.date(2026, 1, 1), uuid.UUID(int=1),
                                   Plain.RED, {1, 2}, object(), "\ud800", 2**64, -2**63 - 1])
def test_pack_refuses_what_msgpack_refuses(value):
    with pytest.raises(TypeError, match="cannot be serialized"):
        base.pack({"x": value})
    with pytest.raises(TypeError, match="field 'x' cannot be serialized"):
        base.pack_fields({"x": value})


def test_unpack_reads_what_only_msgpack_reads_and_fails_as_it_fails():
    import msgpack
    ext = msgpack.packb({"e": msgpack.ExtType(5, b"xx")})
    assert base.unpack(ext) == {"e": msgpack.ExtType(5, b"xx")}
    with pytest.raises(UnicodeDecodeError):
        base.unpack(b"\x81\xa1a\xa2\xff\xfe")  # a str that is not UTF-8
    with pytest.raises(ValueError):
        base.unpack(b"\x81\xa1a")  # cut short


def test_entries_round_trip():
    body = base.pack({"text": "hi"})
    entry = base.make_entry("bridge!conn1", body, 123.5)
    assert base.read_entry(entry, "bridge!") == (123.5, "bridge!conn1", body)
    entry = base.make_entry("chat", body, 99.0)
    assert base.read_entry(entry, "chat") == (99.0, "chat", body)
    assert base.unpack(body) == {"text": "hi"}


def test_capacity_patterns():
    options = base.LayerOptions(capacity=10, channel_capacity={"http.response!*": 2, "chat.*": 5, "chat.x": 7})
    assert options.capacity_for("http.response!abc") == 2
    assert options.capacity_for("chat.x") == 5  # the first matching pattern wins
    assert options.capacity_for("chatXx") == 10  # '.' is literal
    assert options.capacity_for("other") == 10
    with pytest.raises(ValueError, match="channel_capacity"):
        base.LayerOptions(channel_capacity={"a": 0})
    with pytest.raises(ValueError, match="capacity"):
        base.LayerOptions(capacity=0)
    with pytest.raises(ValueError, match="prefix"):
        base.LayerOptions(prefix="has space")


def test_lua_patterns_match_like_the_python_ones():
    import re

    cases = ["http.response!*", "chat.*", "a?b*", "x%y*", "*"]
    names = ["http.response!abc", "http.responseXabc", "chat.room", "a?b!c", "a?bc", "x%y1", ""]
    for pattern in cases:
        python = re.compile(base.glob_to_regex(pattern))
        lua = glob_to_lua(pattern)
        for name in names:
            # translate the Lua pattern's escapes back to a regex to compare semantics
            as_regex = re.sub(r"%(.)", lambda m: re.escape(m.group(1)), lua)
            assert bool(python.match(name)) == bool(re.match(as_regex, name)), (pattern, name)


def test_backoff_grows_with_jitter_and_is_capped():
    delays = list(itertools.islice(base.backoff_delays(initial=0.1, cap=2.0), 12))
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 2.0 for d in delays)
    assert max(delays[-4:]) > 1.0
    assert len(set(delays)) > 1


def test_from_url_rejects_unknown_schemes_helpfully():
    with pytest.raises(ValueError, match="memory://"):
        layer.from_url("amqp://localhost")


def test_public_url_hides_the_password():
    assert public_url("redis://:s3cret@example.com:6380/2") == "redis://example.com:6380/2"
    assert "s3cret" not in repr(layer.from_url("redis://:s3cret@127.0.0.1:6380/0"))


@pytest.mark.parametrize("text, shown", [
    ("redis://:s3cret@example.com:6380/2", "redis://:****@example.com:6380/2"),
    ("rediss://user:s3cret@cache:6380/0?ssl_ca_certs=/ca.pem", "rediss://user:****@cache:6380/0?ssl_ca_certs=/ca.pem"),
    ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=****"),
    ("cannot reach redis://:s3cret@h:1/0 or mqtt://bob:s3cret@broker",
     "cannot reach redis://:****@h:1/0 or mqtt://bob:****@broker"),
    ("redis://example.com:6379/0", "redis://example.com:6379/0"),
    ("redis://user@example.com/0", "redis://user@example.com/0"),
    ("memory://", "memory://"),
])
def test_mask_url_hides_every_password_and_keeps_the_rest(text, shown):
    assert layer.mask_url(text) == shown


def test_an_unknown_scheme_error_does_not_repeat_the_password():
    with pytest.raises(ValueError) as caught:
        layer.from_url("amqp://guest:s3cret@localhost")
    assert "s3cret" not in str(caught.value) and "amqp://guest:****@localhost" in str(caught.value)
