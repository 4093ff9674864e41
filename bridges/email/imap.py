"""The email bridge's second inbound: reading one IMAP mailbox (aioimaplib on the reactor's loop), for users who
cannot receive SMTP (a hosted mailbox).

This module owns the IMAP connection: TLS (``imaps://``, or STARTTLS on
``imap://``), LOGIN, watching the mailbox (IDLE, renewed before servers'
30-minute cutoff, or polling when the server has no IDLE), and the rule that
makes reading safe: a mail is fetched with ``BODY.PEEK[]`` (which leaves it
unread) and marked ``\\Seen`` (or moved) only once the layer accepted its
``email.receive``. A full or unreachable layer leaves it unread; it is retried
with backoff, in UID order. A mail ``messages.read_mail`` refuses (too big, a
MIME bomb, unreadable) is set aside once (``\\Seen`` and ``\\Flagged``, or moved
to ``imap_refused_folder``) and counted, never retried for ever. Which UIDs to
deliver is ``mailbox.py``'s (pure) decision, from a cursor kept in the layer's
key/value store, so nothing is delivered twice across restarts and reconnects.
Reading a mail into its message is ``messages.py``'s, as for SMTP; the bridge
(``bridge.py``) only starts and stops this reader.

Why aioimaplib and not IMAPClient: aioimaplib is asyncio, so it runs on the
reactor's own loop next to the layer's client and the SMTP server, as
everything in a bridge does; IMAPClient is blocking and would need a thread
per mailbox, with a second way to stop it. aioimaplib has no STARTTLS of its
own: ``_starttls`` upgrades its transport with ``loop.start_tls``.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aioimaplib import aioimaplib

from crossroads.bridges.options import Option, OptionError
from crossroads.bridges.protocol import positive_seconds, problem_of
from crossroads.layer import LayerError, MessageTooLarge
from crossroads.layer.base import MAX_MESSAGE_SIZE, backoff_delays

from . import mailbox as mb
from . import messages as m

if TYPE_CHECKING:
    from .bridge import EmailBridge

_HEADROOM = 16384  # as the SMTP side: bytes of a layer message kept for its keys and msgpack's framing
CURSOR_TTL = 400 * 86400.0  # seconds a mailbox's cursor is kept in the layer; renewed with every mail
_BATCH = 100  # UIDs sized in one FETCH: a mailbox of 100,000 unseen mails is read in steps, not at once
_STOP_WAIT = 5.0  # stop_accepting() lets the mail in hand finish this long


def _check_url(value: str) -> str | None:
    """The option's check, which quotes the value in its error: a URL holding a password is left to
    ``check_options``, which says so without repeating it."""
    if not value or urlsplit(value).password is not None:
        return None
    return problem_of(mb.parse_imap_url)(value)


def check_options(checked: dict[str, Any]) -> None:
    """The IMAP options' rules between keys (``EmailBridge.validate_options`` calls it); ``OptionError``."""
    if not checked["smtp"] and not checked["imap"]:
        raise OptionError("imap", "set imap (a mailbox to read), or leave smtp on: with neither the bridge would "
                                  "take no mail")
    if not checked["imap"]:
        return
    try:
        mb.parse_imap_url(checked["imap"])
    except ValueError as exc:  # only a URL with a password gets here: never quote it
        raise OptionError("imap", str(exc)) from None
    if not checked["imap_password"]:
        raise OptionError("imap_password", "reading the imap mailbox needs its password "
                                           "(\"${credential:imap-password}\")")
    mailbox = mb.parse_imap_url(checked["imap"]).mailbox
    for key in ("imap_move_to", "imap_refused_folder"):
        if checked[key] == mailbox:
            raise OptionError(key, f"must be another folder than the one read ({mailbox}): a mail moved there "
                                   "would come back as new")


OPTIONS = {
    "imap": Option(str, "", "imaps://user@host/INBOX (or imap:// with STARTTLS): also read this mailbox",
                   _check_url),
    "imap_password": Option(str, "", "the IMAP user's password (\"${credential:imap-password}\" or "
                                     "\"${env:IMAP_PASSWORD}\")"),
    "imap_require_tls": Option(bool, True, "with imap://: refuse to log in when the server offers no STARTTLS",
                               from_string=True),
    "imap_ca_file": Option(str, "", "PEM CA certificates to verify the IMAP server with (default: the system's)"),
    "imap_idle_renew": Option(float, 1500.0, "seconds after which an IDLE is ended and issued again (servers may "
                                             "cut it after 30 minutes, RFC 2177)", positive_seconds,
                              from_string=True),
    "imap_poll_interval": Option(float, 60.0, "seconds between looks at a mailbox whose server has no IDLE",
                                 positive_seconds, from_string=True),
    "imap_move_to": Option(str, "", "move each delivered mail to this folder instead of marking it \\Seen",
                           mb.imap_mailbox_check),
    "imap_refused_folder": Option(str, "", "move mail that cannot be taken (too big, a MIME bomb) here instead of "
                                           "marking it \\Seen and \\Flagged", mb.imap_mailbox_check),
    "imap_timeout": Option(float, 30.0, "seconds for connecting, TLS, and each IMAP command", positive_seconds,
                           from_string=True),
}


class ImapError(Exception):
    """The server refused what reading the mailbox needs (LOGIN, SELECT, TLS): a reason to reconnect later."""


def _ok(response: Any, what: str) -> Any:
    """``response`` if it is OK; ``ImapError`` saying what was refused otherwise."""
    if response.result != "OK":
        text = b" ".join(bytes(line) for line in response.lines if isinstance(line, (bytes, bytearray)))
        raise ImapError(f"{what} refused: {response.result} {text.decode('utf-8', 'replace')[:200]}")
    return response


class ImapReader:
    """Reads one mailbox into the layer for an ``EmailBridge``; ``start()``, ``stop_accepting()``, ``close()``."""

    def __init__(self, bridge: EmailBridge) -> None:
        self.bridge = bridge
        options = bridge.options
        self.url = mb.parse_imap_url(options["imap"])
        self.options = options
        self.describe = f"IMAP {self.url}"
        self.key = mb.cursor_key(bridge.name, self.url)
        # the mailbox's own address is ours too: mail from it is "own" (never answered automatically)
        self.own_addresses = sorted({*bridge.own_addresses, *([self.url.user.lower()] if "@" in self.url.user
                                                                else [])})
        self.cursor: mb.Cursor | None = None  # None until read from the layer
        self.client: aioimaplib.IMAP4 | None = None
        self.session: asyncio.Task | None = None
        self.stopping = False
        self._stopped = asyncio.Event()  # set by stop_accepting(): ends a wait between looks at once
        self.idling = False
        self.mail_arrived = False  # an EXISTS came in the answer to a command, not in IDLE
        self.idles = 0  # IDLE commands issued: one per look at the mailbox, and one per renewal
        self._cursor_problem_logged = False
        self.reconnector = bridge.reconnector(self._connect, self.describe)

    def start(self) -> None:
        self.reconnector.start()

    # -- connecting --

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.options["imap_ca_file"] or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def _connect(self) -> aioimaplib.IMAP4:
        """One attempt: connect, TLS, LOGIN, SELECT, read the cursor; then the session runs in its own task."""
        timeout = self.options["imap_timeout"]
        url = self.url
        lost: dict[str, Any] = {}

        def connection_lost(error: Exception | None) -> None:  # aioimaplib calls it from its protocol
            if lost.get("session") is not None:
                self._ended(lost["session"], error or ConnectionError("the server closed the connection"))
            lost["gone"] = True

        client = aioimaplib.IMAP4(host=url.host, port=url.port, timeout=timeout, conn_lost_cb=connection_lost,
                                  ssl_context=self._tls_context() if url.implicit_tls else None)
        self._hear_exists(client)
        try:
            await client.wait_hello_from_server()
            if not url.implicit_tls:
                await self._starttls(client)
            response = await client.login(url.user, self.options["imap_password"])
            if response.result != "OK":
                raise ImapError(f"login as the configured user refused: "
                                f"{b' '.join(bytes(line) for line in response.lines).decode('utf-8', 'replace')[:200]}")
            await asyncio.wait_for(client.protocol.capability(), timeout)  # after LOGIN: IDLE, MOVE are known now
            if (self.options["imap_move_to"] or self.options["imap_refused_folder"]) and not client.has_capability(
                    "MOVE"):
                raise ImapError("the server has no MOVE (RFC 6851), which imap_move_to and imap_refused_folder need")
            selected = _ok(await client.select(mb.quoted_mailbox(url.mailbox)), f"SELECT {url.mailbox}")
            uidvalidity = mb.uidvalidity_of(selected.lines)
            if uidvalidity is None:
                raise ImapError(f"the server gave no UIDVALIDITY for {url.mailbox}: its UIDs cannot be trusted")
            if self.cursor is None:  # once per process: afterwards ours is the newest (the layer may lag)
                self.cursor = mb.Cursor.from_record(await self.bridge.layer.kv_get(self.key))
        except BaseException:
            self._abort(client)
            raise
        if lost.get("gone"):
            raise ConnectionError("the server closed the connection while logging in")
        self.client = client
        session = self.session = asyncio.ensure_future(self._serve(client, uidvalidity))
        lost["session"] = session
        session.add_done_callback(lambda task: self._ended(task, None))
        return client

    def _hear_exists(self, client: aioimaplib.IMAP4) -> None:
        """Note every ``EXISTS`` the server sends, also between commands, where aioimaplib drops it ("ignored
        untagged response"). Dovecot sends a mail's EXISTS there when it arrives just after a SEARCH and before
        our IDLE; missed, the mail would wait for the next IDLE renewal (25 minutes)."""
        protocol = client.protocol
        untagged = protocol._untagged_response

        def hear(line: bytes) -> Any:
            if line.endswith(b" EXISTS"):
                self.mail_arrived = True
            return untagged(line)

        protocol._untagged_response = hear

    async def _starttls(self, client: aioimaplib.IMAP4) -> None:
        protocol = client.protocol
        if "STARTTLS" not in protocol.capabilities:
            if self.options["imap_require_tls"]:
                raise ImapError("the server offers no STARTTLS and imap_require_tls is on: the password would go "
                                "in clear (use imaps://, or set imap_require_tls = false on a trusted network)")
            return
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        _ok(await asyncio.wait_for(protocol.execute(command), self.options["imap_timeout"]), "STARTTLS")
        loop = asyncio.get_running_loop()
        protocol.transport = await asyncio.wait_for(
            loop.start_tls(protocol.transport, protocol, self._tls_context(), server_hostname=self.url.host),
            self.options["imap_timeout"])
        await asyncio.wait_for(protocol.capability(), self.options["imap_timeout"])  # RFC 3501 6.2.1: ask again

    def _ended(self, session: asyncio.Task, error: Exception | None) -> None:
        """The connection or its session ended: once per connection, close it and let the reconnector try again."""
        if getattr(session, "crossroads_ended", False):
            return
        session.crossroads_ended = True  # type: ignore[attr-defined]
        if not session.done():
            session.cancel()
        reason: Any = error
        if reason is None and not session.cancelled() and session.exception() is not None:
            reason = session.exception()
            if not isinstance(reason, (ImapError, OSError, aioimaplib.AioImapException, TimeoutError)):
                self.bridge.count("errors")
                self.bridge.log.error("%s: reading %s failed", self.bridge.label, self.describe, exc_info=reason)
        client, self.client = self.client, None
        if client is not None:
            self._abort(client)
        if not self.stopping:
            self.reconnector.connection_lost(reason or "the session ended")

    @staticmethod
    def _abort(client: aioimaplib.IMAP4) -> None:
        transport = client.protocol.transport if client.protocol is not None else None
        if transport is not None:
            transport.abort()
        # aioimaplib's own tasks (an IDLE command's, a greeting's) would wait for ever on a dead connection
        for task in [*client.tasks, *client.protocol.tasks]:
            task.cancel()

    # -- stopping --

    async def stop_accepting(self) -> None:
        """Take no more mail: the one in hand finishes (delivered and marked, or left unread), IDLE ends."""
        self.stopping = True
        self._stopped.set()
        session = self.session
        if session is None:
            return
        if self.idling and self.client is not None:
            await self.client.stop_wait_server_push()
        await asyncio.wait([session], timeout=_STOP_WAIT)

    async def close(self) -> None:
        session, client = self.session, self.client
        if session is not None and not session.done():
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)
        if client is not None and client.protocol.transport is not None:
            try:
                await asyncio.wait_for(client.logout(), 2.0)
            except Exception:  # noqa: BLE001 (a goodbye the server may not hear: nothing to do about it)
                pass
            self._abort(client)

    # -- the session: read what is new, then wait for more --

    async def _serve(self, client: aioimaplib.IMAP4, uidvalidity: int) -> None:
        retry = None  # backoff delays while the layer refuses
        while not self.stopping:
            if await self._read_new(client, uidvalidity):
                retry = None
                if self.stopping:
                    break
                if self.mail_arrived:
                    continue  # told of a mail while looking: look again rather than IDLE past it
                if client.has_capability("IDLE"):
                    await self._idle(client)
                else:
                    await self._nap(self.options["imap_poll_interval"])
            else:  # the layer is full or down: the mail stays unread and is tried again, first in line
                retry = retry or backoff_delays(0.5, 30.0)
                await self._nap(next(retry))

    async def _nap(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the bridge stops meanwhile."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except TimeoutError:
            pass

    async def _idle(self, client: aioimaplib.IMAP4) -> None:
        """IDLE until the server says a mail arrived, or ``imap_idle_renew`` passed (then the caller looks and IDLEs
        again: a renewal)."""
        renew = self.options["imap_idle_renew"]
        idle = await client.idle_start(timeout=renew)
        self.idling = True
        self.idles += 1
        try:
            while not self.stopping and not self.mail_arrived:  # told before the IDLE began: look again now
                pushed = await client.wait_server_push(timeout=renew + self.options["imap_timeout"])
                if pushed == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                if any(b"EXISTS" in bytes(line) for line in pushed if isinstance(line, (bytes, bytearray))):
                    break  # a new mail (an EXPUNGE or a flag change is no reason to look)
        finally:
            self.idling = False
        # Not in the finally: a cancelled session (the connection is gone) must not wait for an answer to DONE.
        client.idle_done()
        _ok(await asyncio.wait_for(idle, self.options["imap_timeout"]), "IDLE")

    async def _read_new(self, client: aioimaplib.IMAP4, uidvalidity: int) -> bool:
        self.mail_arrived = False  # from here on an EXISTS means: look again before IDLE
        """Deliver every new unseen mail in UID order; False when the layer refused one (the rest wait too)."""
        searched = _ok(await client.uid_search("UNSEEN", charset=None), "UID SEARCH UNSEEN")
        plan = mb.plan(self.cursor or mb.Cursor(), uidvalidity, mb.uids_of_search(searched.lines))
        if plan.uidvalidity_changed:
            self.bridge.log.warning("%s: the UIDVALIDITY of %s changed (%s to %s): its unseen mail is read again "
                                    "from the start", self.bridge.label, self.describe,
                                    (self.cursor or mb.Cursor()).uidvalidity, uidvalidity)
            self.bridge.count("imap_uidvalidity_changes")
        self.cursor = plan.cursor
        if plan.mark_seen:  # delivered before, but the connection dropped before their \Seen was stored
            await self._mark(client, plan.mark_seen, delivered=True)
        for start in range(0, len(plan.deliver), _BATCH):
            batch = plan.deliver[start:start + _BATCH]
            sized = _ok(await client.uid("fetch", mb.uid_set(batch), "(RFC822.SIZE)"), "UID FETCH RFC822.SIZE")
            sizes = mb.sizes_of_fetch(sized.lines)
            for uid in batch:
                if self.stopping:
                    return True
                if uid not in sizes:  # expunged meanwhile
                    continue
                if not await self._deliver(client, uid, sizes[uid]):
                    return False
        return True

    async def _deliver(self, client: aioimaplib.IMAP4, uid: int, size: int) -> bool:
        bridge = self.bridge
        bridge.count("received")
        peer = f"{self.describe} UID {uid}"
        try:
            if size > bridge.limits.max_message_size:  # never downloaded: its size is enough
                raise m.MailRefused(552, "5.3.4", f"message too big: {size} bytes, at most "
                                                  f"{bridge.limits.max_message_size}", "oversized")
            fetched = _ok(await client.uid("fetch", str(uid), "(BODY.PEEK[])"), "UID FETCH BODY.PEEK[]")
            raw = mb.body_of_fetch(fetched.lines, uid)
            if raw is None:
                return True  # expunged between the two fetches
            if len(raw) > bridge.limits.max_message_size:
                raise m.MailRefused(552, "5.3.4", "message too big", "oversized")
            received = await asyncio.get_running_loop().run_in_executor(None, self._read, raw)
            stored = await bridge.store_received(received)
        except MessageTooLarge:
            return await self._set_aside(client, uid, peer, m.MailRefused(
                552, "5.3.4", "message too big for the channel layer once decoded", "oversized"))
        except m.MailRefused as refusal:
            return await self._set_aside(client, uid, peer, refusal)
        if not stored:
            return False
        await self._advance(uid)
        await self._mark(client, [uid], delivered=True)
        bridge.count("imap_delivered")
        return True

    def _read(self, raw: bytes) -> m.Received:
        """One mail's bytes into its message (in an executor thread, as for SMTP); raises ``MailRefused``."""
        limits = self.bridge.limits
        mail = m.read_mail(raw, limits)
        try:
            envelope_from, envelope_to = mb.imap_envelope(
                *(None if mail.get(name) is None else str(mail.get(name))
                  for name in ("return-path", "from", "delivered-to", "to", "cc")), self.url.user)
        except Exception:  # noqa: BLE001 (the stdlib raises odd errors on hostile headers, as receive_message knows)
            raise m.MailRefused(554, "5.6.0", "message could not be read", "unreadable") from None
        return m.receive_message(mail, envelope_from=envelope_from, envelope_to=envelope_to,
                                 reply_prefix=self.bridge.prefix, limits=limits, budget=MAX_MESSAGE_SIZE - _HEADROOM,
                                 authenticated=m.authentication(), own_addresses=self.own_addresses)

    async def _set_aside(self, client: aioimaplib.IMAP4, uid: int, peer: str, refusal: m.MailRefused) -> bool:
        """A mail that will never be taken: counted, logged, and marked (or moved) so it is not read again."""
        self.bridge.refused_mail(peer, refusal)
        self.bridge.count("imap_set_aside")
        await self._advance(uid)
        await self._mark(client, [uid], delivered=False)
        return True

    async def _advance(self, uid: int) -> None:
        """Move the cursor past ``uid`` and store it; a layer that cannot store it is logged once (the cursor in
        memory and the mail's \\Seen still keep it from coming back)."""
        self.cursor = (self.cursor or mb.Cursor()).after(uid)
        try:
            await self.bridge.layer.kv_set(self.key, self.cursor.as_record(), CURSOR_TTL)
        except LayerError as exc:
            if not self._cursor_problem_logged:
                self._cursor_problem_logged = True
                self.bridge.log.warning("%s: cannot store how far %s was read (%s); its \\Seen flags still say it",
                                        self.bridge.label, self.describe, exc)
            return
        self._cursor_problem_logged = False

    async def _mark(self, client: aioimaplib.IMAP4, uids: list[int], *, delivered: bool) -> None:
        folder = self.options["imap_move_to"] if delivered else self.options["imap_refused_folder"]
        if folder:
            _ok(await client.uid("move", mb.uid_set(uids), mb.quoted_mailbox(folder)), f"UID MOVE to {folder}")
        else:
            flags = "(\\Seen)" if delivered else "(\\Seen \\Flagged)"
            _ok(await client.uid("store", mb.uid_set(uids), "+FLAGS.SILENT", flags), "UID STORE \\Seen")
