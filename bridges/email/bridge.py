"""The email bridge's inbound side: aiosmtpd's SMTP protocol on the reactor's asyncio loop, feeding ``messages.py``.

This module owns the SMTP server's I/O (listening is ``bridges.listening``'s:
TCP, a Unix socket, a socket from systemd; STARTTLS or implicit TLS): which
recipients it takes (only ``domains`` and ``recipients``: never an open relay),
AUTH, the caps a peer's transaction may cost, and the one rule that makes mail
safe to take: the ``250`` after DATA is written only once the layer accepted
the ``email.receive``; a full or unreachable layer, or a bridge that is
stopping, answers ``451 4.3.0`` so the sending MTA keeps the mail and retries.
It must not decide what a mail means (``messages.py``) nor how replies reach
it (``bridges/base.py``). docs/spec/email.md is the contract with consumers.

Why aiosmtpd's protocol and not its ``Controller``: the Controller runs its own
loop in a thread (and cannot bind port 0); the protocol runs on our loop, next
to the layer's client, through ``loop.create_server``. What consumers send
back (replies on a thread's channel, ``email.send``) is ``smarthost.py``'s:
this module only hands it over.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

from crossroads.bridges.base import Option, OptionError
from crossroads.bridges.listening import (
    ListeningBridge,
    asyncio_tcp_port,
    listen_asyncio,
    listen_options,
    server_ssl_context,
    uses_tls,
)
from crossroads.bridges.protocol import describe_peer, each, positive, positive_seconds, problem_of
from crossroads.layer import MessageTooLarge
from crossroads.layer.base import MAX_MESSAGE_SIZE

from . import imap
from . import messages as m
from .smarthost import OPTIONS as SENDING_OPTIONS
from .smarthost import Sending

TRY_LATER = "451 4.3.0 the gateway cannot take mail right now, try again later"
STOPPING = "421 4.3.2 the gateway is shutting down, try again later"
BUSY = "421 4.7.0 too many connections, try again later"
_HEADROOM = 16384  # bytes of a layer message kept for its keys and msgpack's framing
_SYNTAX_ERRORS = ("500", "501", "553", "555")  # unknown command or line too long, bad arguments, bad address
_CLOSE_WAIT = 5.0  # close_protocol() lets transactions in DATA finish (with 451) this long
# Threads reading mails: reading holds the GIL, so more threads read no faster; they only contend with the loop for
# it. asyncio's default pool (up to 6 threads for bench/email.py's 4 clients) cost the bridge ~1,410 µs of CPU per
# 256-byte mail against ~1,060 with one thread (means of 4 runs each on the shared machine). The price: a mail that
# costs much to read (within the caps, up to ~1 s) delays the mails behind it, which wait; the loop does not.
_READERS = 1


_AIOSMTPD_LOG = logging.getLogger("mail.log")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_IDLE_SLACK = 0.001  # seconds: a connection's idle timer may fire this much before its deadline and still close it


def _sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's ``sanitized_log`` (it masks AUTH data in a logged command line), called twice for every line a peer
    sends; it builds its masked copy of the arguments before the logger decides whether to log: ~1 µs a line wasted
    at our WARNING level. This one asks the logger first."""
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if level is None or _AIOSMTPD_LOG.isEnabledFor(level):  # any other logging function: called as before
        _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log


def _not_login_data_deprecation(record: logging.LogRecord) -> bool:
    return "login_data is deprecated" not in record.getMessage()


def _quiet_aiosmtpd() -> None:
    """aiosmtpd logs every command and address at INFO (``mail.log``) and a deprecation warning on every AUTH
    (its own code sets ``Session.login_data``): keep its warnings and errors, and our own lines say the rest."""
    aiosmtpd_log = logging.getLogger("mail.log")
    if aiosmtpd_log.level < logging.WARNING:
        aiosmtpd_log.setLevel(logging.WARNING)
    if _not_login_data_deprecation not in aiosmtpd_log.filters:
        aiosmtpd_log.addFilter(_not_login_data_deprecation)
    aiosmtpd.smtp.sanitized_log = _sanitized_log  # the module's global, as its command loop calls it


def _network(entry: Any) -> str | None:
    try:
        ipaddress.ip_network(entry, strict=False)
    except (TypeError, ValueError):
        return f"entries must be IP addresses or networks like \"10.0.0.0/8\", not {entry!r}"
    return None


def _recipient(entry: Any) -> str | None:
    if not isinstance(entry, str) or m.address_of(entry) != entry or "@" not in entry:
        return f"entries must be addresses like \"lobby@chat.example\", not {entry!r}"
    return None


def _message_size(value: int) -> str | None:
    most = MAX_MESSAGE_SIZE // 2
    return None if 0 < value <= most else f"must be from 1 to {most} bytes (half the layer's largest message)"


def _tls_mode(value: str) -> str | None:
    return None if value in ("starttls", "implicit") else f"must be \"starttls\" or \"implicit\", not {value!r}"


def parse_auth_users(text: str) -> dict[str, str]:
    """``user:password`` lines (blank lines and ``#`` comments skipped) as {user: password}; ValueError."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"line {number} is not user:password")
        users[user] = password
    return users


class SmtpConnection(SMTP):
    """One SMTP peer: aiosmtpd's protocol, with the bridge's connection cap, its own words for aiosmtpd's
    refusals (and their counters), and its state for a graceful stop."""

    def __init__(self, bridge: EmailBridge) -> None:
        self.bridge = bridge
        options = bridge.options
        starttls = bridge.tls_context if options["tls"] == "starttls" else None
        super().__init__(
            bridge, data_size_limit=options["max_message_size"], enable_SMTPUTF8=True, hostname=bridge.hostname,
            ident="crossroads", tls_context=starttls, require_starttls=options["require_starttls"],
            timeout=options["idle_timeout"],
            auth_require_tls=options["tls"] != "implicit",  # implicit TLS: every connection is encrypted already
            auth_exclude_mechanism=[] if bridge.users else ["LOGIN", "PLAIN"],  # no users: AUTH not offered
            authenticator=bridge.authenticate, loop=asyncio.get_running_loop(),
        )
        self.in_data: asyncio.Future | None = None  # while a DATA is read and answered: done when it is
        self.turned_away = False
        self.closed = asyncio.get_running_loop().create_future()
        self.peer_name = "?"
        self._idle_deadline = 0.0  # loop time at which an idle connection is closed (idle_timeout after a command)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        bridge = self.bridge
        if self.transport is None:  # the connection itself, not its STARTTLS upgrade
            peer = transport.get_extra_info("peername")
            self.peer_name = describe_peer(list(peer[:2]) if isinstance(peer, tuple) else None)
            if len(bridge.connections) >= bridge.options["max_connections"] or not bridge.accepting:
                self.turned_away = True
                bridge.count("turned_away")
                transport.write(((BUSY if bridge.accepting else STOPPING) + "\r\n").encode())
                transport.close()
                self.closed.set_result(None)
                return
            bridge.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.turned_away:
            return
        self.bridge.connections.discard(self)
        super().connection_lost(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.turned_away:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.turned_away else super().eof_received()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802 (aiosmtpd's name)
        self.in_data = asyncio.get_running_loop().create_future()
        try:
            await self._data(arg)
        finally:
            self.in_data.set_result(None)
            self.in_data = None

    async def _data(self, arg: str) -> None:
        """aiosmtpd 1.4.6's ``smtp_DATA``, its answers and states the same, but for how the mail is read.

        aiosmtpd reads it line by line (a ``readuntil`` and its bookkeeping per line: ~2 µs each, half the cost
        of DATA for a 256-byte mail). A mail up to ``line_length_limit`` bytes (1001, aiosmtpd's line cap and its
        reader's limit) comes here in one ``readuntil(b".\r\n")``, taken whole when that ``.`` line is the end
        (it follows a line end, or is the first line); anything else goes on line by line from where that read
        stopped, as aiosmtpd does. Dot-unstuffing is done once on the whole (every line begins after a CRLF).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await self._read_data()
        except asyncio.CancelledError:  # the connection was lost during DATA
            _AIOSMTPD_LOG.info("Connection lost during DATA")
            self._writer.close()
            raise
        if content is None:
            return  # answered 500 or 552 already
        self.envelope.content = self.envelope.original_content = content  # decode_data is off: bytes both
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | None:
        """The mail's bytes up to the ``.`` line, unstuffed; None when it was refused (500, 552: answered here)."""
        reader = self._reader
        limit, line_limit = self.data_size_limit, self.line_length_limit
        first: bytes | None = None
        try:
            first = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError:  # no ".\r\n" in the first line_limit bytes: left in the reader
            pass
        if first is not None and len(first) <= line_limit and (first == b".\r\n" or first.endswith(b"\r\n.\r\n")):
            data = first[:-3]
            too_long = too_much = False
        else:
            lines = [line + b"\r\n" for line in first[:-2].split(b"\r\n")] if first is not None else []
            data, too_long, too_much = await self._data_lines(lines, limit, line_limit)
        if too_long:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif too_much or (limit and len(data) > limit):
            await self.push("552 Error: Too much mail data")
        else:
            return (data[1:] if data.startswith(b".") else data).replace(b"\r\n.", b"\r\n")
        self._set_post_data_state()
        return None

    async def _data_lines(self, lines: list[bytes], limit: int | None, line_limit: int) -> tuple[bytes, bool, bool]:
        """aiosmtpd's DATA loop: ``lines`` (read already, each ending in CRLF), then the reader's, to the ``.``
        line; the bytes (not unstuffed), and whether a line was too long or the whole over ``limit``."""
        pieces: list[bytes] = []
        size = 0
        too_long = too_much = False
        fragments: list[bytes] = []
        queued = iter(lines)
        while self.transport is not None:
            line = next(queued, None)
            if line is None:
                try:
                    line = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:  # beyond the reader's limit: drain it, the mail is refused
                    too_long = too_long or not too_much
                    pieces.clear()
                    line = await self._reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            size += len(line)
            if not too_long and not too_much and limit and size > limit:
                too_much = True
                pieces.clear()
            fragments.append(line)
            if line.endswith(b"\r\n"):
                if not too_long and not too_much:
                    whole = b"".join(fragments)
                    if len(whole) > line_limit:
                        too_long = True
                        pieces.clear()
                    else:
                        pieces.append(whole)
                fragments.clear()
        return b"".join(pieces), too_long, too_much

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd answers some bad input itself; count it, and say it with RFC 3463 codes where ours differ."""
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if text.startswith("552 Error"):  # over max_message_size: at MAIL (SIZE=) or after DATA
            refusal = m.MailRefused(552, "5.3.4", f"message too big: at most {self.data_size_limit} bytes",
                                    "oversized")
            self.bridge.refused_mail(self.peer_name, refusal)
            status = refusal.smtp_reply
        elif text[:3] in _SYNTAX_ERRORS:  # aiosmtpd's own (ours, 550/552/554/535, are counted where they are made)
            self.bridge.bad_input(self.peer_name, text)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a MAIL FROM or RCPT TO path, and what follows it, with a shortcut for the plain
        ``<a@b>``: aiosmtpd defines a typing.Protocol class on every call and parses with the header parser, a
        fifth of the bridge's CPU per small mail. Its answer for such a path: the address, and the rest after the
        whitespace (its CFWS) that follows; anything else (a comment, ``<>``, UTF-8, quoting) is its to parse."""
        found = m.PLAIN_PATH_RE.match(arg)
        if found is None:
            return super()._getaddr(arg)
        rest = arg[found.end():]
        if rest[:1] in (" ", "\t"):
            rest = rest.lstrip()
        if rest[:1] == "(":
            return super()._getaddr(arg)
        address = found.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd restarts its idle timer at every command: a ``TimerHandle`` cancelled and another scheduled on
        the loop's heap, four times a mail. Here the deadline moves and one timer, when it fires, either closes the
        connection (as aiosmtpd's) or waits again for what is left; the heap is touched only when the deadline comes
        nearer than the timer (a shorter ``duration``) or once per ``idle_timeout``."""
        loop = self.loop
        self._idle_deadline = deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() + _IDLE_SLACK < self._idle_deadline:  # a command came since the timer was set
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
        else:
            self._timeout_cb()

    def close_with(self, status: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write((status + "\r\n").encode())
            self.transport.close()


class EmailBridge(ListeningBridge):
    """Takes mail for its domains over SMTP and hands each transaction to the layer as one ``email.receive``."""

    type_name = "email"
    OPTIONS = {
        **listen_options(2525),
        "smtp": Option(bool, True, "serve SMTP on host/port; false: only read the imap mailbox", from_string=True),
        "tls": Option(str, "starttls", "\"starttls\": plain SMTP offering STARTTLS when tls_cert is set; "
                                       "\"implicit\": TLS from the first byte (SMTPS)", _tls_mode),
        "require_starttls": Option(bool, False, "refuse every command but EHLO, NOOP, STARTTLS and QUIT before TLS",
                                   from_string=True),
        "domains": Option(list, [], "mail domains served: any recipient @ one of them is accepted",
                          each(problem_of(m.parse_domain))),
        "recipients": Option(list, [], "single addresses served besides domains; anything else is refused 550",
                             each(_recipient)),
        "auth_users": Option(str, "", "user:password lines (\"${credential:smtp-users}\") for AUTH PLAIN and LOGIN, "
                                      "offered only after TLS", problem_of(parse_auth_users)),
        "trusted_relays": Option(list, [], "IP addresses or networks of the MTA in front, whose "
                                           "Authentication-Results are read", each(_network)),
        "authserv_id": Option(str, "", "the authserv-id your relay writes in Authentication-Results"),
        "hostname": Option(str, "", "the name in the greeting and EHLO; default authserv_id, else the first "
                                    "domain, else localhost"),
        "max_message_size": Option(int, 524288, "bytes of one mail, announced in EHLO SIZE; larger is refused 552",
                                   _message_size, from_string=True),
        "max_header_bytes": Option(int, 65536, "the largest header block of the mail or of a part", positive,
                                   from_string=True),
        "max_address_header_bytes": Option(int, 16384, "bytes of address headers (From, To, Cc, Reply-To, ...) in one "
                                                        "mail, its parts included; more is refused 552", positive,
                                           from_string=True),
        "max_parts": Option(int, 100, "MIME parts, containers and the mail included", positive, from_string=True),
        "max_depth": Option(int, 20, "nesting of multipart and message/* parts", positive, from_string=True),
        "max_attachment_content": Option(int, 65536, "attachments up to this size carry their bytes",
                                         lambda v: None if v >= 0 else "must be 0 or more", from_string=True),
        "max_recipients": Option(int, 10, "RCPT TOs per transaction; more are answered 452", positive,
                                 from_string=True),
        "max_connections": Option(int, 100, "SMTP connections at once; more are answered 421", positive,
                                  from_string=True),
        "idle_timeout": Option(float, 300.0, "seconds a connection may wait between commands (RFC 5321 "
                                             "section 4.5.3.2.7: at least 5 minutes)", positive_seconds,
                               from_string=True),
        **SENDING_OPTIONS,  # replies and email.send, through the smarthost
        **imap.OPTIONS,  # reading a mailbox: bridges/email/imap.py
    }

    def __init__(self, name: str, options: dict[str, Any], layer: Any) -> None:
        super().__init__(name, options, layer)
        options = self.options
        self.domains = {m.parse_domain(domain) for domain in options["domains"]}
        self.recipients = {address.lower() for address in options["recipients"]}
        self.users = parse_auth_users(options["auth_users"])
        self.relays = [ipaddress.ip_network(entry, strict=False) for entry in options["trusted_relays"]]
        self.hostname = (options["hostname"] or options["authserv_id"] or next(iter(options["domains"]), "")
                         or "localhost")  # never socket.getfqdn(): a DNS lookup on the loop
        self.limits = m.Limits(options["max_message_size"], options["max_header_bytes"], options["max_parts"],
                               options["max_depth"], options["max_attachment_content"],
                               options["max_address_header_bytes"])
        self.own_addresses = sorted(self.recipients)
        self.tls_context = None
        self.threads = m.ThreadMemory(options["threads"])
        self.accepting = False
        self.connections: set[SmtpConnection] = set()
        self.server: asyncio.Server | None = None
        self.reader: ThreadPoolExecutor | None = None  # where mails are read (messages.py), off the loop
        self.port: int | None = 0  # the TCP port listened on, once open (None on a Unix socket)
        self.sending = Sending(self, options, self.domains, self.recipients)
        self.imap = imap.ImapReader(self) if options["imap"] else None

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        checked = super().validate_options(options)
        imap.check_options(checked)
        if checked["smtp"] and not checked["domains"] and not checked["recipients"]:
            raise OptionError("domains", "set domains or recipients: the addresses this bridge takes mail for")
        if checked["tls"] == "implicit" and not uses_tls(checked):
            raise OptionError("tls", "tls = \"implicit\" needs tls_cert and tls_key")
        if checked["require_starttls"] and not uses_tls(checked):
            raise OptionError("require_starttls", "needs tls_cert and tls_key to offer STARTTLS")
        return checked

    # -- the server --

    async def open_protocol(self) -> None:
        self.sending.prepare()  # replies go out whichever way mail came in
        self.sending.start()
        if self.imap is not None:
            self.imap.start()
        if not self.options["smtp"]:
            self.port = None
            return
        _quiet_aiosmtpd()
        if uses_tls(self.options):
            self.tls_context = server_ssl_context(self.options)
        implicit = self.tls_context if self.options["tls"] == "implicit" else None
        self.reader = ThreadPoolExecutor(_READERS, thread_name_prefix=f"email-{self.name}-read")
        self.accepting = True
        self.server = await listen_asyncio(lambda: SmtpConnection(self), self.options, implicit)
        self.port = asyncio_tcp_port(self.server)

    async def stop_accepting(self) -> None:
        self.accepting = False  # a DATA finishing from now on is answered 451: the sender retries elsewhere or later
        if self.server is not None:
            self.server.close()
        await self.sending.stop_consuming()
        if self.imap is not None:
            await self.imap.stop_accepting()

    async def close_protocol(self) -> None:
        if self.imap is not None:
            await self.imap.close()
        busy = [c.in_data for c in self.connections if c.in_data is not None]
        if busy:  # let each transaction in DATA end with its 451 rather than a cut connection
            await asyncio.wait(busy, timeout=_CLOSE_WAIT)
        connections = list(self.connections)
        for connection in connections:
            connection.close_with(STOPPING)
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=1.0)
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()
        await self.sending.close()  # after the replies in hand were queued: it sends or logs what is left
        if self.reader is not None:
            self.reader.shutdown(wait=False)  # every connection is closed: a mail still being read goes unanswered

    # -- aiosmtpd's handler hooks (SMTP calls them with itself, the session and the envelope) --

    async def handle_EHLO(self, server: SmtpConnection, session: Any, envelope: Any, hostname: str,  # noqa: N802
                          responses: list[str]) -> list[str]:
        """aiosmtpd's EHLO answer, without the empty ``AUTH`` line it writes when no mechanism is offered."""
        session.host_name = hostname
        return [line for line in responses if line.rstrip() != "250-AUTH"]

    async def handle_RCPT(self, server: SmtpConnection, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if address.lower() not in self.recipients and address.rpartition("@")[2].lower() not in self.domains:
            self.bad_input(server.peer_name, f"refused recipient {address!r}: not one of ours (no relaying)")
            return "550 5.1.1 no such recipient here (this server does not relay)"
        if len(envelope.rcpt_tos) >= self.options["max_recipients"]:
            return f"452 4.5.3 too many recipients: at most {self.options['max_recipients']} per mail"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SmtpConnection, session: Any, envelope: Any) -> str:  # noqa: N802
        self.count("received")
        if not self.accepting:
            self.count("refused")
            return TRY_LATER
        relay = self._relay_of(session.peer)
        login = session.auth_data.login.decode("utf-8", "replace") if session.authenticated else None
        raw, rcpt_tos = envelope.original_content, list(envelope.rcpt_tos)
        try:
            if m.quick_to_read(raw):  # a few ms at most (messages.QUICK_*): the hand-off would cost more than it saves
                received = self._read(raw, envelope.mail_from, rcpt_tos, relay, login)
            else:  # parsing is bounded, but a 512 KB mail can still cost milliseconds: off the loop
                received = await asyncio.get_running_loop().run_in_executor(
                    self.reader, self._read, raw, envelope.mail_from, rcpt_tos, relay, login)
        except m.MailRefused as exc:
            self.refused_mail(server.peer_name, exc)
            return exc.smtp_reply
        try:
            stored = await self.store_received(received)
        except MessageTooLarge:  # receive_message kept within the budget; the layer's own count is the last word
            refusal = m.MailRefused(552, "5.3.4", "message too big for the channel layer once decoded", "oversized")
            self.refused_mail(server.peer_name, refusal)
            return refusal.smtp_reply
        if not stored:  # full or unreachable: the sender keeps the mail and retries
            return TRY_LATER
        return "250 2.0.0 OK: queued"

    async def store_received(self, received: m.Received) -> bool:
        """Send a mail's ``email.receive`` into the layer (SMTP and IMAP alike); whether the layer took it.

        The thread is known before the layer has the mail: over Redis a worker's
        reply can reach the reply loop before the send returns. It is taken back
        if the layer does not take the mail (refused, or ``MessageTooLarge``).
        """
        previous = self.threads.get(received.local_id)
        self._remember(received.local_id, received.thread)
        try:
            # One message in one call, not send_to_layer's: the layer's per-tick batching of single sends costs a
            # future, a callback and a Task per mail (bridge callgrind per 256-byte mail, one client: 1.511M ->
            # 1.438M instructions), and few mails would share one: ~7% of sends found another in the 4-client flood.
            stored = await self.send_many_to_layer(m.RECEIVE, [received.message]) == 1
        except MessageTooLarge:
            self._take_back(received.local_id, previous)
            raise
        if not stored:
            self._take_back(received.local_id, previous)
        return stored

    def _remember(self, local_id: str, thread: m.Thread) -> None:
        for forgotten in self.threads.remember(local_id, thread):
            self.unregister(forgotten)
        self.register(thread, local_id)

    def _take_back(self, local_id: str, previous: m.Thread | None) -> None:
        """Replies answer the thread's mail before this one again (none: they are unknown, as before it came)."""
        if previous is not None:
            self._remember(local_id, previous)
        else:
            self.unregister(local_id)  # its entry in threads is left to age out: nothing routes to it

    async def handle_exception(self, error: Exception) -> str:
        """A failure of ours while serving a peer (aiosmtpd would answer 500 with the exception's text): logged and
        counted, and a temporary answer, so the mail is retried rather than bounced."""
        self.count("errors")
        self.log.error("%s: serving an SMTP peer failed", self.label, exc_info=error)
        return "451 4.3.0 local error, try again later"

    def _read(self, raw: bytes, mail_from: str, rcpt_tos: list[str], relay: str | None,
              login: str | None) -> m.Received:
        """Read one mail into its message (on the loop or in the reading thread: pure code, no bridge state but
        reads)."""
        mail = m.read_mail(raw, self.limits)
        authenticated = m.authentication(smtp_login=login, relay=relay, authserv_id=self.options["authserv_id"],
                                         headers=[(k, str(v)) for k, v in mail.raw_items()] if relay else ())
        return m.receive_message(mail, envelope_from=None if mail_from in ("", "<>") else mail_from,
                                 envelope_to=rcpt_tos, reply_prefix=self.prefix, limits=self.limits,
                                 budget=MAX_MESSAGE_SIZE - _HEADROOM, authenticated=authenticated,
                                 own_addresses=self.own_addresses)

    def _relay_of(self, peer: Any) -> str | None:
        if not self.relays:  # parsing the peer's address costs more than the rest of handle_DATA
            return None
        host = peer[0] if isinstance(peer, tuple) else None
        try:
            address = ipaddress.ip_address(host) if host else None
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # a dual-stack listener's IPv4 peer
            address = address.ipv4_mapped
        return str(address) if address is not None and any(address in network for network in self.relays) else None

    def refused_mail(self, peer: str, refusal: m.MailRefused) -> None:
        self.count(refusal.counter)
        self.bad_input(peer, f"refused a mail: {refusal.smtp_reply}")

    def authenticate(self, server: SmtpConnection, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        """aiosmtpd's authenticator: AUTH PLAIN and LOGIN against ``auth_users``. Synchronous, as aiosmtpd calls it:
        anything but an ``AuthResult`` back (a coroutine) would count as a success there."""
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            password = self.users.get(login)
            if password is not None and hmac.compare_digest(password.encode(), auth_data.password):
                return AuthResult(success=True, auth_data=auth_data)
        self.bad_input(server.peer_name, f"AUTH {mechanism} failed")
        return AuthResult(success=False, handled=False)

    # -- replies --

    def handle_reply(self, local_id: str, message: dict) -> None:
        self.sending.reply(local_id, self.threads.get(local_id), message)
