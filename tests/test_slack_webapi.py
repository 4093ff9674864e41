"""The Slack bridge's own Web API client (bridges/slack/webapi.py) against the emulator and against raw servers.

The emulator answers as Slack does (ok, errors, 429 with Retry-After); a raw asyncio server on a free port
plays what the emulator cannot: a kept-alive connection closed while idle, a chunked answer, one that is not
JSON, one cut mid-way, one that never comes. A bridge-level test checks that a post Slack refuses is counted
in ``not_delivered`` and the next one goes on (docs/spec/slack.md, "Rate limits and order").
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable

import httptools
import pytest
from servers import take, write_test_certificates
from slack_emulator import SlackEmulator
from test_slack_bridge import bridging, post, reply, texts

from crossroads.bridges.slack import webapi
from crossroads.bridges.slack.webapi import WebAPI

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def test_posts_errors_and_429_as_slack_answers_them(run):
    async def scenario():
        async with SlackEmulator(posts_per_window=1, window=60.0) as emulator:
            api = WebAPI(emulator.api_url, emulator.bot_token)
            posted = await api.call("chat.postMessage", {"channel": "C1", "text": "a &amp; b", "thread_ts": "1.2"})
            limited = await api.call("chat.postMessage", {"channel": "C1", "text": "again"})
            refused = await api.call("chat.postMessage", {"channel": "", "text": "nowhere"})
            wrong = await WebAPI(emulator.api_url, "xoxb-wrong").call("chat.postMessage",
                                                                      {"channel": "C2", "text": "x"})
            api.close()
            return emulator, posted, limited, refused, wrong

    emulator, posted, limited, refused, wrong = run(scenario())
    status, answer, retry_after = posted
    assert status == 200 and answer["ok"] and answer["channel"] == "C1" and retry_after is None
    assert emulator.history["C1"][0]["text"] == "a &amp; b" and emulator.history["C1"][0]["thread_ts"] == "1.2"
    call = emulator.calls_to("chat.postMessage")[0]
    assert call.token == emulator.bot_token and call.args["text"] == "a &amp; b"
    status, answer, retry_after = limited
    assert status == 429 and answer["error"] == "ratelimited" and float(retry_after) >= 1
    assert refused[0] == 200 and refused[1] == {"ok": False, "error": "channel_not_found"}
    assert wrong[1]["error"] == "invalid_auth"


async def serving(answer: Answer, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, str, list[bytes]]:
    """A raw HTTP(S) server on a free port: each request's head and body recorded, ``answer`` writes the answer."""
    requests: list[bytes] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                requests.append(head + await reader.readexactly(length))
                await answer(reader, writer, len(requests))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{port}/api/", requests


def json_answer(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def test_a_connection_closed_while_idle_is_replaced_and_the_request_sent_once_more(run):
    async def answer(reader, writer, n):
        writer.write(json_answer())
        await writer.drain()
        writer.close()  # no "Connection: close": the client believes it kept alive

    async def scenario():
        server, url, requests = await serving(answer)
        api = WebAPI(url, "xoxb-t")
        answers = [await api.call("chat.postMessage", {"channel": "C1", "text": str(n)}) for n in range(3)]
        api.close()
        server.close()
        return answers, requests

    answers, requests = run(scenario())
    assert [a[:2] for a in answers] == [(200, {"ok": True})] * 3
    assert [json.loads(r.rpartition(b"\r\n\r\n")[2]) for r in requests] == [{"channel": "C1", "text": str(n)}
                                                                             for n in range(3)]
    head = requests[0].partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /api/chat.postMessage HTTP/1.1"
    assert b"Authorization: Bearer xoxb-t" in head and b"Content-Type: application/json; charset=utf-8" in head


def test_kept_alive_connections_are_reused_and_chunked_answers_read(run):
    async def answer(reader, writer, n):
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b'{"ok"', b': false, "error": "limited"}', b""))
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunks)
        await writer.drain()

    async def scenario():
        server, url, requests = await serving(answer)
        api = WebAPI(url, "xoxb-t")
        answers = [await api.call("reactions.add", {"name": "x"}) for _ in range(3)]
        api.close()
        server.close()
        return answers, requests

    answers, requests = run(scenario())
    assert answers == [(429, {"ok": False, "error": "limited"}, "7")] * 3
    assert len(requests) == 3  # the server's one connection read all three: it was kept alive


def test_calls_beyond_the_connections_wait_for_one_and_time_out_there(run, monkeypatch):
    monkeypatch.setattr(webapi, "CONNECTIONS", 2)
    release = two_in = None

    async def answer(reader, writer, n):
        if n >= 2:
            two_in.set()
        await release.wait()  # every answer held until all calls are made: two connections are busy meanwhile
        writer.write(json_answer())
        await writer.drain()

    async def scenario():
        nonlocal release, two_in
        release, two_in = asyncio.Event(), asyncio.Event()
        server, url, requests = await serving(answer)
        api = WebAPI(url, "xoxb-t")
        calls = [asyncio.ensure_future(api.call("chat.postMessage", {"text": str(n)})) for n in range(6)]
        await asyncio.wait_for(two_in.wait(), 10)
        busy, waiting = api.busy, len(api.waiting)
        release.set()
        answers = await asyncio.gather(*calls)
        made = len(requests)
        short = WebAPI(url, "xoxb-t", timeout=0.3)
        release.clear()
        held = [asyncio.ensure_future(short.call("chat.postMessage", {})) for _ in range(3)]
        outcomes = await asyncio.gather(*held, return_exceptions=True)
        release.set()
        for client in (api, short):
            client.close()
        server.close()
        return busy, waiting, answers, made, len(api.idle), outcomes

    busy, waiting, answers, made, idle, outcomes = run(scenario())
    assert (busy, waiting) == (2, 4)
    assert [a[:2] for a in answers] == [(200, {"ok": True})] * 6 and made == 6
    assert idle <= 2
    assert [type(o) for o in outcomes] == [TimeoutError] * 3  # two on their connections, one waiting for a slot


@pytest.mark.parametrize("answer_bytes", [
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\n\r\n<html/>!!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[1,2]",
])
def test_an_answer_that_is_not_a_json_object_is_an_error_answer(run, answer_bytes):
    async def answer(reader, writer, n):
        writer.write(answer_bytes)
        await writer.drain()

    async def scenario():
        server, url, _ = await serving(answer)
        api = WebAPI(url, "xoxb-t")
        got = await api.call("chat.postMessage", {})
        api.close()
        server.close()
        return got

    status, answer_dict, _ = run(scenario())
    assert answer_dict["ok"] is False and "not a JSON object" in answer_dict["error"]
    assert status == int(answer_bytes.split(b" ")[1])


def test_an_answer_cut_midway_or_never_sent_raises(run):
    async def cut(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"ok\":")
        await writer.drain()
        writer.transport.abort()

    async def silent(reader, writer, n):
        await reader.read()  # no answer; returns when the client, given up, closes

    async def scenario():
        cut_server, cut_url, _ = await serving(cut)
        silent_server, silent_url, _ = await serving(silent)
        outcomes = []
        for api in (WebAPI(cut_url, "xoxb-t"), WebAPI(silent_url, "xoxb-t", timeout=0.5)):
            try:
                await api.call("chat.postMessage", {})
            except (ConnectionError, TimeoutError) as exc:
                outcomes.append(type(exc))
            api.close()
        for server in (cut_server, silent_server):
            server.close()
        return outcomes

    assert run(scenario()) == [ConnectionError, TimeoutError]


def test_https_is_verified_against_the_trusted_cas(run, tmp_path):
    certificates = write_test_certificates(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificates["cert"], certificates["key"])
    trusting = ssl.create_default_context(cafile=certificates["ca"])

    async def answer(reader, writer, n):
        writer.write(json_answer())
        await writer.drain()

    async def scenario():
        server, url, requests = await serving(answer, server_tls)
        api = WebAPI(url, "xoxb-t", ssl_context=trusting)
        got = [await api.call("chat.postMessage", {"n": n}) for n in range(2)]
        api.close()
        try:  # the system's CAs (the default) do not know the test CA: refused before a byte is sent
            await WebAPI(url, "xoxb-t").call("chat.postMessage", {"n": 2})
        except ssl.SSLCertVerificationError as exc:
            got.append(exc)
        server.close()
        return got, requests

    got, requests = run(scenario())
    assert [g[:2] for g in got[:2]] == [(200, {"ok": True})] * 2
    assert isinstance(got[2], ssl.SSLCertVerificationError) and isinstance(got[2], OSError)  # the bridge retries it
    assert len(requests) == 2


def test_a_refused_connection_raises_a_connection_error(run):
    async def scenario():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        try:
            await WebAPI(f"http://127.0.0.1:{port}/api/", "xoxb-t").call("chat.postMessage", {})
        except OSError as exc:
            return exc
        return None

    assert isinstance(run(scenario()), ConnectionError)


class Refusing(SlackEmulator):
    """Refuses posts whose text is "refused", as Slack refuses one it cannot take (``msg_too_long``, ...)."""

    def _chat_postMessage(self, args):
        if args.get("text") == "refused":
            return self._error("not_in_channel")
        return super()._chat_postMessage(args)


def test_a_post_slack_refuses_is_counted_and_the_next_goes_on(run, caplog):
    async def scenario():
        async with Refusing() as emulator, bridging(emulator, {"rate": 100, "burst": 100}) as bridge:
            await emulator.send_event(post("hi", "1700000001.000100"))
            message = await take(bridge.layer, "slack.receive")
            for text in ("one", "refused", "two"):
                await reply(bridge, message, {"text": text})
            await emulator.wait_for(lambda: len(texts(emulator, "C111")) == 2, what="the posts around the refused")
            return bridge, emulator

    bridge, emulator = run(scenario())
    assert texts(emulator, "C111") == ["one", "two"]
    assert bridge.counters["not_delivered"] == 1 and bridge.counters["posted"] == 2
    assert any("chat.postMessage to C111 failed: not_in_channel" in r.getMessage() for r in caplog.records)


def test_retry_after_is_read_from_the_head_as_llhttp_reads_the_header():
    heads = [b"Retry-After: 7", b"retry-after:7", b"RETRY-AFTER: \t 30 ", b"Retry-After:", b"X-Retry-After: 3",
             b"Retry-After: 1\r\nRetry-After: 2", b"Content-Type: application/json", b"Retry-Afterx: 4"]

    class Headers:
        def __init__(self):
            self.found = None

        def on_header(self, name, value):
            if name.lower() == b"retry-after":
                self.found = value.decode("latin-1")

    for head in heads:
        answer = b"HTTP/1.1 429 Too Many Requests\r\n%s\r\nContent-Length: 2\r\n\r\n{}" % head
        headers = Headers()
        httptools.HttpResponseParser(headers).feed_data(answer)
        assert webapi._retry_after_of(answer) == headers.found, head


def test_retry_after_is_read_from_an_answer_that_came_in_pieces(run):
    async def answer(reader, writer, n):
        whole = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 12\r\n" \
                b"Content-Length: 13\r\n\r\n{\"ok\": false}"
        for at in range(0, len(whole), 9):
            if at:
                await asyncio.sleep(0.001)  # each piece read on its own
            writer.write(whole[at:at + 9])
            await writer.drain()

    async def scenario():
        server, url, requests = await serving(answer)
        api = WebAPI(url, "xoxb-t")
        answered = await api.call("chat.postMessage", {"channel": "C1", "text": "x"})
        api.close()
        server.close()
        return answered

    assert run(scenario()) == (429, {"ok": False}, "12")
