"""The Slack side of ``bench/slack.py``: the tests' emulator in a process of its own, driven over stdin/stdout.

Owns the load and every measurement of the Slack benchmark: it sends the envelopes, sees the acks and the
posts that come back, and times both on its clock. Run as ``python bench/slack_peer.py`` with ``.venv``'s
interpreter (it imports ``tests/slack_emulator.py``), pinned by the harness to the load core.

``BenchEmulator`` is tests/slack_emulator.py's ``SlackEmulator`` (its Web API answers, tokens,
``apps.connections.open`` tickets, ``hello``) with three paths replaced for speed, so that the emulator is not
what is measured: the tests' Socket Mode handler keeps its pending envelopes in a list it scans on every ack and
every send (fine for a test's dozen, quadratic for a flood of thousands), ``chat.postMessage`` records every call
and the channel's history, and every request goes through aiohttp's server. Here un-acked envelopes sit in a dict
by id, a post is a timestamp by sequence number (its token, arguments and the per-channel limiter checked as the
base checks them), and the Web API is served by ``WebAPIServer``, a small llhttp-parsed HTTP/1.1 protocol on a
port of its own (the WebSocket stays on aiohttp's low-level server).

The protocol, one JSON object a line: it prints ``{"ready": true, "api_url": ...}`` once it listens; then for
each command on stdin one answer on stdout:

- ``{"cmd": "connected", "timeout": s}``: waits until a Socket Mode client said hello (``{"connected": true}``);
- ``{"cmd": "flood", "run": name, "count": n, "window": w, "rate": r or null, "channels": [...],
  "posts": bool, "idle": s}``: sends ``n`` ``message`` events as ``events_api`` envelopes on the newest socket,
  never more than ``w`` un-acked at once, paced at ``r`` per second when given, each channel in turn; then
  waits for every ack and, with ``posts``, every post back (a post's text is the event's, ``"<run> <seq>"``),
  giving up on what has not come ``idle`` seconds after the last arrival. Answers the timings in ns;
- ``{"cmd": "stop"}``: exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import httptools
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from slack_emulator import Call, SlackEmulator  # noqa: E402  (after the sys.path fix)

USER = "U222"  # who posts the events: a user other than the bot, so the bridge does not skip them


class BenchEmulator(SlackEmulator):
    def __init__(self, channels: dict[str, str]) -> None:
        # No rate limit on chat.postMessage: the bridge's own limiter is opened wide by the harness, and a 429
        # would measure Slack's policy, not the bridge.
        super().__init__(posts_per_window=10**9, users={USER: "alice"}, channels=channels)
        self.ws: web.WebSocketResponse | None = None
        self.connected = asyncio.Event()
        self.waiting: dict[str, int] = {}  # envelope_id -> seq, sent and not acked
        self.window_open = asyncio.Event()
        self.progress = asyncio.Event()  # set on every ack and post
        self.run = ""
        self.sent_ns: list[int] = []
        self.acked_ns: list[int] = []
        self.posted_ns: list[int] = []
        self.acks = 0  # type: ignore[assignment]  (a count here; the base's dict of ack frames is not kept)
        self.posts = 0
        self.stray_acks = 0  # acks of envelopes not waiting (a repeat, or an earlier run's)

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._open_link(request, 1)
        self.ws = ws
        self.hellos += 1
        self.connected.set()
        async for frame in ws:
            if frame.type == aiohttp.WSMsgType.TEXT:
                now = time.monotonic_ns()
                seq = self.waiting.pop(json.loads(frame.data).get("envelope_id"), None)
                if seq is None:
                    self.stray_acks += 1
                    continue
                self.acked_ns[seq] = now
                self.acks += 1
                self.window_open.set()
                self.progress.set()
        if self.ws is ws:
            self.ws = None
            self.connected.clear()
        return ws

    def _chat_postMessage(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The base's checks and per-channel limiter (opened wide here), then a timestamp instead of the history."""
        now = time.monotonic_ns()
        channel = args.get("channel")
        if not channel:
            return self._error("channel_not_found")
        text = args.get("text")
        if not text and not args.get("blocks"):
            return self._error("no_text")
        limited = self._limit_post(channel)
        if limited is not None:
            return limited
        run, _, seq = str(text or "").partition(" ")
        if run == self.run and seq.isdigit() and int(seq) < len(self.posted_ns) and not self.posted_ns[int(seq)]:
            self.posted_ns[int(seq)] = now
            self.posts += 1
            self.progress.set()
        return self._ok(channel=channel, ts=self._next_ts())

    async def start(self) -> BenchEmulator:
        """aiohttp's low-level server for Socket Mode (the WebSocket), ``WebAPIServer`` on a port of its own for the
        Web API."""
        self._runner = web.ServerRunner(web.Server(self._dispatch, access_log=None), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # apps.connections.open's URLs point here
        loop = asyncio.get_running_loop()
        self.api_server = await loop.create_server(lambda: WebAPIServer(self), "127.0.0.1", 0)
        self.api_port = self.api_server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.api_server.close()
        await super().stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/"

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/link/":
            return await self._link(request)
        return web.Response(status=404, text="not found")

    def api_call(self, method: str, token: str | None, args: dict[str, Any]) -> tuple[int, dict[str, Any],
                                                                                      dict[str, str]]:
        """One Web API call, answered by the base's ``_answer`` (the token checked, then the method). Every call is
        recorded in ``calls`` as the base records it but ``chat.postMessage``: a flood's would be memory for
        nothing, its timestamp is kept instead."""
        call = Call(method, token, args)
        status, answer, headers = self._answer(call)
        if method != "chat.postMessage":
            call.status, call.answer = status, answer
            self.calls.append(call)
            self._changed()
        return status, answer, headers


    def frames(self, run: str, count: int, channels: list[str]) -> list[tuple[str, str]]:
        """(envelope id, frame) of every event of a run, built before the clock starts."""
        built = []
        for seq in range(count):
            envelope_id = f"{run}-{seq}"
            ts = f"{1700000000 + seq}.{abs(hash(run)) % 1000000:06d}"
            event = {"type": "message", "channel": channels[seq % len(channels)], "user": USER, "text": f"{run} {seq}",
                     "ts": ts, "event_ts": ts, "channel_type": "channel"}
            payload = self.event_callback(event, event_id=f"Ev{run}{seq}")
            built.append((envelope_id, json.dumps({"envelope_id": envelope_id, "payload": payload,
                                                   "type": "events_api", "accepts_response_payload": False,
                                                   "retry_attempt": 0, "retry_reason": ""})))
        return built

    async def flood(self, spec: dict[str, Any]) -> dict[str, Any]:
        count, window, rate = spec["count"], spec["window"], spec.get("rate")
        frames = self.frames(spec["run"], count, spec["channels"])
        self.run = spec["run"]
        self.sent_ns, self.acked_ns, self.posted_ns = [0] * count, [0] * count, [0] * count
        self.acks = self.posts = self.stray_acks = 0
        self.waiting.clear()
        ws = self.ws
        if ws is None:
            raise RuntimeError("no Socket Mode connection")
        cpu_before, wall_before, waited_before = time.process_time(), time.monotonic(), waited_ns()
        start = time.monotonic_ns()
        for seq, (envelope_id, frame) in enumerate(frames):
            while len(self.waiting) >= window:
                self.window_open.clear()
                await self.window_open.wait()
            if rate:
                due = start + int(seq * 1e9 / rate)
                ahead = due - time.monotonic_ns()
                if ahead > 0:
                    await asyncio.sleep(ahead / 1e9)
            self.waiting[envelope_id] = seq
            self.sent_ns[seq] = time.monotonic_ns()
            await ws.send_str(frame)
        sent_all_ns = time.monotonic_ns()
        want_posts = spec.get("posts", False)
        while self.acks < count or (want_posts and self.posts < count):
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), spec.get("idle", 5.0))
            except TimeoutError:
                break  # nothing new for idle seconds: what is missing is lost
        cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
        waited = (waited_ns() - waited_before) / 1e9
        acked = [i for i in range(count) if self.acked_ns[i]]
        posted = [i for i in range(count) if self.posted_ns[i]]
        return {"count": count, "window": window, "rate": rate, "start_ns": start, "sent_all_ns": sent_all_ns,
                "acked": len(acked), "posts": len(posted), "stray_acks": self.stray_acks,
                "last_ack_ns": max((self.acked_ns[i] for i in acked), default=0),
                "last_post_ns": max((self.posted_ns[i] for i in posted), default=0),
                "ack_ns": [self.acked_ns[i] - self.sent_ns[i] for i in acked],
                "round_trip_ns": [self.posted_ns[i] - self.sent_ns[i] for i in posted],
                "emulator_cpu_s": cpu, "emulator_wall_s": wall,
                "emulator_waited_s": waited}


class WebAPIServer(asyncio.BufferedProtocol):
    """The emulator's Web API over HTTP/1.1 keep-alive, parsed by llhttp (httptools), without aiohttp's server.

    Why: the bench's emulator answers a ``chat.postMessage`` per event, and aiohttp's server (request and response
    objects, its stream reader and writer, a task per request) spent ~100 µs of the emulator's core on each: with
    the emulator on a core of its own, that capped every receiver that posts at ~9,000 posts/s, whatever the
    receiver. This answers the same calls the same way (``SlackEmulator._answer``: token, method, arguments, the
    per-channel limiter) at a fraction of that. What a Web API client sends: ``POST`` or ``GET`` to ``/api/{method}``,
    arguments in the query string, a JSON or form-encoded body, the token as ``Authorization: Bearer`` or a
    ``token`` argument. Requests on one connection are answered in order (pipelined ones too). Read into a buffer of
    its own (``BufferedProtocol``): a plain Protocol's every read allocates asyncio's 256 KiB ``recv`` buffer, which
    in this process meant an mmap, an mremap and a munmap per request (strace -c).
    """

    def __init__(self, emulator: BenchEmulator) -> None:
        self.emulator = emulator
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.authorization = b""
        self.content_type = b""
        self.body: list[bytes] = []
        self.buffer = memoryview(bytearray(65536))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.parser.feed_data(self.buffer[:nbytes])  # llhttp's callbacks get copies (bytes)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        self.url, self.authorization, self.content_type, self.body = b"", b"", b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"authorization":
            self.authorization = value
        elif name == b"content-type":
            self.content_type = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path, _, query = self.url.decode("latin-1").partition("?")
        if not path.startswith("/api/"):
            self._answer(404, {"ok": False, "error": "not_found"}, {})
            return
        args: dict[str, Any] = dict(parse_qsl(query)) if query else {}
        body = b"".join(self.body)
        if body:
            try:
                if self.content_type.startswith(b"application/json"):
                    args.update(json.loads(body))
                else:
                    args.update(parse_qsl(body.decode()))
            except (ValueError, TypeError):
                self._answer(400, {"ok": False, "error": "invalid_arguments"}, {})
                return
        auth = self.authorization.decode("latin-1")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else args.pop("token", None)
        self._answer(*self.emulator.api_call(path[len("/api/"):], token, args))

    def _answer(self, status: int, answer: dict[str, Any], headers: dict[str, str]) -> None:
        body = json.dumps(answer).encode()
        more = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                             b"Content-Length: %d\r\n%s%s\r\n%s"
                             % (status, REASONS.get(status, b"Status"), len(body), more,
                                b"" if keep_alive else b"Connection: close\r\n", body))
        if not keep_alive:
            self.transport.close()


REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests"}


def waited_ns() -> int:
    """Nanoseconds this thread (the loop's) has waited runnable for a core: on a shared machine, the time others
    took from the emulator (the second field of /proc/thread-self/schedstat; 0 where there is none)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


async def serve(channels: dict[str, str]) -> None:
    emulator = await BenchEmulator(channels).start()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def read() -> None:  # stdin in a thread: the loop stays free for the sockets
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, '{"cmd": "stop"}')

    threading.Thread(target=read, daemon=True).start()
    emit({"ready": True, "api_url": emulator.api_url, "bot_token": emulator.bot_token,
          "app_token": emulator.app_token})
    try:
        while True:
            command = json.loads(await commands.get())
            if command["cmd"] == "stop":
                return
            if command["cmd"] == "connected":
                try:
                    await asyncio.wait_for(emulator.connected.wait(), command.get("timeout", 60))
                    emit({"connected": True})
                except TimeoutError:
                    emit({"connected": False})
            elif command["cmd"] == "flood":
                try:
                    emit(await emulator.flood(command))
                except (RuntimeError, ConnectionError) as exc:
                    emit({"error": str(exc)})
    finally:
        await emulator.stop()


def main() -> None:
    channels = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    asyncio.run(serve(channels))


if __name__ == "__main__":
    main()
