"""The email bridge's outbound side: replies and ``email.send`` mails, through the smarthost, with aiosmtplib.

This module owns what happens to a mail a consumer asked for, from the
consumer's message to the smarthost's answer: ``Sending`` builds it
(``messages.build_reply`` / ``build_send``), holds back replies to automatic
mail and over the per-recipient rate limit, and hands it to the ``Outbox``: a
bounded queue (mails and bytes) and the one task that sends it, in order, over
one aiosmtplib connection on the bridge's loop (STARTTLS when offered or
required, implicit TLS for ``smtps://``, AUTH only over TLS, the certificate
verified), kept open for ``smarthost_idle_timeout`` seconds once the queue is
empty. A 4xx answer or a smarthost that cannot be reached keeps the mail at
the head of the queue and retries it with jittered backoff; a 5xx answer drops
it, logged and counted. It must not touch the SMTP server (``bridge.py``) nor
decide what a mail holds (``messages.py``). docs/spec/email.md is the contract.

Why aiosmtplib: an asyncio client, so it runs on the reactor's own loop next to
the layer's client (no thread, no blocking smtplib), maintained, and it gives
each SMTP answer's code, which is what tells a retry from a drop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import aiosmtplib

from crossroads.bridges.options import Option, OptionError
from crossroads.bridges.protocol import positive, positive_seconds
from crossroads.layer.base import backoff_delays

from . import messages as m

_LOGGED_THREADS = 10000  # bounds the "log each suppressed thread once" memory
_FLUSH_WAIT = 5.0  # at stop, seconds the outbox may go on sending to a smarthost that is answering


def _smarthost(value: str) -> str | None:
    return m.check_smarthost(value) if value else None


def _address(value: str) -> str | None:
    if not value:
        return None
    try:
        m.parse_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _channel(value: str) -> str | None:
    if value == "" or (len(value) < 100 and re.fullmatch(r"[A-Za-z0-9_.-]+", value)):
        return None
    return f"must be a channel name like \"email.send\" (or \"\" for none), not {value!r}"


def _rate(value: float) -> str | None:
    return None if value > 0 else "must be more than 0 replies per second"


OPTIONS: dict[str, Option] = {
    "smarthost": Option(str, "", "smtp://host[:port] (STARTTLS when offered) or smtps://host[:port] (implicit TLS): "
                                 "where replies and email.send mails go; \"\" sends nothing", _smarthost),
    "smarthost_user": Option(str, "", "AUTH login at the smarthost (only over TLS)"),
    "smarthost_password": Option(str, "", "AUTH password at the smarthost (\"${credential:smarthost-password}\")"),
    "smarthost_require_tls": Option(bool, False, "send only over TLS (STARTTLS required of an smtp:// smarthost)",
                                    from_string=True),
    "smarthost_ca_file": Option(str, "", "PEM file of the CA(s) that sign the smarthost's certificate; default the "
                                         "system's"),
    "smarthost_timeout": Option(float, 30.0, "seconds to wait for the smarthost's answer to one command",
                                positive_seconds, from_string=True),
    "smarthost_idle_timeout": Option(float, 5.0, "seconds the connection to the smarthost stays open once no mail "
                                                 "waits, for the next one; 0 closes it at once",
                                     lambda v: None if v >= 0 else "must be 0 or more seconds", from_string=True),
    "smarthost_retry_max": Option(float, 60.0, "the longest wait between two tries of a mail the smarthost did not "
                                               "take (backoff with jitter, from 1 s)", positive_seconds,
                                  from_string=True),
    "from": Option(str, "", "the sender of email.send mails that name none; default the first of recipients, else "
                            "postmaster@ the first domain", _address),
    "message_id_domain": Option(str, "", "the domain of the Message-IDs we write; default the first domain"),
    "reply_rate": Option(float, 1 / 60, "replies per second to one recipient, after reply_burst", _rate,
                         from_string=True),
    "reply_burst": Option(int, 5, "replies to one recipient at once", positive, from_string=True),
    "threads": Option(int, 100000, "threads remembered for replies (the least recent are forgotten)", positive,
                      from_string=True),
    "send_channel": Option(str, m.SEND, "the channel of email.send messages the bridge consumes; \"\" for none",
                           _channel),
    "outbound_queue_limit": Option(int, 1000, "mails waiting for the smarthost; beyond it the oldest is dropped",
                                   positive, from_string=True),
    "outbound_queue_bytes": Option(int, 64 * 1024 * 1024, "bytes of the mails waiting for the smarthost; beyond it "
                                                         "the oldest is dropped", positive, from_string=True),
}


class _TryLater(Exception):
    """The smarthost could not take the mail now (4xx, or the connection failed): keep it and retry."""


def _codes(exc: aiosmtplib.SMTPRecipientsRefused) -> dict[str, int]:
    return {refused.recipient: refused.code for refused in exc.recipients}


class Outbox:
    """Mails for the smarthost: a bounded queue, sent in order by one task over one connection at a time."""

    def __init__(self, bridge: Any, options: dict[str, Any], local_hostname: str) -> None:
        self.bridge = bridge  # counts, logs and hears of the smarthost's health
        self.smarthost = m.parse_smarthost(options["smarthost"])
        self.options = options
        self.local_hostname = local_hostname  # our EHLO name: never socket.getfqdn(), a DNS lookup on the loop
        self.queue: deque[m.Outgoing] = deque()
        self.queued_bytes = 0
        self.current: m.Outgoing | None = None  # taken from the queue, being sent
        self.failures = 0  # consecutive tries that failed for want of the smarthost
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._client: aiosmtplib.SMTP | None = None
        self._overflowing = False
        self.tls_context: ssl.SSLContext | None = None

    def __len__(self) -> int:
        return len(self.queue) + (self.current is not None)

    @property
    def label(self) -> str:
        return f"{self.bridge.label}: smarthost {self.smarthost}"

    def prepare(self) -> None:
        """Read the CAs the smarthost's certificate is verified with; ``OptionError`` naming ``smarthost_ca_file``."""
        ca_file = self.options["smarthost_ca_file"] or None
        try:  # verified by default: a smarthost's certificate is checked against the system's CAs or ca_file
            self.tls_context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise OptionError("smarthost_ca_file", f"cannot read {ca_file!r}: {exc}") from None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def put(self, outgoing: m.Outgoing) -> None:
        """Queue a mail; the oldest waiting are dropped (counted, logged once per overflow) past the limits."""
        self.queue.append(outgoing)
        self.queued_bytes += len(outgoing.data)
        self._idle.clear()
        self._trim()
        self._wake.set()

    def _trim(self) -> None:
        """Drop the oldest mails while the queue is over a limit (one mail, however big, may always wait)."""
        dropped = 0
        while len(self.queue) > 1 and (len(self.queue) > self.options["outbound_queue_limit"]
                                       or self.queued_bytes > self.options["outbound_queue_bytes"]):
            self.queued_bytes -= len(self.queue.popleft().data)
            dropped += 1
        if dropped:
            self.bridge.count("outbound_dropped", dropped)
            self.bridge.count("dropped", dropped)
            if not self._overflowing:  # once per overflow: a long outage must not write a line per mail
                self._overflowing = True
                self.bridge.log.warning(
                    "%s: the outbound queue is full (outbound_queue_limit %d, outbound_queue_bytes %d): dropping "
                    "the oldest mails; they are counted in outbound_dropped", self.label,
                    self.options["outbound_queue_limit"], self.options["outbound_queue_bytes"])

    async def close(self) -> None:
        """Send what the smarthost is answering for a few seconds more, then stop; log what is left unsent."""
        try:
            if self.failures == 0 and not self._idle.is_set():
                try:
                    await asyncio.wait_for(self._idle.wait(), _FLUSH_WAIT)
                except TimeoutError:
                    pass
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            await self._disconnect()
            left = len(self)
            if left:
                self.bridge.count("outbound_dropped", left)
                self.bridge.count("dropped", left)
                self.bridge.log.warning("%s: stopping with %d mail(s) still queued for the smarthost: they are not "
                                        "sent (counted in outbound_dropped)", self.label, left)

    # -- the sender --

    async def _run(self) -> None:
        delays: Iterator[float] | None = None
        while True:
            if not self.queue:
                self._idle.set()
                self._overflowing = False
                await self._wait_for_mail()
                continue
            outgoing = self.current = self.queue.popleft()
            self.queued_bytes -= len(outgoing.data)
            try:
                retry, reason = await self._send(outgoing), None
            except _TryLater as exc:
                retry, reason = outgoing, str(exc)
            except asyncio.CancelledError:  # the bridge stops: the mail is still queued, and close() says so
                self.queue.appendleft(outgoing)
                self.queued_bytes += len(outgoing.data)
                raise
            except Exception:  # a failure of ours: logged, and this mail dropped rather than retried forever
                self.bridge.count("errors")
                self.bridge.log.exception("%s: sending mail %s failed", self.label, outgoing.message_id)
                self._not_delivered(outgoing, "the bridge failed to send it (see the traceback above)")
                retry = None
            finally:
                self.current = None
            if retry is None:
                if self.failures:
                    self.failures = 0
                    self.bridge.clear_problem("smarthost", ": mail flows again")
                delays = None
                continue
            self.queue.appendleft(retry)  # order kept: the same mail goes first on the next try
            self.queued_bytes += len(retry.data)
            self._trim()  # the queue filled while it was out: it is the oldest
            await self._disconnect()
            self.failures += 1
            self.bridge.count("smarthost_retries")
            delays = delays or backoff_delays(min(1.0, self.options["smarthost_retry_max"]),
                                              self.options["smarthost_retry_max"])
            delay = next(delays)
            self.bridge.set_problem("smarthost", f"{self.smarthost}: {reason or 'some recipients must wait'}; "
                                                 f"{len(self)} mail(s) queued, retrying in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _wait_for_mail(self) -> None:
        """Until ``put()`` queues a mail. The connection stays open ``smarthost_idle_timeout`` seconds of it, so
        replies one after the other do not each pay a connection, the greeting, EHLO, STARTTLS, AUTH and QUIT;
        then it is closed, so as not to hold the smarthost's connection while nothing is sent."""
        self._wake.clear()
        keep = self.options["smarthost_idle_timeout"]
        if keep > 0 and self._client is not None and self._client.is_connected:
            try:
                await asyncio.wait_for(self._wake.wait(), keep)
                return
            except TimeoutError:
                pass
        await self._disconnect()
        if not self.queue:  # put() may have run while disconnecting: its wake-up must not be lost
            await self._wake.wait()

    async def _send(self, outgoing: m.Outgoing) -> m.Outgoing | None:
        """One try of one mail (see ``_send_once``). A kept connection the smarthost closed as the mail went out
        (it ends idle connections when it likes) is no failure of the smarthost's: the mail goes again at once
        over a new connection, and only a failure there counts."""
        kept = self._client is not None and self._client.is_connected
        try:
            return await self._send_once(outgoing)
        except _TryLater as exc:
            if not kept or not isinstance(exc.__cause__, ConnectionError):
                raise
        await self._disconnect()
        return await self._send_once(outgoing)

    async def _send_once(self, outgoing: m.Outgoing) -> m.Outgoing | None:
        """One try of one mail: None when it is done with (sent, or refused for good), else what to retry (the mail,
        or a copy for the recipients the smarthost deferred). Raises ``_TryLater`` for a failure of the connection."""
        try:
            client = await self._connected()
            refused = await client.sendmail(outgoing.mail_from, list(outgoing.rcpt_tos), outgoing.data,
                                            mail_options=["SMTPUTF8"] if outgoing.smtputf8 else [])
            refused_codes = {rcpt: response.code for rcpt, response in refused[0].items()}
            self.bridge.count("mails_sent")
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused_codes = _codes(exc)
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
            if 400 <= exc.code < 500:
                raise _TryLater(f"answered {exc.code} {exc.message}") from exc
            self._not_delivered(outgoing, f"answered {exc.code} {exc.message}")
            return None
        except aiosmtplib.SMTPNotSupported as exc:  # SMTPUTF8 needed, not offered: a retry won't help
            self._not_delivered(outgoing, str(exc))
            return None
        except (OSError, aiosmtplib.SMTPException) as exc:  # refused, reset, timed out, TLS (certificate), AUTH...
            raise _TryLater(_describe(exc)) from exc
        except ValueError as exc:  # aiosmtplib's check of an address (ours are checked before): a retry won't help
            self._not_delivered(outgoing, str(exc))
            return None
        if not refused_codes:
            return None
        later = tuple(rcpt for rcpt, code in refused_codes.items() if 400 <= code < 500)
        never = {rcpt: code for rcpt, code in refused_codes.items() if rcpt not in later}
        if never:
            self._not_delivered(outgoing, "recipients refused: " + ", ".join(f"{r} ({c})" for r, c in never.items()))
        return dataclasses.replace(outgoing, rcpt_tos=later) if later else None

    def _not_delivered(self, outgoing: m.Outgoing, why: str) -> None:
        self.bridge.count("not_delivered")
        self.bridge.count("dropped")
        self.bridge.log.warning("%s: mail %s to %s not delivered: %s", self.label, outgoing.message_id,
                                ", ".join(outgoing.rcpt_tos), why)

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            return self._client
        options, implicit = self.options, self.smarthost.tls
        client = aiosmtplib.SMTP(
            hostname=self.smarthost.host, port=self.smarthost.port, local_hostname=self.local_hostname,
            timeout=options["smarthost_timeout"], use_tls=implicit, tls_context=self.tls_context,
            start_tls=False if implicit else (True if options["smarthost_require_tls"] else None))
        self._client = client
        await client.connect()
        if options["smarthost_user"]:
            if not (implicit or client.get_transport_info("sslcontext") is not None):
                raise aiosmtplib.SMTPException("the smarthost offers no STARTTLS: not sending the password in clear")
            await client.login(options["smarthost_user"], options["smarthost_password"])
        return client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None or not client.is_connected:
            return
        try:
            await asyncio.wait_for(client.quit(), 5.0)
        except (OSError, aiosmtplib.SMTPException, TimeoutError):
            client.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate did not verify ({exc.verify_message}; smarthost_ca_file names the CA)"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"answered {exc.code} {exc.message}"
    return f"{type(exc).__name__}: {exc}"


class Sending:
    """What becomes of a consumer's reply or ``email.send`` message: built, checked, held back or queued."""

    def __init__(self, bridge: Any, options: dict[str, Any], domains: set[str], recipients: set[str]) -> None:
        self.bridge = bridge
        self.options = options
        recipient_domains = {address.rpartition("@")[2] for address in recipients}
        first_domain = m.parse_domain(options["domains"][0]) if options["domains"] else None
        first_recipient = options["recipients"][0].lower() if options["recipients"] else None
        self.domain = (options["message_id_domain"] or first_domain
                       or (first_recipient or "localhost").rpartition("@")[2])
        self.from_domains = domains | recipient_domains
        self.default_from = options["from"] or first_recipient or f"postmaster@{first_domain}"
        self.rate = m.RateLimit(options["reply_rate"], options["reply_burst"])
        self.outbox = Outbox(bridge, options, bridge.hostname) if options["smarthost"] else None
        self._suppressed_logged: OrderedDict[str, None] = OrderedDict()
        self._limited_logged: OrderedDict[str, None] = OrderedDict()
        self._consumer: asyncio.Task | None = None
        self._no_smarthost_logged = False

    def prepare(self) -> None:
        """What can fail on the bridge's options (``OptionError``), before the bridge opens anything."""
        if self.outbox is not None:
            self.outbox.prepare()

    def start(self) -> None:
        if self.outbox is None:
            return
        self.outbox.start()
        channel = self.options["send_channel"]
        if channel:
            self._consumer = asyncio.ensure_future(self._consume(channel))

    async def stop_consuming(self) -> None:
        if self._consumer is not None:
            await asyncio.gather(self._consumer, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_consuming()
        if self.outbox is not None:
            await self.outbox.close()

    def reply(self, local_id: str, thread: m.Thread | None, message: Any) -> None:
        """A reply on a thread's channel: sent to the thread's latest mail, unless it must not be."""
        if thread is None:  # registered and remembered together: only a bug gets here
            raise RuntimeError(f"thread {local_id} is registered but not remembered")
        if self.outbox is None:
            self._not_sent(local_id)
            return
        try:
            outgoing = m.build_reply(thread, message, domain=self.domain)
        except m.InvalidReply as exc:
            self._invalid(f"a reply to thread {local_id}", exc)
            return
        why = m.suppressed(thread.auto, force=message.get("force", False))
        if why is not None:
            self.bridge.count("suppressed_replies")
            self.bridge.count("dropped")
            if _first_time(self._suppressed_logged, local_id):
                self.bridge.log.info("%s: not sending a reply to thread %s: %s; further ones are counted in "
                                     "suppressed_replies", self.bridge.label, local_id, why)
            return
        now = time.monotonic()
        limited = [rcpt for rcpt in outgoing.rcpt_tos if not self.rate.allow(rcpt, now)]
        if limited:
            self.bridge.count("rate_limited")
            self.bridge.count("dropped")
            for rcpt in limited:
                if _first_time(self._limited_logged, rcpt.lower()):
                    self.bridge.log.warning("%s: not sending a reply to %s: over reply_rate (%g/s after %d at once); "
                                            "further ones are counted in rate_limited", self.bridge.label, rcpt,
                                            self.options["reply_rate"], self.options["reply_burst"])
            return
        self.outbox.put(outgoing)

    def send(self, message: Any) -> None:
        """An ``email.send`` message: a new mail (not rate-limited: a consumer chose to send it)."""
        try:
            outgoing = m.build_send(message, domain=self.domain, default_from=self.default_from,
                                    domains=self.from_domains)
        except m.InvalidReply as exc:
            self._invalid(f"a message on {self.options['send_channel']}", exc)
            return
        self.outbox.put(outgoing)

    async def _consume(self, channel: str) -> None:
        def send_all(batch: list[tuple[str, dict]]) -> None:
            for _, message in batch:
                self.send(message)

        # A bounded wait, so stop_accepting() ends the loop without cancelling a receive in flight
        # (cancelling one on Redis can lose the message being popped), as the MQTT bridge's mqtt.publish.
        await self.bridge.receive_batches([channel], 100, send_all, channel, timeout=1.0,
                                          running=lambda: self.bridge.accepting)

    def _invalid(self, what: str, exc: m.InvalidReply) -> None:
        self.bridge.count("invalid_replies")
        self.bridge.count("dropped")
        self.bridge.log.warning("%s: not sending %s: %s", self.bridge.label, what, exc)

    def _not_sent(self, local_id: str) -> None:
        self.bridge.count("replies_not_sent")
        self.bridge.count("dropped")
        if not self._no_smarthost_logged:
            self._no_smarthost_logged = True
            self.bridge.log.warning("%s: dropped a reply to thread %s: no smarthost is configured to send it; "
                                    "further replies are counted in replies_not_sent", self.bridge.label, local_id)


def _first_time(logged: OrderedDict[str, None], key: str) -> bool:
    if key in logged:
        return False
    logged[key] = None
    if len(logged) > _LOGGED_THREADS:
        logged.popitem(last=False)
    return True
