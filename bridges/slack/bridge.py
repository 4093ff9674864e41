"""The Slack bridge: slack-sdk's asyncio clients on the reactor's own loop, feeding ``messages.py``.

This module owns the I/O of one Slack app's link: ``auth.test`` (who we are),
the Socket Mode connections (one slack-sdk ``SocketModeClient`` per
connection, opened through the base's reconnector with a fresh
``apps.connections.open`` URL each time, recycled on ``disconnect`` frames,
watched by a ping/pong watchdog) or the Events API listener (aiohttp's
low-level server through the shared ``listen_asyncio``, signatures checked on
the raw body), passing events into the layer and acknowledging each only once
the layer took it, the names cache's lookups, and posting replies through one
rate-limited queue per channel (its calls through ``webapi.py``). What an event or a reply means is
``messages.py``'s; docs/spec/slack.md is the contract with consumers.

Why slack-sdk's Socket Mode client is subclassed (``_SocketClient``): left to
itself it reconnects on its own (a retry loop without backoff, outside the
bridge's health and counters) and hands frames to listeners in tasks of their
own, in no guaranteed order. Here one client is one connection: ``connect``
makes one attempt, and every frame comes to ``SlackBridge._frame`` in the
order it was read. Its receive loop, ping handling (``last_ping_pong_time``)
and acknowledgement sending are the SDK's. ``enqueue_message``,
``receive_messages`` and those attributes are slack-sdk 3.x internals
(setup.cfg pins ``<4``); tests/test_slack_bridge.py covers them.

Why replies are posted through ``webapi.WebAPI`` and not slack-sdk's ``AsyncWebClient``: a post is the one Web
API call made per event, and the SDK's per-call machinery cost ~4x the instructions of that small keep-alive
client (bench/slack_post.py under callgrind; the reasons in webapi.py). The SDK still makes every other call
(``auth.test``, ``apps.connections.open``, ``users.info``, ``conversations.info``, response_url answers).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from json.encoder import encode_basestring_ascii as json_string
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from crossroads.bridges.base import REQUIRED, Inlet, Option, OptionError
from crossroads.bridges.listening import (
    ListeningBridge,
    asyncio_tcp_port,
    busy_response,
    listen_asyncio,
    listen_options,
    server_ssl_context,
    uses_tls,
)
from crossroads.bridges.protocol import positive, seconds_or_off
from crossroads.layer.base import backoff_delays

from . import messages as m
from .webapi import WebAPI

FORWARD_BATCH = 100  # events sent into the layer at once (Slack's order kept)
IN_FLIGHT_LIMIT = 1000  # events taken and not yet stored; beyond, an envelope is left unacknowledged (Slack resends)
REPLY_TARGETS = 10_000  # channel and thread reply channels remembered (the most recently used)
COMMANDS_KEPT = 1000  # slash commands whose reply channel still answers (through response_url after the ack)
COMMAND_LIFETIME = 30 * 60.0  # Slack's response_url works for 30 minutes
LOOKUPS_AT_ONCE = 50  # users.info / conversations.info calls in flight; more ids wait for a later event
LOOKUP_RETRY = 60.0  # seconds before an id whose lookup failed is looked up again
BODY_LIMIT = 1024 * 1024  # aiohttp's client_max_size: a larger Events API body is refused (413); Slack's are KiBs
BODY_TIME = 10.0  # seconds a client has to send its request body
CONNECT_TIMEOUT = 10.0  # seconds for apps.connections.open, the WebSocket handshake and Slack's hello
DRAIN_TIME = 2.0  # seconds a stopping bridge lets queued posts go before dropping (and counting) the rest
POST_ATTEMPTS = 3  # a post that fails for a network error is tried this often before it is given up
POST_TIMEOUT = 30.0  # seconds for one Web API call of a reply (slack-sdk's default)
OUTBOXES_KEPT = 1000  # channels' outboxes held before a new one first forgets the idle ones (one made per post cost)
# Counted from the start, so `crossroads status` shows them at 0 (docs/spec/slack.md, "Counters and logs").
COUNTERS = ("repeats", "skipped", "bad_signatures", "app_rate_limited", "lookup_failures", "oversized", "posted",
            "rate_limited", "outbound_dropped", "invalid_replies", "not_delivered")
TOKEN_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                "not_allowed_token_type"}


def _command_wait(value: float) -> str | None:
    return None if 0.1 <= value <= 2.5 else "must be 0.1 to 2.5 seconds (Slack's budget for the ack is 3 s)"


def _split_at(value: int) -> str | None:
    return None if 1 <= value <= m.TEXT_LIMIT else f"must be 1 to {m.TEXT_LIMIT}"


def _threading(value: str) -> str | None:
    return None if value in m.THREADING else "must be \"auto\", \"always\" or \"never\""


def _transport(value: str) -> str | None:
    return None if value in ("socket", "events") else "must be \"socket\" or \"events\""


def _api_url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")) or not value.endswith("/") or len(value.split("/")[2]) == 0:
        return "must be an http(s):// URL ending with '/', such as https://slack.com/api/"
    return None


def _path(value: str) -> str | None:
    return None if value.startswith("/") else "must start with '/'"


@dataclass(eq=False, slots=True)
class _Pending:
    """An event or command taken from Slack and on its way into the layer; ``answers`` acknowledge it once stored.

    A redelivery arriving while it waits (a slow ack, a Slack retry) adds its
    own answer instead of a second copy, so it is acknowledged, and delivered, once.
    """

    keys: list[str]
    message: dict[str, Any]
    answers: list[Callable[..., None]]
    command: _Command | None = None


@dataclass(eq=False)
class _Command:
    """One slash command's reply channel: its first answer goes in the ack when in time, later ones to response_url."""

    response_url: str | None
    answered: asyncio.Future
    acked: bool = False
    created: float = field(default_factory=time.monotonic)


class _Outbox:
    """One channel's posts: those waiting (``(method, args, attempts)``, in order) and the one in flight.

    ``busy`` while a post is in flight or a timer (the limiter, Retry-After, a backoff) will send the next.
    """

    __slots__ = ("channel", "posts", "current", "dropped", "busy", "timer", "delays", "done", "closed")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.posts: deque[tuple[str, dict[str, Any], int]] = deque()
        self.current: tuple[str, dict[str, Any], int] | None = None
        self.dropped = False  # the post in flight was dropped over max_queued: its outcome is not judged
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.delays: Iterator[float] | None = None  # the backoff after network errors, until a post goes
        self.done: Callable[..., None] | None = None
        self.closed = False  # the bridge stopped

    @property
    def held(self) -> int:
        """Posts it holds towards ``max_queued`` and the stop's count: those waiting and the one in flight, unless
        that one was dropped."""
        return len(self.posts) + (self.current is not None and not self.dropped)


def text_frames(texts: list[str], random_bits: Callable[[int], int] = random.getrandbits) -> bytes:
    """``texts`` as masked WebSocket text frames (RFC 6455 §5.2), one after the other, as a client sends them.

    Masked by aiohttp's own C helper (a private module of aiohttp 3.x, as its writer masks): in Python, the XOR
    was ~3 µs an ack, ~3.6% of the bridge's CPU in a flood without replies.
    """
    frames = []
    for text in texts:
        payload = bytearray(text.encode())
        size = len(payload)
        if size < 126:
            head = bytes((0x81, 0x80 | size))
        elif size < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        mask = random_bits(32).to_bytes(4, "big")  # a fresh key per frame (§5.3), as aiohttp draws its own
        websocket_mask(mask, payload)
        frames += (head, mask, payload)
    return b"".join(frames)


class _SocketClient(SocketModeClient):
    """One Socket Mode connection: one attempt per ``connect``, every frame to the bridge in order (see the module)."""

    def __init__(self, bridge: SlackBridge) -> None:
        super().__init__(app_token=bridge.options["app_token"], web_client=bridge.web,
                         ping_interval=bridge.options["ping_interval"], auto_reconnect_enabled=False,
                         logger=bridge.sdk_log)
        self.bridge = bridge
        self.hello: asyncio.Future = asyncio.get_running_loop().create_future()
        self.watchdog: asyncio.Task | None = None
        self.acks: list[str] = []  # ack frames to send, in the order the envelopes were stored
        self.ack_flush: asyncio.Handle | None = None  # writes them all at once, at the end of the loop's round
        self.on_close_listeners.append(self._closed)
        self.on_error_listeners.append(self._closed)

    async def connect(self) -> None:
        """One attempt with a fresh URL: ``apps.connections.open``, then the WebSocket (never the SDK's retry loop)."""
        self.wss_uri = await self.issue_new_wss_url()
        self.current_session = await self.aiohttp_client_session.ws_connect(
            self.wss_uri, autoping=False, heartbeat=None, proxy=self.proxy,
            timeout=aiohttp.ClientWSTimeout(ws_close=1.0),  # a dead socket must not hold its replacement up
            ssl=self.web_client.ssl if self.web_client.ssl is not None else True)
        self.message_receiver = asyncio.ensure_future(self.receive_messages())

    async def enqueue_message(self, message: str) -> None:
        self.bridge._frame(self, message)  # called by the SDK's receive loop, frame by frame, in order

    async def connect_to_new_endpoint(self, force: bool = False) -> None:
        pass  # the bridge, not the SDK, decides when a new connection is made

    async def _closed(self, message: Any) -> None:
        self.bridge._socket_lost(self, "connection lost")

    def send_texts(self, texts: list[str]) -> None:
        """Each of ``texts`` as a WebSocket text frame, all in one write to the socket.

        Why not ``send_str`` per frame: aiohttp writes each frame to the socket on its own, and a flood's acks come a
        batch at a time (all the events one layer call stored), so a write per ack was a system call per event.
        The frames are aiohttp's (masked as a client's must be, RFC 6455 §5.3), written to its transport: aiohttp's
        own writes (pings, the close) are whole frames too, so they never interleave inside one.
        """
        session = self.current_session
        transport = session._writer.transport if session is not None and not session.closed else None  # aiohttp 3.x
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the Socket Mode connection is closing")
        transport.write(text_frames(texts))

    @property
    def is_open(self) -> bool:
        return not self.closed and self.current_session is not None and not self.current_session.closed

    @property
    def public_url(self) -> str:
        return (self.wss_uri or "").partition("?")[0]  # without its ticket, which is a credential

    async def shut(self) -> None:
        """Close the connection and wait for its tasks (the watchdog, the SDK's receive and process loops)."""
        if self.ack_flush is not None:
            self.ack_flush.cancel()  # not acknowledged: Slack sends those envelopes again, where they are repeats
            self.ack_flush = None
        tasks = [t for t in (self.watchdog, self.message_receiver, self.message_processor)
                 if t is not None and t is not asyncio.current_task()]
        try:
            await self.close()
        except Exception:  # a broken socket may fail to close: it is gone either way
            self.bridge.log.debug("%s: closing a Socket Mode connection failed", self.bridge.label, exc_info=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SlackBridge(ListeningBridge):
    """A Slack app's bot: Socket Mode or the Events API in, posts out (docs/spec/slack.md)."""

    type_name = "slack"
    OPTIONS = {
        "bot_token": Option(str, REQUIRED, "the bot token (xoxb-...), from ${VAR} or ${credential:NAME}"),
        "app_token": Option(str, "", "the app-level token (xapp-...) that opens Socket Mode connections"),
        "transport": Option(str, "socket", "\"socket\" (Socket Mode) or \"events\" (the Events API over HTTP)",
                            _transport),
        "signing_secret": Option(str, "", "with events: the app's signing secret, to check every request"),
        **listen_options(3000),
        "path": Option(str, "/slack/events", "with events: the path Slack calls", _path),
        "api_url": Option(str, "https://slack.com/api/", "the Web API's base URL (a proxy, a gateway, an emulator)",
                          _api_url),
        "threading": Option(str, "auto", "where replies go: \"auto\", \"always\" or \"never\" in the thread",
                            _threading),
        "split_at": Option(int, m.SPLIT_AT, "the longest post in characters as sent; longer text is split",
                           _split_at, from_string=True),
        "rate": Option(float, 1.0, "posts per second per channel once a burst is spent", positive, from_string=True),
        "burst": Option(int, 3, "posts a channel may take at once", positive, from_string=True),
        "max_queued": Option(int, 1000, "posts waiting per channel; beyond, the oldest is dropped", positive,
                             from_string=True),
        "repeat_window": Option(float, 600.0, "seconds an event is remembered to recognise a repeat", positive,
                                from_string=True),
        "names_cache": Option(int, 10_000, "user and channel names kept", positive, from_string=True),
        "names_max_age": Option(float, 3600.0, "seconds a name is kept before it is looked up again", positive,
                                from_string=True),
        "lookup_wait": Option(float, 1.0, "seconds an event waits for the lookup of its user's or channel's name "
                                          "(users.info, conversations.info) so it carries names; 0 never waits",
                              seconds_or_off, from_string=True),
        "command_wait": Option(float, 2.5, "seconds a slash command waits for an answer to put in its ack",
                               _command_wait, from_string=True),
        "ping_interval": Option(float, 5.0, "Socket Mode: seconds between pings; 4 without a pong replace the socket",
                                positive, from_string=True),
        "reconnect_initial": Option(float, 1.0, "the first reconnect delay (doubled up to reconnect_cap, jittered)",
                                    positive, from_string=True),
        "reconnect_cap": Option(float, 60.0, "the longest reconnect delay", positive, from_string=True),
    }

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        checked = super().validate_options(options)
        if not checked["bot_token"].startswith("xoxb-"):
            raise OptionError("bot_token", "must be a bot token, starting xoxb- (OAuth & Permissions in the app's "
                                           "settings)")
        if checked["app_token"] and not checked["app_token"].startswith("xapp-"):
            raise OptionError("app_token", "must be an app-level token, starting xapp- (Basic Information, App-Level "
                                           "Tokens, scope connections:write)")
        if checked["transport"] == "socket" and not checked["app_token"]:
            raise OptionError("app_token", "is required with transport = \"socket\" (Socket Mode)")
        if checked["transport"] == "events" and not checked["signing_secret"]:
            raise OptionError("signing_secret", "is required with transport = \"events\": every request's "
                                                "signature is checked with it")
        return checked

    # -- lifecycle --

    async def open_protocol(self) -> None:
        options = self.options
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.socket_mode = options["transport"] == "socket"
        for counter in COUNTERS:
            self.count(counter, 0)
        self.accepting = True
        self.link_up = False
        self.me: m.Identity | None = None
        self.window = m.RepeatWindow(options["repeat_window"])
        self.names = m.NamesCache(options["names_cache"], options["names_max_age"])
        self.user_names, self.channel_names = self._lookup("u"), self._lookup("c")  # made once, not per event
        self.limiter = m.ChannelLimiter(options["rate"], options["burst"])
        self.in_flight: dict[str, _Pending] = {}  # repeat key -> the event waiting for the layer
        self.reply_targets: OrderedDict[str, None] = OrderedDict()  # local ids, least recently used first
        self.commands: OrderedDict[str, _Command] = OrderedDict()
        self.lookups: dict[str, asyncio.Task] = {}  # "u:U1" / "c:C1" -> its users.info / conversations.info call
        # Events held (in order) until the lookups of their names end or lookup_wait passes; (pending, payload, retry).
        self.naming: deque[tuple[_Pending, dict[str, Any], int, float]] = deque()
        self._namer: asyncio.Task | None = None
        self.lookup_failed: OrderedDict[str, float] = OrderedDict()
        self.outboxes: dict[str, _Outbox] = {}  # channel -> its posts waiting and in flight
        self.drained: asyncio.Future | None = None  # set once no outbox is busy, while stopping
        self.socket: _SocketClient | None = None
        self.recycling = False
        self.server: asyncio.Server | None = None
        self.http: web.Server | None = None
        self.url = ""
        # Built here, inside the running loop: aiohttp sessions belong to the loop they were made on.
        self.session = aiohttp.ClientSession()
        # slack-sdk formats its debug lines when its logger's own level is <= DEBUG, and NOTSET (0) is: ~6% of the
        # bridge's CPU per event for lines nobody shows. Its level is ours, so they are formatted only when shown.
        self.sdk_log = self.log.getChild("sdk")
        self.sdk_log.setLevel(self.log.getEffectiveLevel())
        self.web = AsyncWebClient(token=options["bot_token"], base_url=options["api_url"], session=self.session,
                                  logger=self.sdk_log)
        self.poster = WebAPI(options["api_url"], options["bot_token"], timeout=POST_TIMEOUT)
        # Events into the layer in the order Slack sent them, each acknowledged once stored. Socket Mode
        # holds what the layer refuses and tries it again (unacknowledged meanwhile: Slack's redelivery
        # joins the waiting copy); the Events API answers 503 at once, and Slack retries.
        self.inlet = Inlet(self, "forwarding Slack events", batch=FORWARD_BATCH, build=lambda _, p: p.message,
                           stored_all=self._stored, refused=self._refused, too_large=self._too_large,
                           retry_while=(lambda: self.accepting) if self.socket_mode else None)
        if self.socket_mode:
            self.link = self.reconnector(self._connect_socket, "Slack (Socket Mode)",
                                         initial=options["reconnect_initial"], cap=options["reconnect_cap"])
        else:
            self.verifier = SignatureVerifier(options["signing_secret"])
            tls = server_ssl_context(options) if uses_tls(options) else None
            self.http = web.Server(self._http, access_log=None)  # bodies over BODY_LIMIT (aiohttp's 1 MiB): 413
            try:
                self.server = await listen_asyncio(self.http, options, tls, self, busy_response())
            except BaseException:
                await self.session.close()
                raise
            self.port = asyncio_tcp_port(self.server)
            where = options["unix_socket"] or f"{options['host']}:{self.port}"
            self.url = f"{'https' if tls else 'http'}://{where}{options['path']}"
            self.link = self.reconnector(self._connect_events, "Slack (Events API)",
                                         initial=options["reconnect_initial"], cap=options["reconnect_cap"])
        self.link.start()

    async def stop_accepting(self) -> None:
        # From now on nothing new is taken: Socket Mode leaves envelopes unacknowledged (Slack sends them
        # to the next connection), the Events API answers 503 (Slack retries).
        self.accepting = False
        if self.server is not None:
            self.server.close()

    async def close_protocol(self) -> None:
        if any(o.busy for o in self.outboxes.values()):  # posts handed over before the stop: let them go, in bounds
            self.drained = self.loop.create_future()
            try:
                await asyncio.wait_for(self.drained, DRAIN_TIME)
            except TimeoutError:
                pass
        left = 0
        for outbox in self.outboxes.values():
            outbox.closed = True  # its post in flight, if any, is not judged when answered
            if outbox.timer is not None:
                outbox.timer.cancel()
            left += outbox.held
        self.outboxes.clear()
        if left:
            self.count("dropped", left)
            self.log.warning("%s: stopped with %d post(s) still waiting to go to Slack", self.label, left)
        if self.link_up:
            self.link_up = False
            await self.send_to_layer(m.DISCONNECT, self._disconnect_message("bridge stopped"))
        socket, self.socket = self.socket, None
        if socket is not None:
            await socket.shut()
        if self.http is not None:
            await self.http.shutdown(1.0)
        self.poster.close()
        await self.session.close()

    # -- the link: who we are --

    async def _auth(self) -> m.Identity:
        if self.me is None:
            try:
                answer = await self.web.auth_test()
            except SlackApiError as exc:
                error = exc.response.get("error")
                if error in TOKEN_ERRORS:
                    raise ConnectionError(f"Slack refused the bot token ({error}): check bot_token") from None
                raise ConnectionError(f"auth.test failed ({error})") from None
            self.me = m.Identity(answer["user_id"], answer.get("bot_id") or "", answer.get("team_id") or "")
            if answer.get("user"):  # our own name: mentions of us read right from the first event
                self.names.put(f"u:{self.me.user_id}", answer["user"], time.monotonic())
        return self.me

    async def _connect_events(self) -> SlackBridge:
        me = await self._auth()
        self.link_up = True
        self.spawn(self.send_to_layer_persistently(m.CONNECT, m.connect_message(self.name, me, "events", self.url)),
                   "sending slack.connect")
        return self

    # -- Socket Mode connections --

    async def _open(self) -> _SocketClient:
        """One Socket Mode connection, up to Slack's ``hello``; closed again if any step fails."""
        client = _SocketClient(self)
        try:
            await asyncio.wait_for(self._hello(client), CONNECT_TIMEOUT)
        except SlackApiError as exc:
            await client.shut()
            error = exc.response.get("error")
            if error in TOKEN_ERRORS:
                raise ConnectionError(f"Slack refused the app token ({error}): check app_token") from None
            raise ConnectionError(f"apps.connections.open failed ({error})") from None
        except BaseException:
            await client.shut()
            raise
        return client

    @staticmethod
    async def _hello(client: _SocketClient) -> None:
        await client.connect()
        await client.hello

    async def _connect_socket(self) -> _SocketClient:
        me = await self._auth()
        client = await self._open()
        self._use(client)
        self.link_up = True
        self.spawn(self.send_to_layer_persistently(m.CONNECT, m.connect_message(self.name, me, "socket",
                                                                                client.public_url)),
                   "sending slack.connect")
        return client

    def _use(self, client: _SocketClient) -> None:
        self.socket = client
        client.last_ping_pong_time = time.time()
        client.watchdog = asyncio.ensure_future(self._watch(client))

    async def _watch(self, client: _SocketClient) -> None:
        """Ping every ``ping_interval``; a socket with no pong for 4 intervals, or closed, is replaced.

        Slack may stop answering without closing anything (a NAT that forgot
        us, a silent TCP loss): nothing else would notice, and the bridge would
        stay connected but deaf.
        """
        interval = self.options["ping_interval"]
        while client is self.socket:
            await asyncio.sleep(interval)
            if client is not self.socket:
                return
            if not client.is_open:
                self._socket_lost(client, "connection lost")
                return
            try:
                await client.current_session.ping(f"sdk-ping-pong:{time.time()}".encode())
            except Exception:
                self.log.debug("%s: a ping failed", self.label, exc_info=True)
            # The SDK's receive loop sets last_ping_pong_time from each pong (the time its ping was sent).
            if time.time() - (client.last_ping_pong_time or 0) >= 4 * interval:
                self._socket_lost(client, "ping timeout")
                return

    def _socket_lost(self, client: _SocketClient, reason: str) -> None:
        if not client.hello.done():  # lost before Slack's hello: the attempt fails now, not at its timeout
            client.hello.set_exception(ConnectionError(f"the connection closed before Slack's hello ({reason})"))
            client.hello.exception()  # retrieved: an attempt already given up must not log it as forgotten
        if not client.closed:
            self.spawn(client.shut(), "closing a Socket Mode connection")
        if client is not self.socket:
            return  # an old one, already replaced
        self.socket = None
        if self.link_up:
            self.link_up = False
            self.log.info("%s: the Socket Mode connection was lost (%s); reconnecting", self.label, reason)
            self.spawn(self.send_to_layer_persistently(m.DISCONNECT, self._disconnect_message(reason)),
                       "sending slack.disconnect")
        self.link.connection_lost(reason)

    def _disconnect_message(self, reason: str) -> dict[str, Any]:
        me = self.me or m.Identity("")
        return m.disconnect_message(self.name, me, "socket" if self.socket_mode else "events", reason)

    async def _recycle(self, old: _SocketClient, reason: str) -> None:
        """Slack said it will close ``old``: the next connection is opened first, then ``old`` let go.

        Envelopes ``old`` took and the layer stores after the switch are still
        acknowledged on it while it is open; the rest Slack sends again on the
        new one, where they are repeats (docs/spec/slack.md, "Repeats").
        """
        self.recycling = True
        try:
            new = await self._open()
        except Exception as exc:
            self.log.warning("%s: Slack asked us to reconnect (%s) and the new connection failed (%s)", self.label,
                             reason, exc)
            self._socket_lost(old, f"{reason}; the next connection failed")
            return
        finally:
            self.recycling = False
        if self.socket is not old or not self.accepting:  # lost or stopped meanwhile: the reconnector owns the link
            await new.shut()
            return
        if old.watchdog is not None:
            old.watchdog.cancel()
        self._use(new)
        self.link.connection = new
        self.log.info("%s: Socket Mode connection recycled (%s)", self.label, reason)
        await old.shut()

    def _frame(self, client: _SocketClient, raw: str) -> None:
        """One Socket Mode frame, in the order read."""
        try:
            frame = m.parse_json(raw)
        except ValueError:
            self.bad_input("Slack", f"a Socket Mode frame that is not JSON ({raw[:100]!r})")
            return
        if not isinstance(frame, dict):
            self.bad_input("Slack", "a Socket Mode frame that is not a JSON object")
            return
        kind = frame.get("type")
        if kind == "hello":
            if not client.hello.done():
                client.hello.set_result(None)
            return
        if kind == "disconnect":
            reason = str(frame.get("reason") or "disconnect")
            if client is self.socket and not self.recycling and self.accepting:
                self.spawn(self._recycle(client, reason), "recycling the Socket Mode connection")
            return
        envelope_id = frame.get("envelope_id")
        if not isinstance(envelope_id, str) or not envelope_id:
            self.bad_input("Slack", f"a {kind!r} frame without an envelope_id")
            return
        if not self.accepting:
            return  # stopping: not acknowledged, so Slack sends it to the next connection
        self.count("received")
        retry = frame.get("retry_attempt") or 0
        retry = retry if isinstance(retry, int) else 0

        def answer(outcome: str, payload: dict[str, Any] | None = None) -> None:
            if outcome != "refused":
                self._ack(client, envelope_id, payload)

        payload = frame.get("payload")
        if kind == "events_api":
            self._take_event(payload, retry, answer)
        elif kind == "slash_commands":
            self._take_command(payload, retry, answer)
        else:  # interactive (buttons, shortcuts, modals) is not in this version
            self.count("skipped")
            answer("done")

    def _ack(self, client: _SocketClient, envelope_id: str, payload: dict[str, Any] | None) -> None:
        if not client.is_open:
            return  # its socket is gone: Slack sends the envelope again, where it is a repeat
        if payload is None:
            client.acks.append('{"envelope_id": ' + json_string(envelope_id) + "}")  # what json.dumps gives
        else:
            client.acks.append(json.dumps({"envelope_id": envelope_id, "payload": payload}))
        if client.ack_flush is None:  # once per round of the loop, however many envelopes it stored
            client.ack_flush = self.loop.call_soon(self._send_acks, client)

    def _send_acks(self, client: _SocketClient) -> None:
        client.ack_flush = None
        acks, client.acks = client.acks, []
        try:
            client.send_texts(acks)
        except (ConnectionError, RuntimeError) as exc:
            self.log.info("%s: %d acknowledgement(s) could not be sent (%s); Slack will send the envelopes again",
                          self.label, len(acks), exc)

    # -- the Events API --

    async def _http(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.remote or "a client"
        if request.path != self.options["path"]:
            return web.Response(status=404, text="not found")
        if request.method != "POST":
            return web.Response(status=405, text="POST only", headers={"Allow": "POST"})
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIME)
        except web.HTTPRequestEntityTooLarge:
            self.bad_input(peer, f"an Events API body over {BODY_LIMIT} bytes")
            return web.Response(status=413, text="too large")
        except TimeoutError:
            self.bad_input(peer, f"an Events API body not sent within {BODY_TIME:.0f} s")
            return web.Response(status=408, text="too slow")
        headers = request.headers
        if not self.verifier.is_valid(body, headers.get("X-Slack-Request-Timestamp"),
                                      headers.get("X-Slack-Signature")):
            self.count("bad_signatures")
            self.log.warning("%s: refused an Events API request from %s: bad, missing or stale signature", self.label,
                             peer)
            return web.Response(status=401, text="bad signature")
        try:
            retry = int(headers.get("X-Slack-Retry-Num", "0"))
        except ValueError:
            retry = 0
        try:
            events_request = m.parse_events_request(body, headers.get("Content-Type", ""))
        except m.BadInput as exc:
            self.bad_input(peer, str(exc))
            return web.Response(status=200)  # Slack would only send it again
        kind = events_request.kind
        if kind == "url_verification":
            return web.json_response({"challenge": events_request.challenge})
        if kind == "ssl_check":
            return web.Response(status=200)
        if kind == "app_rate_limited":
            self.count("app_rate_limited")
            self.log.warning("%s: Slack dropped events for this app: over 30,000 in an hour (app_rate_limited)",
                             self.label)
            return web.Response(status=200)
        if not self.accepting or self.me is None:
            return web.Response(status=503, headers={"Retry-After": "1"}, text="not ready")
        self.count("received")
        answered: asyncio.Future = self.loop.create_future()

        def answer(outcome: str, payload: dict[str, Any] | None = None) -> None:
            if not answered.done():
                answered.set_result((outcome, payload))

        if kind == "command":
            self._take_command(events_request.payload, retry, answer)
        else:
            self._take_event(events_request.payload, retry, answer)
        try:
            outcome, payload = await asyncio.wait_for(asyncio.shield(answered), BODY_TIME)
        except TimeoutError:
            outcome, payload = "refused", None
        if outcome == "refused":
            return web.Response(status=503, headers={"Retry-After": "1"}, text="the channel layer cannot take it")
        return web.json_response(payload) if payload is not None else web.Response(status=200)

    # -- into the layer --

    def _lookup(self, kind: str) -> Callable[[str], str | None]:
        get, monotonic, prefix = self.names.get, time.monotonic, kind + ":"  # bound once: two lookups an event

        def lookup(an_id: str) -> str | None:
            key = prefix + an_id
            name = get(key, monotonic())
            if name is None and an_id:
                self._look_up_later(kind, an_id, key)
            return name
        return lookup

    def _look_up_later(self, kind: str, an_id: str, key: str) -> None:
        failed = self.lookup_failed.get(key)
        if key in self.lookups or len(self.lookups) >= LOOKUPS_AT_ONCE or not self.accepting:
            return
        if failed is not None and time.monotonic() - failed < LOOKUP_RETRY:
            return
        self.lookups[key] = self.spawn(self._look_up(kind, an_id, key), "looking up a name")

    async def _look_up(self, kind: str, an_id: str, key: str) -> None:
        try:
            if kind == "u":
                user = (await self.web.users_info(user=an_id))["user"]
                profile = user.get("profile") or {}
                name = profile.get("display_name") or user.get("real_name") or user.get("name")
            else:
                name = (await self.web.conversations_info(channel=an_id))["channel"].get("name")
            if not isinstance(name, str) or not name:
                raise KeyError("name")
        except (SlackApiError, aiohttp.ClientError, TimeoutError, KeyError, TypeError) as exc:
            self.count("lookup_failures")
            self.lookup_failed[key] = time.monotonic()
            self.lookup_failed.move_to_end(key)
            if len(self.lookup_failed) > 1000:
                self.lookup_failed.popitem(last=False)
            self.log.debug("%s: looking up %s failed: %s", self.label, an_id, exc)
        else:
            self.names.put(key, name, time.monotonic())
            self.lookup_failed.pop(key, None)
        finally:
            self.lookups.pop(key, None)

    def _take_event(self, payload: Any, retry: int, answer: Callable[..., None]) -> None:
        """An ``event_callback`` from either transport: a repeat, skipped, bad, or queued for the layer."""
        if not isinstance(payload, dict):
            self.bad_input("Slack", "an events_api envelope without a payload object")
            answer("done")
            return
        keys = m.repeat_keys(payload)
        if self._repeat(keys, answer):
            return
        prefix = self.prefix
        try:
            message = m.event_message(payload, self.me, self.name, prefix, users=self.user_names,
                                      channels=self.channel_names, threading=self.options["threading"],
                                      retry_attempt=retry)
        except m.BadInput as exc:
            self.bad_input("Slack", str(exc))
            answer("done")
            return
        if isinstance(message, m.Skip):
            self.count("skipped")
            answer("done")
            return
        self._route(message["reply_channel"][len(prefix):])
        pending = _Pending(keys, message, [answer])
        if (self.naming or (self.lookups and self.options["lookup_wait"] > 0 and self._naming_wanted(payload))) \
                and len(self.naming) < IN_FLIGHT_LIMIT:
            # A name being looked up for this event (or an earlier one still held): it waits for the lookup, at most
            # lookup_wait, so the first post of a new user or channel carries names, not ids; later events queue
            # behind it, so the order stays Slack's. A failed lookup ends the wait at once.
            for key in keys:
                self.in_flight[key] = pending  # a redelivery meanwhile joins it
            self.naming.append((pending, payload, retry, time.monotonic() + self.options["lookup_wait"]))
            if self._namer is None or self._namer.done():
                self._namer = self.spawn(self._name_and_queue(), "waiting for names")
            return
        self._queue(m.RECEIVE, pending)

    def _naming_wanted(self, payload: dict[str, Any]) -> bool:
        """Whether a lookup in flight is for this event's user or channel (asked only while lookups run)."""
        event = payload.get("event") if isinstance(payload.get("event"), dict) else {}
        wanted = [f"u:{event.get('user')}", f"c:{event.get('channel')}"]
        return any(key in self.lookups for key in wanted)

    async def _name_and_queue(self) -> None:
        while self.naming:
            pending, payload, retry, deadline = self.naming[0]
            event = payload.get("event") or {}
            tasks = [task for key in (f"u:{event.get('user')}", f"c:{event.get('channel')}")
                     if (task := self.lookups.get(key)) is not None]
            left = deadline - time.monotonic()
            if tasks and left > 0:
                await asyncio.wait(tasks, timeout=left)
            self.naming.popleft()
            try:  # again, with what the lookups found (the same event: it parsed before)
                message = m.event_message(payload, self.me, self.name, self.prefix, users=self.user_names,
                                          channels=self.channel_names, threading=self.options["threading"],
                                          retry_attempt=retry)
            except m.BadInput:
                message = pending.message
            if isinstance(message, dict):
                pending.message = message
            for key in pending.keys:
                if self.in_flight.get(key) is pending:
                    del self.in_flight[key]  # _queue registers it again, with the limit checked
            self._queue(m.RECEIVE, pending)

    def _take_command(self, payload: Any, retry: int, answer: Callable[..., None]) -> None:
        try:
            message = m.command_message(payload, self.name, self.prefix, users=self.user_names,
                                        channels=self.channel_names, retry_attempt=retry)
        except m.BadInput as exc:
            self.bad_input("Slack", str(exc))
            answer("done")
            return
        keys = [f"command:{message['trigger_id']}"]
        if self._repeat(keys, answer):
            return
        local_id = message["reply_channel"][len(self.prefix):]
        command = self.commands.get(local_id)
        if command is None:
            command = _Command(message["response_url"], self.loop.create_future())
            self._keep_command(local_id, command)
        self._queue(m.COMMAND, _Pending(keys, message, [answer], command))

    def _repeat(self, keys: list[str], answer: Callable[..., None]) -> bool:
        """Whether an event was seen: stored within the window (answered now) or still waiting (answered with it)."""
        if self.window.seen(keys, time.monotonic()):
            self.count("repeats")
            answer("done")
            return True
        for key in keys:
            pending = self.in_flight.get(key)
            if pending is not None:
                self.count("repeats")
                pending.answers.append(answer)
                return True
        return False

    def _queue(self, channel: str, pending: _Pending) -> None:
        if len(self.inlet) >= IN_FLIGHT_LIMIT:
            self.count("refused")
            self.set_problem("layer", f"{IN_FLIGHT_LIMIT} events wait for the layer; leaving more to Slack's retries")
            pending.answers[0]("refused")
            return
        for key in pending.keys:
            self.in_flight[key] = pending
        self.inlet.put(channel, pending)

    def _settle(self, pending: _Pending) -> None:
        for key in pending.keys:
            if self.in_flight.get(key) is pending:
                del self.in_flight[key]

    def _stored(self, channel: str, stored: list[tuple[_Pending, dict]]) -> None:
        """What one layer call stored, in order: each no longer in flight, now a repeat, and acknowledged.

        Once per call, not per event: one clock read and one ``remember`` for them all. Nothing an answer does
        (an ack queued for the loop's round, a future set) looks at ``in_flight`` or the window meanwhile.
        """
        for pending, _ in stored:
            self._settle(pending)
        self.window.remember_all([pending.keys for pending, _ in stored], time.monotonic())
        for pending, _ in stored:
            if pending.command is not None:
                self.spawn(self._acknowledge_command(pending), "acknowledging a slash command")
                continue
            for answer in pending.answers:
                answer("stored")

    def _refused(self, channel: str, pending: _Pending) -> None:
        if not self.socket_mode:  # the Events API answers 503 now: Slack retries
            self._settle(pending)
            for answer in pending.answers:
                answer("refused")
        # Socket Mode: held and tried again, unacknowledged meanwhile

    def _too_large(self, channel: str, pending: _Pending) -> None:
        self._settle(pending)
        self.count("oversized")
        self.bad_input("Slack", f"a {channel} too large for the layer; acknowledged and dropped")
        for answer in pending.answers:
            answer("done")

    async def _acknowledge_command(self, pending: _Pending) -> None:
        """The ack of a stored command: with the first answer a consumer gives within ``command_wait``, if any."""
        command = pending.command
        try:
            payload = await asyncio.wait_for(asyncio.shield(command.answered), self.options["command_wait"])
        except TimeoutError:
            payload = None
        command.acked = True
        for answer in pending.answers:
            answer("stored", payload)

    def _keep_command(self, local_id: str, command: _Command) -> None:
        now = time.monotonic()
        while self.commands:
            oldest_id, oldest = next(iter(self.commands.items()))
            if len(self.commands) < COMMANDS_KEPT and now - oldest.created < COMMAND_LIFETIME:
                break
            del self.commands[oldest_id]
            self.unregister(oldest_id)
        self.commands[local_id] = command
        self.register(command, local_id)

    def _route(self, local_id: str) -> None:
        """Replies to a channel's or thread's reply channel reach Slack, for the most recent ``REPLY_TARGETS``."""
        targets = self.reply_targets
        if local_id in targets:
            targets.move_to_end(local_id)
            return
        self.register(m.target_of(local_id), local_id)
        targets[local_id] = None
        if len(targets) > REPLY_TARGETS:
            self.unregister(targets.popitem(last=False)[0])

    # -- replies out to Slack --

    def handle_reply(self, local_id: str, message: dict) -> None:
        target = self.targets[local_id]
        if isinstance(target, _Command):
            self._answer_command(local_id, target, message)
            return
        texts = m.plain_posts(message, self.options["split_at"])
        if texts is not None:  # the common {"text": ...}: what the loop below posts for it, with no Reply built
            channel, thread_ts = target.channel, target.thread_ts
            for text in texts:
                args = {"channel": channel, "text": text} if text else {"channel": channel}
                if thread_ts:
                    args["thread_ts"] = thread_ts
                self._post(channel, "chat.postMessage", args)
            return
        try:
            reply = m.parse_reply(message, target, limit=self.options["split_at"])
        except m.InvalidReply as exc:
            self._invalid(local_id, exc)
            return
        channel = target.channel
        if reply.kind == m.REACTION:
            self._post(channel, "reactions.add", {"channel": channel, "timestamp": reply.ts, "name": reply.name})
            return
        blocks = list(reply.blocks) if reply.blocks is not None else None
        for text in reply.texts:
            args: dict[str, Any] = {"channel": channel}
            if text:  # a blocks-only reply has none
                args["text"] = text
            if blocks is not None:
                args["blocks"] = blocks
            if reply.kind == m.UPDATE:
                self._post(channel, "chat.update", {**args, "ts": reply.ts})
                continue
            if reply.thread_ts:
                args["thread_ts"] = reply.thread_ts
            if reply.kind == m.EPHEMERAL:
                self._post(channel, "chat.postEphemeral", {**args, "user": reply.user})
                continue
            if reply.broadcast:
                args["reply_broadcast"] = True
            if not reply.unfurl:
                args.update(unfurl_links=False, unfurl_media=False)
            self._post(channel, "chat.postMessage", args)

    def _invalid(self, local_id: str, exc: Exception) -> None:
        self.count("invalid_replies")
        self.count("dropped")
        self.log.warning("%s: ignored a reply on %s%s: %s", self.label, self.prefix, local_id, exc)

    def _answer_command(self, local_id: str, command: _Command, message: dict) -> None:
        try:
            reply = m.parse_command_reply(message)
        except m.InvalidReply as exc:
            self._invalid(local_id, exc)
            return
        body: dict[str, Any] = {"text": reply.texts[0], "response_type": reply.response_type}
        if reply.blocks is not None:
            body["blocks"] = list(reply.blocks)
        if not command.acked and not command.answered.done():
            command.answered.set_result(body)  # in the acknowledgement, within Slack's 3 s
        elif command.response_url:
            self.spawn(self._respond(command.response_url, body), "answering a slash command")
        else:
            self.count("not_delivered")
            self.log.warning("%s: a slash command's late answer has no response_url to go to", self.label)

    async def _respond(self, url: str, body: dict[str, Any]) -> None:
        try:
            answer = await AsyncWebhookClient(url, session=self.session).send_dict(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.count("not_delivered")
            self.log.warning("%s: answering a slash command through its response_url failed: %s", self.label, exc)
            return
        if answer.status_code >= 300:
            self.count("not_delivered")
            self.log.warning("%s: Slack answered %d to a slash command's answer: %s", self.label, answer.status_code,
                             answer.body[:200])
        else:
            self.count("posted")

    def _post(self, channel: str, method: str, args: dict[str, Any]) -> None:
        """Queue one Web API call for ``channel``, behind the channel's earlier ones (the order replies came in)."""
        outbox = self.outboxes.get(channel)
        if outbox is None:
            if len(self.outboxes) >= OUTBOXES_KEPT:
                self._forget_idle_outboxes()
            outbox = self.outboxes[channel] = _Outbox(channel)
            outbox.done = partial(self._posted, outbox)  # bound once per outbox, not per post
        posts = outbox.posts
        if outbox.held >= self.options["max_queued"]:
            if len(posts) < outbox.held:  # the oldest is the post in flight: not tried again
                outbox.dropped = True
            else:
                posts.popleft()
            self.count("outbound_dropped")
            self.count("dropped")
            self.log.warning("%s: dropped the oldest post waiting for %s: over max_queued (%d); %d dropped so far",
                             self.label, channel, self.options["max_queued"], self.counters["outbound_dropped"])
        posts.append((method, args, 0))
        if not outbox.busy:
            self._send_next(outbox)

    def _send_next(self, outbox: _Outbox) -> None:
        """Write ``outbox``'s first post now if the limiter lets it go, else wait for when it does.

        Why no sender task per channel: a post is started here and its answer judged in ``_posted``, called back by
        the connection that read it, which starts the next; a timer only when the channel must wait (the limiter,
        a 429's Retry-After, a backoff). So one post per channel is in flight, in the order they were queued.
        """
        channel, posts = outbox.channel, outbox.posts
        while posts:
            wait = self.limiter.claim(channel, time.monotonic())
            if wait > 0:
                self._send_later(outbox, wait)
                return
            outbox.current = post = posts.popleft()
            outbox.busy = True
            try:
                self.poster.send(post[0], post[1], outbox.done)
            except Exception as exc:  # a reply Web API cannot write (a TypeError from json): this post only
                self._unexpected(outbox, exc)
                continue
            return
        outbox.busy = False  # kept, idle, for the channel's next post (up to OUTBOXES_KEPT of them)
        if self.drained is not None and not self.drained.done() and not any(o.busy for o in self.outboxes.values()):
            self.drained.set_result(None)

    def _forget_idle_outboxes(self) -> None:
        for channel in [c for c, o in self.outboxes.items() if not o.busy]:
            del self.outboxes[channel]

    def _send_later(self, outbox: _Outbox, wait: float) -> None:
        outbox.busy = True
        outbox.timer = self.loop.call_later(wait, self._resume, outbox)

    def _resume(self, outbox: _Outbox) -> None:
        outbox.timer = None
        if not outbox.closed:
            self._send_next(outbox)

    def _unexpected(self, outbox: _Outbox, exc: BaseException) -> None:
        method = outbox.current[0] if outbox.current else "a call"
        outbox.current = None
        self.count("not_delivered")
        self.log.error("%s: %s to %s failed unexpectedly; dropped", self.label, method, outbox.channel,
                       exc_info=exc)

    def _posted(self, outbox: _Outbox, error: BaseException | None, status: int, answer: dict[str, Any],
                retry_after: str | None) -> None:
        """The outcome of ``outbox``'s post in flight (called back by ``WebAPI``): judged, then the next one goes."""
        if error is None and status == 200 and not (outbox.closed or outbox.dropped) and answer.get("ok") is True:
            outbox.current = outbox.delays = None  # posted: the usual case, judged here rather than in _judge
            self.count("posted")
            warning = answer.get("warning")
            if warning:
                self.log.warning("%s: Slack warned about a post to %s: %s", self.label, outbox.channel, warning)
            self._send_next(outbox)
            return
        if outbox.closed:  # the bridge stopped meanwhile: counted in close_protocol's dropped
            return
        if outbox.dropped:  # over max_queued while in flight: counted in outbound_dropped, whatever came of it
            outbox.dropped = False
            outbox.current = None
            self._send_next(outbox)
            return
        try:
            wait = self._judge(outbox, error, status, answer, retry_after)
        except Exception as exc:
            self._unexpected(outbox, exc)
            wait = 0.0
        outbox.current = None
        if wait > 0:
            self._send_later(outbox, wait)
        else:
            self._send_next(outbox)

    def _judge(self, outbox: _Outbox, error: BaseException | None, status: int, answer: dict[str, Any],
               retry_after: str | None) -> float:
        """What a post's outcome other than posted means (counted, logged, maybe queued again first); seconds before
        the next try."""
        method, args, attempts = outbox.current
        channel = outbox.channel
        if error is not None:
            if not isinstance(error, (aiohttp.ClientError, TimeoutError, OSError)):
                raise error
            if attempts + 1 >= POST_ATTEMPTS:
                self.count("not_delivered")
                self.log.warning("%s: %s to %s failed %d times (%s); given up", self.label, method, channel,
                                 POST_ATTEMPTS, error)
                return 0.0
            outbox.posts.appendleft((method, args, attempts + 1))
            outbox.delays = outbox.delays or backoff_delays(0.5, 5.0)
            return next(outbox.delays)
        if status == 429:
            self.count("rate_limited")
            try:
                held = float(retry_after or "1")
            except ValueError:
                held = 1.0
            self.limiter.retry_after(channel, held, time.monotonic())
            self.log.info("%s: Slack rate-limited posts to %s; holding them %.0f s", self.label, channel, held)
            outbox.posts.appendleft((method, args, attempts))  # the same post again, after Retry-After: the order stays
            return 0.0  # the limiter makes it wait
        # Not posted (an answer that is not 200 and ok: a post that is, _posted judged itself).
        self.count("not_delivered")
        self.log.warning("%s: %s to %s failed: %s", self.label, method, channel,
                         answer.get("error") or f"HTTP {status}")
        return 0.0
