"""A WebSocket bridge on the HTTP bridge's port: the http bridge's ``websocket`` option.

Real clients over loopback: the stdlib HTTP client and raw sockets for HTTP,
the ``websockets`` library for WebSocket, on one port, in one process against
``memory://`` (with and without TLS); then as deployed, ``crossroads bridge
web`` running both over a real redis-server beside ``crossroads worker``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from contextlib import asynccontextmanager

import pytest
from servers import wait_until_async
from test_cli import run as run_cli
from test_cli import write_config
from test_http_bridge import fetch, raw, status_of
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.http.bridge import HttpBridge
from crossroads.bridges.websocket.bridge import WebsocketBridge
from crossroads.consumers.worker import Worker


@asynccontextmanager
async def shared(http_options: dict | None = None, ws_options: dict | None = None):
    """An HTTP bridge on a free port with a WebSocket bridge on the same port, and a worker for both."""
    channel_layer = layer.from_url("memory://", capacity=1000)
    web = HttpBridge("web", {"port": 0, "websocket": "ws", **(http_options or {})}, channel_layer)
    ws = WebsocketBridge("ws", {"port": 1, **(ws_options or {})}, channel_layer)  # port 1: proves it is unused
    web.attach_companions({"web": web, "ws": ws})
    await ws.start()
    await web.start()
    worker = Worker("apps.web_both:routes", channel_layer, threads=1)
    worker.start()
    try:
        yield web
    finally:
        await web.stop(timeout=5)
        await ws.stop(timeout=5)
        worker.stop()
        await asyncio.to_thread(worker.join, 10)
        await channel_layer.close()


def test_http_and_websocket_share_one_port(run):
    async def scenario():
        async with shared() as web:
            status, _, body = await fetch(web.port, "/text")
            assert (status, body) == (200, "héllo from text".encode())
            # A browser's WebSocket from a page of this port: same origin, so allowed without allowed_origins.
            origin = f"http://127.0.0.1:{web.port}"
            async with connect(f"ws://127.0.0.1:{web.port}/echo/", origin=origin, open_timeout=10) as ws:
                await ws.send("over the shared port")
                assert await asyncio.wait_for(ws.recv(), 10) == "over the shared port"
                await ws.send(b"\x00\x01")
                assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01"
                # HTTP goes on being served while the socket is open.
                assert (await fetch(web.port, "/text"))[0] == 200
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{web.port}/echo/", origin="https://evil.example",
                                   open_timeout=10):
                    pass
            assert refused.value.response.status_code == 403
            # The first request of a connection decides: a keep-alive HTTP connection stays HTTP.
            both = await raw(web.port, b"GET /text HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                       b"GET /missing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", both)] == [200, 404]

    run(scenario())


def test_shared_port_limits(run):
    async def scenario():
        async with shared({"max_header_bytes": 2048, "idle_timeout": 0.5}) as web:
            # A head over max_header_bytes that never ends is HTTP's to refuse.
            assert status_of(await raw(web.port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4096)) == 431
            # A head that never completes is answered 408 and closed (here at idle_timeout, the sooner deadline).
            assert status_of(await raw(web.port, b"GET /echo/ HTTP/1.1\r\nUpgrade: websocket\r\n")) == 408
            # A connection that sends nothing is closed at idle_timeout with nothing said (browsers open spares).
            assert await raw(web.port, b"") == b""
            # An upgrade that is not a valid handshake gets the WebSocket bridge's answer, not a consumer's.
            answer = await raw(web.port, b"GET /echo/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
            assert status_of(answer) == 400
            assert not web.undecided

    run(scenario())


def test_max_connections_refuses_with_503_and_frees_slots_when_sockets_close(run, caplog):
    """Three slots: held by an idle socket, a WebSocket (handed over by the port splitter) and keep-alive HTTP."""

    async def scenario():
        async with shared({"max_connections": 3}) as web:
            idle_reader, idle = await asyncio.open_connection("127.0.0.1", web.port)
            ws = await connect(f"ws://127.0.0.1:{web.port}/echo/", open_timeout=10)
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 10) == "hi"
            reader, keep_alive = await asyncio.open_connection("127.0.0.1", web.port)
            keep_alive.write(b"GET /text HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            refused = await raw(web.port, b"GET /text HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert status_of(refused) == 503 and b"\r\nRetry-After: 5\r\n" in refused, refused
            with pytest.raises(InvalidStatus) as busy:
                async with connect(f"ws://127.0.0.1:{web.port}/echo/", open_timeout=10):
                    pass
            assert busy.value.response.status_code == 503
            assert web.counters["connections_refused"] == 2
            assert web.open_connections == 3 and web.status()["open_connections"] == 3
            await ws.close()  # a WebSocket's slot is the HTTP listener's: freed when the socket closes
            await wait_until_async(lambda: web.open_connections == 2, "the WebSocket's slot to be freed")
            again = await raw(web.port, b"GET /text HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert status_of(again) == 200
            idle.close()
            keep_alive.close()
            await asyncio.gather(idle.wait_closed(), keep_alive.wait_closed())

    run(scenario())
    assert "refusing new ones with 503" in caplog.text


def test_shared_port_with_tls(run, tmp_path):
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def https_get(port: int) -> tuple[int, bytes]:
        import http.client

        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            conn.request("GET", "/text")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    async def scenario():
        async with shared({"tls_cert": str(cert), "tls_key": str(key)}) as web:
            assert await asyncio.to_thread(https_get, web.port) == (200, "héllo from text".encode())
            async with connect(f"wss://127.0.0.1:{web.port}/echo/", ssl=context, open_timeout=10) as ws:
                await ws.send("secret")
                assert await asyncio.wait_for(ws.recv(), 10) == "secret"
            connected = await web.layer.receive(["test.connects"], timeout=10)
            assert connected[1]["scheme"] == "wss"  # the WebSocket bridge knows the port is TLS

    run(scenario())


def test_linking_names_the_problem():
    channel_layer = layer.from_url("memory://")
    web = HttpBridge("web", {"port": 0, "websocket": "ws"}, channel_layer)
    with pytest.raises(OptionError, match=r"websocket: names \[bridges.ws\], which is not running in this process"):
        web.attach_companions({"web": web})
    other = HttpBridge("ws", {"port": 0}, channel_layer)
    with pytest.raises(OptionError, match=r"which is a http bridge: name a websocket bridge"):
        web.attach_companions({"web": web, "ws": other})
    assert HttpBridge.companions(web.options) == ["ws"]
    assert HttpBridge.companions(other.options) == []


SHARED_CONFIG = """[layer]
url = "{url}"
prefix = "sharedport"

[routing]
app = "apps.web_both:routes"

[worker]
threads = 1

[bridges.web]
type = "http"
port = {port}
websocket = "ws"

[bridges.ws]
type = "websocket"
"""


def test_config_mistakes_are_explained(tmp_path):
    config = str(write_config(tmp_path, SHARED_CONFIG.format(url="memory://", port=8000).replace(
        'websocket = "ws"', 'websocket = "sockets"')))
    result = run_cli("check", "--config", config)
    assert result.returncode == 2
    assert "[bridges.web] names [bridges.sockets] to run beside it, but there is no such table" in result.stderr
    config = str(write_config(tmp_path, SHARED_CONFIG.format(url="redis://127.0.0.1:6379/0", port=8000)))
    result = run_cli("bridge", "ws", "--config", config)
    assert result.returncode == 2
    assert "run `crossroads bridge web`, which runs both" in result.stderr
    result = run_cli("systemd", "--config", config, "--output", str(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    assert "crossroads-bridge@web.service" in result.stdout
    assert "crossroads-bridge@ws.service" not in result.stdout  # it runs in web's unit


def test_crossroads_bridge_web_serves_both_over_redis(tmp_path, redis_server, daemons):
    from servers import free_port
    from test_daemons import bridge_and_worker
    from websockets.sync.client import connect as connect_sync

    port = free_port()
    config = str(write_config(tmp_path, SHARED_CONFIG.format(url=redis_server.url, port=port)))
    bridge, worker = bridge_and_worker(tmp_path, daemons, "web", config, port)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/text", timeout=20) as response:
        assert response.read() == "héllo from text".encode()
    with connect_sync(f"ws://127.0.0.1:{port}/echo/", origin=f"http://127.0.0.1:{port}",
                      open_timeout=20) as ws:
        ws.send("one port")
        assert ws.recv(timeout=20) == "one port"
    status = run_cli("status", "--config", config)
    assert status.returncode == 0, status.stderr
    assert "web: connected" in status.stdout and "ws: connected" in status.stdout  # one process, both reported
    log = bridge.terminate()
    assert "serving: ws (websocket), web (http)" in log
    worker.terminate()
