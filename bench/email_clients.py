"""The plain sides of ``bench/mail.py``: the SMTP load (stdlib smtplib) and the competitor, a bare aiosmtpd server.

Owns these modes, run as ``python bench/email_clients.py '<json spec>'`` with the ``.bench-venvs/aiosmtpd``
interpreter (aiosmtpd alone, at ``.venv``'s version, so the bare server and the bridge speak SMTP with the same
code and differ only in what they do with a mail):

- ``serve``: the bare receiver: aiosmtpd's ``SMTP`` protocol on ``loop.create_server``, its handler's
  ``handle_DATA`` answering ``250 OK`` and doing nothing else: the ceiling a hand-written receiver reaches;
- ``send``: one SMTP client on one connection, sending ``count`` mails of ``size`` bytes back to back
  (MAIL FROM, RCPT TO, DATA), retrying a mail answered 4xx (451 when crossroads' layer is full), as an MTA would;
- ``versions``: the installed versions of some packages (to check the venv).

Every mail's Subject is ``<run> <seq>``: the consumer counts distinct ``(run, seq)`` pairs, so it can tell a
lost mail from one delivered twice. ``send`` prints ``{"ready": true}`` once connected (EHLO answered), waits
for a line on stdin (the harness starts every client at once), then prints its result as a JSON line.
Timestamps are ``time.monotonic_ns()``, one clock for every process on Linux.

The reply-latency scenario (from the end of DATA to the reply arriving at the smarthost) adds two:

- ``smarthost``: the recording smarthost, a bare aiosmtpd server that takes every mail and prints, the moment
  its DATA is in, ``{"run", "seq", "ns", "ehlo_ns"}``: the run and sequence number from the reply's Subject
  (``Re: <run> <seq>``), when its DATA was in and when its session's EHLO came (the sender's SMTP session
  with the smarthost, from its greeting to the end of the mail, is ``ns - ehlo_ns`` and a bit);
- ``replier``: the hand-written competitor: aiosmtpd's ``SMTP`` whose ``handle_DATA`` parses the mail
  (``policy.default``), answers ``250 OK`` and sends the reply itself with ``aiosmtplib.send`` (one connection
  per reply, as that call does; a task, so the 250 does not wait on the smarthost).
"""

from __future__ import annotations

import json
import smtplib
import sys
import time
from typing import Any

SENDER = "load@client.example"
LINE = 76  # body line length: under SMTP's 998 and the 78 of RFC 5322's advice


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def mail(run: str, seq: int, size: int, to: str) -> bytes:
    """A plain-text mail of ``size`` bytes (CRLF line ends, no line starting with a dot), Subject ``<run> <seq>``."""
    head = (f"From: Load <{SENDER}>\r\nTo: <{to}>\r\nSubject: {run} {seq}\r\n"
            f"Message-ID: <{seq}.{run}@client.example>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    left = size - len(head)
    if left < 2:
        raise SystemExit(f"size {size} is smaller than the headers ({len(head)} bytes)")
    full, rest = divmod(left, LINE + 2)
    lines = [b"x" * LINE] * full
    if rest >= 2:
        lines.append(b"y" * (rest - 2))
    elif rest == 1:  # a lone byte cannot end a line: the last full line takes it
        lines[-1] = b"x" * (LINE + 1)
    body = b"".join(line + b"\r\n" for line in lines)
    return head + body


def transaction(client: smtplib.SMTP, to: str, body: bytes) -> int:
    """MAIL FROM, RCPT TO, DATA: the last status code (250 when the mail was taken). After a refusal at MAIL or
    RCPT, RSET ends the transaction; after DATA's answer it is over on both sides already."""
    code, _ = client.mail(SENDER)
    if code == 250:
        code, _ = client.rcpt(to)
        if code in (250, 251):
            try:
                code, _ = client.data(body)
            except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
                code = exc.smtp_code
            return code
    client.rset()
    return code


def send(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` mails over one connection; each 4xx answer is counted and the mail sent again after ``retry``
    seconds; a 5xx is counted and the mail given up (it never counts as accepted)."""
    host, port, to = spec["host"], spec["port"], spec["to"]
    run, size, first, count = spec["run"], spec["size"], spec.get("first_seq", 0), spec["count"]
    retry, timeout = spec.get("retry", 0.01), spec.get("timeout", 120.0)
    bodies = [mail(run, seq, size, to) for seq in range(first, first + count)]  # before the clock starts
    client = smtplib.SMTP(host, port, timeout=30)
    client.ehlo("load.client.example")
    emit({"ready": True})
    if not spec.get("no_wait"):
        sys.stdin.readline()  # the harness's go
    accepted: list[int] = []
    answers: dict[str, int] = {}  # status code -> how many, beside the 250s
    cpu_start, start = time.process_time(), time.monotonic_ns()
    deadline = time.monotonic() + timeout
    for offset, body in enumerate(bodies):
        while True:
            try:
                code = transaction(client, to, body)
            except smtplib.SMTPServerDisconnected:  # a 421, or the server went away: reconnect, send it again
                code = 421
                client.close()
                client = smtplib.SMTP(host, port, timeout=30)
                client.ehlo("load.client.example")
            if code == 250:
                accepted.append(first + offset)
                break
            answers[str(code)] = answers.get(str(code), 0) + 1
            if 500 <= code < 600 or time.monotonic() > deadline:
                break
            time.sleep(retry)
        if time.monotonic() > deadline:
            break
    end = time.monotonic_ns()
    cpu = time.process_time() - cpu_start
    client.quit()
    return {"accepted": len(accepted), "answers": answers, "start_ns": start,
            "end_ns": end, "cpu_s": cpu, "count": count}


def serve_until_stopped(handler: Any, hostname: str, spec: dict[str, Any]) -> dict[str, Any]:
    """aiosmtpd's SMTP with ``handler`` on ``spec``'s host and port, on this process's own loop, until SIGTERM."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname=hostname, loop=loop), spec["host"],
                                          spec["port"])
        emit({"ready": True})
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return {"stopped": True}


def serve(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare receiver, until SIGTERM."""

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's)
            return "250 OK"

    return serve_until_stopped(Handler(), "bare.bench.example", spec)


def smarthost(spec: dict[str, Any]) -> dict[str, Any]:
    """The recording smarthost, until SIGTERM: one line per mail taken, timed first thing in ``handle_DATA``."""
    import re


    subject = re.compile(rb"^Subject: (?:Re: )?(\S+) (\d+)\r?$", re.MULTILINE | re.IGNORECASE)

    class Handler:
        async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,  # noqa: N802
                              responses: list[str]) -> list[str]:
            session.host_name = hostname
            session.ehlo_ns = time.monotonic_ns()
            return responses

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's)
            now = time.monotonic_ns()
            found = subject.search(envelope.original_content or envelope.content)
            ehlo = getattr(session, "ehlo_ns", None)
            emit({"run": found[1].decode(), "seq": int(found[2]), "ns": now, "ehlo_ns": ehlo} if found
                 else {"unknown": True, "ns": now})
            return "250 OK"

    return serve_until_stopped(Handler(), "smarthost.bench.example", spec)


def replier(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare replying receiver, until SIGTERM: what a hand-written aiosmtpd + aiosmtplib program does."""
    import asyncio
    from email import policy
    from email.message import EmailMessage
    from email.parser import BytesParser
    from email.utils import make_msgid

    import aiosmtplib

    sending: set[asyncio.Task] = set()
    parser = BytesParser(policy=policy.default)

    async def send_reply(reply: EmailMessage) -> None:
        try:
            await aiosmtplib.send(reply, hostname=spec["smarthost_host"], port=spec["smarthost_port"])
        except (aiosmtplib.SMTPException, OSError) as exc:
            print(f"bench replier ERROR reply not sent: {exc}", file=sys.stderr, flush=True)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's)
            mail = parser.parsebytes(envelope.original_content or envelope.content)
            reply = EmailMessage()
            reply["From"], reply["To"] = envelope.rcpt_tos[0], mail["Reply-To"] or mail["From"]
            reply["Subject"] = f"Re: {mail['Subject']}"
            reply["Message-ID"] = make_msgid(domain=envelope.rcpt_tos[0].rpartition("@")[2])
            reply["In-Reply-To"] = reply["References"] = mail["Message-ID"]
            reply.set_content(f"Re {mail['Subject']}\n")
            task = asyncio.create_task(send_reply(reply))
            sending.add(task)
            task.add_done_callback(sending.discard)
            return "250 OK"

    return serve_until_stopped(Handler(), "replier.bench.example", spec)


def versions(spec: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {name: version(name) for name in spec["packages"]}


MODES = {"send": send, "serve": serve, "smarthost": smarthost, "replier": replier, "versions": versions}

if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    emit(MODES[given["mode"]](given))
