"""The channel layer conformance suite: what every backend must do, ours or a third party's.

Use it from pytest by subclassing and saying how to build your layer::

    from crossroads.layer.conformance import LayerConformance

    class TestMyLayer(LayerConformance):
        def make_layer(self, **options):
            return my_backend.Layer(**options)

Every case runs on both faces: the blocking one (``layer.sync``) and the async
one (driven on an event loop of its own). Cases 1-18 port the ASGI 1.0
conformance suite of asgiref 1.x; the rest are the guarantees crossroads adds
(docs/spec/layer.md), among them the key/value records (``kv_*``). The layer is built with a short ``expiry`` and
``group_expiry`` so that expiry cases wait a fraction of a second; they wait
for time itself to pass, which is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from . import base

EXPIRY = 0.4
GROUP_EXPIRY = 0.6
CAPACITY = 5


class _AsyncFace:
    """Calls the async face as if it were blocking, on one loop owned by the test."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.layer, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.run_until_complete(method(*args, **kwargs))

        return call

    def close(self) -> None:
        self.loop.run_until_complete(self.layer.close())
        self.loop.close()


class LayerConformance:
    """Subclass with ``make_layer(**options)``; pytest collects the ``test_`` methods."""

    def make_layer(self, **options: Any) -> Any:
        raise NotImplementedError("subclasses say how to build the layer under test")

    def build(self, **options: Any) -> Any:
        settings = {"expiry": EXPIRY, "group_expiry": GROUP_EXPIRY, "capacity": CAPACITY,
                    "process_capacity": CAPACITY, "channel_capacity": {"tcc_special*": 2}}
        settings.update(options)
        return self.make_layer(**settings)

    @pytest.fixture(params=["sync", "async"])
    def layer(self, request: Any) -> Any:
        """The layer under test, through one face, flushed before the test."""
        raw = self.build()
        face = raw.sync if request.param == "sync" else _AsyncFace(raw)
        face.flush()
        yield face
        face.flush()
        face.close()
        raw.sync.close()

    @pytest.fixture
    def raw_layer(self) -> Any:
        """The layer itself, for cases that use both faces at once."""
        raw = self.build()
        raw.sync.flush()
        yield raw
        raw.sync.flush()
        raw.sync.close()

    # -- 1-18: the ASGI 1.0 cases --

    def test_send_recv(self, layer: Any) -> None:
        layer.send("sr_test", {"value": "blue"})
        layer.send("sr_test", {"value": "green"})
        layer.send("sr_test2", {"value": "red"})
        assert layer.receive(["sr_test"]) == ("sr_test", {"value": "blue"})
        assert layer.receive(["sr_test"]) == ("sr_test", {"value": "green"})
        assert layer.receive(["sr_test", "sr_test2"]) == ("sr_test2", {"value": "red"})

    def test_process_local_receive(self, layer: Any) -> None:
        layer.send("spr_test!a", {"value": "blue"})
        layer.send("spr_test!b", {"value": "green"})
        layer.send("spr_test!b", {"value": "yellow"})
        layer.send("spr_test2", {"value": "red"})
        assert layer.receive(["spr_test!"]) == ("spr_test!a", {"value": "blue"})
        assert layer.receive(["spr_test!"]) == ("spr_test!b", {"value": "green"})
        assert layer.receive(["spr_test!", "spr_test2"], timeout=1) in (
            ("spr_test!b", {"value": "yellow"}), ("spr_test2", {"value": "red"}))

    def test_process_local_receive_error(self, layer: Any) -> None:
        with pytest.raises(base.InvalidChannelName):
            layer.receive(["spr_test!a"], timeout=0)
        with pytest.raises(base.InvalidChannelName):
            layer.send("spr_test!", {"value": "no local part"})

    def test_message_expiry(self, layer: Any) -> None:
        layer.send("me_test", {"value": "blue"})
        time.sleep(EXPIRY + 0.2)
        assert layer.receive(["me_test"], timeout=0) == (None, None)
        assert layer.stats()["expired"] >= 1

    def test_new_channel_single_reader(self, layer: Any) -> None:
        name1 = layer.new_channel("test-new?")
        assert isinstance(name1, str) and name1.startswith("test-new?") and len(name1) > len("test-new?")
        layer.send(name1, {"value": "blue"})
        name2 = layer.new_channel("test-new?")
        assert name2 != name1
        assert layer.receive([name1, name2]) == (name1, {"value": "blue"})

    def test_new_channel_failures(self, layer: Any) -> None:
        for pattern in ("test!foo", "test.foo", "test?foo", "", "bad name?", None):
            with pytest.raises(base.InvalidChannelName):
                layer.new_channel(pattern)

    def test_strings(self, layer: Any) -> None:
        message = {"values": {
            "utf-bytes": b"\xc2\xa3",  # the UTF-8 of a pound sign, which must stay bytes
            "unicode": "\u00a3",
            "emoji": "\U0001F612",
            "control": b"\x01\x00\x03\x21",
        }}
        layer.send("str_test", message)
        _, received = layer.receive(["str_test"])
        assert received == message
        values = received["values"]
        assert isinstance(values["utf-bytes"], bytes) and isinstance(values["control"], bytes)
        assert isinstance(values["unicode"], str) and isinstance(values["emoji"], str)

    def test_groups(self, layer: Any) -> None:
        layer.group_add("tgroup", "tg_test")
        layer.group_add("tgroup", "tg_test2")
        layer.group_add("tgroup", "tg_test3")
        layer.group_discard("tgroup", "tg_test3")
        layer.group_send("tgroup", {"value": "orange"})
        assert layer.receive(["tg_test"], timeout=1) == ("tg_test", {"value": "orange"})
        assert layer.receive(["tg_test2"], timeout=1) == ("tg_test2", {"value": "orange"})
        assert layer.receive(["tg_test3"], timeout=0) == (None, None)

    def test_groups_process_local(self, layer: Any) -> None:
        layer.group_add("tgroup", "tgp!test")
        layer.group_add("tgroup", "tgp!test2")
        layer.group_add("tgroup", "tgp!test3")
        layer.group_discard("tgroup", "tgp!test2")
        layer.group_send("tgroup", {"value": "orange"})
        got = [layer.receive(["tgp!"], timeout=1), layer.receive(["tgp!"], timeout=1)]
        assert sorted(got, key=str) == [("tgp!test", {"value": "orange"}), ("tgp!test3", {"value": "orange"})]
        assert layer.receive(["tgp!"], timeout=0) == (None, None)

    def test_group_channels(self, layer: Any) -> None:
        assert layer.group_channels("tgroup") == []
        layer.group_add("tgroup", "tg_test")
        layer.group_add("tgroup", "tg_test2")
        layer.group_add("tgroup", "tg_test3!x")
        layer.group_discard("tgroup", "tg_test2")
        assert sorted(layer.group_channels("tgroup")) == ["tg_test", "tg_test3!x"]

    def test_flush(self, layer: Any) -> None:
        layer.send("fl_test", {"value": "blue"})
        layer.send("fl_test!a", {"value": "green"})
        layer.flush()
        assert layer.receive(["fl_test", "fl_test!"], timeout=0) == (None, None)

    def test_flush_groups(self, layer: Any) -> None:
        layer.group_add("tfg_group", "tfg_test")
        layer.flush()
        assert layer.group_channels("tfg_group") == []
        assert layer.group_send("tfg_group", {"value": "blue"}).delivered == 0
        assert layer.receive(["tfg_test"], timeout=0) == (None, None)

    def test_group_expiry(self, layer: Any) -> None:
        layer.group_add("tge_group", "tge_test")
        layer.group_add("tge_group", "tge_test2")
        time.sleep(GROUP_EXPIRY + 0.2)
        assert layer.group_channels("tge_group") == []
        assert layer.group_send("tge_group", {"value": "blue"}).delivered == 0
        assert layer.receive(["tge_test", "tge_test2"], timeout=0) == (None, None)

    def test_capacity(self, layer: Any) -> None:
        for _ in range(CAPACITY):
            layer.send("tc_test", {})
        with pytest.raises(base.ChannelFull):
            layer.send("tc_test", {})
        layer.receive(["tc_test"])
        layer.send("tc_test", {})  # one received frees one place
        # a channel_capacity pattern overrides the default
        layer.send("tcc_special.a", {})
        layer.send("tcc_special.a", {})
        with pytest.raises(base.ChannelFull):
            layer.send("tcc_special.a", {})
        assert layer.stats()["refused"] == 2

    def test_full_channel_makes_room_by_expiry(self, layer: Any) -> None:
        for _ in range(CAPACITY):
            layer.send("tce_test", {"old": True})
            layer.send("tce_test2", {"old": True})
        time.sleep(EXPIRY + 0.2)
        layer.group_add("tce_group", "tce_test2")
        layer.send("tce_test", {"old": False})  # the expired messages no longer count
        assert layer.group_send("tce_group", {"old": False}).delivered == 1
        assert layer.receive_many(["tce_test"], 10) == [("tce_test", {"old": False})]
        assert layer.receive_many(["tce_test2"], 10) == [("tce_test2", {"old": False})]
        assert layer.stats()["expired"] == 2 * CAPACITY  # each counted once, at send or at receive

    def test_capacity_process_local(self, layer: Any) -> None:
        # local channels share their process queue, so capacity counts the whole prefix
        for i in range(CAPACITY):
            layer.send(f"tcp_test!{i}", {})
        with pytest.raises(base.ChannelFull):
            layer.send("tcp_test!foo", {})
        assert len(layer.receive_many(["tcp_test!"], 10)) == CAPACITY

    def test_process_queues_hold_a_broadcast(self, layer: Any) -> None:
        """By default a process queue holds 100x capacity: one bridge's sockets all get a group message."""
        channel_layer = self.build(process_capacity=None, capacity=3)
        face = channel_layer.sync
        face.flush()
        try:
            for i in range(250):
                face.group_add("tpb_group", f"tpb!{i}")
            assert face.group_send("tpb_group", {"value": "all"}).dropped == 0
            assert len(drain(face, ["tpb!"])) == 250
        finally:
            face.flush()
            face.close()

    def test_capacity_group(self, layer: Any) -> None:
        layer.group_add("tcg_group", "tcg_test")
        layer.group_add("tcg_group", "tcg_test2")
        for _ in range(CAPACITY):
            layer.send("tcg_test", {})
        result = layer.group_send("tcg_group", {"value": "x"})  # never raises for a full member
        assert (result.delivered, result.dropped) == (1, 1)
        assert len(layer.receive_many(["tcg_test"], 10)) == CAPACITY
        assert layer.receive(["tcg_test2"], timeout=0) == ("tcg_test2", {"value": "x"})

    def test_exceptions(self, layer: Any) -> None:
        assert layer.ChannelFull is base.ChannelFull
        assert layer.MessageTooLarge is base.MessageTooLarge
        assert layer.InvalidChannelName is base.InvalidChannelName
        assert layer.LayerUnavailable is base.LayerUnavailable
        for error in (base.ChannelFull, base.MessageTooLarge, base.InvalidChannelName, base.LayerUnavailable):
            assert issubclass(error, base.LayerError)

    def test_message_alteration_after_send(self, layer: Any) -> None:
        message = {"value": [1, 2, 3], "nested": {"a": "b"}}
        layer.send("mas_test", message)
        message["value"][0] = "changed"
        message["nested"]["a"] = "changed"
        assert layer.receive(["mas_test"]) == ("mas_test", {"value": [1, 2, 3], "nested": {"a": "b"}})

    # -- what crossroads adds --

    def test_fifo_single_reader(self, layer: Any) -> None:
        for i in range(CAPACITY):
            layer.send("fifo_test", {"i": i})
            layer.send("fifo!a", {"i": i})
        assert [m["i"] for _, m in (layer.receive(["fifo_test"]) for _ in range(CAPACITY))] == list(range(CAPACITY))
        assert [m["i"] for _, m in layer.receive_many(["fifo!"], 100)] == list(range(CAPACITY))

    def test_receive_timeout(self, layer: Any) -> None:
        assert layer.receive(["rt_test"], timeout=0.05) == (None, None)
        assert layer.receive_many(["rt_test", "rt!"], 10, timeout=0) == []

    def test_blocking_receive_wakes_on_send(self, layer: Any) -> None:
        # The receiver must return because the message came, not because its
        # timeout ran out; the wake-up latency itself is measured in bench/, and
        # the Redis tests check that a waiting receive issues no repeated commands.
        timeout = 30.0
        sent_at: list[float] = []

        def send_later() -> None:
            time.sleep(0.1)
            sent_at.append(time.monotonic())
            self._sender_face(layer).send("wake_test", {"value": "now"})

        thread = threading.Thread(target=send_later)
        thread.start()
        channel, message = layer.receive(["wake_test", "wake_other"], timeout=timeout)
        woke = time.monotonic() - sent_at[0]
        thread.join()
        assert (channel, message) == ("wake_test", {"value": "now"})
        assert woke < timeout / 10, f"receive woke {woke:.3f}s after the send"

    def _sender_face(self, layer: Any) -> Any:
        # the async face's loop is busy in receive; send from this thread on the blocking face
        return layer.layer.sync if isinstance(layer, _AsyncFace) else layer

    def test_message_too_large(self, layer: Any) -> None:
        with pytest.raises(base.MessageTooLarge):
            layer.send("mtl_test", {"payload": b"x" * (base.MAX_MESSAGE_SIZE + 1)})
        with pytest.raises(base.MessageTooLarge):
            layer.group_send("mtl_group", {"payload": b"x" * base.MAX_MESSAGE_SIZE})
        just_fits = {"payload": b"x" * (base.MAX_MESSAGE_SIZE - 16)}
        assert len(base.pack(just_fits)) <= base.MAX_MESSAGE_SIZE
        layer.send("mtl_test", just_fits)
        assert layer.receive(["mtl_test"]) == ("mtl_test", just_fits)

    def test_invalid_names(self, layer: Any) -> None:
        for name in ("has space", "", "a" * 100, "two!bangs!x", "q?and!bang", b"bytes", None):
            with pytest.raises(base.InvalidChannelName):
                layer.send(name, {})
        with pytest.raises(base.InvalidChannelName):
            layer.receive([], timeout=0)
        with pytest.raises(ValueError):
            layer.receive_many(["ok"], 0, timeout=0)
        with pytest.raises(base.InvalidChannelName):
            layer.group_add("bad group", "ok")
        with pytest.raises(TypeError):
            layer.send("ok", ["not", "a", "dict"])
        with pytest.raises(TypeError):
            layer.send("ok", {"value": object()})

    def test_group_send_counts(self, layer: Any) -> None:
        for i in range(10):
            layer.group_add("gsc_group", f"gsc_test{i}")
        layer.group_add("gsc_group", "gsc!local")
        for _ in range(CAPACITY):
            layer.send("gsc_test0", {})
            layer.send("gsc_test1", {})
        result = layer.group_send("gsc_group", {"value": "hi"})
        assert (result.delivered, result.dropped) == (9, 2)
        assert layer.stats()["dropped"] == 2
        got = drain(layer, [f"gsc_test{i}" for i in range(2, 10)] + ["gsc!"])
        assert sorted(channel for channel, _ in got) == sorted([f"gsc_test{i}" for i in range(2, 10)] + ["gsc!local"])

    def test_send_many_receive_many(self, layer: Any) -> None:
        layer.send_many([("srm_a", {"i": i}) for i in range(3)] + [("srm_b!x", {"i": 9})])
        assert layer.receive_many(["srm_a"], 2) == [("srm_a", {"i": 0}), ("srm_a", {"i": 1})]
        rest = drain(layer, ["srm_a", "srm_b!"])
        assert sorted(rest, key=str) == [("srm_a", {"i": 2}), ("srm_b!x", {"i": 9})]
        # a batch that overflows a channel stores what fits and names what did not
        with pytest.raises(base.ChannelFull) as caught:
            layer.send_many([("srm_full", {"i": i}) for i in range(CAPACITY + 2)] + [("srm_ok", {})])
        assert caught.value.refused_channels == ["srm_full"]
        assert caught.value.refused_counts == {"srm_full": 2}
        assert len(layer.receive_many(["srm_full"], 100)) == CAPACITY
        assert layer.receive(["srm_ok"], timeout=0) == ("srm_ok", {})
        # validation fails the whole batch before anything is stored
        with pytest.raises(base.InvalidChannelName):
            layer.send_many([("srm_c", {}), ("bad name", {})])
        assert layer.receive(["srm_c"], timeout=0) == (None, None)

    def test_stats(self, layer: Any) -> None:
        layer.send("st_a", {})
        layer.send("st_a", {})
        layer.send("st_b!x", {})
        stats = layer.stats()
        assert stats["pending"] == {"st_a": 2, "st_b!": 1}
        assert stats["sent"] == 3
        layer.receive(["st_a"])
        stats = layer.stats()
        assert stats["pending"] == {"st_a": 1, "st_b!": 1} and stats["received"] == 1

    # -- key/value records: the state beside the channels (sessions, health) --

    def test_kv_set_get_delete(self, layer: Any) -> None:
        assert "kv" in layer.extensions  # what session_store looks for
        record = {"nick": "ada", "raw": b"\x00\xff", "seen": [1, 2.5, None, True], "nested": {"a": "b"}}
        assert layer.kv_get("kv_test:ws!abc") == {}
        layer.kv_set("kv_test:ws!abc", record, 60)
        assert layer.kv_get("kv_test:ws!abc") == record
        assert type(layer.kv_get("kv_test:ws!abc")["raw"]) is bytes  # bytes and str stay distinct
        layer.kv_set("kv_test:ws!abc", {"nick": "grace"}, 60)  # a set replaces the whole record
        assert layer.kv_get("kv_test:ws!abc") == {"nick": "grace"}
        layer.kv_delete("kv_test:ws!abc")
        assert layer.kv_get("kv_test:ws!abc") == {}
        layer.kv_set("kv_test:empty", {"a": 1}, 60)
        layer.kv_set("kv_test:empty", {}, 60)  # an empty record is no record
        assert layer.kv_get("kv_test:empty") == {}
        layer.kv_delete("kv_test:never-set")  # deleting what is not there is no error

    def test_kv_update_merges_fields(self, layer: Any) -> None:
        layer.kv_update("kv_health", {"irc": {"state": "connected"}}, 60)
        layer.kv_update("kv_health", {"mqtt": {"state": "connecting"}}, 60)
        layer.kv_update("kv_health", {"mqtt": {"state": "connected"}}, 60)
        assert layer.kv_get("kv_health") == {"irc": {"state": "connected"}, "mqtt": {"state": "connected"}}

    def test_kv_expiry(self, layer: Any) -> None:
        layer.kv_set("kv_expiring", {"a": 1}, EXPIRY)
        layer.kv_update("kv_expiring_update", {"a": 1}, EXPIRY)
        layer.kv_set("kv_kept", {"a": 1}, 60)
        time.sleep(EXPIRY + 0.2)
        assert layer.kv_get("kv_expiring") == {}
        assert layer.kv_get("kv_expiring_update") == {}
        assert layer.kv_get("kv_kept") == {"a": 1}

    def test_kv_mutation_after_set(self, layer: Any) -> None:
        record = {"list": [1]}
        layer.kv_set("kv_mutated", record, 60)
        record["list"].append(2)
        got = layer.kv_get("kv_mutated")
        assert got == {"list": [1]}
        got["list"].append(3)
        assert layer.kv_get("kv_mutated") == {"list": [1]}

    def test_kv_flush(self, layer: Any) -> None:
        layer.kv_set("kv_flushed", {"a": 1}, 60)
        layer.flush()
        assert layer.kv_get("kv_flushed") == {}

    def test_kv_errors(self, layer: Any) -> None:
        for key in ("has space", "", "k" * (base.MAX_KV_KEY_LENGTH + 1), b"bytes", None):
            with pytest.raises(base.InvalidChannelName):
                layer.kv_set(key, {"a": 1}, 60)
            with pytest.raises(base.InvalidChannelName):
                layer.kv_get(key)
        for ttl in (0, -1, float("inf"), "60", None, True):
            with pytest.raises(ValueError):
                layer.kv_set("kv_bad", {"a": 1}, ttl)
        with pytest.raises(TypeError):
            layer.kv_set("kv_bad", {1: "a name must be str"}, 60)
        with pytest.raises(TypeError):
            layer.kv_update("kv_bad", {"a": object()}, 60)
        with pytest.raises(TypeError):
            layer.kv_set("kv_bad", ["not", "a", "dict"], 60)
        with pytest.raises(base.MessageTooLarge):
            layer.kv_set("kv_bad", {"a": b"x" * base.MAX_MESSAGE_SIZE}, 60)
        assert layer.kv_get("kv_bad") == {}  # nothing of a refused write was stored

    def test_threads_and_tasks_at_once(self, raw_layer: Any) -> None:
        """Threads and coroutines send and receive at once: nothing lost, nothing twice."""
        senders, per_sender = 4, 150
        channels = ["cc_a", "cc_b", "cc_local!x"]
        receive_on = ["cc_a", "cc_b", "cc_local!"]
        expected = {(s, i) for s in range(senders) for i in range(per_sender)}
        received: list[tuple[int, int]] = []
        lock = threading.Lock()
        done = threading.Event()

        def record(messages: list) -> None:
            with lock:
                received.extend((m["s"], m["i"]) for _, m in messages)
                if len(received) >= len(expected):
                    done.set()

        def send_all(s: int) -> None:
            for i in range(per_sender):
                while True:
                    try:
                        raw_layer.sync.send(channels[i % len(channels)], {"s": s, "i": i})
                        break
                    except base.ChannelFull:
                        time.sleep(0.001)  # back-pressure: the receivers are behind

        def receive_sync() -> None:
            while not done.is_set():
                record(raw_layer.sync.receive_many(receive_on, 7, timeout=0.2))

        async def receive_async() -> None:
            async def task() -> None:
                while not done.is_set():
                    got = await raw_layer.receive(receive_on, timeout=0.2)
                    record([got] if got[0] else [])
            await asyncio.gather(task(), task())

        workers = [threading.Thread(target=receive_sync) for _ in range(2)]
        workers.append(threading.Thread(target=asyncio.run, args=(receive_async(),)))
        workers += [threading.Thread(target=send_all, args=(s,)) for s in range(senders)]
        for thread in workers:
            thread.start()
        finished = done.wait(60)
        done.set()
        for thread in workers:
            thread.join(30)
        assert finished, f"received {len(received)} of {len(expected)} messages"
        assert len(received) == len(set(received)), "a message was delivered twice"
        assert set(received) == expected


def drain(layer: Any, channels: list[str]) -> list[tuple[str, dict]]:
    """Everything waiting on ``channels``: one ``receive_many`` may serve a single channel."""
    got: list[tuple[str, dict]] = []
    while batch := layer.receive_many(channels, 100, timeout=0):
        got += batch
    return got
