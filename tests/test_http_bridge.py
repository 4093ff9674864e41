"""The HTTP bridge with real clients over loopback, and a real worker running tests/apps/http_app.py.

In-process tests run the bridge on the asyncio reactor of a loop of this
module (installed and removed as in tests/test_bridge_base.py, so no reactor
leaks), and the consumers in a ``consumers.worker.Worker`` on threads, against
``memory://``. Normal requests go through the stdlib's ``http.client`` (in a
thread, since it blocks); malformed ones through raw asyncio sockets. The last
tests run ``crossroads bridge`` and ``crossroads worker`` as processes over a
real redis-server. Waits have deadlines; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import re
import socket
from contextlib import asynccontextmanager

import pytest
from servers import free_port, wait_for_port, wait_until_async
from test_cli import run as run_cli
from test_cli import write_config
from test_daemons import Daemon, bridge_and_worker

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.http.bridge import HttpBridge
from crossroads.consumers.worker import Worker

# -- the reactor, the loop, the layer and the worker ---------------------------------------------------------


# the reactor and run fixtures live in conftest.py


@pytest.fixture
def channel_layer(run):
    made = layer.from_url("memory://")
    yield made
    run(made.close())


@pytest.fixture
def worker(channel_layer):
    started = Worker("apps.http_app:routes", channel_layer, threads=4)
    started.start()
    yield started
    started.stop()
    assert started.join(10), "the worker did not stop"


@asynccontextmanager
async def serving(channel_layer, **options):
    bridge = HttpBridge("web", {"port": 0, **options}, channel_layer)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop(timeout=5)


# -- clients -------------------------------------------------------------------------------------------------


def _fetch(port: int, method: str, path: str, body: bytes | None, headers: list[tuple[str, str]]):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        names = {name.lower() for name, _ in headers}
        conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


async def fetch(port: int, path: str, method: str = "GET", body: bytes | None = None,
                headers: list[tuple[str, str]] = ()) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request with the stdlib client, in a thread, while the loop serves it."""
    return await asyncio.to_thread(_fetch, port, method, path, body, list(headers))


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


async def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are, and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match, f"not an HTTP response: {response[:200]!r}"
    return int(match.group(1))


def decode(value):
    """Undo tests/apps/http_app.py's marking of bytes."""
    if isinstance(value, dict) and set(value) == {"bytes"}:
        return value["bytes"].encode("latin-1")
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    return value


# -- requests in, responses out ------------------------------------------------------------------------------


def test_a_request_carries_every_key(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer, root_path="/app", allowed_hosts=["example.test"]) as bridge:
            status, headers, body = await fetch(
                bridge.port, "/inspect/caf%C3%A9%20au%2Flait?a=1&b=%20x", "POST", body="héllo".encode(),
                headers=[("X-Dup", "one"), ("X-Other", "2"), ("X-Dup", "two"), ("X_Forwarded_For", "6.6.6.6"),
                         ("Host", "example.test")])
            assert status == 200 and header_values(headers, "content-type") == ["application/json"]
            return bridge, decode(json.loads(body))

    bridge, message = run(scenario())
    assert message["reply_channel"].startswith(bridge.prefix)
    assert message["http_version"] == "1.1" and message["method"] == "POST" and message["scheme"] == "http"
    assert message["path"] == "/inspect/café au/lait"
    assert message["query_string"] == b"a=1&b=%20x"
    assert message["root_path"] == "/app"
    assert message["headers"] == [[b"x-dup", b"one"], [b"x-other", b"2"], [b"x-dup", b"two"],
                                  [b"host", b"example.test"], [b"content-length", b"6"]]
    assert message["body"] == "héllo".encode() and message["text"] == "héllo"
    assert message["client"][0] == "127.0.0.1" and isinstance(message["client"][1], int)
    assert message["server"] == ["127.0.0.1", bridge.port]
    assert message["protocol"] == "http" and message["room"] == "/inspect/café au/lait"
    assert message["sender"] == f"127.0.0.1:{message['client'][1]}"
    assert bridge.counters["received"] == 1 and bridge.counters["sent"] == 1 and bridge.counters["replies"] == 1


def test_binary_body_has_no_text_and_keep_alive_serves_several_requests(run, channel_layer, worker):
    def two_requests(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            answers = []
            for body in (b"\xff\xfe binary", b""):
                conn.request("PUT", "/inspect", body=body)
                response = conn.getresponse()
                answers.append(decode(json.loads(response.read())))
            return answers
        finally:
            conn.close()

    async def scenario():
        async with serving(channel_layer) as bridge:
            return await asyncio.to_thread(two_requests, bridge.port)

    first, second = run(scenario())
    assert first["body"] == b"\xff\xfe binary" and first["text"] is None
    assert second["body"] == b"" and second["text"] == ""
    assert first["client"] == second["client"], "the second request did not reuse the connection"


def test_pipelined_requests_are_answered_in_order_and_lf_in_bodies_is_data(run, channel_layer, worker):
    """Three requests in one write; LFs inside the bodies are not the bare LF line ends the parser refuses."""
    async def scenario():
        async with serving(channel_layer) as bridge:
            return bridge, await raw(bridge.port, (
                b"PUT /inspect HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 5\r\n\r\na\nb\n\n"
                b"PUT /inspect HTTP/1.1\r\nHost: [::1]\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nc\n\nd\r\n0\r\n\r\n"
                b"GET /text HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"))

    bridge, answer = run(scenario())
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3, answer
    first, second, third = (answer.index(b'"body": {"bytes": "a\\nb\\n\\n"}'),
                            answer.index(b'"body": {"bytes": "c\\n\\nd"}'), answer.index("héllo".encode()))
    assert first < second < third
    assert bridge.counters["bad_input"] == 0 and bridge.counters["received"] == 3


def test_100_continue_head_and_a_stream_to_http_1_0(run, channel_layer, worker):
    """What twisted.web did for us and the bridge's own protocol does now."""
    async def scenario():
        async with serving(channel_layer) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"PUT /inspect HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 4\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # before the body is sent
            writer.write(b"body")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            inspected = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
            writer.write(b"HEAD /text HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head_only = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            old = await raw(bridge.port, b"GET /stream HTTP/1.0\r\n\r\n")
            return interim, inspected, head_only, old

    interim, inspected, head_only, old = run(scenario())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert decode(inspected["body"]) == b"body"
    assert status_of(head_only) == 200 and head_only.endswith(b"\r\n\r\n"), head_only  # no body after the head
    assert re.search(rb"(?i)content-length: %d\r\n" % len("héllo from text".encode()), head_only)
    assert old.startswith(b"HTTP/1.0 201 ") and b"transfer-encoding" not in old.lower()
    assert old.endswith(b"\r\n\r\nfirst,second,third")  # the end of the body is the end of the connection


def test_text_replies_are_plain_utf8(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return await fetch(bridge.port, "/text"), await fetch(bridge.port, "/missing")

    (status, headers, body), (missing_status, missing_headers, missing_body) = run(scenario())
    assert status == 200 and body == "héllo from text".encode()
    assert header_values(headers, "content-type") == ["text/plain; charset=utf-8"]
    assert header_values(headers, "content-length") == [str(len(body))]
    assert missing_status == 404 and missing_body == b"no such page"


def test_streamed_response(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return await fetch(bridge.port, "/stream")

    status, headers, body = run(scenario())
    assert status == 201 and body == b"first,second,third"
    assert header_values(headers, "transfer-encoding") == ["chunked"]
    assert header_values(headers, "x-stream") == ["yes"]


def test_duplicate_response_headers_are_kept(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return await fetch(bridge.port, "/duplicate-headers")

    status, headers, body = run(scenario())
    assert status == 200 and body == b"ok"
    assert header_values(headers, "set-cookie") == ["a=1", "b=2"] and header_values(headers, "x-one") == ["1"]


@pytest.mark.parametrize("kind", ["crlf", "lf", "nul", "name"])
def test_response_header_injection_is_refused(run, channel_layer, worker, caplog, kind):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return bridge, await fetch(bridge.port, f"/bad-header?{kind}")

    with caplog.at_level(logging.ERROR, logger="crossroads.bridges.http"):
        bridge, (status, headers, body) = run(scenario())
    assert status == 500 and b"invalid response" in body
    assert not header_values(headers, "set-cookie") and not header_values(headers, "x-bad")
    assert bridge.counters["bad_replies"] == 1
    assert any("invalid reply to GET /bad-header" in r.getMessage() for r in caplog.records)


def test_an_invalid_part_of_a_streamed_response_cuts_the_connection(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return bridge, await raw(bridge.port, b"GET /bad-stream HTTP/1.1\r\nHost: localhost\r\n\r\n")

    bridge, response = run(scenario())
    assert status_of(response) == 200 and b"part one" in response
    assert not response.endswith(b"0\r\n\r\n"), "the cut response looks complete"
    assert bridge.counters["bad_replies"] == 1


async def open_slow_reader(port: int, path: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a small receive buffer, so the server's writes fill the socket long before the body ends."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    return reader, writer


def test_a_slow_client_gets_a_streamed_response_whole_and_in_order(run, channel_layer, worker):
    """The consumer sends 3 MiB at once; the client reads 16 KiB at a time: parts wait, and none is lost."""
    parts, size = 48, 65536

    async def scenario():
        async with serving(channel_layer) as bridge:
            reader, writer = await open_slow_reader(bridge.port, f"/big?parts={parts}&size={size}".encode())
            received = bytearray()
            while chunk := await asyncio.wait_for(reader.read(16384), 10):
                received += chunk
                await asyncio.sleep(0)  # read no faster than the loop turns: the server's buffer fills
            writer.close()
            return bridge, bytes(received)

    bridge, response = run(scenario())
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    content, rest = bytearray(), body
    while True:  # undo the chunked encoding
        size_line, _, rest = rest.partition(b"\r\n")
        length = int(size_line, 16)
        if length == 0:
            break
        content += rest[:length]
        rest = rest[length + 2:]
    assert bytes(content) == b"".join(bytes([i % 256]) * size for i in range(parts))
    assert bridge.counters["slow_clients"] == 0


def test_a_client_too_far_behind_a_streamed_response_is_cut_off(run, channel_layer, worker, caplog):
    """A client that stops reading costs the bridge at most max_response_buffer; its consumer hears of it."""
    async def scenario():
        async with serving(channel_layer, max_response_buffer=2 * 1024 * 1024, idle_timeout=30) as bridge:
            reader, writer = await open_slow_reader(bridge.port, b"/big?parts=64&size=65536")
            # The client reads nothing until the bridge has given up on it; then what is left is a reset.
            deadline = asyncio.get_running_loop().time() + 20
            while bridge.counters["slow_clients"] == 0 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                while True:
                    if not await asyncio.wait_for(reader.read(65536), 10):
                        raise asyncio.IncompleteReadError(b"", None)  # a clean end would be a complete response
            writer.close()
            channel, message = await bridge.layer.receive(["test.disconnects"], timeout=10)
            assert channel == "test.disconnects", "no http.disconnect reached the consumer"
            return bridge, message

    bridge, disconnect = run(scenario())
    assert disconnect["path"] == "/big"  # the consumer hears the client is gone, and can stop streaming
    assert bridge.counters["slow_clients"] == 1
    assert "during the streamed response to GET /big: over max_response_buffer (2097152 bytes) behind" in caplog.text


def test_proxy_headers_only_when_enabled(run, channel_layer, worker):
    forwarded = [("X-Forwarded-For", "203.0.113.9, 10.0.0.1"), ("X-Forwarded-Port", "4443"),
                 ("X-Forwarded-Proto", "https")]

    async def scenario():
        answers = []
        for trusted in (False, True):
            async with serving(channel_layer, proxy_headers=trusted) as bridge:
                _, _, body = await fetch(bridge.port, "/inspect", headers=forwarded)
                answers.append(decode(json.loads(body)))
        return answers

    ignored, honoured = run(scenario())
    assert ignored["client"][0] == "127.0.0.1" and ignored["scheme"] == "http"
    assert honoured["client"] == ["203.0.113.9", 4443] and honoured["scheme"] == "https"
    assert honoured["sender"] == "203.0.113.9:4443"


def test_access_log_in_combined_format(run, channel_layer, worker, caplog):
    async def scenario():
        async with serving(channel_layer) as bridge:
            await fetch(bridge.port, "/text?x=1", headers=[("Referer", "http://ref.test/"),
                                                           ("User-Agent", 'agent "quoted"')])

    with caplog.at_level(logging.INFO, logger="crossroads.http.access"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "crossroads.http.access"]
    assert len(lines) == 1
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /text\?x=1 HTTP/1\.1" 200 '
                        r'16 "http://ref\.test/" "agent \\"quoted\\""', lines[0]), lines[0]


# -- limits and errors ---------------------------------------------------------------------------------------


def test_layer_full_is_503_with_retry_after(run):
    full_layer = layer.from_url("memory://", capacity=1)

    async def scenario():
        await full_layer.send("http.request", {"filler": True})
        async with serving(full_layer) as bridge:
            status, headers, body = await fetch(bridge.port, "/anything")
            return bridge, status, headers

    try:
        bridge, status, headers = run(scenario())
    finally:
        run(full_layer.close())
    assert status == 503 and header_values(headers, "retry-after") == ["1"]
    assert bridge.counters["refused"] == 1


def test_no_response_in_time_is_504(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer, http_timeout=0.3) as bridge:
            return bridge, await fetch(bridge.port, "/silent")

    bridge, (status, _, body) = run(scenario())
    assert status == 504 and b"did not respond in time" in body
    assert bridge.counters["timeouts"] == 1


def test_a_path_no_route_matches_is_404_at_once(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:  # http_timeout 60 s: a 504 would come long after fetch gave up
            return bridge, await fetch(bridge.port, "/favicon.ico")

    bridge, (status, _, body) = run(scenario())
    assert status == 404 and b"no route matches" in body
    assert bridge.counters["timeouts"] == 0 and worker.dispatcher.counters.unrouted == 1


async def trickle(port: int, head: bytes, pieces: list[bytes], every: float) -> bytes:
    """Send ``head``, then one of ``pieces`` every ``every`` seconds while the server has not answered; its answer
    (everything it sent until it closed), or b"" if every piece went and it said nothing for 5 s more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for piece in pieces:
            try:
                answer = await asyncio.wait_for(reader.read(), every)
            except TimeoutError:
                writer.write(piece)
                continue
            return answer
        try:
            return await asyncio.wait_for(reader.read(), 5)
        except TimeoutError:
            return b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def test_a_head_trickled_a_line_at_a_time_is_408_at_header_timeout(run, channel_layer, caplog):
    """idle_timeout restarts with every byte: a head trickled one line every 0.3 s kept a connection forever."""

    async def scenario():
        async with serving(channel_layer, header_timeout=1, idle_timeout=60) as bridge:
            answers = await asyncio.gather(*(trickle(bridge.port, b"GET /text HTTP/1.1\r\n",
                                                     [b"X-Slow: %d\r\n" % i for i in range(40)], 0.3)
                                             for _ in range(20)))
            return answers, bridge.counters

    answers, counters = run(scenario())
    assert [status_of(answer) for answer in answers] == [408] * 20
    assert counters["slow_requests"] == 20
    assert "request head not complete within header_timeout (1 s)" in caplog.text


def test_quick_requests_on_one_connection_for_longer_than_header_timeout_are_all_served(run, channel_layer, worker):
    """header_timeout bounds each head, not the connection: one timer per connection follows the head arriving."""
    async def scenario():
        async with serving(channel_layer, header_timeout=1) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            statuses = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 2.5:  # a new head every 0.3 s, each begun in a second half-written
                writer.write(b"GET /text HTTP/1.1\r\nHost: localhost\r\n")
                await asyncio.sleep(0.3)
                writer.write(b"\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await asyncio.wait_for(reader.readexactly(length), 10)
                statuses.append(status_of(head))
            writer.close()
            return bridge, statuses

    bridge, statuses = run(scenario())
    assert len(statuses) >= 5 and set(statuses) == {200}
    assert bridge.counters.get("slow_requests", 0) == 0


def test_a_body_trickled_below_min_body_rate_is_408_and_a_steady_one_is_served(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer, header_timeout=1, min_body_rate=1000) as bridge:
            head = b"POST /inspect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 400000\r\n\r\n"
            slow = await asyncio.gather(*(trickle(bridge.port, head, [b"x"] * 40, 0.3) for _ in range(10)))
            # 40,000 bytes in pieces of 4,000 every 0.25 s: 16,000 bytes/s, well over the rate.
            steady_head = (b"POST /inspect HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                           b"Content-Length: 40000\r\n\r\n")
            steady = await trickle(bridge.port, steady_head, [b"y" * 4000] * 10, 0.25)
            return slow, steady, bridge.counters

    slow, steady, counters = run(scenario())
    assert [status_of(answer) for answer in slow] == [408] * 10
    assert b"min_body_rate (1000 bytes/s over 1 s)" in slow[0]
    assert status_of(steady) == 200, steady[:300]
    assert counters["slow_requests"] == 10


def test_a_dns_rebinding_host_is_refused_on_a_loopback_listener(run, channel_layer, worker, caplog):
    """A page on evil.example that rebinds its name to 127.0.0.1 sends Host: evil.example (and a matching Origin)."""

    async def scenario():
        async with serving(channel_layer) as bridge:  # host 127.0.0.1 and no allowed_hosts: the loopback names
            ours = [await fetch(bridge.port, "/text", headers=[("Host", host)])
                    for host in (f"127.0.0.1:{bridge.port}", f"localhost:{bridge.port}", "[::1]")]
            evil = await raw(bridge.port, b"GET /text HTTP/1.1\r\nHost: evil.example\r\n"
                                          b"Origin: http://evil.example\r\n\r\n")
        async with serving(channel_layer, allowed_hosts=["chat.example.com"]) as bridge:
            named = await fetch(bridge.port, "/text", headers=[("Host", "chat.example.com")])
            unnamed = await raw(bridge.port, b"GET /text HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with serving(channel_layer, proxy_headers=True) as bridge:  # behind a proxy, the proxy decides
            proxied = await fetch(bridge.port, "/text", headers=[("Host", "chat.example.com")])
        return ours, evil, named, unnamed, proxied

    ours, evil, named, unnamed, proxied = run(scenario())
    assert [status for status, _, _ in ours] == [200, 200, 200]
    assert status_of(evil) == 400 and b"not served here: add its name to allowed_hosts" in evil
    assert (named[0], status_of(unnamed), proxied[0]) == (200, 400, 200)
    assert "Host 'evil.example' is not served here" in caplog.text


def test_body_over_max_body_is_413_without_reading_it(run, channel_layer):
    async def scenario():
        async with serving(channel_layer, max_body=100) as bridge:
            # Only the headers are sent: the answer must not wait for the body.
            announced = await raw(bridge.port, b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n"
                                               b"Expect: 100-continue\r\n\r\n")
            # The whole chunked body, end included, in one read: it must not reach the layer cut short.
            chunked = await raw(bridge.port, b"POST /x HTTP/1.1\r\nHost: localhost\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n"
                                             b"50\r\n" + b"a" * 80 + b"\r\n50\r\n" + b"b" * 80 + b"\r\n0\r\n\r\n")
            return bridge, announced, chunked

    bridge, announced, chunked = run(scenario())
    assert status_of(announced) == 413 and b"100 Continue" not in announced
    assert status_of(chunked) == 413
    assert bridge.counters["bad_input"] == 2 and bridge.counters["sent"] == 0


def test_request_too_large_for_the_layer_is_413(run, channel_layer):
    async def scenario():
        async with serving(channel_layer, max_body=3_000_000) as bridge:
            return bridge, await fetch(bridge.port, "/upload", "POST", body=b"x" * 1_500_000)

    bridge, (status, headers, body) = run(scenario())
    assert status == 413 and b"too large for the channel layer" in body
    assert header_values(headers, "connection") == ["close"]
    assert bridge.counters["bad_input"] == 1 and bridge.counters["sent"] == 0


def test_headers_over_the_limit_are_431(run, channel_layer):
    async def scenario():
        async with serving(channel_layer, max_header_bytes=2048) as bridge:
            many = await raw(bridge.port, b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50)
                                                                        for i in range(60)) + b"\r\n")
            one_long = await raw(bridge.port, b"GET / HTTP/1.1\r\nCookie: " + b"c" * 5000 + b"\r\n\r\n")
            return many, one_long

    many, one_long = run(scenario())
    assert status_of(many) == 431 and status_of(one_long) == 431


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: twelve\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/3.0\r\n\r\n",
    b"GET noslash HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /%FF%FE HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["request-line", "header-line", "content-length", "two-lengths", "version", "target", "not-utf8", "chunk"])
def test_malformed_requests_are_400(run, channel_layer, request_bytes, caplog):
    async def scenario():
        async with serving(channel_layer) as bridge:
            return bridge, await raw(bridge.port, request_bytes)

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.http"):
        bridge, response = run(scenario())
    assert status_of(response) == 400
    assert bridge.counters["bad_input"] == 1 and bridge.counters["sent"] == 0
    assert any("bad input from 127.0.0.1:" in r.getMessage() for r in caplog.records)


# Each is read by the client without closing its side: a request the bridge would wait on fails the test (10 s).
@pytest.mark.parametrize("request_bytes, problem", [
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", b"Invalid `Transfer-Encoding` header value"),
    (b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", b"more than one Transfer-Encoding header"),
    (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     b"Transfer-Encoding in an HTTP/1.0 request"),
    (b"GET /text HTTP/1.1\r\n\r\n", b"no Host header in an HTTP/1.1 request"),
    (b"GET /text HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", b"more than one Host header"),
    (b"GET /text HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  Transfer-Encoding: chunked\r\n\r\n",
     b"Unexpected whitespace after header value"),  # llhttp's words for obs-fold
    (b"GET /text HTTP/1.1\nHost: h\n\n", b"Expected CRLF after version"),  # a bare LF
    (b"GET /text HTTP/1.1\r\nHost: h\nX-A: 1\r\n\r\n", b"Missing expected CR after header value"),
    (b"GET /text\r\n\r\n", b"HTTP version 0.9 is not served"),
], ids=["chunked-then-identity", "identity-then-chunked", "transfer-encoding-on-1.0", "no-host", "two-hosts",
        "obs-fold", "bare-lf", "bare-lf-inside", "http-0.9"])
def test_what_could_smuggle_a_request_is_400_at_once(run, channel_layer, request_bytes, problem, caplog):
    """Issue 14 §3: what twisted.web accepted (or waited on until a timeout); llhttp and the bridge refuse it."""
    async def scenario():
        async with serving(channel_layer) as bridge:
            return bridge, await raw(bridge.port, request_bytes)

    with caplog.at_level(logging.WARNING, logger="crossroads.bridges.http"):
        bridge, response = run(scenario())
    assert status_of(response) == 400 and problem in response, response
    assert bridge.counters["bad_input"] == 1 and bridge.counters["sent"] == 0
    assert any(problem.decode() in r.getMessage() for r in caplog.records)


def test_a_chunk_over_max_body_is_413_from_its_size_line(run, channel_layer):
    """Only a size line is sent (and the client waits): the answer must not wait for the chunk's data."""
    async def scenario():
        async with serving(channel_layer, max_body=100) as bridge:
            huge = await raw(bridge.port, b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"ffffffffff\r\n")
            # 64 bytes are within max_body, 64 more are not: refused at the second size line.
            second = await raw(bridge.port, b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"40\r\n" + b"a" * 64 + b"\r\n40\r\n")
            return bridge, huge, second

    bridge, huge, second = run(scenario())
    assert status_of(huge) == 413 and b"a chunk of 1099511627775 bytes takes the body over max_body (100" in huge
    assert status_of(second) == 413 and b"a chunk of 64 bytes" in second
    assert bridge.counters["bad_input"] == 2 and bridge.counters["sent"] == 0


def test_client_leaving_early_sends_http_disconnect(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"GET /hold HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert await channel_layer.receive(["test.held"], timeout=10) == ("test.held", {"path": "/hold"})
            writer.close()
            await writer.wait_closed()
            channel, message = await channel_layer.receive(["test.disconnects"], timeout=10)
            return bridge, message

    bridge, message = run(scenario())
    assert message["path"] == "/hold" and message["reply_channel"].startswith(bridge.prefix)
    assert message["protocol"] == "http"
    assert not bridge.targets


def test_unix_socket(run, channel_layer, worker, tmp_path):
    path = str(tmp_path / "http.sock")

    async def scenario():
        async with serving(channel_layer, unix_socket=path):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET /inspect HTTP/1.0\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
            return response

    response = run(scenario())
    assert status_of(response) == 200
    message = decode(json.loads(response.split(b"\r\n\r\n", 1)[1]))
    assert message["client"] is None and message["sender"] == "unix" and message["http_version"] == "1.0"
    assert message["server"] == [path, None]


def test_https(run, channel_layer, worker, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def get(port):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.request("GET", "/inspect")
            return decode(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    async def scenario():
        async with serving(channel_layer, tls_cert=str(cert), tls_key=str(key)) as bridge:
            return await asyncio.to_thread(get, bridge.port)

    assert run(scenario())["scheme"] == "https"


@pytest.mark.parametrize("problem", ["missing-file", "not-pem", "wrong-key"])  # only one of the two: test_listening
def test_tls_misconfiguration_fails_the_start(run, channel_layer, tmp_path, problem):
    import trustme

    ca = trustme.CA()
    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    ca.issue_cert("localhost").cert_chain_pems[0].write_to_path(str(cert))
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other))
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(key))
    options = {"missing-file": {"tls_cert": str(tmp_path / "nope.pem"), "tls_key": str(key)},
               "not-pem": {"tls_cert": str(key), "tls_key": str(key)},
               "wrong-key": {"tls_cert": str(cert), "tls_key": str(other)}}[problem]
    bridge = HttpBridge("web", {"port": 0, **options}, channel_layer)
    with pytest.raises(ValueError, match="tls_"):
        run(bridge.start())
    assert bridge.health["state"] == "stopped" and "start failed" in bridge.health["reason"]


def test_stop_lets_requests_in_flight_finish(run, channel_layer, worker):
    async def scenario():
        bridge = HttpBridge("web", {"port": 0}, channel_layer)
        await bridge.start()
        pending = asyncio.ensure_future(fetch(bridge.port, "/held-then-answered"))
        assert await channel_layer.receive(["test.held"], timeout=10) == ("test.held", {"path": "/held-then-answered"})
        seen_stopping = asyncio.Event()
        bridge.health_listeners.append(lambda health: health["state"] == "stopping" and seen_stopping.set())
        stopping = asyncio.ensure_future(bridge.stop(timeout=10))
        await asyncio.wait_for(seen_stopping.wait(), 5)
        assert not stopping.done(), "stop() did not wait for the response in flight"
        await channel_layer.send("test.release", {})
        answer = await pending
        await stopping
        return bridge, answer

    bridge, (status, _, body) = run(scenario())
    assert status == 200 and body == b"released"
    assert bridge.health["state"] == "stopped"


def test_requests_arriving_while_stopping_are_503(run, channel_layer, worker):
    async def scenario():
        bridge = HttpBridge("web", {"port": 0}, channel_layer)
        await bridge.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)  # open before the stop
        pending = asyncio.ensure_future(fetch(bridge.port, "/held-then-answered"))
        await channel_layer.receive(["test.held"], timeout=10)
        seen_stopping = asyncio.Event()
        bridge.health_listeners.append(lambda health: health["state"] == "stopping" and seen_stopping.set())
        stopping = asyncio.ensure_future(bridge.stop(timeout=10))
        await asyncio.wait_for(seen_stopping.wait(), 5)
        writer.write(b"GET /text HTTP/1.1\r\nHost: localhost\r\n\r\n")
        late = await asyncio.wait_for(reader.read(), 10)  # read() ends: the bridge closes after answering
        writer.close()
        await writer.wait_closed()
        await channel_layer.send("test.release", {})
        await pending
        await stopping
        return late

    late = run(scenario())
    assert status_of(late) == 503
    head = late.split(b"\r\n\r\n")[0].lower()
    assert b"\r\nretry-after: 1" in head and b"\r\nconnection: close" in head


# -- the daemons over Redis ----------------------------------------------------------------------------------


HTTP_CONFIG = """[layer]
url = "{url}"
prefix = "{prefix}"

[routing]
app = "apps.http_app:routes"

[bridges.web]
type = "crossroads.bridges.http.bridge:HttpBridge"
host = "127.0.0.1"
port = {port}
http_timeout = 5
max_body = 1000
proxy_headers = "${{HTTP_PROXY_HEADERS}}"
"""


def test_crossroads_check_accepts_the_options(tmp_path, monkeypatch):
    config = write_config(tmp_path, HTTP_CONFIG.format(url="memory://", prefix="x", port=8080))
    import test_cli

    monkeypatch.setitem(test_cli.ENV, "HTTP_PROXY_HEADERS", "true")
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    bad = write_config(tmp_path, HTTP_CONFIG.format(url="memory://", prefix="x", port=8080)
                       .replace("max_body = 1000", "max_body = -1"))
    result = run_cli("check", "--config", str(bad))
    assert result.returncode != 0 and "max_body" in result.stderr and "bridges.web" in result.stderr


def test_bridge_and_worker_as_separate_daemons_over_redis(tmp_path, redis_server, monkeypatch, daemons):
    import test_cli

    monkeypatch.setitem(test_cli.ENV, "HTTP_PROXY_HEADERS", "false")
    port = free_port()
    config = str(write_config(tmp_path, HTTP_CONFIG.format(url=redis_server.url, prefix="httpd", port=port)))
    bridge, worker = bridge_and_worker(tmp_path, daemons, "web", config, port)
    status, headers, body = _fetch(port, "GET", "/text", None, [])
    assert status == 200 and body == "héllo from text".encode()
    status, _, body = _fetch(port, "GET", "/stream", None, [])
    assert status == 201 and body == b"first,second,third"
    status, _, _ = _fetch(port, "POST", "/inspect", b"x" * 2000, [])
    assert status == 413
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 400 ")
    log = bridge.terminate()
    assert '"GET /text HTTP/1.1" 200' in log, log
    worker.terminate()


def test_systemd_socket_activation(tmp_path, redis_server):
    """systemd-socket-activate (systemd's own tool) holds the port and passes it, named, to `crossroads bridge`."""
    from test_daemons import socket_activated

    port = free_port()
    config = str(write_config(tmp_path, HTTP_CONFIG.format(url=redis_server.url, prefix="activated", port=1)
                              .replace('proxy_headers = "${HTTP_PROXY_HEADERS}"', 'systemd_socket = "web"')))
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    bridge = socket_activated(f"127.0.0.1:{port}", "web", "bridge", "web", "--config", config)
    try:
        worker.wait_ready()
        wait_for_port(port, bridge)  # the port is open before the bridge runs: systemd's point
        status, _, body = _fetch(port, "GET", "/text", None, [])  # the first connection starts the bridge
        assert status == 200 and body == "héllo from text".encode()
        bridge.terminate()
        log = bridge.communicate(timeout=30)[0]
        assert '"GET /text HTTP/1.1" 200' in log, log
        worker.terminate()
    finally:
        if bridge.poll() is None:
            bridge.kill()
        worker.close()


def test_systemd_socket_missing_is_explained(run, channel_layer):
    bridge = HttpBridge("web", {"systemd_socket": "web"}, channel_layer)
    with pytest.raises(OptionError, match=r"systemd_socket: systemd passed no listening socket named 'web'; "
                                          r"start this bridge through a .socket unit with FileDescriptorName=web"):
        run(bridge.start())


def test_a_bridge_that_cannot_start_stops_the_process_with_its_reason(tmp_path):
    config = write_config(tmp_path, HTTP_CONFIG.format(url="memory://", prefix="x", port=1).replace(
        'proxy_headers = "${HTTP_PROXY_HEADERS}"', 'systemd_socket = "web"'))
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "could not start: systemd_socket: systemd passed no listening socket named 'web'" in result.stderr
    assert "Traceback" not in result.stderr  # the worker that never started is not a second failure


def test_a_burst_of_connections_waits_in_the_listen_queue_while_the_bridge_is_busy(run, channel_layer, worker):
    """300 clients connect while the bridge accepts nobody (busy): the kernel holds them all, none is dropped."""
    async def connect_one(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)

    async def scenario():
        async with serving(channel_layer) as bridge:
            bridge.listening.stopReading()  # as if the reactor were busy elsewhere: nothing is accepted
            clients = await asyncio.gather(*(connect_one(bridge.port) for _ in range(300)), return_exceptions=True)
            refused = [c for c in clients if isinstance(c, BaseException)]
            bridge.listening.startReading()
            statuses = []
            for reader, writer in (c for c in clients if not isinstance(c, BaseException)):
                writer.write(b"GET /text HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                statuses.append(status_of(await asyncio.wait_for(reader.read(), 10)))
                writer.close()
            return refused, statuses

    refused, statuses = run(scenario())
    assert not refused, f"{len(refused)} of 300 connections were not taken into the listen queue"
    assert statuses == [200] * 300


# -- request bodies over max_body, streamed on a body_channel ------------------------------------------------


def test_a_body_over_max_body_is_streamed_to_the_consumer_in_parts(run, channel_layer, worker):
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB

    async def scenario():
        async with serving(channel_layer, max_body=1000, max_upload=10_000_000) as bridge:
            large = await fetch(bridge.port, "/upload", "POST", body=body)
            small = await fetch(bridge.port, "/upload", "POST", body=b"tiny")
            over = await raw(bridge.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000001\r\n\r\n")
            return large, small, over

    large, small, over = run(scenario())
    answer = json.loads(large[2])
    assert large[0] == 200 and answer["size"] == len(body) and answer["streamed"]
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    # parts of 256 KiB plus what one read of the socket adds (64 KiB): never the body whole
    assert answer["parts"] >= len(body) // (320 * 1024), "the body came in parts of about 256 KiB"
    assert json.loads(small[2]) == {"size": 4, "sha256": hashlib.sha256(b"tiny").hexdigest(), "parts": 0,
                                    "streamed": False}
    assert status_of(over) == 413 and b"max_upload (10000000 bytes)" in over, "refused before the body was read"


def test_a_streamed_body_from_a_host_not_allowed_is_400_before_the_layer(run, channel_layer, worker):
    """allowed_hosts holds for a request sent on at its head, too (main's twisted.web path let it through)."""
    async def scenario():
        async with serving(channel_layer, max_body=1000, max_upload=10_000_000) as bridge:
            answer = await raw(bridge.port, b"POST /upload HTTP/1.1\r\nHost: evil.example\r\n"
                                            b"Content-Length: 5000\r\n\r\n")
            return bridge, answer

    bridge, answer = run(scenario())
    assert status_of(answer) == 400 and b"allowed_hosts" in answer, answer
    assert bridge.counters["bad_input"] == 1 and bridge.counters["sent"] == 0


def test_a_consumer_may_answer_before_reading_a_streamed_body(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer, max_body=1000, max_upload=10_000_000) as bridge:
            refused = await fetch(bridge.port, "/upload-refused", "POST", body=b"x" * 3_000_000)
            after = await fetch(bridge.port, "/text")
            return refused, after

    refused, after = run(scenario())
    assert refused[0] == 403 and refused[2] == b"not wanted"
    assert after[0] == 200


def test_a_client_leaving_mid_upload_ends_the_consumers_read(run, channel_layer, worker):
    async def scenario():
        async with serving(channel_layer, max_body=1000, max_upload=10_000_000) as bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\n"
                         + b"x" * 600_000)
            await writer.drain()
            await wait_until_async(lambda: bridge.counters["sent"] >= 1, "the request to reach the layer")
            writer.close()
            await writer.wait_closed()
            await wait_until_async(lambda: worker.dispatcher.counters.errors >= 1,
                                   "the consumer's read to end with BodyUnavailable")
            return await fetch(bridge.port, "/text")

    after = run(scenario())
    assert worker.dispatcher.counters.errors == 1, "the consumer's read did not end when its client left"
    assert after[0] == 200, "the worker thread was freed"
