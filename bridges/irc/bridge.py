"""The IRC bridge: one twisted.words ``IRCClient`` connection per bridge, feeding ``messages.py``.

This module owns the I/O of one connection to one IRC network: connecting
(plain or TLS) and registering (server password, SASL PLAIN, alternate nicks
on collision, NickServ), reconnecting with backoff through the base's
``Reconnector`` and rejoining every channel, passing what is said into the
layer in order, and pacing what consumers say through the token bucket. It
must not decide what a line or a reply means (``messages.py``) nor how
replies reach it (``bridges/base.py``). docs/spec/irc.md is the contract.

Why the outgoing queue belongs to the bridge and not to the connection: what a
consumer says while the server is away is said after the reconnect, behind the
JOINs that put us back in the channels, instead of being lost with the socket.
Why we parse lines ourselves: twisted.words decodes strictly as UTF-8 and
raises on a line it cannot parse, which would drop the connection; a network
with one Latin-1 user must not take the bridge down.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from typing import Any

from twisted.internet import endpoints, protocol, ssl
from twisted.internet.defer import Deferred

from crossroads.bridges.base import REQUIRED, Bridge, Inlet, Option, as_future, get_reactor
from crossroads.bridges.protocol import each, positive, problem_of

from . import messages as m

_CLOSE_WAIT = 5.0  # close_protocol() waits this long for the server to close after our QUIT
_FLUSH_WAIT = 5.0  # ... and at most this long for queued lines to go out before it
FORWARD_BATCH = 100  # events of one kind sent into the layer at once (a netsplit's QUITs, a busy channel)


_server = problem_of(m.parse_server)
_channels = problem_of(m.parse_channels)
_nicks = each(m.nick_problem)


def _no_line_breaks(value: str) -> str | None:
    return "may not contain CR, LF, NUL or spaces" if m.breaks_lines(value) or " " in value else None


class RegistrationFailed(ConnectionError):
    """The server closed or refused us before we were registered: a failed connection attempt."""


def _irc() -> Any:
    """twisted.words' IRC module, imported only once the asyncio reactor is installed: it imports
    ``twisted.internet.reactor`` at module level, which would install Twisted's default reactor."""
    get_reactor()  # raises ReactorError, naming the problem, when no asyncio reactor is installed
    from twisted.words.protocols import irc

    return irc


@functools.cache
def connection_class() -> type:
    """``IrcConnection`` on top of twisted.words' ``IRCClient`` (made on first use, see ``_irc``)."""
    return type("IrcConnection", (IrcConnection, _irc().IRCClient), {})


class IrcConnection:
    """One connection to the server, mixed into twisted.words' ``IRCClient`` by ``connection_class()``.
    Everything lasting (channels, queue, counters) is the bridge's.
    """

    heartbeatInterval = None  # ours: _keepalive, which also notices a server gone silent

    def __init__(self, bridge: IrcBridge) -> None:
        self.bridge = bridge
        options = bridge.options
        self.primary_nick = options["nick"]
        self.nickname = self.primary_nick
        self.username = options["username"] or self.primary_nick
        self.realname = options["realname"]
        self.password = options["password"] or None
        # The nicks to ask for, fitted to the server's NICKLEN once known (by the bridge, from an earlier connection).
        self.nicks = m.NickChoice(self.primary_nick, options["alternate_nicks"], bridge.nick_limit)
        self.our_user: str | None = None  # from our own JOIN echo: exact line budgets from then on
        self.our_host: str | None = None
        self.failure = ""  # why the server refused us, for the failed attempt's log line
        self.registered: Deferred = Deferred()
        self.closed = asyncio.get_running_loop().create_future()
        self.membership = m.Membership()
        self.last_heard = time.monotonic()
        self.timers: list[Any] = []

    # -- writing --

    def write(self, line: str) -> None:
        """Send one line now. ``line`` comes from ``messages.command`` (no CR, LF or NUL); checked once more."""
        if m.breaks_lines(line):
            raise m.UnsafeText(f"refusing to write a line with CR, LF or NUL: {line[:80]!r}")
        if self.transport is not None:
            self.transport.write(line.encode("utf-8") + b"\r\n")

    def sendLine(self, line: str) -> None:  # noqa: N802 (Twisted's name): twisted.words' own sends
        self.bridge.enqueue("", [line])

    # -- registration --

    def connectionMade(self) -> None:
        # Lines go out one at a time, already paced by the token bucket: Nagle's algorithm would hold each
        # behind the server's delayed ACK of the previous one (40 ms a line, measured by bench/chat.py).
        self.transport.setTcpNoDelay(True)
        self.supported = _irc().ServerSupportedFeatures()
        self.bridge.client = self
        reactor = get_reactor()
        self.timers.append(reactor.callLater(self.bridge.options["register_timeout"], self._register_timed_out))
        if self.bridge.options["sasl_password"]:
            self.write("CAP REQ :sasl")  # registration waits for our CAP END
        if self.password:
            self.write(m.command("PASS", trailing=self.password))
        self._set_nick(self.nicks.next())
        self.write(m.command("USER", self.username, "0", "*", trailing=self.realname))

    def _set_nick(self, nick: str) -> None:
        self._attemptedNick = nick
        self.write(m.command("NICK", nick))

    def _register_timed_out(self) -> None:
        if not self._registered:
            self.fail(f"not registered within {self.bridge.options['register_timeout']} s")

    def fail(self, reason: str) -> None:
        """Give up on this connection: the reconnector tries again later (and says why)."""
        self.failure = self.failure or reason
        if self.transport is not None:
            self.write("QUIT")
            self.transport.abortConnection()

    def irc_CAP(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        sub = params[1].upper() if len(params) > 1 else ""
        caps = params[-1].split()
        if sub == "ACK" and "sasl" in caps:
            self.write("AUTHENTICATE PLAIN")
        elif sub == "NAK":
            self.fail("SASL is configured but the server does not offer it (CAP NAK sasl)")

    def irc_AUTHENTICATE(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        if params and params[0] == "+":
            options = self.bridge.options
            for piece in m.sasl_plain(options["sasl_username"] or self.primary_nick, options["sasl_password"]):
                self.write(m.command("AUTHENTICATE", piece))

    def irc_903(self, prefix: str, params: list[str]) -> None:  # RPL_SASLSUCCESS
        self.write("CAP END")

    def _sasl_failed(self, prefix: str, params: list[str]) -> None:
        self.fail(f"SASL authentication failed: {params[-1] if params else 'no reason given'}")

    irc_902 = irc_904 = irc_905 = irc_906 = irc_908 = _sasl_failed

    def irc_ERR_NICKNAMEINUSE(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        if self._registered:  # a rename we asked for (regaining our nick) failed: keep the one we have
            return
        nick = self.nicks.next()
        if nick is None:
            self.fail(f"every nick we tried is taken ({len(self.nicks.tried)} of them): set `nick` or "
                      f"`alternate_nicks` in [bridges.{self.bridge.name}] to nicks free on this network")
            return
        self.bridge.log.warning("%s: nick %s is taken, trying %s", self.bridge.label, self._attemptedNick, nick)
        self._set_nick(nick)

    irc_ERR_UNAVAILRESOURCE = irc_ERR_NICKNAMEINUSE

    def irc_ERR_ERRONEUSNICKNAME(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        if self._registered:
            return
        refused, nick = self._attemptedNick, self.nicks.refused(params[-1])
        if nick is not None:  # too long for this server: a shorter one, and the rest fitted to the same length
            self.bridge.log.info("%s: the server refuses the nick %s (%s), trying %s", self.bridge.label, refused,
                                 params[-1], nick)
            self._set_nick(nick)
        else:
            self.fail(f"the server refuses the nick {refused!r}: {params[-1]}; set `nick` (and `alternate_nicks`) "
                      f"in [bridges.{self.bridge.name}] to a nick it accepts")

    def irc_ERR_PASSWDMISMATCH(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self.failure = "the server refused our password (464): check `password`"

    def irc_ERROR(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self.failure = self.failure or f"server said ERROR: {params[-1] if params else ''}"

    def irc_RPL_WELCOME(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self.hostname = prefix
        self._registered = True
        # The nick the server registered us as: some cut a long nick silently instead of refusing it.
        self.nickname = params[0] if params and not m.nick_problem(params[0]) else self._attemptedNick
        self.bridge.nick_limit = self.nicks.limit
        self.timers.append(get_reactor().callLater(self.bridge.options["ping_interval"], self._keepalive))
        self.timers.append(get_reactor().callLater(self.bridge.options["nick_retry_interval"], self._regain_nick))
        self.registered.callback(self)

    def irc_RPL_ENDOFMOTD(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        pass

    def _keepalive(self) -> None:
        """PING the server when it has been quiet; drop the connection when even that got no answer."""
        interval = self.bridge.options["ping_interval"]
        quiet = time.monotonic() - self.last_heard
        if quiet >= 2 * interval:
            self.bridge.log.warning("%s: nothing from the server for %.0f s, reconnecting", self.bridge.label, quiet)
            self.failure = "ping timeout"
            self.transport.abortConnection()
            return
        if quiet >= interval:
            self.write(m.command("PING", self.hostname or "crossroads"))
        self.timers.append(get_reactor().callLater(interval / 2, self._keepalive))

    def _regain_nick(self) -> None:
        """On an alternate nick, ask for ours now and then: whoever holds it may have left unseen."""
        if not self.is_us(self.nicks.wanted):
            self._set_nick(self.nicks.wanted)  # a 433 answer is ignored once registered
        self.timers.append(get_reactor().callLater(self.bridge.options["nick_retry_interval"], self._regain_nick))

    # -- reading --

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.last_heard = time.monotonic()
        text, utf8 = m.decode(line.rstrip(b"\r"))
        if not text:
            return
        if not utf8:
            self.bridge.count("non_utf8_lines")  # common on old networks: read as Latin-1, not an error
        try:
            parsed = m.parse_line(text)
        except m.BadLine as exc:
            self.bridge.bad_input(str(self.bridge.server), str(exc))
            return
        command = _irc().numeric_to_symbolic.get(parsed.command, parsed.command)
        if not parsed.params and command not in ("PING",):
            parsed.params = [""]
        handler = getattr(self, f"irc_{command}", None)
        try:
            if handler is not None:
                handler(parsed.prefix, parsed.params)
        except Exception:  # a line we did not expect in this shape: log it, keep the connection
            self.bridge.count("errors")
            self.bridge.log.exception("%s: could not handle %r", self.bridge.label, text[:200])

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        self.bridge.bad_input(str(self.bridge.server), f"a line over {self.MAX_LENGTH} bytes (ignored)")

    def irc_PING(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        token = params[-1] if params else ""
        self.write(m.command("PONG", trailing=token) if token else "PONG")  # at once, never queued

    def irc_RPL_ISUPPORT(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self.supported.parse(params[1:-1])
        casemapping = self.supported.getFeature("CASEMAPPING", ["rfc1459"])
        self.membership.casemapping = casemapping[0] if isinstance(casemapping, list | tuple) else casemapping
        limit = self.nicks.limit
        self.nicks.advertised(params[1:-1])
        if self.nicks.limit != limit:  # the server's own NICKLEN: fit our nick to it (longer than a guessed 9?)
            self.bridge.nick_limit = self.nicks.limit
            if self._registered and not self.is_us(self.nicks.wanted):
                self._set_nick(self.nicks.wanted)

    def is_us(self, nick: str) -> bool:
        return m.irc_lower(nick, self.membership.casemapping) == m.irc_lower(self.nickname,
                                                                             self.membership.casemapping)

    def irc_JOIN(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        channel, nick = params[0], m.nick_of(prefix)
        ours = self.is_us(nick)
        if ours:
            self.bridge.clear_problem(f"channel {channel}")
            if "!" in prefix:
                self.our_user, _, self.our_host = prefix.split("!", 1)[1].partition("@")
        self.membership.joined(channel, nick)
        self.bridge.event(m.JOIN, channel, lambda reply: m.join_message(reply, channel, prefix, ours,
                                                                        self.bridge.name))

    def irc_PART(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        channel, nick = params[0], m.nick_of(prefix)
        ours = self.is_us(nick)
        self.membership.parted(channel, nick, ours)
        reason = params[1] if len(params) > 1 else ""
        self.bridge.event(m.PART, channel, lambda reply: m.part_message(reply, channel, prefix, ours,
                                                                        self.bridge.name, reason=reason))

    def irc_KICK(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        channel, kicked = params[0], params[1]
        ours = self.is_us(kicked)
        self.membership.parted(channel, kicked, ours)
        reason = params[2] if len(params) > 2 else ""
        if ours:
            self.bridge.log.warning("%s: kicked from %s by %s: %s", self.bridge.label, channel, m.nick_of(prefix),
                                    reason)
        self.bridge.event(m.PART, channel, lambda reply: m.part_message(
            reply, channel, kicked, ours, self.bridge.name, how="kick", reason=reason, by=m.nick_of(prefix)))

    def irc_QUIT(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        nick = m.nick_of(prefix)
        reason = params[0] if params else ""
        for folded in self.membership.quit(nick):
            channel = self.bridge.channel_names.get(folded, folded)
            self.bridge.event(m.PART, channel, lambda reply, channel=channel: m.part_message(
                reply, channel, prefix, False, self.bridge.name, how="quit", reason=reason))
        self._maybe_regain(nick)

    def irc_NICK(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        old, new = m.nick_of(prefix), params[0]
        self.membership.renamed(old, new)
        if self.is_us(old):
            self.nickname = new
            self.bridge.log.info("%s: our nick is now %s", self.bridge.label, new)
        else:
            self._maybe_regain(old)

    def _maybe_regain(self, nick_gone: str) -> None:
        """Someone gave up our configured nick (quit or renamed): take it back."""
        wanted = self.nicks.wanted
        if not self.is_us(wanted) and (m.irc_lower(nick_gone, self.membership.casemapping)
                                       == m.irc_lower(wanted, self.membership.casemapping)):
            self._set_nick(wanted)

    def irc_RPL_NAMREPLY(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        if len(params) >= 4:
            self.membership.names(params[2], params[3].split())

    def irc_PRIVMSG(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self._said(prefix, params, notice=False)

    def irc_NOTICE(self, prefix: str, params: list[str]) -> None:  # noqa: N802
        self._said(prefix, params, notice=True)

    def _said(self, prefix: str, params: list[str], notice: bool) -> None:
        if len(params) < 2 or "!" not in prefix:
            return  # the server's own notices (registration, MOTD) are not anybody talking
        target, body = params[0], params[-1]
        nick = m.nick_of(prefix)
        if self.is_us(nick):
            return  # our own words (a server with echo-message) are not input
        ctcp = m.parse_ctcp(body)
        kind = m.NOTICE if notice else m.MESSAGE
        if ctcp is not None:
            if notice or ctcp[0] != "ACTION":
                if not notice and ctcp[0] in ("PING", "VERSION", "CLIENTINFO", "TIME"):
                    self._ctcp_reply(nick, ctcp)  # paced like everything we say: a CTCP flood cannot flood us off
                return
            kind, body = m.ACTION, ctcp[1]
        private = target[:1] not in m.CHANNEL_PREFIXES
        room = nick if private else target
        self.bridge.count("received")
        self.bridge.event(m.RECEIVE, room, lambda reply: m.receive_message(reply, kind, prefix, target, body,
                                                                           self.bridge.name))

    def _ctcp_reply(self, nick: str, ctcp: tuple[str, str]) -> None:
        answers = {"PING": ctcp[1], "VERSION": "crossroads IRC bridge", "CLIENTINFO": "ACTION PING VERSION TIME",
                   "TIME": time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())}
        try:
            line = m.command("NOTICE", nick, trailing=f"\x01{ctcp[0]} {answers[ctcp[0]]}\x01"[:400])
        except m.UnsafeText:
            return
        self.bridge.enqueue(m.irc_lower(nick), [line])

    def _cannot_join(self, prefix: str, params: list[str]) -> None:
        channel = params[1] if len(params) > 1 else "?"
        self.bridge.set_problem(f"channel {channel}", f"cannot join: {params[-1]}")

    irc_ERR_CHANNELISFULL = irc_ERR_INVITEONLYCHAN = irc_ERR_BANNEDFROMCHAN = _cannot_join
    irc_ERR_BADCHANNELKEY = irc_ERR_TOOMANYCHANNELS = _cannot_join

    def _cannot_send(self, prefix: str, params: list[str]) -> None:
        self.bridge.count("not_delivered")
        self.bridge.log.warning("%s: the server did not deliver to %s: %s", self.bridge.label,
                                params[1] if len(params) > 1 else "?", params[-1])

    irc_ERR_CANNOTSENDTOCHAN = irc_ERR_NOSUCHNICK = irc_ERR_NOSUCHCHANNEL = _cannot_send

    # -- the end --

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        for timer in self.timers:
            if timer.active():
                timer.cancel()
        self.timers.clear()
        if self.bridge.client is self:
            self.bridge.client = None
        self.bridge.disconnected(self, reason)
        if not self.registered.called:
            self.registered.errback(RegistrationFailed(self.failure or irc_reason(reason)))
        if not self.closed.done():
            self.closed.set_result(None)


def irc_reason(reason: Any) -> str:
    value = getattr(reason, "value", reason)
    return str(value) or type(value).__name__


class IrcBridge(Bridge):
    """Keeps one client connection to an IRC network for ASGI 1.0 ``irc-client`` consumers."""

    type_name = "irc"
    OPTIONS = {
        "server": Option(str, REQUIRED, "irc://host[:port] (6667) or ircs://host[:port] (TLS, 6697)", _server),
        "nick": Option(str, "crossroads", "the nick to use", m.nick_problem),
        "alternate_nicks": Option(list, [], "nicks to try when ours is taken (then nick_, nick2, ...)", _nicks),
        "username": Option(str, "", "the user name (ident) to register with; default: the nick", _no_line_breaks),
        "realname": Option(str, "crossroads bridge", "the real name (gecos) to register with"),
        "password": Option(str, "", "the server password (PASS), e.g. \"${IRC_PASSWORD}\"", _no_line_breaks),
        "sasl_username": Option(str, "", "SASL PLAIN account; default: the nick", _no_line_breaks),
        "sasl_password": Option(str, "", "SASL PLAIN password: authenticate before registering (fails without it)"),
        "nickserv_password": Option(str, "", "say IDENTIFY to NickServ with this password after registering"),
        "nickserv_nick": Option(str, "NickServ", "the nick of the network's NickServ", m.nick_problem),
        "channels": Option(list, [], "channels to join: \"#chat\" or {name = \"#ops\", key = \"...\"}", _channels),
        "tls_verify": Option(bool, True, "verify the ircs:// server's certificate and name", from_string=True),
        "tls_ca": Option(str, "", "PEM file of the CA to trust for ircs:// instead of the system's"),
        "flood_burst": Option(int, 4, "lines sent at once before pacing starts", positive, from_string=True),
        "flood_rate": Option(float, 0.5, "lines per second after the burst", positive, from_string=True),
        "max_queued_lines": Option(int, 1000, "lines waiting to be sent, to every target together, before more "
                                              "are dropped (counted)", positive, from_string=True),
        "max_queued_per_target": Option(int, 500, "lines waiting for one channel or nick before more for it are "
                                                  "dropped (counted)", positive, from_string=True),
        "ping_interval": Option(float, 60.0, "PING a quiet server after this many seconds; reconnect after twice "
                                             "that with nothing heard", positive, from_string=True),
        "nick_retry_interval": Option(float, 60.0, "on an alternate nick, ask for ours again this often (seconds)",
                                      positive, from_string=True),
        "register_timeout": Option(float, 30.0, "seconds for the server to accept our registration",
                                   positive, from_string=True),
        "reconnect_initial": Option(float, 1.0, "the first reconnect delay (seconds, doubled up to reconnect_cap, "
                                                "jittered)", positive, from_string=True),
        "reconnect_cap": Option(float, 60.0, "the longest reconnect delay", positive, from_string=True),
        "quit_message": Option(str, "crossroads bridge stopping", "said when the bridge stops"),
    }

    def __init__(self, name: str, options: dict[str, Any], layer: Any) -> None:
        super().__init__(name, options, layer)
        self.server = m.parse_server(self.options["server"])
        self.nick_limit: int | None = None  # the server's NICKLEN, once seen: later connections start fitted to it
        self.wanted: dict[str, m.ChannelSpec] = {}  # folded name -> channel: what we (re)join on every connect
        self.channel_names: dict[str, str] = {}  # folded name -> the name as first seen, for QUIT's parts
        for spec in m.parse_channels(self.options["channels"]):
            self.wanted[m.irc_lower(spec.name)] = spec
        self.client: IrcConnection | None = None
        self.accepting = False
        # What consumers say, one queue per target taken in turn: one channel's long reply cannot hold another's.
        self.outgoing = m.FairQueue(self.options["max_queued_per_target"], self.options["max_queued_lines"])
        self._overflowing: set[str | None] = set()  # targets (None: all) whose overflow was logged, until they drain
        self.bucket = m.TokenBucket(self.options["flood_rate"], self.options["flood_burst"], time.monotonic())
        self._pump_call: Any = None
        # What the server tells us, into the layer in the order it told it. IRC cannot be asked to repeat:
        # what the layer refuses is dropped (the base logged and counted the refusal).
        self.inlet = Inlet(self, "forwarding IRC events", batch=FORWARD_BATCH,
                           peer=lambda message: message.get("sender") or str(self.server),
                           refused=lambda channel, message: self.count("dropped"))
        self._drained = asyncio.Event()  # set whenever the outgoing queue empties
        self.link: Any = None

    # -- connecting --

    def _tls_options(self) -> Any:
        if not self.options["tls_verify"]:
            return ssl.CertificateOptions(verify=False)
        if self.options["tls_ca"]:
            with open(self.options["tls_ca"], "rb") as pem:
                authority = ssl.Certificate.loadPEM(pem.read())
            return ssl.optionsForClientTLS(self.server.host, trustRoot=authority)
        return ssl.optionsForClientTLS(self.server.host)

    async def _connect(self) -> IrcConnection:
        # Addresses come from asyncio's resolver: HostnameEndpoint resolves in the reactor's thread pool,
        # which only runs under reactor.run(), not when the loop is driven by asyncio alone (tests, embedding).
        reactor = get_reactor()
        host, port = self.server.host, self.server.port
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        factory = protocol.Factory()
        factory.noisy = False  # no 'Starting factory' line on every reconnect
        factory.buildProtocol = lambda address: connection_class()(self)
        failure: Exception = ConnectionError(f"{host} has no address")
        for family, _, _, _, address in infos:
            kind = endpoints.TCP6ClientEndpoint if family == socket.AF_INET6 else endpoints.TCP4ClientEndpoint
            endpoint = kind(reactor, address[0], port, timeout=30)
            if self.server.tls:
                endpoint = endpoints.wrapClientTLS(self._tls_options(), endpoint)
            try:
                client = await as_future(endpoint.connect(factory))
                break
            except Exception as exc:  # the next address, if any
                failure = exc
        else:
            raise failure
        try:
            await as_future(client.registered)
        except BaseException:
            if client.transport is not None:
                client.transport.abortConnection()
            raise
        self._signed_on(client)
        return client

    async def open_protocol(self) -> None:
        self.accepting = True
        self.register(None, m.SERVER_LOCAL_ID)
        self.link = self.reconnector(self._connect, f"server {self.server}", initial=self.options["reconnect_initial"],
                                     cap=self.options["reconnect_cap"])
        self.link.start()

    def _signed_on(self, client: IrcConnection) -> None:
        self.log.info("%s: registered on %s as %s", self.label, self.server, client.nickname)
        if self.options["nickserv_password"]:
            account = self.options["sasl_username"] or client.primary_nick
            self._send_now(m.command("PRIVMSG", self.options["nickserv_nick"],
                                     trailing=f"IDENTIFY {account} {self.options['nickserv_password']}"))
        for spec in self.wanted.values():
            self._send_now(m.join_line(spec))
        self.event(m.CONNECT, None, lambda reply: m.connect_message(reply, self.server, client.nickname, self.name))
        self._pump()

    def disconnected(self, client: IrcConnection, reason: Any) -> None:
        # registered.called: the attempt had succeeded (a failed one is errbacked after this call). Tell the
        # reconnector even if connect() has not returned yet: it clears the flag before each attempt only.
        if client.registered.called and self.link is not None:
            self.link.connection_lost(client.failure or irc_reason(reason))
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None

    # -- lines out, paced --

    def _send_now(self, line: str) -> None:
        """Lines that must go first on a new connection (JOINs, IDENTIFY): they use tokens, maybe in debt."""
        if self.client is not None:
            self.bucket.take(time.monotonic())
            self.client.write(line)

    def enqueue(self, target: str, lines: list[str]) -> None:
        """Queue ``lines`` for ``target`` (its folded name; "" for lines to the server), behind its earlier ones."""
        outgoing = self.outgoing
        for line in lines:
            full = outgoing.put(target, line)
            if full is None:
                self._drained.clear()
                continue
            self.count("dropped")
            which = None if full == m.FairQueue.FULL_TOTAL else target
            if which not in self._overflowing:  # once per overflow: a flood of drops is one line in the log
                self._overflowing.add(which)
                if which is not None:
                    self.log.warning("%s: %d lines are waiting for %s; dropping more for it until they go out",
                                     self.label, outgoing.waiting(target), target or "the server")
                else:
                    self.log.warning("%s: %d lines are waiting to be sent; dropping more until they go out",
                                     self.label, len(outgoing))
        self._pump()

    def _pump(self) -> None:
        client = self.client
        if self._pump_call is not None and self._pump_call.active():
            return
        self._pump_call = None
        if client is None or not client._registered:
            return  # _signed_on pumps again
        while self.outgoing:
            now = time.monotonic()
            wait = self.bucket.wait(now)
            if wait > 0:
                self._pump_call = get_reactor().callLater(wait, self._pump)
                return
            self.bucket.take(now)
            target, line = self.outgoing.take()
            client.write(line)
            self.count("lines_sent")
            if self._overflowing and not self.outgoing.waiting(target):
                self._overflowing.discard(target)
        self._overflowing.clear()
        self._drained.set()

    # -- events in, in order --

    def local_id_for(self, target: str) -> str:
        casemapping = self.client.membership.casemapping if self.client is not None else "rfc1459"
        local_id = m.target_local_id(target, casemapping, limit=99 - len(self.prefix) - 1)
        if local_id not in self.targets:
            self.register(target, local_id)
        if target[:1] in m.CHANNEL_PREFIXES:
            self.channel_names.setdefault(m.irc_lower(target, casemapping), target)
        return local_id

    def event(self, channel: str, target: str | None, build: Any) -> None:
        """Queue one event for the layer; ``build(reply_channel)`` makes the message."""
        if not self.accepting:
            return
        local_id = m.SERVER_LOCAL_ID if target is None else self.local_id_for(target)
        self.inlet.put(channel, build(self.reply_channel(local_id)))

    # -- replies --

    def handle_reply(self, local_id: str, message: dict) -> None:
        target = self.targets[local_id]
        try:
            actions = m.interpret_reply(message, target)
            lines: list[str] = []
            for action in actions:
                if isinstance(action, m.Say):
                    lines += m.say_lines(action.kind, action.target, action.text, self._prefix_length())
                elif isinstance(action, m.Join):
                    self.wanted[m.irc_lower(action.channel.name)] = action.channel
                    lines.append(m.join_line(action.channel))
                else:
                    self.wanted.pop(m.irc_lower(action.channel), None)
                    lines.append(m.part_line(action.channel, action.reason))
        except (m.InvalidReply, m.UnsafeText) as exc:
            self.count("invalid_replies")
            self.log.warning("%s: ignored an invalid reply for %s: %s", self.label, target or "the server channel",
                             exc)
            return
        self.enqueue(m.irc_lower(target) if target else "", lines)

    def _prefix_length(self) -> int:
        client = self.client
        if client is None:
            longest = max([self.options["nick"] + "99", *self.options["alternate_nicks"]], key=len)
            return m.prefix_length(longest, None, None)
        return m.prefix_length(client.nickname, client.our_user, client.our_host)

    # -- stopping --

    async def stop_accepting(self) -> None:
        self.accepting = False

    async def close_protocol(self) -> None:
        client = self.client
        # The replies in hand, if they go soon: a backlog the flood rate cannot send within _FLUSH_WAIT is not
        # waited for (it would only spend the stop timeout and leave the QUIT, and the log line below, unsaid).
        if client is not None and client._registered and self.outgoing \
                and len(self.outgoing) / self.options["flood_rate"] <= _FLUSH_WAIT:
            try:
                await asyncio.wait_for(self._drained.wait(), _FLUSH_WAIT)
            except TimeoutError:
                pass
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        if self.outgoing:
            left = self.outgoing.clear()
            self.count("dropped", left)
            self.log.warning("%s: %d lines not sent before stopping", self.label, left)
        if client is None:
            return
        client.write(m.command("QUIT", trailing=" ".join(m.text_lines(self.options["quit_message"])) or "bye"))
        client.transport.loseConnection()
        try:
            await asyncio.wait_for(asyncio.shield(client.closed), _CLOSE_WAIT)
        except TimeoutError:
            client.transport.abortConnection()
            await asyncio.wait_for(asyncio.shield(client.closed), 1.0)
