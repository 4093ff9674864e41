"""An offline Slack for the tests: the Web API methods the bridge calls, Socket Mode, and Events API deliveries.

Slack cannot be reached from here, so this aiohttp server on a free port plays
it, closely enough that the real slack-sdk clients run against it unchanged:

- the Web API at ``/api/{method}`` (point ``AsyncWebClient(base_url=emulator.api_url)`` at it): ``auth.test``,
  ``apps.connections.open``, ``chat.postMessage`` (at most ``posts_per_window`` posts per channel in
  ``window`` seconds, beyond which it answers 429 with ``Retry-After``, as Slack does), ``chat.update``,
  ``chat.postEphemeral``, ``reactions.add``, ``users.info``, ``conversations.info``. Every call is
  recorded in ``calls``; a wrong token gets ``invalid_auth``, none ``not_authed``, both with HTTP 200
  and ``ok: false`` as Slack answers them.
- Socket Mode at ``/link`` (the URL ``apps.connections.open`` hands out, one ticket per call): ``hello``
  first, then the envelopes a test queues, in order; acks recorded; envelopes not acked when their
  socket closes, or when a test calls ``redeliver``, come again with ``retry_attempt`` raised;
  ``disconnect`` frames and silent TCP drops (nothing read, nothing sent, pings unanswered) on demand.
- Events API deliveries: ``deliver`` POSTs a payload signed the way Slack signs (``v0=`` and
  HMAC-SHA256 of ``v0:{timestamp}:{body}`` with the signing secret) and retries with
  ``X-Slack-Retry-Num``/``X-Slack-Retry-Reason`` while the answer is not a 2xx (at once, not after
  Slack's minutes: the tests wait on events, not clocks).

Frame and payload shapes follow slack-sdk's own test mocks (tests/slack_sdk/socket_mode/
mock_socket_mode_server.py, tests/slack_sdk/web/mock_web_api_handler.py). Tests wait with
``wait_for(predicate)``, which wakes on every change the emulator records, with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

TEXT_LIMIT = 40_000
BOT_METHODS = {"auth.test", "chat.postMessage", "chat.update", "chat.postEphemeral", "reactions.add", "users.info",
               "conversations.info"}


@dataclass
class Call:
    """One Web API call as the emulator received it: method, token used, arguments merged, and the answer."""

    method: str
    token: str | None
    args: dict[str, Any]
    status: int = 200
    answer: dict[str, Any] = field(default_factory=dict)


@dataclass
class Envelope:
    """A Socket Mode envelope waiting for its ack."""

    envelope_id: str
    type: str
    payload: dict[str, Any]
    accepts_response_payload: bool
    retry_attempt: int = 0
    retry_reason: str = ""
    sent_on: Any = None  # the socket it last went out on

    def frame(self) -> str:
        frame = {"envelope_id": self.envelope_id, "payload": self.payload, "type": self.type,
                 "accepts_response_payload": self.accepts_response_payload}
        if self.type == "events_api":
            frame.update(retry_attempt=self.retry_attempt, retry_reason=self.retry_reason)
        return json.dumps(frame)


@dataclass
class Delivery:
    """One Events API POST and the answer it got."""

    attempt: int
    headers: dict[str, str]
    body: bytes
    status: int
    answer: bytes
    answer_headers: dict[str, str]


def slack_signature(secret: str, timestamp: str, body: bytes) -> str:
    """Slack's request signature: ``v0=`` and HMAC-SHA256 of ``v0:{timestamp}:{body}`` keyed by the signing secret."""
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


class SlackEmulator:
    def __init__(self, *, bot_token: str = "xoxb-emulator", app_token: str = "xapp-emulator",
                 signing_secret: str = "emulator-signing-secret", team: str = "T111", user_id: str = "U111",
                 bot_id: str = "B111", app_id: str = "A111", posts_per_window: int = 3, window: float = 1.0,
                 users: dict[str, str] | None = None, channels: dict[str, str] | None = None) -> None:
        self.bot_token, self.app_token, self.signing_secret = bot_token, app_token, signing_secret
        self.team, self.user_id, self.bot_id, self.app_id = team, user_id, bot_id, app_id
        self.posts_per_window, self.window = posts_per_window, window
        self.users = {user_id: "crossroads", **(users or {})}
        self.channels = dict(channels or {})
        self.calls: list[Call] = []
        self.history: dict[str, list[dict[str, Any]]] = {}  # channel -> messages posted, in order
        self.ephemeral: list[dict[str, Any]] = []
        self.reactions: list[tuple[str, str, str]] = []  # (channel, ts, name)
        self.rate_limited: list[str] = []  # channels that got a 429, once per 429
        self.acks: dict[str, dict[str, Any]] = {}  # envelope_id -> the ack frame
        self.hellos = 0  # hello frames sent: one per Socket Mode connection
        self.peak_connections = 0  # the most Socket Mode connections live at once
        self.disconnects: list[str] = []  # reasons of the disconnect frames sent
        self.deliveries: list[Delivery] = []
        self.responses: list[tuple[str, dict[str, Any]]] = []  # (path, JSON body) POSTed to a response_url
        self._recent_posts: dict[str, deque[float]] = {}
        self._pending: list[Envelope] = []  # in the order queued; not acked yet
        self._sockets: list[web.WebSocketResponse] = []  # live, oldest first
        self._transports: dict[web.WebSocketResponse, asyncio.BaseTransport] = {}
        self._tickets: set[str] = set()
        self._clock = itertools.count(1)
        self._waiters: list[asyncio.Future] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- running -----------------------------------------------------------------------------------------------

    async def start(self) -> SlackEmulator:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link/", self._link)
        app.router.add_post("/commands/{rest:.*}", self._response_url)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for transport in self._transports.values():  # what a socket's handler waits on ends at once
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> SlackEmulator:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # -- waiting -----------------------------------------------------------------------------------------------

    def _changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        """``predicate()`` once it is true, re-checked on every change the emulator records; AssertionError after
        ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            except TimeoutError:
                raise AssertionError(f"the Slack emulator waited {timeout} s for {what or predicate}") from None

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    # -- the Web API -------------------------------------------------------------------------------------------

    def _next_ts(self) -> str:
        return f"{1700000000 + next(self._clock)}.000100"

    async def _api(self, request: web.Request) -> web.Response:
        return await self._call(request, request.match_info["method"])

    async def _call(self, request: web.BaseRequest, method: str) -> web.Response:
        """One Web API call of ``method``: recorded in ``calls``, answered by ``_answer``."""
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update(await request.post())
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.pop("token", None)
        call = Call(method, token, args)
        self.calls.append(call)
        status, answer, headers = self._answer(call)
        call.status, call.answer = status, answer
        self._changed()
        return web.json_response(answer, status=status, headers=headers)

    def _answer(self, call: Call) -> tuple[int, dict[str, Any], dict[str, str]]:
        wanted = self.app_token if call.method == "apps.connections.open" else self.bot_token
        if call.method not in BOT_METHODS | {"apps.connections.open"}:
            return 404, {"ok": False, "error": "unknown_method"}, {}
        if not call.token:
            return 200, {"ok": False, "error": "not_authed"}, {}
        if call.token != wanted:
            kind = "not_allowed_token_type" if call.token in (self.app_token, self.bot_token) else "invalid_auth"
            return 200, {"ok": False, "error": kind}, {}
        handler = getattr(self, "_" + call.method.replace(".", "_"))
        return handler(call.args)

    @staticmethod
    def _ok(**answer: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        return 200, {"ok": True, **answer}, {}

    @staticmethod
    def _error(error: str, **more: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        return 200, {"ok": False, "error": error, **more}, {}

    def _auth_test(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        return self._ok(url="https://emulator.slack.com/", team="Emulator", user=self.users[self.user_id],
                        team_id=self.team, user_id=self.user_id, bot_id=self.bot_id, is_enterprise_install=False)

    def _apps_connections_open(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        return self._ok(url=f"ws://127.0.0.1:{self.port}/link/?ticket={ticket}&app_id={self.app_id}")

    def _chat_postMessage(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        channel = args.get("channel")
        if not channel:
            return self._error("channel_not_found")
        if not args.get("text") and not args.get("blocks"):
            return self._error("no_text")
        limited = self._limit_post(channel)
        if limited is not None:
            return limited
        text = args.get("text") or ""
        warnings = ["message_truncated"] if len(text) > TEXT_LIMIT else []
        message = {"type": "message", "user": self.user_id, "bot_id": self.bot_id, "text": text[:TEXT_LIMIT],
                   "ts": self._next_ts(), "team": self.team}
        for key in ("thread_ts", "blocks", "reply_broadcast", "mrkdwn", "unfurl_links"):
            if key in args:
                message[key] = args[key]
        self.history.setdefault(channel, []).append(message)
        answer = {"channel": channel, "ts": message["ts"], "message": message}
        if warnings:
            answer.update(warning=warnings[0], response_metadata={"warnings": warnings})
        return self._ok(**answer)

    def _limit_post(self, channel: str) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """The per-channel limiter: a 429 with ``Retry-After`` past ``posts_per_window`` posts in ``window`` seconds,
        else None (the post is counted)."""
        now = time.monotonic()
        recent = self._recent_posts.get(channel)
        if recent is None:
            recent = self._recent_posts[channel] = deque()
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.posts_per_window:
            self.rate_limited.append(channel)
            retry_after = max(1, math.ceil(recent[0] + self.window - now))
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)}
        recent.append(now)
        return None

    def _find(self, channel: str | None, ts: str | None) -> dict[str, Any] | None:
        return next((msg for msg in self.history.get(channel or "", []) if msg["ts"] == ts), None)

    def _chat_update(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        message = self._find(args.get("channel"), args.get("ts"))
        if message is None:
            return self._error("message_not_found")
        message.update({key: args[key] for key in ("text", "blocks") if key in args}, edited={"user": self.user_id})
        return self._ok(channel=args["channel"], ts=args["ts"], text=message.get("text", ""))

    def _chat_postEphemeral(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if not args.get("channel") or not args.get("user"):
            return self._error("channel_not_found" if not args.get("channel") else "user_not_in_channel")
        self.ephemeral.append(dict(args))
        return self._ok(message_ts=self._next_ts())

    def _reactions_add(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        key = (args.get("channel"), args.get("timestamp"), args.get("name"))
        if self._find(key[0], key[1]) is None:
            return self._error("message_not_found")
        if key in self.reactions:
            return self._error("already_reacted")
        self.reactions.append(key)
        return self._ok()

    def _users_info(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        user = args.get("user")
        if user not in self.users:
            return self._error("user_not_found")
        name = self.users[user]
        return self._ok(user={"id": user, "team_id": self.team, "name": name, "real_name": name.title(),
                              "is_bot": user == self.user_id, "profile": {"display_name": name, "real_name": name}})

    def _conversations_info(self, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        channel = args.get("channel")
        if channel not in self.channels:
            return self._error("channel_not_found")
        return self._ok(channel={"id": channel, "name": self.channels[channel], "is_channel": True,
                                 "is_private": False, "is_im": False, "is_member": True})

    def response_url(self, trigger: str = "1") -> str:
        """A slash command's ``response_url`` on the emulator: what is POSTed to it lands in ``responses``."""
        return f"http://127.0.0.1:{self.port}/commands/{self.team}/{trigger}/x"

    async def _response_url(self, request: web.Request) -> web.Response:
        self.responses.append((request.path, await request.json()))
        self._changed()
        return web.Response(text="ok")

    # -- Socket Mode -------------------------------------------------------------------------------------------

    async def _open_link(self, request: web.Request, connections: int) -> web.WebSocketResponse:
        """A Socket Mode connection for a ticket ``apps.connections.open`` gave out, up to its ``hello``."""
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            raise web.HTTPUnauthorized(text="unknown or used ticket")
        self._tickets.discard(ticket)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        if request.transport is not None:
            self._transports[ws] = request.transport
        await ws.send_str(json.dumps({
            "type": "hello", "num_connections": connections,
            "debug_info": {"host": "emulator", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id}}))
        return ws

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._open_link(request, len(self._sockets) + 1)
        self._sockets.append(ws)
        self.peak_connections = max(self.peak_connections, len(self._sockets))
        self.hellos += 1
        self._changed()
        await self._flush()
        try:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    ack = json.loads(frame.data)
                    envelope_id = ack.get("envelope_id")
                    if any(e.envelope_id == envelope_id for e in self._pending):
                        self._pending = [e for e in self._pending if e.envelope_id != envelope_id]
                        self.acks[envelope_id] = ack
                        self._changed()
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
            # Slack sends what was never acked again, on a connection that is still there.
            self._requeue("timeout", ws)
            self._changed()
            await self._flush()
        return ws

    async def _flush(self) -> None:
        """Send every pending envelope not yet out on the newest live socket."""
        for envelope in self._pending:
            if envelope.sent_on is not None or not self._sockets:
                continue
            ws = self._sockets[-1]
            envelope.sent_on = ws
            try:
                await ws.send_str(envelope.frame())
            except ConnectionError:
                envelope.sent_on = None

    async def send_event(self, event: dict[str, Any], *, event_id: str | None = None) -> str:
        """Queue an ``events_api`` envelope carrying ``event``; returns its envelope id."""
        payload = self.event_callback(event, event_id=event_id)
        return await self.send_envelope("events_api", payload)

    async def send_envelope(self, kind: str, payload: dict[str, Any], *, accepts_response_payload: bool | None = None
                            ) -> str:
        """Queue an envelope (``events_api``, ``slash_commands``, ``interactive``) and send it when a socket is up."""
        accepts = kind == "slash_commands" if accepts_response_payload is None else accepts_response_payload
        envelope = Envelope(str(uuid.uuid4()), kind, payload, accepts)
        self._pending.append(envelope)
        await self._flush()
        self._changed()
        return envelope.envelope_id

    def event_callback(self, event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        """An Events API ``event_callback`` payload around ``event``, as Slack wraps it."""
        return {"token": "verification-token", "team_id": self.team, "api_app_id": self.app_id,
                "event": {"team": self.team, **event}, "type": "event_callback",
                "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time()),
                "authorizations": [{"enterprise_id": None, "team_id": self.team, "user_id": self.user_id,
                                    "is_bot": True, "is_enterprise_install": False}],
                "is_ext_shared_channel": False}

    def unacked(self) -> list[str]:
        return [envelope.envelope_id for envelope in self._pending]

    async def redeliver(self, reason: str = "timeout") -> None:
        """Send every envelope sent but not acked yet again, with ``retry_attempt`` raised (Slack's retry of a slow
        ack)."""
        self._requeue(reason)
        await self._flush()

    def _requeue(self, reason: str, socket: web.WebSocketResponse | None = None) -> None:
        """Envelopes sent (on ``socket``, or on any) and not acked go out again, as a retry."""
        for envelope in self._pending:
            if envelope.sent_on is not None and (socket is None or envelope.sent_on is socket):
                envelope.sent_on, envelope.retry_reason = None, reason
                envelope.retry_attempt += 1

    @property
    def connections(self) -> int:
        """Live Socket Mode connections (a silently dropped one no longer counts)."""
        return len(self._sockets)

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """A ``disconnect`` frame on every live socket, as Slack sends before it recycles a connection."""
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"type": "disconnect", "reason": reason,
                                          "debug_info": {"host": "emulator"}}))
        self.disconnects.append(reason)
        self._changed()

    async def close_connections(self) -> None:
        """Close every live socket with a WebSocket close frame, as Slack does when it goes away without warning."""
        for ws in list(self._sockets):
            await ws.close()

    def drop_silently(self) -> None:
        """The newest socket goes dead without a word: nothing read (so no pong), nothing sent, no FIN."""
        ws = self._sockets.pop()
        if ws in self._transports:
            self._transports[ws].pause_reading()
        self._requeue("timeout", ws)
        self._changed()

    # -- the Events API ----------------------------------------------------------------------------------------

    async def deliver(self, url: str, payload: dict[str, Any] | bytes, *, retries: int = 3,
                      timestamp: int | None = None, signing_secret: str | None = None,
                      content_type: str = "application/json", headers: dict[str, str] | None = None
                      ) -> list[Delivery]:
        """POST ``payload`` to ``url`` signed as Slack signs it; again with ``X-Slack-Retry-Num`` while the answer is
        not a 2xx, at most ``retries`` times, unless it says ``X-Slack-No-Retry: 1``. The attempts, in order.
        ``headers`` are added to every attempt (``X-Slack-Retry-Num`` to play a retry after a lost answer)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": stamp,
                   "X-Slack-Signature": slack_signature(signing_secret or self.signing_secret, stamp, body),
                   **(headers or {})}
        attempts: list[Delivery] = []
        async with aiohttp.ClientSession() as session:
            for attempt in range(retries + 1):
                sent = dict(headers)
                if attempt:
                    sent.update({"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_error"})
                async with session.post(url, data=body, headers=sent) as response:
                    delivery = Delivery(attempt, sent, body, response.status, await response.read(),
                                        dict(response.headers))
                attempts.append(delivery)
                self.deliveries.append(delivery)
                self._changed()
                if 200 <= delivery.status < 300 or delivery.answer_headers.get("X-Slack-No-Retry") == "1":
                    break
        return attempts
