"""The email bridge's SMTP server with real clients: the standard library's smtplib, and swaks.

The bridge runs on the reactor's loop (conftest.py's ``run``); smtplib blocks,
so each client runs in a thread (``asyncio.to_thread``) while the loop serves
it. What a consumer sees is read from the layer the bridge sends to
(``email.receive``), ``memory://`` unless a test needs a real redis-server to
stop. Waits have deadlines; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
from contextlib import asynccontextmanager
from email import policy
from email.message import EmailMessage

import pytest
from servers import (
    RedisServer,
    free_port,
    running_in_process,
    take,
    wait_for_port,
    wait_until,
    wait_until_async,
    write_test_certificates,
)
from test_cli import write_config
from test_daemons import Daemon, socket_activated

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.email.bridge import EmailBridge

DOMAIN = "chat.example"


@asynccontextmanager
async def serving(options: dict | None = None, *, channel_layer=None):
    """A started EmailBridge for ``chat.example`` on a free port (no worker: tests read the layer)."""
    channel_layer = channel_layer or layer.from_url("memory://", capacity=100)
    bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN], **(options or {})}, channel_layer)
    async with running_in_process(bridge, None):
        yield bridge


def mail(subject: str = "Hello", text: str = "Hi there,\n\nhow are you?\n", sender: str = "ann@example.org",
         to: str = f"lobby@{DOMAIN}") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = f"Ann <{sender}>", to, subject
    message["Message-ID"] = "<first@example.org>"
    message.set_content(text)
    return message.as_bytes(policy=policy.SMTP)  # CRLF line ends, as on the wire


def client(bridge: EmailBridge) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", bridge.port, local_hostname="client.example", timeout=10)


def send(bridge: EmailBridge, raw: bytes, to: list[str] | None = None, sender: str = "ann@example.org") -> dict:
    """Send one mail with smtplib.sendmail (in the calling thread); the refused recipients."""
    with client(bridge) as smtp:
        return smtp.sendmail(sender, to or [f"lobby@{DOMAIN}"], raw)


async def in_thread(function, *args, **kwargs):
    return await asyncio.to_thread(function, *args, **kwargs)


async def nothing_more(channel_layer, channel: str = "email.receive") -> None:
    """The bridge sends before it answers 250, so once the client has its answer the layer has everything."""
    got, message = await channel_layer.receive([channel], timeout=0)
    assert got is None, f"unexpected {message!r}"


# -- receiving -----------------------------------------------------------------------------------------------


def test_a_mail_becomes_one_email_receive_with_the_spec_keys(run):
    async def scenario():
        async with serving() as bridge:
            refused = await in_thread(send, bridge, mail())
            message = await take(bridge.layer, "email.receive")
            await nothing_more(bridge.layer)
            return bridge, refused, message

    bridge, refused, message = run(scenario())
    assert refused == {}
    assert message["from"] == "ann@example.org" and message["to"] == [f"lobby@{DOMAIN}"]
    assert message["headers"]["subject"] == "Hello" and message["subject"] == "Hello"
    assert message["headers"]["from"] == "Ann <ann@example.org>"
    assert message["content"]["content-type"] == "text/plain"
    assert message["text"] == "Hi there,\n\nhow are you?" and message["body_text"].startswith("Hi there,")
    assert message["message_id"] == "<first@example.org>" and message["thread"] == "<first@example.org>"
    assert message["protocol"] == "email" and message["sender"] == "ann@example.org"
    assert message["reply_channel"] == bridge.prefix + message["room"] and message["room"].startswith("t.")
    assert message["authenticated"]["smtp_auth"] is None and message["authenticated"]["relay"] is None
    assert message["auto"] is None and message["defects"] == []
    assert bridge.counters["sent"] == 1 and bridge.counters["received"] == 1


def test_several_recipients_are_one_message_and_one_answer(run):
    async def scenario():
        async with serving({"recipients": ["ops@other.example"]}) as bridge:
            to = [f"lobby@{DOMAIN}", f"Help@{DOMAIN.upper()}", "ops@other.example"]
            refused = await in_thread(send, bridge, mail(), to)
            message = await take(bridge.layer, "email.receive")
            await nothing_more(bridge.layer)
            return refused, message, to

    refused, message, to = run(scenario())
    assert refused == {} and message["to"] == to


def test_swaks_delivers_a_mail(run):
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed: tests/system-packages.sh installs it (apt-get install -y swaks)"

    async def scenario():
        async with serving() as bridge:
            done = await asyncio.create_subprocess_exec(
                swaks, "--server", f"127.0.0.1:{bridge.port}", "--to", f"lobby@{DOMAIN}", "--from",
                "bob@example.org", "--header", "Subject: from swaks", "--body", "sent by swaks",
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            output, _ = await asyncio.wait_for(done.communicate(), 20)
            return done.returncode, output.decode(), await take(bridge.layer, "email.receive")

    code, output, message = run(scenario())
    assert code == 0, output
    assert "250 2.0.0" in output
    assert message["subject"] == "from swaks" and message["text"] == "sent by swaks"
    assert message["from"] == "bob@example.org"


# -- what is refused at the envelope ---------------------------------------------------------------------------


def test_a_foreign_recipient_is_refused_550_never_relayed(run):
    async def scenario():
        async with serving({"recipients": ["ops@other.example"]}) as bridge:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                await in_thread(send, bridge, mail(), ["someone@elsewhere.example", f"lobby@sub.{DOMAIN}",
                                                       "other@other.example"])
            await nothing_more(bridge.layer)
            return bridge, refused.value.recipients

    bridge, recipients = run(scenario())
    assert {code for code, _ in recipients.values()} == {550} and len(recipients) == 3
    assert all(b"5.1.1" in reply for _, reply in recipients.values())
    assert bridge.counters["bad_input"] == 3


def test_too_many_recipients_are_answered_452_and_the_rest_delivered(run):
    async def scenario():
        async with serving({"max_recipients": 2}) as bridge:
            to = [f"a@{DOMAIN}", f"b@{DOMAIN}", f"c@{DOMAIN}"]
            refused = await in_thread(send, bridge, mail(), to)
            return refused, await take(bridge.layer, "email.receive")

    refused, message = run(scenario())
    assert list(refused) == [f"c@{DOMAIN}"] and refused[f"c@{DOMAIN}"][0] == 452
    assert b"4.5.3" in refused[f"c@{DOMAIN}"][1]
    assert message["to"] == [f"a@{DOMAIN}", f"b@{DOMAIN}"]


def test_the_size_is_announced_and_enforced_with_552(run):
    big = mail(text=("x" * 70 + "\n") * 200)  # about 14 KB

    def at_mail_and_after_data(bridge):
        with client(bridge) as smtp:
            smtp.ehlo()
            announced = int(smtp.esmtp_features["size"])
            with pytest.raises(smtplib.SMTPSenderRefused) as at_mail:  # smtplib sends SIZE= itself
                smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], big)
            smtp.rset()
            assert smtp.mail("ann@example.org")[0] == 250  # no SIZE=: the size is found during DATA
            assert smtp.rcpt(f"lobby@{DOMAIN}")[0] == 250
            after_data = smtp.data(big)  # (smtplib returns the answer to the data, raising only for DATA itself)
            assert smtp.noop()[0] == 250  # the connection goes on
        return announced, at_mail.value, after_data

    async def scenario():
        async with serving({"max_message_size": 10000}) as bridge:
            result = await in_thread(at_mail_and_after_data, bridge)
            await nothing_more(bridge.layer)
            return bridge, result

    bridge, (announced, at_mail, after_data) = run(scenario())
    assert announced == 10000
    assert at_mail.smtp_code == 552 and b"5.3.4" in at_mail.smtp_error
    assert after_data[0] == 552 and b"5.3.4" in after_data[1]
    assert bridge.counters["oversized"] == 2 and bridge.counters["bad_input"] == 2


# -- AUTH and TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_test_certificates(tmp_path_factory.mktemp("smtp-tls"))


def test_auth_is_refused_before_tls_and_accepted_after_starttls(run, certificates):
    options = {"tls_cert": certificates["cert"], "tls_key": certificates["key"],
               "auth_users": "ann:s3cret\n# a comment\nbob:hunter2\n"}
    context = ssl.create_default_context(cafile=certificates["ca"])

    def session(bridge):
        with client(bridge) as smtp:
            smtp.ehlo()
            offered_before = smtp.has_extn("auth")
            with pytest.raises(smtplib.SMTPNotSupportedError):
                smtp.login("ann", "s3cret")
            forced = smtp.docmd("AUTH", "PLAIN AGFubgBzM2NyZXQ=")  # \0ann\0s3cret, sent anyway
            smtp.starttls(context=context)
            smtp.ehlo()
            offered_after = smtp.esmtp_features.get("auth", "")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("ann", "wrong")
            smtp.login("ann", "s3cret")
            smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail())
        return offered_before, forced, offered_after

    async def scenario():
        async with serving(options) as bridge:
            result = await in_thread(session, bridge)
            return result, await take(bridge.layer, "email.receive")

    (offered_before, forced, offered_after), message = run(scenario())
    assert not offered_before
    assert forced[0] == 538
    assert set(offered_after.split()) == {"LOGIN", "PLAIN"}
    assert message["authenticated"]["smtp_auth"] == "ann"


def test_require_starttls_refuses_mail_before_tls(run, certificates):
    options = {"tls_cert": certificates["cert"], "tls_key": certificates["key"], "require_starttls": True}
    context = ssl.create_default_context(cafile=certificates["ca"])

    def session(bridge):
        with client(bridge) as smtp:
            smtp.ehlo()
            before = smtp.mail("ann@example.org")
            smtp.starttls(context=context)
            smtp.ehlo()
            return before, smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail())

    async def scenario():
        async with serving(options) as bridge:
            result = await in_thread(session, bridge)
            return result, await take(bridge.layer, "email.receive")

    (before, refused), message = run(scenario())
    assert before[0] == 530 and refused == {} and message["subject"] == "Hello"


def test_implicit_tls_serves_smtps(run, certificates):
    options = {"tls": "implicit", "tls_cert": certificates["cert"], "tls_key": certificates["key"]}
    context = ssl.create_default_context(cafile=certificates["ca"])

    def over_tls(bridge):
        with smtplib.SMTP_SSL("127.0.0.1", bridge.port, context=context, timeout=10) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            assert not smtp.has_extn("auth")  # no auth_users: no AUTH line, not an empty one
            return smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail())

    async def scenario():
        async with serving(options) as bridge:
            refused = await in_thread(over_tls, bridge)
            return refused, await take(bridge.layer, "email.receive")

    refused, message = run(scenario())
    assert refused == {} and message["subject"] == "Hello"


def test_trusted_relays_mark_the_mail_and_their_results_are_read(run):
    raw = (b"Authentication-Results: mx.chat.example; spf=pass smtp.mailfrom=example.org; dkim=fail\r\n"
           b"Authentication-Results: evil.example; dmarc=pass\r\n" + mail())

    async def scenario():
        async with serving({"trusted_relays": ["127.0.0.0/8"], "authserv_id": "mx.chat.example"}) as bridge:
            await in_thread(send, bridge, raw)
            return await take(bridge.layer, "email.receive")

    authenticated = run(scenario())["authenticated"]
    assert authenticated == {"smtp_auth": None, "relay": "127.0.0.1", "spf": "pass", "dkim": "fail", "dmarc": None,
                             "arc": None}


# -- the acknowledgement is the guarantee ----------------------------------------------------------------------


def test_451_while_redis_is_stopped_and_the_same_mail_250_once_it_is_back(run, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    raw = mail(subject="kept by the sender")

    async def scenario():
        channel_layer = layer.from_url(redis.url, prefix="email-redis")
        try:
            async with serving(channel_layer=channel_layer) as bridge:
                redis.stop()  # killed, like a crash
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    await in_thread(send, bridge, raw)
                redis.start()
                retried = await in_thread(send, bridge, raw)  # what the sending MTA does with a 451
                message = await take(channel_layer, "email.receive")
                await nothing_more(channel_layer)
                return bridge, refused.value, retried, message
        finally:
            redis.stop()

    bridge, refused, retried, message = run(scenario(), timeout=60)
    assert refused.smtp_code == 451 and b"4.3.0" in refused.smtp_error
    assert retried == {} and message["subject"] == "kept by the sender"
    assert bridge.counters["refused"] == 1 and bridge.counters["sent"] == 1


def test_a_full_channel_answers_451(run):
    async def scenario():
        async with serving(channel_layer=layer.from_url("memory://", capacity=1)) as bridge:
            await in_thread(send, bridge, mail(subject="one"))
            with pytest.raises(smtplib.SMTPDataError) as refused:
                await in_thread(send, bridge, mail(subject="two"))
            assert (await take(bridge.layer, "email.receive"))["subject"] == "one"
            await in_thread(send, bridge, mail(subject="two"))  # room again: the retry is taken
            return refused.value, await take(bridge.layer, "email.receive")

    refused, message = run(scenario())
    assert refused.smtp_code == 451 and message["subject"] == "two"


def start_data(port: int) -> tuple[socket.socket, object]:
    """A raw SMTP session on ``port`` in the middle of DATA: half a mail sent, the final dot not yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    replies = [reader.readline()]
    for command in (b"EHLO client.example", b"MAIL FROM:<ann@example.org>", f"RCPT TO:<lobby@{DOMAIN}>".encode(),
                    b"DATA"):
        sock.sendall(command + b"\r\n")
        while True:
            line = reader.readline()
            replies.append(line)
            if line[3:4] != b"-":
                break
    assert replies[-1].startswith(b"354"), replies
    sock.sendall(b"Subject: half\r\n\r\nthe first half\r\n")
    return sock, reader


def finish_data(sock: socket.socket, reader) -> tuple[bytes, bytes]:
    """The rest of the mail and its dot; the answer to it, and the line after (421, or the end of the stream)."""
    sock.sendall(b"and the rest\r\n.\r\n")
    answer = reader.readline()
    rest = reader.readline()
    sock.close()
    return answer, rest


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return False
    return True


def test_stopping_mid_data_answers_451(run):
    async def scenario():
        bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN]}, layer.from_url("memory://"))
        await bridge.start()
        sock, reader = await in_thread(start_data, bridge.port)
        stopping = asyncio.ensure_future(bridge.stop(timeout=10))
        await wait_until_async(lambda: not bridge.accepting, "the bridge to stop accepting")
        answer, rest = await in_thread(finish_data, sock, reader)
        await stopping
        got, _ = await bridge.layer.receive(["email.receive"], timeout=0)
        await bridge.layer.close()
        return answer, rest, got

    answer, rest, got = run(scenario())
    assert answer.startswith(b"451 4.3.0"), answer
    assert rest in (b"", b"421 4.3.2 the gateway is shutting down, try again later\r\n")
    assert got is None


def daemon_config(tmp_path, redis_server, prefix: str, listening: str) -> str:
    return str(write_config(tmp_path, f"""[layer]
url = "{redis_server.url}"
prefix = "{prefix}"

[bridges.mail]
type = "email"
{listening}
domains = ["{DOMAIN}"]
"""))


def test_sigterm_mid_data_answers_451_and_the_daemon_exits_cleanly(tmp_path, redis_server, daemons):
    """`crossroads bridge mail` as a user runs it, over Redis: SIGTERM while a mail is half sent."""
    port = free_port()
    config = daemon_config(tmp_path, redis_server, "email-sigterm", f"port = {port}")
    bridge = Daemon(tmp_path, "bridge", "bridge", "mail", "--config", config)
    daemons.append(bridge)
    bridge.wait_ready()
    sock, reader = start_data(port)
    bridge.process.send_signal(signal.SIGTERM)
    assert bridge.notify.recv(100) == b"STOPPING=1"
    wait_until(lambda: not accepts_connections(port), "the bridge to stop listening (it stops accepting mail first)")
    answer, _ = finish_data(sock, reader)
    assert bridge.process.wait(30) == 0, bridge.log()
    assert answer.startswith(b"451 4.3.0"), (answer, bridge.log())
    redis_layer = layer.from_url(redis_server.url, prefix="email-sigterm")
    try:
        assert redis_layer.sync.receive(["email.receive"], timeout=0) == (None, None)
    finally:
        redis_layer.sync.close()


# -- bad input -------------------------------------------------------------------------------------------------


def test_mime_bombs_are_refused_and_the_bridge_keeps_serving(run):
    deep = (b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + b"".join(f"--b{n}\r\nContent-Type: multipart/mixed; boundary=b{n + 1}\r\n\r\n".encode()
                       for n in range(1000)) + b"--b1000--\r\n")
    wide = (b"Subject: wide\r\nContent-Type: multipart/mixed; boundary=w\r\n\r\n"
            + b"--w\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 5000 + b"--w--\r\n")
    unreadable = (b"Subject: idna\r\nContent-Type: text/plain; charset*=idna''%FF\r\n\r\nbody\r\n")

    def refusal(bridge, raw):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(bridge, raw)
        return refused.value.smtp_code, refused.value.smtp_error

    async def scenario():
        async with serving() as bridge:
            answers = [await in_thread(refusal, bridge, raw) for raw in (deep, wide, unreadable)]
            await in_thread(send, bridge, mail(subject="after the bombs"))
            message = await take(bridge.layer, "email.receive")
            await nothing_more(bridge.layer)
            return bridge, answers, message

    bridge, answers, message = run(scenario())
    assert answers == [(554, b"5.6.0 MIME parts nested too deep: more than 20"),
                       (554, b"5.6.0 too many MIME parts: more than 100"),
                       (554, b"5.6.0 message could not be read")]
    assert message["subject"] == "after the bombs"
    counters = bridge.counters
    assert (counters["too_deep"], counters["too_many_parts"], counters["unreadable"]) == (1, 1, 1)
    assert counters["bad_input"] == 3 and counters["errors"] == 0


def test_a_mail_with_too_many_addresses_is_refused_and_the_bridge_keeps_serving(run):
    # ~22 KiB, folded (SMTP lines end at 1,000 bytes): over the 16 KiB default
    cc = ",\r\n ".join(f'"Member {n}" <member{n}@example.org>' for n in range(600))
    crowded = mail(subject="crowded").replace(b"Subject: crowded", b"Cc: " + cc.encode() + b"\r\nSubject: crowded")

    def refusal(bridge, raw):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(bridge, raw)
        return refused.value.smtp_code, refused.value.smtp_error

    async def scenario():
        async with serving() as bridge:
            answer = await in_thread(refusal, bridge, crowded)
            await in_thread(send, bridge, mail(subject="after the crowd"))
            message = await take(bridge.layer, "email.receive")
            await nothing_more(bridge.layer)
            return bridge, answer, message

    bridge, answer, message = run(scenario())
    assert answer[0] == 552 and answer[1].startswith(b"5.3.4 address headers too large: more than 16384 bytes")
    assert message["subject"] == "after the crowd"
    assert bridge.counters["address_headers_too_large"] == 1 and bridge.counters["bad_input"] == 1


def test_syntax_errors_are_answered_counted_and_the_session_goes_on(run):
    def session(bridge):
        with client(bridge) as smtp:
            smtp.ehlo()
            answers = [smtp.docmd("MAIL", "FROM:"), smtp.docmd("FROBNICATE"),
                       smtp.docmd("MAIL", "FROM:<ann@example.org> COLOR=blue")]
            return answers, smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail())

    async def scenario():
        async with serving() as bridge:
            result = await in_thread(session, bridge)
            return bridge, result, await take(bridge.layer, "email.receive")

    bridge, (answers, refused), message = run(scenario())
    assert [code for code, _ in answers] == [501, 500, 555]
    assert bridge.counters["bad_input"] == 3 and refused == {} and message["subject"] == "Hello"


def test_bad_charsets_are_read_and_flagged(run):
    raw = (b"From: ann@example.org\r\nSubject: =?x-unknown?q?odd?=\r\n"
           b"Content-Type: text/plain; charset=x-unknown-charset\r\n\r\ncaf\xc3\xa9 and \xff\r\n")

    async def scenario():
        async with serving() as bridge:
            await in_thread(send, bridge, raw)
            return await take(bridge.layer, "email.receive")

    message = run(scenario())
    assert message["text"] == "café and \ufffd"
    assert any("x-unknown-charset" in defect for defect in message["defects"])
    assert message["content"]["body"] == b"caf\xc3\xa9 and \xff\r\n"  # nothing lost: the bytes are there


def test_connections_beyond_the_cap_are_answered_421(run):
    def two_at_once(bridge):
        with client(bridge) as first:
            assert first.noop()[0] == 250
            with pytest.raises(smtplib.SMTPConnectError) as second:
                client(bridge)
        return second.value.smtp_code

    async def scenario():
        async with serving({"max_connections": 1}) as bridge:
            code = await in_thread(two_at_once, bridge)
            await in_thread(send, bridge, mail())  # the first one gone, there is room again
            return bridge, code, await take(bridge.layer, "email.receive")

    bridge, code, message = run(scenario())
    assert code == 421 and bridge.counters["turned_away"] == 1 and message["subject"] == "Hello"


# -- options ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "key"), [
    ({"domains": []}, "domains"),
    ({"domains": ["not a domain"]}, "domains"),
    ({"recipients": ["nobody"]}, "recipients"),
    ({"tls": "implicit"}, "tls"),
    ({"tls": "sometimes"}, "tls"),
    ({"require_starttls": True}, "require_starttls"),
    ({"trusted_relays": ["mx.example"]}, "trusted_relays"),
    ({"auth_users": "ann"}, "auth_users"),
    ({"max_message_size": 600000}, "max_message_size"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(OptionError) as failed:
        EmailBridge.validate_options({"domains": [DOMAIN], **options})
    assert failed.value.key == key


def test_a_bounce_from_the_null_sender_is_taken_and_marked(run):
    async def scenario():
        async with serving() as bridge:
            await in_thread(send, bridge, mail(sender="mailer-daemon@example.org"), sender="")
            return await take(bridge.layer, "email.receive")

    message = run(scenario())
    assert message["from"] is None and message["auto"] == "bounce"


def test_it_serves_on_a_unix_socket(run, tmp_path):
    path = str(tmp_path / "smtp.sock")

    def greeting_and_quit():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            reader = sock.makefile("rb")
            greeting = reader.readline()
            sock.sendall(b"QUIT\r\n")
            return greeting, reader.readline()

    async def scenario():
        async with serving({"unix_socket": path}) as bridge:
            return bridge.port, await in_thread(greeting_and_quit)

    port, (greeting, bye) = run(scenario())
    assert port is None and greeting.startswith(b"220 chat.example") and bye.startswith(b"221")


def test_an_idle_connection_is_closed(run):
    def wait_for_close(bridge):
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=20) as sock:
            reader = sock.makefile("rb")
            greeting = reader.readline()
            return greeting, reader.readline()  # b"" once the server closes it

    async def scenario():
        async with serving({"idle_timeout": 0.2}) as bridge:
            return await in_thread(wait_for_close, bridge)

    greeting, after = run(scenario())
    assert greeting.startswith(b"220") and after == b""


def test_a_mail_trickled_a_line_at_a_time_is_cut_off_at_idle_timeout(run):
    """idle_timeout bounds a whole command or DATA, not the gap between bytes: aiosmtpd restarts it only at a
    valid command, so a DATA trickled a line every 0.3 s ends at 1 s (the hardening issue's slow-request finding)."""

    def trickle(bridge) -> tuple[int, bool]:
        sock, _ = start_data(bridge.port)
        sent, closed = 0, False
        with sock:
            for n in range(60):  # 18 s at most, against an idle_timeout of 1 s
                try:
                    sock.sendall(b"line %d\r\n" % n)
                except OSError:
                    closed = True
                    break
                sent += 1
                readable, _, _ = select.select([sock], [], [], 0.3)
                if readable and not sock.recv(1024):
                    closed = True
                    break
        return sent, closed

    async def scenario():
        async with serving({"idle_timeout": 1}) as bridge:
            sent, closed = await in_thread(trickle, bridge)
            got, _ = await bridge.layer.receive(["email.receive"], timeout=0)
            return sent, closed, got

    sent, closed, got = run(scenario())
    assert closed and sent < 20 and got is None, (sent, closed)


def test_systemd_socket_activation(tmp_path, redis_server):
    """systemd-socket-activate holds port 25's stand-in and passes it, named, to `crossroads bridge mail`."""
    port = free_port()
    config = daemon_config(tmp_path, redis_server, "email-activated", 'systemd_socket = "smtp"')
    bridge = socket_activated(f"127.0.0.1:{port}", "smtp", "bridge", "mail", "--config", config)
    redis_layer = layer.from_url(redis_server.url, prefix="email-activated")
    try:
        wait_for_port(port, bridge)  # the port is open before the bridge runs: systemd's point
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            assert smtp.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail()) == {}
        got, message = redis_layer.sync.receive(["email.receive"], timeout=10)
        assert got == "email.receive" and message["subject"] == "Hello"
        bridge.terminate()
        assert bridge.wait(30) == 0, bridge.communicate(timeout=5)[0]
    finally:
        if bridge.poll() is None:
            bridge.kill()
        redis_layer.sync.close()


def test_an_unreadable_certificate_fails_the_start_naming_the_option(run, tmp_path, certificates):
    bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN], "tls_cert": str(tmp_path / "missing.pem"),
                                  "tls_key": certificates["key"]}, layer.from_url("memory://"))
    with pytest.raises(OptionError) as failed:
        run(bridge.start())
    assert failed.value.key == "tls_cert" and "missing.pem" in str(failed.value)
    with pytest.raises(OptionError) as mismatched:  # a key that is not the certificate's
        run(EmailBridge("mail", {"port": 0, "domains": [DOMAIN], "tls_cert": certificates["ca"],
                                 "tls_key": certificates["key"]}, layer.from_url("memory://")).start())
    assert mismatched.value.key == "tls_key"


PATHS = ["<a@b>", "<a@b> SIZE=100", "<a@b>  SIZE=100 BODY=8BITMIME", "<a@b>\tX=1", "<a@b>(comment) SIZE=1",
         "<a@b> (c) SIZE=1", "<a@b>X", "<>", "<> SIZE=1", "<a@b", "a@b", "a@b SIZE=1", " <a@b>", "<a.b@c.d>",
         "<a..b@c>", "<.a@b>", "<a@b.>", '<"q r"@b>', "<jürgen@bücher.de>", "<a@b>\x0bX", "<a@b> \u00a0X", "<a@b>   ",
         "<@route:a@b>", "<a@[1.2.3.4]>", "<o'brien+tag=x?y@ex-ample.org> SMTPUTF8", "<a b@c>", "<a@b>>", ""]


@pytest.mark.parametrize("limit", [0, 3])
def test_smtp_paths_are_read_as_aiosmtpd_reads_them(limit):
    # the bridge's shortcut for plain <a@b> paths (aiosmtpd's own parse costs a fifth of a small mail's CPU) gives
    # aiosmtpd's answer for every path, plain or not, with and without a local-part limit
    from aiosmtpd.smtp import SMTP

    from crossroads.bridges.email.bridge import SmtpConnection

    connection = object.__new__(SmtpConnection)
    connection.local_part_limit = limit
    for path in PATHS:
        assert connection._getaddr(path) == SMTP._getaddr(connection, path), path


def _data_cases() -> list[bytes]:
    """DATA inputs whose reading is easy to get wrong: stuffed dots, a dot line that does not end the mail, bare CR
    and LF, lines around aiosmtpd's 1,001-byte cap, mails around and over the size limit."""
    cases = [b".\r\n", b"a\r\n.\r\n", b"Hello.\r\n.\r\n", b"..x\r\n..\r\n.\r\n", b".a\r\nb\r\n.\r\n",
             b"a\nb\n.\r\n.\r\n", b"a\r.\r\n.\r\n", b"\r\n.\r\n", b"\r\n\r\n.\r\n", b"a.\r\n" * 400 + b".\r\n",
             b"w" * 98 + b"\r\n.\r\n", b"w" * 99 + b"\r\n.\r\n", b"y" * 90 + b"\r\n" + b"z" * 20 + b"\r\n.\r\n",
             *(b"x" * n + b"\r\n.\r\n" for n in (997, 998, 999, 1000, 1001, 1002, 5000))]
    pieces = [b"..", b"a.", b"\n.", b".\r", b"q" * 40, b"x" * 700, b"x" * 1000, b""]
    for seed in range(40):  # fixed mixtures of those lines
        cases.append(b"".join(pieces[(seed * 7 + i * i) % len(pieces)] + b"\r\n" for i in range(seed % 13)) + b".\r\n")
    return cases


@pytest.mark.parametrize("limit", [100, 2000, 33554432])
def test_data_is_read_as_aiosmtpd_reads_it(run, limit):
    # the bridge's DATA (a small mail in one read) gives aiosmtpd's own smtp_DATA's answers and content, served by
    # both over TCP, for mails sent whole and sent in pieces
    from aiosmtpd.smtp import SMTP

    from crossroads.bridges.email.bridge import SmtpConnection

    class Ours(SMTP):
        smtp_DATA = SmtpConnection.smtp_DATA
        _data, _read_data, _data_lines = SmtpConnection._data, SmtpConnection._read_data, SmtpConnection._data_lines
        in_data = None

    class Keep:
        def __init__(self) -> None:
            self.contents: list[bytes] = []

        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
            self.contents.append(bytes(envelope.original_content))
            return "250 OK"

    async def answers(port: int, body: bytes, piece: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got: list[bytes] = []

        async def reply() -> None:
            while (line := await reader.readline())[3:4] == b"-":
                pass
            got.append(line)

        await reply()
        for command in (b"EHLO client.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d.example>", b"DATA"):
            writer.write(command + b"\r\n")
            await reply()
        for start in range(0, len(body), piece):
            writer.write(body[start:start + piece])
            await writer.drain()
            await asyncio.sleep(0)
        await reply()
        writer.write(b"NOOP\r\n")  # the session goes on after the mail
        await reply()
        writer.close()
        return got

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for kind in (SMTP, Ours):
            keep = Keep()
            server = await loop.create_server(lambda kind=kind, keep=keep: kind(keep, data_size_limit=limit, loop=loop),
                                              "127.0.0.1", 0)
            servers.append((server, keep, server.sockets[0].getsockname()[1]))
        try:
            for body in _data_cases():
                for piece in (len(body), 7, 1000):
                    theirs, ours = [await answers(port, body, piece) for _, _, port in servers]
                    assert ours == theirs, (body[:80], piece)
                    assert servers[1][1].contents == servers[0][1].contents, (body[:80], piece)
        finally:
            for server, _, _ in servers:
                server.close()
                await server.wait_closed()

    run(scenario(), timeout=120)
