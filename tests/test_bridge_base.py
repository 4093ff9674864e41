"""Tests of bridges/base.py, through the line-based toy bridge in tests/toy_bridge.py.

Twisted allows one reactor per process, so this module installs the asyncio
reactor on a loop of its own, drives that loop with ``run_until_complete``
(the reactor's I/O and timers are the loop's), checks after each test that
nothing was left on it, and uninstalls the reactor when the module is done, so
no reactor leaks into other tests. What needs a pristine process (installing
reactors, a real ``reactor.run()``) runs in a subprocess. Tests wait on events
and socket reads with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
import textwrap
import uuid
from contextlib import asynccontextmanager
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from servers import free_port
from toy_bridge import ToyBridge

import crossroads.bridges.registry as bridges_registry
from crossroads import layer
from crossroads.bridges.base import (
    REQUIRED,
    Bridge,
    BridgeTypeError,
    Inlet,
    Option,
    OptionError,
    load_bridge_class,
)

REPO = Path(__file__).resolve().parent.parent


# -- the reactor and the loop --------------------------------------------------------------------------------


# the reactor and run fixtures live in conftest.py


@pytest.fixture(params=["memory", "redis"])
def layers(request, run):
    """``layers(**options)`` -> (the bridge's layer, the consumer's layer): one object on memory://, two on Redis."""
    made = []

    def make(**options):
        if request.param == "memory":
            made.append(layer.from_url("memory://", **options))
            return made[-1], made[-1]
        url = request.getfixturevalue("redis_server").url
        prefix = "t" + uuid.uuid4().hex[:12]  # each test sees only its own keys
        made.extend([layer.from_url(url, prefix=prefix, **options), layer.from_url(url, prefix=prefix, **options)])
        return made[-2], made[-1]

    yield make
    for made_layer in made:
        run(made_layer.close())


# -- helpers -------------------------------------------------------------------------------------------------


async def echo_consumer(consumer_layer, seen: list | None = None, prefix: str = "echo: ") -> None:
    """A fake worker: answers each toy.receive on its reply channel, in batches like the real one."""
    while True:
        batch = await consumer_layer.receive_many(["toy.receive"], 50)
        if seen is not None:
            seen.extend(message for _, message in batch)
        await consumer_layer.send_many([(m["reply_channel"], {"text": prefix + m["text"]}) for _, m in batch])


@asynccontextmanager
async def running(bridge: Bridge, consumer_layer=None, seen: list | None = None):
    await bridge.start()
    consumer = asyncio.ensure_future(echo_consumer(consumer_layer, seen)) if consumer_layer is not None else None
    try:
        yield bridge
    finally:
        await bridge.stop(timeout=5)
        if consumer is not None:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)


class Client:
    """A line client on plain asyncio streams, sharing the loop with the bridge."""

    async def connect(self, port: int) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    def say(self, *lines: str | bytes) -> None:
        for line in lines:
            self.writer.write((line if isinstance(line, bytes) else line.encode()) + b"\n")

    async def line(self, timeout: float = 5.0) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        assert raw.endswith(b"\n"), f"connection closed instead of a line: {raw!r}"
        return raw[:-1].decode()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class HealthWatch:
    """Records a bridge's health states and waits for one, woken by the bridge's health listener."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.states: list[str] = []
        self.changed = asyncio.Event()
        bridge.health_listeners.append(self.saw)

    def saw(self, health: dict) -> None:
        if not self.states or self.states[-1] != health["state"]:
            self.states.append(health["state"])
        self.changed.set()

    async def until(self, state: str, timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            while self.bridge.health["state"] != state:
                self.changed.clear()
                await self.changed.wait()
        return self.bridge.health


class Recorder(Bridge):
    """A bridge without a protocol: its targets are lists, and each reply is appended to one."""

    type_name = "recorder"

    def handle_reply(self, local_id: str, message: dict) -> None:
        if message.get("fail"):
            raise RuntimeError("this reply was meant to fail")
        self.targets[local_id].append(message)
        if message.get("last"):
            self.last.set()


# -- round trip and order ------------------------------------------------------------------------------------


def test_round_trip(run, layers):
    bridge_layer, consumer_layer = layers()
    seen: list[dict] = []

    async def scenario():
        async with running(ToyBridge("t1", {"room": "kitchen"}, bridge_layer), consumer_layer, seen) as bridge:
            assert bridge.health["state"] == "connected"
            client = await Client().connect(bridge.port)
            client.say("hello", "héllo wörld")
            assert [await client.line(), await client.line()] == ["echo: hello", "echo: héllo wörld"]
            await client.close()
            return bridge

    bridge = run(scenario())
    first = seen[0]
    assert first["reply_channel"].startswith(bridge.prefix) and bridge.prefix.startswith("toy.t1.")
    assert first["protocol"] == "toy" and first["room"] == "kitchen" and first["text"] == "hello"
    assert first["sender"].startswith("127.0.0.1:")
    counters = bridge.counters
    assert (counters["received"], counters["sent"], counters["replies"], counters["errors"]) == (2, 2, 2, 0)
    status = bridge.status()
    assert status["health"]["state"] == "stopped" and status["type"] == "toy" and status["targets"] == 0


def test_per_connection_order_under_load(run, layers):
    bridge_layer, consumer_layer = layers(capacity=10_000)
    lines_each, clients_count = 300, 5

    async def scenario():
        async with running(ToyBridge("order", {}, bridge_layer), consumer_layer) as bridge:
            clients = [await Client().connect(bridge.port) for _ in range(clients_count)]
            for n, client in enumerate(clients):  # all clients talk at once, so replies interleave in the queue
                client.say(*(f"c{n} line {i}" for i in range(lines_each)))
            for n, client in enumerate(clients):
                got = [await client.line() for _ in range(lines_each)]
                assert got == [f"echo: c{n} line {i}" for i in range(lines_each)]
            for client in clients:
                await client.close()
            return bridge

    bridge = run(scenario(), timeout=60)
    assert bridge.counters["replies"] == lines_each * clients_count
    assert bridge.counters["dropped"] == 0


def test_async_handlers_keep_order_per_id_without_blocking_others(run):
    """A reply handler may be async: its id's later replies wait for it, other ids do not."""
    layer_ = layer.from_url("memory://")
    gate = asyncio.Event()
    rng = random.Random(7)

    class SlowRecorder(Recorder):
        def handle_reply(self, local_id, message):
            async def deliver():
                if local_id == "held":
                    await gate.wait()
                for _ in range(rng.randrange(4)):  # handlers finish in a scrambled order
                    await asyncio.sleep(0)
                Recorder.handle_reply(self, local_id, message)
            return deliver()

    async def scenario():
        bridge = SlowRecorder("slow", {}, layer_)
        bridge.last = asyncio.Event()
        await bridge.start()
        held, free = bridge.register([], "held"), bridge.register([], "free")
        await layer_.send_many([(bridge.reply_channel(held), {"n": i}) for i in range(50)])
        await layer_.send_many([(bridge.reply_channel(free), {"n": i}) for i in range(49)]
                               + [(bridge.reply_channel(free), {"n": 49, "last": True})])
        await asyncio.wait_for(bridge.last.wait(), 5)  # "free" got everything while "held" waits
        assert [m["n"] for m in bridge.targets[free]] == list(range(50))
        assert bridge.targets[held] == []
        gate.set()
        await bridge.stop()  # stop drains the replies in hand, including the held ones
        assert [m["n"] for m in bridge.targets[held]] == list(range(50))
        assert bridge.counters["replies"] == 100
        await layer_.close()

    run(scenario())


# -- replies that cannot be delivered ------------------------------------------------------------------------


def test_unknown_reply_ids_are_counted_and_logged_once_per_id(run, caplog):
    layer_ = layer.from_url("memory://")

    async def scenario():
        bridge = Recorder("demux", {}, layer_)
        bridge.last = asyncio.Event()
        async with running(bridge):
            gone = bridge.register([])
            bridge.unregister(gone)  # a connection that closed before its replies came
            known = bridge.register([])
            await layer_.send_many([(bridge.reply_channel("nobody"), {"n": i}) for i in range(3)]
                                   + [(bridge.reply_channel(gone), {"n": i}) for i in range(2)]
                                   + [(bridge.reply_channel(known), {"fail": True}),
                                      (bridge.reply_channel(known), {"last": True})])
            await asyncio.wait_for(bridge.last.wait(), 5)  # FIFO: everything before it was handled
            assert len(bridge.targets[known]) == 1
        await layer_.close()
        return bridge

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges"):
        bridge = run(scenario())
    counters = bridge.counters
    assert (counters["unknown_replies"], counters["errors"], counters["dropped"], counters["replies"]) == (5, 1, 6, 1)
    unknown_lines = [r.getMessage() for r in caplog.records if "nothing is registered" in r.getMessage()]
    assert len(unknown_lines) == 2, unknown_lines
    assert all("recorder bridge 'demux'" in line for line in unknown_lines)
    assert any("handling a reply for local id" in r.getMessage() for r in caplog.records)


def test_stop_delivers_replies_in_hand_before_closing(run):
    layer_ = layer.from_url("memory://")

    async def scenario():
        bridge = ToyBridge("drain", {}, layer_)
        await bridge.start()
        client = await Client().connect(bridge.port)
        client.say("who am i")
        _, message = await layer_.receive(["toy.receive"], timeout=5)
        await layer_.send_many([(message["reply_channel"], {"text": f"reply {i}"}) for i in range(100)])
        await bridge.stop()  # at once: the 100 replies are queued, not yet delivered
        assert [await client.line() for _ in range(100)] == [f"reply {i}" for i in range(100)]
        assert await asyncio.wait_for(client.reader.read(), 5) == b""  # then the bridge closed the connection
        await client.close()
        await layer_.close()
        return bridge

    bridge = run(scenario())
    assert bridge.counters["replies"] == 100 and bridge.health["state"] == "stopped"


# -- nothing lost at the edge --------------------------------------------------------------------------------


def test_layer_full_refuses_counts_and_recovers(run, layers, caplog):
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.receive": 2})

    async def scenario():
        bridge = ToyBridge("full", {}, bridge_layer)
        watch = HealthWatch(bridge)
        async with running(bridge):
            client = await Client().connect(bridge.port)
            client.say("one", "two", "three")
            assert await client.line() == "ERR busy, say that again later"  # "three": the channel held two
            health = await watch.until("degraded")
            assert "'toy.receive' is full" in health["reason"]
            assert await bridge.send_to_layer("toy.receive", {"text": "direct"}) is False
            assert bridge.counters["refused"] == 2 and bridge.counters["sent"] == 2
            assert [m["text"] for _, m in await consumer_layer.receive_many(["toy.receive"], 10, timeout=5)] \
                == ["one", "two"]
            client.say("four")
            await watch.until("connected")
            _, message = await consumer_layer.receive(["toy.receive"], timeout=5)
            assert message["text"] == "four"
            await client.close()
        return bridge, watch

    with caplog.at_level(logging.INFO, logger="crossroads.bridges"):
        bridge, watch = run(scenario())
    assert watch.states == ["starting", "connected", "degraded", "connected", "stopping", "stopped"]
    assert bridge.counters["refused"] == 2 and bridge.counters["sent"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is full" in m for m in messages) == 1  # logged once, however many are refused
    assert any("layer recovered after refusing 2 message(s)" in m for m in messages)


def test_a_batch_stores_what_fits_in_order_and_says_how_many(run, layers, caplog):
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.receive": 3})

    async def scenario():
        bridge = ToyBridge("batch", {}, bridge_layer)
        watch = HealthWatch(bridge)
        async with running(bridge):
            assert await bridge.send_many_to_layer("toy.receive", [{"n": n} for n in range(5)]) == 3
            assert "'toy.receive' is full" in (await watch.until("degraded"))["reason"]
            assert await bridge.send_many_to_layer("toy.receive", [{"n": 5}]) == 0
            got = await consumer_layer.receive_many(["toy.receive"], 10, timeout=5)
            assert [message["n"] for _, message in got] == [0, 1, 2]  # the first ones, in order
            assert await bridge.send_many_to_layer("toy.receive", [{"n": 3}, {"n": 4}]) == 2
            await watch.until("connected")
            got = await consumer_layer.receive_many(["toy.receive"], 10, timeout=5)
            assert [message["n"] for _, message in got] == [3, 4]
        return bridge

    with caplog.at_level(logging.INFO, logger="crossroads.bridges"):
        bridge = run(scenario())
    assert bridge.counters["sent"] == 5 and bridge.counters["refused"] == 3
    assert "layer recovered after refusing 3 message(s)" in caplog.text


def test_a_channel_that_fills_and_empties_again_and_again_is_one_problem_logged_once(run, layers, caplog):
    # A flood faster than the workers fills the channel many times a second: one degraded spell, one warning and
    # one recovery line, not a pair per batch. The problem clears once the layer has taken everything for a while.
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.receive": 2})

    async def scenario():
        bridge = ToyBridge("flood", {}, bridge_layer)
        watch = HealthWatch(bridge)
        async with running(bridge):
            for round_ in range(20):
                assert await bridge.send_many_to_layer("toy.receive", [{"n": round_}] * 2) == 2  # all taken
                assert await bridge.send_to_layer("toy.receive", {"n": round_}) is False  # now full
                assert len(await consumer_layer.receive_many(["toy.receive"], 10, timeout=5)) == 2
            assert await bridge.send_to_layer("toy.receive", {"n": "last"})  # taken: calm starts now
            await watch.until("connected")
        return bridge, watch

    with caplog.at_level(logging.INFO, logger="crossroads.bridges"):
        bridge, watch = run(scenario())
    assert watch.states == ["starting", "connected", "degraded", "connected", "stopping", "stopped"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is full" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1
    assert any("layer recovered after refusing 20 message(s)" in m for m in messages)


def test_layer_unavailable_refuses_and_stop_still_finishes(run, caplog):
    dead = layer.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    async def scenario():
        bridge = ToyBridge("down", {}, dead)
        watch = HealthWatch(bridge)
        await bridge.start()
        client = await Client().connect(bridge.port)
        client.say("anyone?")
        assert await client.line() == "ERR busy, say that again later"
        health = await watch.until("degraded")
        assert "layer: unavailable" in health["reason"] and "is redis-server running?" in health["reason"]
        await bridge.stop(timeout=5)  # the wake-up cannot go through the layer: the reply loop is cancelled
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
        await dead.close()
        return bridge

    with caplog.at_level(logging.WARNING):
        bridge = run(scenario(), timeout=15)
    assert bridge.counters["refused"] == 1 and bridge.health["state"] == "stopped"
    assert any("cannot wake the reply loop" in r.getMessage() for r in caplog.records)


def test_bad_input_is_answered_counted_and_logged_with_the_peer(run, caplog):
    layer_ = layer.from_url("memory://")

    async def scenario():
        async with running(ToyBridge("bad", {"max_line": 64}, layer_), layer_) as bridge:
            client = await Client().connect(bridge.port)
            client.say(b"\xff\xfe not utf-8", "fine")
            assert [await client.line(), await client.line()] == ["ERR your line is not UTF-8", "echo: fine"]
            client.say("x" * 100)
            assert await client.line() == "ERR line too long"
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
            await client.close()
        await layer_.close()
        return bridge

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges"):
        bridge = run(scenario())
    assert bridge.counters["bad_input"] == 2
    lines = [r.getMessage() for r in caplog.records if "bad input" in r.getMessage()]
    assert len(lines) == 2 and all("toy bridge 'bad': bad input from 127.0.0.1:" in line for line in lines)


# -- health --------------------------------------------------------------------------------------------------


def test_health_transitions_and_failed_start(run):
    layer_ = layer.from_url("memory://")

    async def scenario():
        bridge = ToyBridge("h", {}, layer_)
        assert (bridge.health["state"], bridge.health["reason"]) == ("stopped", "not started")
        watch = HealthWatch(bridge)
        await bridge.start()
        since = bridge.health["since"]
        with pytest.raises(RuntimeError, match="was started before"):
            await bridge.start()
        bridge.set_problem("disk", "full")
        assert bridge.health == {"state": "degraded", "reason": "disk: full", "since": bridge.health["since"]}
        bridge.set_problem("layer", "unavailable")
        assert bridge.health["reason"] == "disk: full; layer: unavailable"
        bridge.clear_problem("disk")
        bridge.clear_problem("layer")
        assert bridge.health["state"] == "connected" and bridge.health["since"] >= since
        await bridge.stop()
        await bridge.stop()  # a second stop is harmless
        assert watch.states == ["starting", "connected", "degraded", "connected", "stopping", "stopped"]

        # A start that fails (the port is taken) leaves the bridge stopped, says why, and leaves nothing running.
        holder = ToyBridge("holder", {}, layer_)
        await holder.start()
        clash = ToyBridge("clash", {"port": holder.port}, layer_)
        with pytest.raises(Exception, match="Address already in use"):
            await clash.start()
        assert clash.health["state"] == "stopped" and "start failed" in clash.health["reason"]
        await clash.stop()
        assert "start failed" in clash.health["reason"]
        await holder.stop()
        await layer_.close()

    run(scenario())


# -- reconnecting --------------------------------------------------------------------------------------------


def reconnecting_bridge(layer_, connect, **options) -> Recorder:
    """A bridge whose ``open_protocol()`` starts a Reconnector (``link``) on ``connect`` to "server example:1"."""

    class ClientRecorder(Recorder):
        async def open_protocol(self):
            self.link = self.reconnector(connect, "server example:1", **options)
            self.link.start()

    return ClientRecorder("client", {}, layer_)


def test_reconnector_backs_off_exponentially_and_stops(run, caplog):
    layer_ = layer.from_url("memory://")
    initial, cap, failures = 0.1, 1.6, 8
    delays: list[float] = []
    parked = asyncio.Event()  # set when the reconnector sleeps for the last time
    attempts = 0

    async def fake_sleep(delay):
        delays.append(delay)
        if len(delays) == failures + 2:
            parked.set()
            await asyncio.Event().wait()  # sleeps until stop() cancels it
        await asyncio.sleep(0)

    async def connect():
        nonlocal attempts
        attempts += 1
        if attempts <= failures or attempts == failures + 2:
            raise ConnectionRefusedError(f"attempt {attempts} refused")
        return "a connection"

    async def scenario():
        bridge = reconnecting_bridge(layer_, connect, initial=initial, cap=cap, sleep=fake_sleep)
        watch = HealthWatch(bridge)
        await bridge.start()
        await watch.until("connected")
        assert bridge.link.connected and bridge.link.connection == "a connection"
        bridge.link.connection_lost("peer reset")  # dropped at once: the delays go on growing, not restart
        await asyncio.wait_for(parked.wait(), 5)
        assert bridge.health["state"] == "degraded" and "server example:1: cannot connect" in bridge.health["reason"]
        await bridge.stop()  # stops the reconnector, which is asleep
        assert attempts == failures + 2 and bridge.health["state"] == "stopped"
        await layer_.close()
        return bridge, watch

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges"):
        bridge, watch = run(scenario())
    pairs = [(delay, min(cap, initial * 2**i)) for i, delay in enumerate(delays)]  # (delay, its ceiling)
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in pairs), pairs
    assert delays[-1] >= cap / 2  # after the drop it went on from where it was
    assert watch.states == ["starting", "degraded", "connected", "degraded", "stopping", "stopped"]
    assert bridge.counters["connect_failures"] == failures + 1 and bridge.counters["connects"] == 1
    failed = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(failed) == failures + 1 and all("retrying in" in line for line in failed)


def test_reconnector_stops_when_an_attempt_completes_as_the_stop_cancels_it(run):
    """The shutdown hang of `crossroads run`: on Python 3.11, ``asyncio.wait_for`` returns its result instead of
    raising when the awaited future completes in the same loop tick as the cancel (the MQTT bridge waits for its
    CONNACK that way). The attempt then "succeeds" after ``stop()`` cancelled it; ``stop()`` must still return."""
    layer_ = layer.from_url("memory://")
    arrived = None

    async def connect():
        nonlocal arrived
        arrived = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(asyncio.shield(arrived), 10)

    async def scenario():
        bridge = reconnecting_bridge(layer_, connect)
        await bridge.start()
        while arrived is None:  # the attempt is under way
            await asyncio.sleep(0)
        arrived.set_result("a connection")  # the answer arrives ...
        await asyncio.wait_for(bridge.stop(), 5)  # ... in the tick the stop cancels the attempt
        assert bridge.health["state"] == "stopped"
        await layer_.close()

    run(scenario())


def test_a_connect_that_ignores_the_stop_is_cut_short_and_logged(run, caplog):
    """Bridge.stop() keeps its timeout even when an attempt swallows the reconnector's cancel and waits on."""
    layer_ = layer.from_url("memory://")
    swallowed = asyncio.Event()

    async def connect():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
            await asyncio.Event().wait()  # a second cancel (the stop timeout's) ends it

    async def scenario():
        bridge = reconnecting_bridge(layer_, connect)
        await bridge.start()
        await asyncio.wait_for(bridge.stop(timeout=0.5), 10)
        assert swallowed.is_set() and bridge.health["state"] == "stopped"
        await layer_.close()

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges"):
        run(scenario())
    assert "stopping the reconnector of server example:1 did not finish within the stop timeout" in caplog.text


def tcp_client_bridge(reactor, port: int, layer_) -> Recorder:
    """A bridge that keeps one TCP connection to 127.0.0.1:``port`` through a Reconnector."""
    from twisted.internet import endpoints, protocol

    class Link(protocol.Protocol):
        def connectionLost(self, reason=None):
            self.factory.reconnector.connection_lost(reason)

    class ClientBridge(Recorder):
        async def open_protocol(self):
            factory = protocol.Factory.forProtocol(Link)
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
            factory.reconnector = self.reconnector(lambda: endpoint.connect(factory), f"server 127.0.0.1:{port}",
                                                   initial=0.02, cap=0.1)
            self.link = factory.reconnector
            factory.reconnector.start()

        async def close_protocol(self):
            if self.link.connection is not None:
                self.link.connection.transport.loseConnection()

    return ClientBridge("tcp", {}, layer_)


def test_reconnector_connected_at_the_first_attempt_reports_connected(run, reactor):
    layer_ = layer.from_url("memory://")

    async def scenario():
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        bridge = tcp_client_bridge(reactor, server.sockets[0].getsockname()[1], layer_)
        watch = HealthWatch(bridge)
        await bridge.start()
        await watch.until("connected")  # not left at "starting" when nothing ever failed
        await bridge.stop()
        server.close()
        await server.wait_closed()
        await layer_.close()

    run(scenario())


def test_reconnector_over_real_tcp(run, reactor):
    """Refused while nothing listens, connected once a server does, reconnected after the server hangs up."""
    layer_ = layer.from_url("memory://")
    port = free_port()

    async def scenario():
        bridge = tcp_client_bridge(reactor, port, layer_)
        watch = HealthWatch(bridge)
        await bridge.start()
        await watch.until("degraded")  # refused: nothing listens yet
        accepted: asyncio.Queue = asyncio.Queue()

        async def serve(reader, writer):
            await accepted.put((reader, writer))

        server = await asyncio.start_server(serve, "127.0.0.1", port)
        _, first = await asyncio.wait_for(accepted.get(), 5)
        await watch.until("connected")
        first.close()  # the server hangs up; the bridge reconnects
        reader, second = await asyncio.wait_for(accepted.get(), 5)
        await watch.until("connected")
        await bridge.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the bridge closed its connection
        assert not bridge.link.connected
        second.close()
        server.close()
        await server.wait_closed()
        await layer_.close()
        return bridge

    bridge = run(scenario())
    assert bridge.counters["connects"] == 2 and bridge.counters["connect_failures"] >= 1


# -- finding bridge classes ----------------------------------------------------------------------------------


def fake_entry_points(*pairs):
    points = [EntryPoint(name, value, "crossroads.bridges") for name, value in pairs]
    return lambda group: [ep for ep in points if ep.group == group]


def test_load_bridge_class_by_path_and_errors(monkeypatch):
    assert load_bridge_class("toy_bridge:ToyBridge") is ToyBridge
    with pytest.raises(BridgeTypeError, match="module 'toy_bridge' has no 'Nope'"):
        load_bridge_class("toy_bridge:Nope")
    with pytest.raises(BridgeTypeError, match="cannot import 'no_such_module'"):
        load_bridge_class("no_such_module:Bridge")
    with pytest.raises(BridgeTypeError, match="not a subclass of crossroads.bridges.base.Bridge"):
        load_bridge_class("toy_bridge:ToyConnection")
    # The real registry, whatever is installed: the message explains both ways to name a bridge.
    with pytest.raises(BridgeTypeError, match="unknown bridge type 'no-such-type'") as error:
        load_bridge_class("no-such-type")
    assert "'package.module:ClassName'" in str(error.value)

    monkeypatch.setattr(bridges_registry, "entry_points", fake_entry_points(("toy", "toy_bridge:ToyBridge"),
                                                                        ("irc", "no_such_irc_module:IRCBridge")))
    assert load_bridge_class("toy") is ToyBridge
    assert bridges_registry.available_bridge_types() == {"toy": "toy_bridge:ToyBridge",
                                                     "irc": "no_such_irc_module:IRCBridge"}
    with pytest.raises(BridgeTypeError, match=r"unknown bridge type 'tyo'; did you mean 'toy'\? "
                                              r"Available types: irc, toy\."):
        load_bridge_class("tyo")
    with pytest.raises(BridgeTypeError, match="'irc' .* cannot be loaded: No module named 'no_such_irc_module'"):
        load_bridge_class("irc")
    monkeypatch.setattr(bridges_registry, "entry_points", fake_entry_points())
    with pytest.raises(BridgeTypeError, match="No bridge types are registered"):
        load_bridge_class("toy")
    monkeypatch.setattr(bridges_registry, "entry_points", fake_entry_points(("toy", "toy_bridge:ToyBridge"),
                                                                        ("toy", "other:Toy")))
    with pytest.raises(BridgeTypeError, match="registered by several packages"):
        load_bridge_class("toy")


# -- options -------------------------------------------------------------------------------------------------


class Strict(Bridge):
    type_name = "strict"
    OPTIONS = {
        "server": Option(str, REQUIRED, "the host name of the server"),
        "port": Option(int, 6667, "the server's port", lambda v: None if 0 < v < 65536 else "must be 1 to 65535"),
        "timeout": Option(float, 5.0, "seconds to wait"),
        "tls": Option(bool, False, "use TLS"),
        "channels": (list, ["#lobby"], "channels to join"),
    }


def test_validate_options_fills_defaults_and_normalizes():
    options = Strict.validate_options({"type": "strict", "server": "irc.example", "timeout": 2})
    assert options == {"server": "irc.example", "port": 6667, "timeout": 2.0, "tls": False, "channels": ["#lobby"]}
    assert isinstance(options["timeout"], float)
    options["channels"].append("#mine")  # a mutable default is copied, never shared
    assert Strict.validate_options({"server": "x"})["channels"] == ["#lobby"]
    assert ToyBridge("ok", {}, layer=None).options == {"host": "127.0.0.1", "port": 0, "room": "lobby",
                                                       "max_line": 4096}


def test_options_from_interpolated_text():
    """``${...}`` in the config yields strings: an option with from_string=True takes numbers and booleans so."""

    class FromEnv(Bridge):
        OPTIONS = {"port": Option(int, 1, "", from_string=True), "ratio": Option(float, 1.0, "", from_string=True),
                   "tls": Option(bool, False, "", from_string=True), "name": Option(str, "x", "", from_string=True)}

    assert FromEnv.validate_options({"port": " 8080 ", "ratio": "0.5", "tls": "Yes", "name": "42", "enabled": True}) \
        == {"port": 8080, "ratio": 0.5, "tls": True, "name": "42"}
    assert ToyBridge.validate_options({"port": "8080"})["port"] == 8080
    with pytest.raises(OptionError, match=r"^port: must be a whole number, not 'eighty' \(a string\)$"):
        FromEnv.validate_options({"port": "eighty"})
    with pytest.raises(OptionError, match=r"^tls: must be true or false, not 'maybe' \(a string\)$"):
        FromEnv.validate_options({"tls": "maybe"})


@pytest.mark.parametrize("options, key, says", ids=["required", "unknown", "quoted", "bool", "check", "int", "list"],
                         argvalues=[
    ({}, "server", "is required by strict bridges: add `server = ...` to the bridge's table (the host name of the "
                   "server)"),
    ({"server": "x", "prot": 1}, "prot", "unknown option for strict bridges; did you mean 'port'? Known options: "
                                         "channels, port, server, timeout, tls"),
    ({"server": "x", "port": "6667"}, "port", "must be a whole number, not '6667' (a string): write it without quotes"),
    ({"server": "x", "port": True}, "port", "must be a whole number, not True (true or false)"),
    ({"server": "x", "port": 70000}, "port", "must be 1 to 65535 (got 70000)"),
    ({"server": "x", "tls": 1}, "tls", "must be true or false, not 1 (a whole number)"),
    ({"server": "x", "channels": "#a"}, "channels", "must be a list, not '#a' (a string)"),
])
def test_validate_options_errors_name_the_key_and_the_fix(options, key, says):
    """Each problem names its key and says what to do about it."""
    with pytest.raises(OptionError) as error:
        Strict.validate_options(options)
    assert error.value.key == key
    assert str(error.value) == f"{key}: {says}"


def test_constructor_checks_name_options_and_reply_ids():
    with pytest.raises(OptionError, match="port: must be a TCP port number"):
        ToyBridge("t", {"port": -1}, layer=None)
    with pytest.raises(ValueError, match="bridge name 'a b'"):
        ToyBridge("a b", {}, layer=None)
    bridge = ToyBridge("t", {}, layer=None)
    with pytest.raises(RuntimeError, match="no reply queue before start"):
        bridge.reply_channel("1")
    assert [bridge.register(object()) for _ in range(3)] == ["1", "2", "3"]
    bridge.unregister("3")
    assert bridge.register(object()) == "4"  # ids are never reused
    with pytest.raises(ValueError, match="local id '#chat'"):
        bridge.register(object(), "#chat")
    bridge._prefix = "toy.t.0123456789abcdef!"
    assert bridge.reply_channel("chat.lobby") == "toy.t.0123456789abcdef!chat.lobby"
    with pytest.raises(ValueError, match="over the layer's 99 characters"):
        bridge.reply_channel("x" * 90)


# -- in a fresh process --------------------------------------------------------------------------------------


def run_script(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO / "tests", env=env,
                          capture_output=True, text=True, timeout=60)


def test_install_reactor_is_idempotent_and_refuses_another_reactor():
    result = run_script("""
        import asyncio, sys
        import crossroads.bridges.base, toy_bridge
        assert "twisted.internet.reactor" not in sys.modules, "importing bridge code installed a reactor"
        from crossroads.bridges.base import ReactorError, get_reactor, install_reactor
        try:
            get_reactor()
        except ReactorError as exc:
            print("none:", exc)
        loop = asyncio.new_event_loop()
        reactor = install_reactor(loop)
        assert install_reactor() is reactor and install_reactor(loop) is reactor and get_reactor() is reactor
        try:
            install_reactor(asyncio.new_event_loop())
        except ReactorError as exc:
            print("other loop:", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert ("none: no Twisted reactor is installed: call crossroads.bridges.base.install_reactor() first"
            in result.stdout)
    assert "other loop: the asyncio reactor is already installed on another event loop" in result.stdout

    result = run_script("""
        from twisted.internet import reactor  # installs Twisted's default reactor
        from crossroads.bridges.base import install_reactor
        install_reactor()
    """)
    assert result.returncode != 0
    assert "crossroads.bridges.reactor.ReactorError: Twisted's twisted.internet.epollreactor.EPollReactor is " \
           "installed, but bridges need its asyncio reactor" in result.stderr
    assert "Call install_reactor() first thing in the process" in result.stderr


def test_a_bridge_under_reactor_run():
    """How a bridge process runs: reactor.run(), start when running, a graceful stop before shutdown."""
    result = run_script("""
        import asyncio, sys
        from crossroads.bridges.base import as_deferred, install_reactor
        reactor = install_reactor()
        from crossroads import layer
        from toy_bridge import ToyBridge

        channel_layer = layer.from_url("memory://")
        bridge = ToyBridge("real", {}, channel_layer)
        outcome = []

        async def consumer():
            while True:
                _, message = await channel_layer.receive(["toy.receive"])
                await channel_layer.send(message["reply_channel"], {"text": message["text"].upper()})

        async def main():
            await bridge.start()
            worker = asyncio.ensure_future(consumer())
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"hello\\n")
            outcome.append(await asyncio.wait_for(reader.readline(), 10))
            reactor.stop()  # as SIGTERM would: the shutdown trigger below stops the bridge first
            outcome.append(await asyncio.wait_for(reader.read(), 10))  # the bridge closed the connection
            writer.close()
            worker.cancel()

        async def shutdown():
            await bridge.stop()
            await asyncio.wait(tasks, timeout=10)  # let main() see the connection close

        def failed(task):
            if task.exception() is not None:
                outcome.append(task.exception())
                reactor.stop()

        def begin():
            tasks.append(asyncio.ensure_future(main()))
            tasks[0].add_done_callback(failed)

        tasks = []
        reactor.callWhenRunning(begin)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: as_deferred(shutdown()))
        reactor.run()
        outcome.append(bridge.health["state"])
        print("outcome:", outcome)
        sys.exit(0 if outcome == [b"HELLO\\n", b"", "stopped"] else 1)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outcome: [b'HELLO\\n', b'', 'stopped']" in result.stdout


def test_events_without_a_peer_to_refuse_are_retried_until_the_layer_takes_them(run, layers, caplog):
    """A disconnect that finds its channel full waits for room (briefly) instead of being lost."""
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.disconnect": 1})

    async def scenario():
        bridge = ToyBridge("persist", {}, bridge_layer)
        async with running(bridge):
            assert await bridge.send_to_layer_persistently("toy.disconnect", {"n": 1})
            waiting = asyncio.ensure_future(bridge.send_to_layer_persistently("toy.disconnect", {"n": 2}))
            assert (await consumer_layer.receive(["toy.disconnect"], timeout=5))[1] == {"n": 1}  # room again
            assert await asyncio.wait_for(waiting, 10)
            assert (await consumer_layer.receive(["toy.disconnect"], timeout=5))[1] == {"n": 2}
            assert await bridge.send_to_layer_persistently("toy.disconnect", {"n": 3})
            gave_up = await bridge.send_to_layer_persistently("toy.disconnect", {"n": 4}, within=0.3)
            await consumer_layer.receive(["toy.disconnect"], timeout=5)
        return bridge, gave_up

    bridge, gave_up = run(scenario())
    assert gave_up is False and bridge.counters["dropped"] == 1
    assert "refused toy.disconnect for 0 s; its consumer will not hear of it" in caplog.text


def test_a_burst_of_events_waits_its_turn_in_order_and_none_is_dropped(run, layers):
    """10,000 sockets closing at once: every disconnect is stored, in the order they closed, none starved."""
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.disconnect": 10})

    async def scenario():
        bridge = ToyBridge("burst", {}, bridge_layer)
        async with running(bridge):
            sending = [asyncio.ensure_future(bridge.send_to_layer_persistently("toy.disconnect", {"n": n}, within=5))
                       for n in range(1000)]
            received = []
            while len(received) < 1000:
                channel, message = await consumer_layer.receive(["toy.disconnect"], timeout=10)
                assert channel == "toy.disconnect", f"only {len(received)} of 1000 arrived"
                received.append(message["n"])
            assert all(await asyncio.gather(*sending))
        return bridge, received

    bridge, received = run(scenario())
    assert received == list(range(1000))
    assert bridge.counters["dropped"] == 0 and bridge.counters["sent"] == 1000


# -- the inlet -----------------------------------------------------------------------------------------------


async def drain(consumer_layer, channel: str, count: int) -> list[int]:
    """Receive ``count`` messages from ``channel``, slowly enough that the layer fills; their ``n``s in order."""
    received: list[int] = []
    while len(received) < count:
        got = await consumer_layer.receive_many([channel], 7, timeout=10)
        assert got, f"only {len(received)} of {count} arrived"
        received += [message["n"] for _, message in got]
    return received


def test_an_inlet_holds_what_the_layer_refuses_retries_it_in_order_and_pushes_back(run, layers):
    """Past ``high`` waiting the bridge is told to stop reading its peer, and to start again at ``low``."""
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.receive": 30})

    async def scenario():
        bridge = Recorder("inlet", {}, bridge_layer)
        signals, stored, all_stored = [], [], asyncio.Event()

        def took(channel, item, message):
            stored.append(message["n"])
            if len(stored) == 500:
                all_stored.set()

        inlet = Inlet(bridge, "test messages", batch=20, stored=took, retry_while=lambda: True, high=200, low=50,
                      on_full=lambda: signals.append("full"), on_room=lambda: signals.append("room"))
        async with running(bridge):
            for n in range(500):
                inlet.put("toy.receive", {"n": n})
            assert inlet.paused and signals == ["full"]
            received = await drain(consumer_layer, "toy.receive", 500)
            await asyncio.wait_for(all_stored.wait(), 10)
        return bridge, inlet, signals, stored, received

    bridge, inlet, signals, stored, received = run(scenario())
    assert received == list(range(500)) and stored == list(range(500))  # none lost, none twice, in order
    assert signals == ["full", "room"] and not inlet.paused and len(inlet) == 0
    assert bridge.counters["sent"] == 500 and bridge.counters["refused"] > 0


def test_an_inlet_hands_each_send_s_stored_pairs_to_stored_all_in_order(run, layers):
    bridge_layer, consumer_layer = layers()

    async def scenario():
        bridge = Recorder("batches", {}, bridge_layer)
        calls, all_stored = [], asyncio.Event()

        def took_all(channel, pairs):
            calls.append((channel, [(item, message["n"]) for item, message in pairs]))
            if sum(len(pairs) for _, pairs in calls) == 50:
                all_stored.set()

        inlet = Inlet(bridge, "test messages", batch=20, build=lambda channel, item: {"n": item},
                      stored_all=took_all)
        async with running(bridge):
            for n in range(50):
                inlet.put("toy.receive", n)
            await asyncio.wait_for(all_stored.wait(), 10)
            received = await drain(consumer_layer, "toy.receive", 50)
        return calls, received

    calls, received = run(scenario())
    assert received == list(range(50))
    assert [pair for _, pairs in calls for pair in pairs] == [(n, n) for n in range(50)]
    assert all(channel == "toy.receive" and 0 < len(pairs) <= 20 for channel, pairs in calls)


def test_an_inlet_without_retry_reports_each_refusal_and_goes_on(run, layers):
    bridge_layer, consumer_layer = layers(channel_capacity={"toy.receive": 3})

    async def scenario():
        bridge = Recorder("refusing", {}, bridge_layer)
        refused, told, done = [], asyncio.Event(), asyncio.Event()

        def refuse(channel, item):
            refused.append(item["n"])
            told.set()

        inlet = Inlet(bridge, "test messages", batch=10, refused=refuse,
                      stored=lambda channel, item, message: item["n"] == 6 and done.set())
        async with running(bridge):
            for n in range(5):
                inlet.put("toy.receive", {"n": n})
            await asyncio.wait_for(told.wait(), 10)
            assert refused == [3, 4]  # one batch: the bridge refused them to its peer, they are not sent again
            assert await drain(consumer_layer, "toy.receive", 3) == [0, 1, 2]
            for n in (5, 6):
                inlet.put("toy.receive", {"n": n})
            await asyncio.wait_for(done.wait(), 10)
            assert await drain(consumer_layer, "toy.receive", 2) == [5, 6]
        return bridge

    bridge = run(scenario())
    assert bridge.counters["sent"] == 5 and bridge.counters["refused"] == 2


def test_an_inlet_handles_a_message_too_large_once_and_stores_the_rest_in_order(run, layers, caplog):
    bridge_layer, consumer_layer = layers()

    async def scenario():
        bridge = Recorder("large", {}, bridge_layer)
        stored, done = [], asyncio.Event()
        inlet = Inlet(bridge, "test messages", peer="peer 7", batch=10,
                      stored=lambda channel, item, message: stored.append(message["n"]) or message["n"] == 5
                      and done.set())
        async with running(bridge):
            for n in range(6):
                inlet.put("toy.receive", {"n": n, "blob": b"x" * (2 * 1024 * 1024 if n == 2 else 10)})
            await asyncio.wait_for(done.wait(), 10)
            received = await drain(consumer_layer, "toy.receive", 5)
        return bridge, stored, received

    bridge, stored, received = run(scenario())
    assert received == [0, 1, 3, 4, 5] and stored == [0, 1, 3, 4, 5]  # the batch went on without it
    assert bridge.counters["bad_input"] == 1 and bridge.counters["sent"] == 5 and bridge.counters["refused"] == 0
    assert "bad input from peer 7: toy.receive too large for the layer" in caplog.text
