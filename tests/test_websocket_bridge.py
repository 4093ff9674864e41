"""The WebSocket bridge with real clients (the ``websockets`` library) over loopback.

As in tests/test_bridge_base.py, this module installs Twisted's asyncio reactor
on a loop of its own, runs each test's coroutine on it, checks that nothing is
left on it afterwards and uninstalls the reactor at the end. Consumers are the
modules in tests/apps/ws_*.py, run by an in-process ``consumers.worker.Worker``
(its own threads, the layer's blocking face) against ``memory://``; one test
runs ``crossroads bridge`` and ``crossroads worker`` as separate processes over
a real redis-server. Waits have deadlines; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from contextlib import asynccontextmanager

import pytest
import websockets
from servers import running_in_process, take
from test_websocket_frames import client_frame
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.websocket.bridge import WebsocketBridge

# -- the reactor and the loop (as in test_bridge_base.py) ----------------------------------------------------


# the reactor and run fixtures live in conftest.py


# -- helpers -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def serving(options: dict | None = None, *, channel_layer=None, threads: int = 1, worker: bool = True,
                  app: str = "apps.ws_echo:routes"):
    """A started WebsocketBridge on a free port, and a Worker running ``app`` on the same layer."""
    channel_layer = channel_layer or layer.from_url("memory://", capacity=1000)
    bridge = WebsocketBridge("ws", {"port": 0, **(options or {})}, channel_layer)
    async with running_in_process(bridge, app if worker else None, threads):
        yield bridge


def url(bridge: WebsocketBridge, path: str = "/echo/") -> str:
    return f"ws://127.0.0.1:{bridge.port}{path}"


async def refused_status(bridge: WebsocketBridge, path: str, **client_options) -> int:
    """The HTTP status of a handshake that must fail."""
    with pytest.raises(InvalidStatus) as failed:
        async with connect(url(bridge, path), open_timeout=10, **client_options):
            pass
    return failed.value.response.status_code


async def closed_code(ws) -> int:
    """Wait for the server to close ``ws``; the code it closed with."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return closed.value.rcvd.code if closed.value.rcvd is not None else 1006


# -- the handshake -------------------------------------------------------------------------------------------


def test_accept_and_the_connect_message(run):
    async def scenario():
        async with serving({"root_path": "/app"}) as bridge:
            async with connect(url(bridge, "/echo/caf%C3%A9/?a=1&b=%20"), open_timeout=10,
                               additional_headers=[("X-Twice", "one"), ("X-Twice", "two")]) as ws:
                await ws.send("hi")
                assert await asyncio.wait_for(ws.recv(), 10) == "hi"
                local_port = ws.local_address[1]
            connected = await take(bridge.layer, "test.connects")
            disconnected = await take(bridge.layer, "test.disconnects")
            return bridge, connected, disconnected, local_port

    bridge, connected, disconnected, local_port = run(scenario())
    assert connected["reply_channel"].startswith("websocket.ws.")
    assert connected["scheme"] == "ws" and connected["path"] == "/echo/café/"
    assert connected["query_string"] == b"a=1&b=%20" and connected["root_path"] == "/app"
    assert connected["order"] == 0 and connected["subprotocols"] == []
    assert connected["client"] == ["127.0.0.1", local_port] and connected["server"] == ["127.0.0.1", bridge.port]
    headers = connected["headers"]
    assert all(isinstance(n, bytes) and n == n.lower() and isinstance(v, bytes) for n, v in headers)
    assert [v for n, v in headers if n == b"x-twice"] == [b"one", b"two"]
    assert connected["protocol"] == "websocket" and connected["room"] == "/echo/café/"
    assert connected["sender"] == f"127.0.0.1:{local_port}"
    assert disconnected["code"] == 1000 and disconnected["order"] == 2  # after the one frame
    assert disconnected["reply_channel"] == connected["reply_channel"]
    assert bridge.counters["errors"] == 0


@pytest.mark.parametrize("path", ["/reject/", "/accept-false/", "/close-first/"])
def test_rejected_handshakes_get_403(run, path):
    async def scenario():
        async with serving() as bridge:
            status = await refused_status(bridge, path)
            disconnected = await take(bridge.layer, "test.disconnects")  # the consumer can clean up after it
            return status, disconnected

    status, disconnected = run(scenario())
    assert status == 403
    assert disconnected["path"] == path and disconnected["code"] == 1006 and disconnected["order"] == 1


def test_a_path_no_route_matches_is_403_at_once(run):
    async def scenario():
        # apps.chat routes websocket.connect for /chat/ROOM/ and /rooms/ only; handshake_timeout 10 s would be a 504
        async with serving({"handshake_timeout": 30}, app="apps.chat:routes") as bridge:
            return await refused_status(bridge, "/nowhere/")

    assert run(scenario()) == 403


def test_handshake_is_held_until_the_consumer_answers(run):
    async def scenario():
        async with serving() as bridge:
            opening = asyncio.ensure_future(connect(url(bridge, "/hold/"), open_timeout=10))
            await take(bridge.layer, "test.held")  # the consumer has the connect in hand...
            done, _ = await asyncio.wait([opening], timeout=0.3)
            assert not done, "the handshake finished before the consumer answered"  # ...and no 101 yet
            await bridge.layer.send("test.release", {})
            ws = await opening
            assert ws.protocol.state.name == "OPEN"
            await ws.close()

    run(scenario())


def test_text_before_accept_accepts(run):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge, "/text-first/"), open_timeout=10) as ws:
                assert await asyncio.wait_for(ws.recv(), 10) == "welcome"

    run(scenario())


def test_invalid_replies_are_ignored_counted_and_logged(run, caplog):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge, "/invalid/"), open_timeout=10) as ws:
                await ws.send("still works")
                assert await asyncio.wait_for(ws.recv(), 10) == "still works"
            return bridge

    with caplog.at_level(logging.WARNING):
        bridge = run(scenario())
    assert bridge.counters["invalid_replies"] == 2 and bridge.counters["errors"] == 0
    assert "ignored an invalid reply" in caplog.text and "not both" in caplog.text


def test_handshake_timeout_answers_504(run):
    async def scenario():
        async with serving({"handshake_timeout": 0.3}) as bridge:
            status = await refused_status(bridge, "/silent/")
            return bridge, status

    bridge, status = run(scenario())
    assert status == 504 and bridge.counters["handshake_timeouts"] == 1


def test_an_upgrade_request_that_never_completes_is_dropped(run):
    async def scenario():
        async with serving({"handshake_timeout": 0.3}) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"GET /echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return bridge

    bridge = run(scenario())
    assert bridge.counters["bad_input"] == 1 and bridge.counters["received"] == 0


def test_a_client_leaving_a_held_handshake_still_gets_its_disconnect_sent(run):
    async def scenario():
        async with serving(threads=2) as bridge:  # one thread holds the handshake, one consumes the disconnect
            opening = asyncio.ensure_future(connect(url(bridge, "/hold/"), open_timeout=10))
            await take(bridge.layer, "test.held")
            opening.cancel()  # the client gives up while the consumer holds the handshake
            await asyncio.gather(opening, return_exceptions=True)
            disconnected = await take(bridge.layer, "test.disconnects")
            await bridge.layer.send("test.release", {})  # the late accept goes nowhere
            return disconnected

    disconnected = run(scenario())
    assert disconnected["code"] == 1006 and disconnected["order"] == 1


def test_subprotocols_are_offered_to_the_consumer_and_its_choice_is_spoken(run):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge), subprotocols=["chat.v1", "chat.v2"], open_timeout=10) as ws:
                assert ws.subprotocol == "chat.v2"
            connected = await take(bridge.layer, "test.connects")
            assert connected["subprotocols"] == ["chat.v1", "chat.v2"]

    run(scenario())


# -- origins -------------------------------------------------------------------------------------------------


def test_origins(run):
    async def scenario():
        async with serving({"allowed_origins": ["https://app.example.com", "*.trusted.example"]}) as bridge:
            port = bridge.port
            assert await refused_status(bridge, "/echo/", origin="http://evil.example") == 403
            assert await refused_status(bridge, "/echo/", origin=f"http://127.0.0.1:{port + 1}") == 403
            assert await refused_status(bridge, "/echo/", origin="null") == 403
            for origin in [None, f"http://127.0.0.1:{port}", "https://app.example.com", "http://a.trusted.example"]:
                async with connect(url(bridge), origin=origin, open_timeout=10) as ws:
                    await ws.send("ok")
                    assert await asyncio.wait_for(ws.recv(), 10) == "ok"
            return bridge

    bridge = run(scenario())
    assert bridge.counters["bad_input"] == 3


async def upgrade_status(port: int, host: bytes, origin: bytes) -> int:
    """The HTTP status answering a raw upgrade request with this Host and Origin."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /echo/ HTTP/1.1\r\nHost: " + host + b"\r\nOrigin: " + origin + b"\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()


def test_a_dns_rebinding_page_is_refused_though_its_origin_matches_its_host(run, caplog):
    async def scenario():
        async with serving() as bridge:  # on 127.0.0.1, no allowed_hosts: only the loopback names
            evil = await upgrade_status(bridge.port, b"evil.example", b"http://evil.example")
            here = b"localhost:%d" % bridge.port
            ours = await upgrade_status(bridge.port, here, b"http://" + here)
        async with serving({"allowed_hosts": ["evil.example"]}) as bridge:  # named: then it is the site's own
            named = await upgrade_status(bridge.port, b"evil.example", b"http://evil.example")
        return evil, ours, named

    assert run(scenario()) == (400, 101, 101)
    assert "Host 'evil.example' is not served here" in caplog.text


def test_options_are_checked():
    memory = layer.from_url("memory://")
    with pytest.raises(OptionError, match="allowed_origins"):
        WebsocketBridge("ws", {"allowed_origins": ["ftp://x"]}, memory)
    with pytest.raises(OptionError, match="max_message_size"):
        WebsocketBridge("ws", {"max_message_size": 2_000_000}, memory)
    with pytest.raises(OptionError, match="tls_key"):
        WebsocketBridge("ws", {"tls_cert": "/etc/cert.pem"}, memory)
    with pytest.raises(OptionError, match="handshake_timeout"):
        WebsocketBridge("ws", {"handshake_timeout": 0}, memory)


# -- frames --------------------------------------------------------------------------------------------------


def test_echo_text_and_bytes(run):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge), open_timeout=10) as ws:
                await ws.send("héllo")
                assert await asyncio.wait_for(ws.recv(), 10) == "héllo"
                await ws.send(b"\x00\xffbin")
                assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\xffbin"
                await ws.send("")
                assert await asyncio.wait_for(ws.recv(), 10) == ""

    run(scenario())


def test_order_is_kept_for_many_messages(run):
    count = 500

    async def scenario():
        async with serving(channel_layer=layer.from_url("memory://", capacity=5000)) as bridge:
            async with connect(url(bridge), open_timeout=10) as ws:
                for i in range(count):
                    await ws.send(f"order {i}")
                got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(count)]
            assert got == [f"{i + 1} order {i}" for i in range(count)]  # order keys 1, 2, ... in frame order
            disconnected = await take(bridge.layer, "test.disconnects")
            assert disconnected["order"] == count + 1

    run(scenario(), timeout=60)


async def raw_upgrade(bridge: WebsocketBridge, path: str = "/echo/"):
    """A plain TCP connection upgraded by hand, for frames no client library would send the way a test needs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def server_frame(reader) -> tuple[int, bytes]:
    """One frame from the server (unmasked, unfragmented): its opcode and payload."""
    first, second = await asyncio.wait_for(reader.readexactly(2), 10)
    length = second & 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
    return first & 0x0F, await reader.readexactly(length)


def test_frames_read_by_the_bridge_and_by_autobahn_keep_one_order(run):
    """Whole data frames are read by frames.py until one it leaves to Autobahn (a ping, a fragmented message, a
    frame cut between two reads): every message still reaches the consumer once, in the order sent."""
    cut = client_frame(b"order e")

    async def scenario():
        async with serving() as bridge:
            reader, writer = await raw_upgrade(bridge)
            writer.write(client_frame(b"order a") + client_frame(b"p", 0x89) + client_frame(b"ord", 0x01)
                         + client_frame(b"er b", 0x80) + client_frame(b"order c") + client_frame(b"\x00d", 0x82)
                         + cut[:5])
            await writer.drain()
            got = [await server_frame(reader) for _ in range(5)]
            writer.write(cut[5:] + client_frame(b"order f"))
            got += [await server_frame(reader) for _ in range(2)]
            writer.write(client_frame(b"\x03\xe8", 0x88))
            got.append(await server_frame(reader))
            writer.close()
            disconnected = await take(bridge.layer, "test.disconnects")
            return got, disconnected

    got, disconnected = run(scenario())
    assert (0xA, b"p") in got[:5]  # the pong, whenever it was written
    echoes = [frame for frame in got if frame[0] in (1, 2)]
    assert echoes == [(1, b"1 order a"), (1, b"2 order b"), (1, b"3 order c"), (2, b"\x00d"), (1, b"5 order e"),
                      (1, b"6 order f")]
    assert got[-1] == (8, b"\x03\xe8") and disconnected["code"] == 1000 and disconnected["order"] == 7


def test_frames_before_an_invalid_one_in_the_same_read_reach_the_layer(run):
    async def scenario():
        async with serving() as bridge:
            reader, writer = await raw_upgrade(bridge)
            writer.write(client_frame(b"order a") + client_frame(b"order b") + client_frame(b"bad \xff"))
            frames_in = []
            with pytest.raises(asyncio.IncompleteReadError):  # Autobahn closes at once: the echoes may not come
                while True:
                    frames_in.append(await server_frame(reader))
                    if frames_in[-1][0] == 8:
                        writer.write(client_frame(frames_in[-1][1], 0x88))  # the closing handshake, answered
            writer.close()
            disconnected = await take(bridge.layer, "test.disconnects")
            return bridge, frames_in, disconnected

    bridge, frames_in, disconnected = run(scenario())
    assert any(opcode == 8 and payload[:2] == (1007).to_bytes(2, "big") for opcode, payload in frames_in)
    assert disconnected["order"] == 3 and bridge.counters["bad_input"] == 1  # orders 1 and 2 were stored


@pytest.mark.parametrize(("command", "code"), [("close", 1000), ("close 4321", 4321), ("close 1011", 1011)])
def test_consumer_closes_with_its_code(run, command, code):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge), open_timeout=10) as ws:
                await ws.send(command)
                return await closed_code(ws)

    assert run(scenario()) == code


def test_message_over_max_message_size_closes_1009(run):
    async def scenario():
        async with serving({"max_message_size": 1000}) as bridge:
            async with connect(url(bridge), open_timeout=10) as ws:
                await ws.send("x" * 1000)
                assert len(await asyncio.wait_for(ws.recv(), 10)) == 1000  # the limit itself is fine
                await ws.send("x" * 1001)
                code = await closed_code(ws)
            return bridge, code

    bridge, code = run(scenario())
    assert code == 1009 and bridge.counters["bad_input"] == 1


def test_invalid_utf8_text_closes_1007(run):
    async def scenario():
        async with serving() as bridge:
            async with connect(url(bridge), open_timeout=10) as ws:
                await ws.send(b"ok \xff\xfe", text=True)  # websockets sends these bytes as a text frame unchecked
                code = await closed_code(ws)
            disconnected = await take(bridge.layer, "test.disconnects")
            return bridge, code, disconnected

    bridge, code, disconnected = run(scenario())
    assert code == 1007 and bridge.counters["bad_input"] == 1
    assert disconnected["order"] == 1  # the bad frame never reached the layer


@pytest.mark.parametrize("code", [999, 1005, 5000])
def test_a_close_code_not_allowed_is_answered_1002_not_reset(run, code):
    """Issue 14 §3: Autobahn answered 1002 and reset the connection at once, so the client never read the 1002."""

    async def scenario():
        async with serving() as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"GET /echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101")
            # A masked close frame (FIN + opcode 8), its payload the code; mask 0 leaves the payload as it is.
            writer.write(b"\x88\x82\x00\x00\x00\x00" + code.to_bytes(2, "big"))
            answer = await asyncio.wait_for(reader.read(), 10)  # ConnectionResetError here was the bug
            writer.close()
            disconnected = await take(bridge.layer, "test.disconnects")
            return bridge, answer, disconnected

    bridge, answer, disconnected = run(scenario())
    assert answer[:2] == b"\x88" + bytes([len(answer) - 2]) and answer[2:4] == (1002).to_bytes(2, "big"), answer
    assert b"invalid close code %d" % code in answer
    assert disconnected["code"] == 1002 and bridge.counters["bad_input"] == 1


def test_idle_timeout_closes_1001(run):
    async def scenario():
        async with serving({"idle_timeout": 0.3}) as bridge:
            async with connect(url(bridge), open_timeout=10, ping_interval=None) as ws:
                return await closed_code(ws)

    assert run(scenario()) == 1001


# -- a full layer --------------------------------------------------------------------------------------------


def test_full_layer_refuses_the_handshake_with_503(run):
    async def scenario():
        channel_layer = layer.from_url("memory://", channel_capacity={"websocket.connect": 1})
        async with serving(channel_layer=channel_layer, worker=False) as bridge:
            await channel_layer.send("websocket.connect", {"filler": True})  # the channel is full now
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(bridge), open_timeout=10):
                    pass
            assert bridge.health["state"] == "degraded" and "websocket.connect" in bridge.health["reason"]
            return bridge, refused.value.response

    bridge, response = run(scenario())
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert bridge.counters["refused"] == 1


def test_full_layer_after_accept_closes_1013_and_keeps_order_contiguous(run):
    async def scenario():
        channel_layer = layer.from_url("memory://", channel_capacity={"websocket.receive": 2})
        async with serving(channel_layer=channel_layer, worker=False) as bridge:
            opening = asyncio.ensure_future(connect(url(bridge), open_timeout=10))
            connected = await take(channel_layer, "websocket.connect")  # the test plays the consumer
            await channel_layer.send(connected["reply_channel"], {"accept": True})
            ws = await opening
            for i in range(5):
                await ws.send(f"m{i}")
            code = await closed_code(ws)
            stored = [await take(channel_layer, "websocket.receive") for _ in range(2)]
            disconnected = await take(channel_layer, "websocket.disconnect")
            return bridge, code, stored, disconnected

    bridge, code, stored, disconnected = run(scenario())
    assert code == 1013
    assert [(m["order"], m["text"]) for m in stored] == [(1, "m0"), (2, "m1")]
    assert disconnected["order"] == 3  # no gap for the consumer's @enforce_ordering to wait on
    assert bridge.counters["refused"] >= 1


# -- broadcast to many -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("threads", "app"), [(1, "apps.ws_echo:routes"), (4, "apps.ws_strict:routes")],
                         ids=["one-thread", "four-threads-enforce-ordering"])
def test_a_thousand_clients_in_one_room_get_every_broadcast_in_order(run, threads, app):
    clients, senders, each = 1000, 4, 5
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 2 * clients + 200, (  # conftest.py raised the soft limit to the hard one
        f"the hard limit on open files (ulimit -Hn) is {hard}: this test needs about {2 * clients + 200}; raise "
        f"it (e.g. 'nofile' in /etc/security/limits.conf, or LimitNOFILE= for a systemd service)")

    async def scenario():
        channel_layer = layer.from_url("memory://", capacity=50_000)
        async with serving({"ping_interval": 0}, channel_layer=channel_layer, threads=threads, app=app) as bridge:
            gate = asyncio.Semaphore(100)

            async def open_one():
                async with gate:
                    return await connect(url(bridge, "/room/lobby/"), open_timeout=30, ping_interval=None,
                                         max_queue=None)

            sockets = await asyncio.gather(*(open_one() for _ in range(clients)))
            for n in range(each):  # senders interleave; each one's own messages must stay in order
                for s in range(senders):
                    await sockets[s].send(f"s{s} m{n}")

            async def collect(ws):
                return [await asyncio.wait_for(ws.recv(), 60) for _ in range(senders * each)]

            received = await asyncio.gather(*(collect(ws) for ws in sockets))
            await asyncio.gather(*(ws.close() for ws in sockets))
            return bridge, received, await channel_layer.stats()

    bridge, received, stats = run(scenario(), timeout=110)
    expected = {f"s{s}": [f"s{s} m{n}" for n in range(each)] for s in range(senders)}
    for got in received:
        assert sorted(got) == sorted(sum(expected.values(), [])), "a broadcast was lost or duplicated"
        for sender, mine in expected.items():
            assert [m for m in got if m.split()[0] == sender] == mine, "a sender's broadcasts were reordered"
    assert stats["dropped"] == 0 and bridge.counters["dropped"] == 0


# -- keepalive, TLS and stopping -----------------------------------------------------------------------------


def test_a_peer_that_never_answers_pings_is_dropped(run):
    """A raw TCP peer completes the upgrade, then never reads: pings go unanswered and it is dropped."""

    async def scenario():
        async with serving({"ping_interval": 0.2, "ping_timeout": 0.2}) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"GET /echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101")
            first = await asyncio.wait_for(reader.readexactly(2), 10)
            assert first[0] == 0x89, "the server's first frame should be a ping"
            with pytest.raises(ConnectionResetError):  # aborted (RST) for not answering
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
            disconnected = await take(bridge.layer, "test.disconnects")
            return disconnected

    disconnected = run(scenario())
    assert disconnected["code"] == 1006  # dropped without a closing handshake


def test_connections_timers_share_reactor_calls_and_leave_none_once_cancelled(run, reactor):
    """Every open connection has a ping timer: those due together share one reactor call (an idle socket costs
    less), fire in order, skip the cancelled, and cancelling all of them leaves nothing on the reactor."""
    from crossroads.bridges.websocket.bridge import _TimerWheel

    async def scenario():
        wheel = _TimerWheel(logging.getLogger("test"))
        before = len(reactor.getDelayedCalls())
        fired: list[int] = []
        done = asyncio.get_running_loop().create_future()
        timers = [wheel.call_later(0.1, fired.append, n) for n in range(10)]
        last = wheel.call_later(0.1, lambda: done.set_result(None))
        assert len(reactor.getDelayedCalls()) - before <= 2  # made within microseconds: one tick, two at a boundary
        timers[3].cancel()
        await asyncio.wait_for(done, 10)
        for timer in [*timers, last]:
            timer.cancel()  # after they ran, as Autobahn may
        unused = [wheel.call_later(30, fired.append, n) for n in range(5)]
        for timer in unused:
            timer.cancel()
        return fired, len(reactor.getDelayedCalls()) - before

    fired, left = run(scenario())
    assert fired == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert left == 0


def test_tls(run, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    issued = ca.create_child_ca().issue_cert("127.0.0.1", "localhost")  # as public CAs do: via an intermediate
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    async def scenario():
        async with serving({"tls_cert": str(cert), "tls_key": str(key)}) as bridge:
            async with connect(f"wss://127.0.0.1:{bridge.port}/echo/", ssl=context, open_timeout=10) as ws:
                await ws.send("secret")
                assert await asyncio.wait_for(ws.recv(), 10) == "secret"
            connected = await take(bridge.layer, "test.connects")
            assert connected["scheme"] == "wss"

    run(scenario())
    with pytest.raises(OptionError, match="tls_key: cannot read"):
        run(WebsocketBridge("ws", {"port": 0, "tls_cert": str(cert), "tls_key": str(tmp_path / "nope.pem")},
                            layer.from_url("memory://")).start())


def test_unix_socket(run, tmp_path):
    """A WebSocket bridge behind a proxy on the same machine listens on a Unix socket, like the HTTP bridge."""
    from twisted.internet.error import CannotListenError
    from websockets.asyncio.client import unix_connect

    path = str(tmp_path / "ws.sock")
    (tmp_path / "ws.sock").write_bytes(b"kept")  # not a socket: never removed, so binding fails on it ...
    with pytest.raises(CannotListenError):
        run(WebsocketBridge("ws", {"unix_socket": path}, layer.from_url("memory://")).start())
    assert (tmp_path / "ws.sock").read_bytes() == b"kept"
    (tmp_path / "ws.sock").unlink()

    async def scenario():
        async with serving({"unix_socket": path}) as bridge:
            assert bridge.port is None  # no TCP port was opened
            async with unix_connect(path, "ws://localhost/echo/", open_timeout=10) as ws:
                await ws.send("through a unix socket")
                assert await asyncio.wait_for(ws.recv(), 10) == "through a unix socket"
            connected = await take(bridge.layer, "test.connects")
            disconnected = await take(bridge.layer, "test.disconnects")
        async with serving({"unix_socket": path}):  # ... while a socket file left by an earlier run is replaced
            async with unix_connect(path, "ws://localhost/echo/", open_timeout=10) as ws:
                await ws.send("again")
                assert await asyncio.wait_for(ws.recv(), 10) == "again"
        return connected, disconnected

    connected, disconnected = run(scenario())
    assert connected["client"] is None and connected["server"] == [path, None]
    assert connected["sender"] == disconnected["sender"] == "unix" and connected["scheme"] == "ws"


def test_tls_on_a_unix_socket(run, tmp_path):
    import ssl

    from servers import write_test_certificates

    files = write_test_certificates(tmp_path)
    context = ssl.create_default_context(cafile=files["ca"])
    path = str(tmp_path / "wss.sock")

    async def scenario():
        from websockets.asyncio.client import unix_connect

        async with serving({"unix_socket": path, "tls_cert": files["cert"], "tls_key": files["key"]}) as bridge:
            async with unix_connect(path, "wss://localhost/echo/", ssl=context, server_hostname="localhost",
                                    open_timeout=10) as ws:
                await ws.send("secret")
                assert await asyncio.wait_for(ws.recv(), 10) == "secret"
            return await take(bridge.layer, "test.connects")

    assert run(scenario())["scheme"] == "wss"


def test_backlog_is_the_listening_sockets(run):
    """The kernel's accept queue is as long as ``backlog`` (``ss`` shows it as the listening socket's Send-Q)."""
    import subprocess

    from servers import require_binary

    ss = require_binary("ss")

    async def scenario():
        async with serving({"backlog": 37}, worker=False) as bridge:
            shown = await asyncio.to_thread(subprocess.run, [ss, "-ltnH", f"sport = :{bridge.port}"],
                                            capture_output=True, text=True, timeout=10)
            return shown.stdout.split()

    columns = run(scenario())
    assert columns[0] == "LISTEN" and columns[2] == "37", columns


def test_stop_closes_open_sockets_1001_and_refuses_held_handshakes_503(run):
    async def scenario():
        async with serving() as bridge:
            ws = await connect(url(bridge), open_timeout=10)
            holding = asyncio.ensure_future(connect(url(bridge, "/hold/"), open_timeout=10))
            await take(bridge.layer, "test.held")
            await bridge.stop(timeout=5)
            code = await closed_code(ws)
            with pytest.raises(InvalidStatus) as refused:
                await holding
            await bridge.layer.send("test.release", {})  # let the worker's held consumer finish
            return code, refused.value.response.status_code

    assert run(scenario()) == (1001, 503)


# -- as deployed: bridge and worker as separate processes over Redis --------------------------------------------


def daemon_config(tmp_path, redis_url: str, prefix: str, listening: str) -> str:
    """A config file for `crossroads bridge ws` and `crossroads worker`: the echo app, and ``listening`` (TOML)."""
    from test_cli import write_config

    return str(write_config(tmp_path, f"""[layer]
url = "{redis_url}"
prefix = "{prefix}"

[routing]
app = "apps.ws_echo:routes"

[worker]
threads = 1  # one socket's frames are consumed in order (several threads may run them out of order)

[bridges.ws]
type = "crossroads.bridges.websocket.bridge:WebsocketBridge"
{listening}
"""))


def test_bridge_and_worker_daemons_over_redis(tmp_path, redis_server, daemons):
    from servers import free_port
    from test_daemons import bridge_and_worker
    from websockets.sync.client import connect as connect_sync

    port = free_port()
    config = daemon_config(tmp_path, redis_server.url, "wsdaemons", f"port = {port}")
    bridge, worker = bridge_and_worker(tmp_path, daemons, "ws", config, port)
    with connect_sync(f"ws://127.0.0.1:{port}/echo/", subprotocols=["a", "b"], open_timeout=20) as ws:
        assert ws.subprotocol == "b"
        for i in range(50):
            ws.send(f"order {i}")
        assert [ws.recv(timeout=20) for _ in range(50)] == [f"{i + 1} order {i}" for i in range(50)]
        ws.send(b"\x01\x02")
        assert ws.recv(timeout=20) == b"\x01\x02"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        with connect_sync(f"ws://127.0.0.1:{port}/reject/", open_timeout=20):
            pass
    assert refused.value.response.status_code == 403
    bridge.terminate()
    worker.terminate()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_systemd_socket_activation(tmp_path, redis_server, family):
    """systemd-socket-activate (systemd's own tool) holds the socket and passes it, named, to `crossroads bridge`."""
    from servers import free_port, wait_for_port
    from test_daemons import Daemon, socket_activated
    from websockets.sync.client import connect as connect_sync
    from websockets.sync.client import unix_connect as unix_connect_sync

    port, path = free_port(), str(tmp_path / "activated.sock")
    config = daemon_config(tmp_path, redis_server.url, f"wsactivated{family}", 'systemd_socket = "sockets"')
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    bridge = socket_activated(f"127.0.0.1:{port}" if family == "tcp" else path, "sockets", "bridge", "ws",
                              "--config", config)
    try:
        worker.wait_ready()
        if family == "tcp":
            wait_for_port(port, bridge)  # the port is open before the bridge runs: systemd's point
            client = connect_sync(f"ws://127.0.0.1:{port}/echo/", open_timeout=30)  # the first one starts the bridge
        else:
            wait_for_path(path, bridge)
            client = unix_connect_sync(path, "ws://localhost/echo/", open_timeout=30)
        with client as ws:
            ws.send("activated")
            assert ws.recv(timeout=20) == "activated"
        bridge.terminate()
        log = bridge.communicate(timeout=30)[0]
        assert bridge.returncode == 0, log
        worker.terminate()
    finally:
        if bridge.poll() is None:
            bridge.kill()
        worker.close()


def wait_for_path(path: str, process, deadline: float = 10.0) -> None:
    """Wait until the Unix socket ``path`` exists; fail if ``process`` (which makes it) exits first."""
    import os

    from servers import wait_until

    def made() -> bool:
        assert process.poll() is None, f"exited with {process.returncode} before making {path}"
        return os.path.exists(path)

    wait_until(made, f"{path} to be made", deadline)
