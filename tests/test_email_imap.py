"""The email bridge reading a mailbox over IMAP, against a real Dovecot (``dovecot-imapd``) the tests start.

Dovecot runs with a scratch config on free ports (tests/servers.py's
``DovecotServer``): IMAPS with a test certificate, plain IMAP offering
STARTTLS. Mail gets into the box the way a user's mail does, through another
client: the standard library's imaplib APPENDs it, and reads the flags the
bridge left. What a consumer sees is read from the layer the bridge sends to.
The bridge runs with ``smtp = false`` (only the mailbox), on the reactor's loop
(conftest.py's ``run``); imaplib blocks, so it runs in a thread. Waits have
deadlines; none is a bare sleep.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
import smtplib
import ssl
from contextlib import asynccontextmanager
from email import policy
from email.message import EmailMessage

import pytest
from servers import (
    DovecotServer,
    RedisServer,
    Smarthost,
    running_in_process,
    take,
    wait_until_async,
    write_test_certificates,
)

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.email.bridge import EmailBridge

PASSWORD = "s3cret-imap-pw"


@pytest.fixture
def certs(tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    return write_test_certificates(folder)


@pytest.fixture
def dovecot(tmp_path, certs):
    server = DovecotServer(tmp_path / "dovecot", users={"bot": PASSWORD}, tls=certs).start()
    yield server
    server.cleanup()


def mail(subject: str = "Hello", text: str = "Hi bot,\n\nwhat is new?\n",
         message_id: str = "<m1@example.org>") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "Ann <ann@example.org>", "bot@mail.example", subject
    message["Message-ID"] = message_id
    message.set_content(text)
    return message.as_bytes(policy=policy.SMTP)


class OtherClient:
    """The user's own mail client (imaplib, blocking): it puts mail in the box and looks at the flags."""

    def __init__(self, server: DovecotServer, certs: dict[str, str]) -> None:
        self.server, self.context = server, ssl.create_default_context(cafile=certs["ca"])

    def _session(self) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("127.0.0.1", self.server.tls_port, ssl_context=self.context, timeout=10)
        client.login("bot", PASSWORD)
        return client

    def append(self, raw: bytes, mailbox: str = "INBOX") -> int:
        with self._session() as client:
            status, answer = client.append(mailbox, None, None, raw)
            assert status == "OK", answer
            return int(re.search(rb"APPENDUID \d+ (\d+)", answer[0]).group(1))

    def flags(self, mailbox: str = "INBOX") -> dict[int, set[str]]:
        with self._session() as client:
            client.select(mailbox, readonly=True)
            status, lines = client.uid("FETCH", "1:*", "(FLAGS)")
            found = {}
            for line in lines:
                if line:
                    match = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", line)
                    if match:
                        found[int(match.group(1))] = set(match.group(2).decode().split()) - {"\\Recent"}
            return found

    def command(self, *commands: tuple[str, ...], mailbox: str | None = "INBOX") -> None:
        with self._session() as client:
            if mailbox:
                client.select(mailbox)
            for name, *args in commands:
                status, answer = getattr(client, name)(*args)
                assert status == "OK", (name, answer)


async def in_thread(function, *args, **kwargs):
    return await asyncio.to_thread(function, *args, **kwargs)


def options(server: DovecotServer, certs: dict[str, str], mailbox: str = "INBOX", **more) -> dict:
    return {"smtp": False, "imap": f"imaps://bot@127.0.0.1:{server.tls_port}/{mailbox}", "imap_password": PASSWORD,
            "imap_ca_file": certs["ca"], "imap_poll_interval": 3600, **more}


@asynccontextmanager
async def reading(bridge_options: dict, channel_layer=None, name: str = "mail"):
    channel_layer = channel_layer or layer.from_url("memory://", capacity=100)
    bridge = EmailBridge(name, bridge_options, channel_layer)
    async with running_in_process(bridge, None):
        yield bridge


async def flags_become(other: OtherClient, uid: int, wanted: set[str], mailbox: str = "INBOX") -> None:
    end = asyncio.get_running_loop().time() + 10
    while True:
        flags = (await in_thread(other.flags, mailbox)).get(uid)
        if flags == wanted:
            return
        assert asyncio.get_running_loop().time() < end, f"UID {uid} has flags {flags}, not {wanted}, after 10 s"
        await asyncio.sleep(0.05)


async def nothing_more(channel_layer) -> None:
    got, message = await channel_layer.receive(["email.receive"], timeout=0)
    assert got is None, f"unexpected {message!r}"


def connected(bridge: EmailBridge) -> bool:
    return bridge.imap.reconnector.connected


# -- delivery --------------------------------------------------------------------------------------------------


def test_mail_in_the_box_and_new_mail_through_idle_arrive_and_are_marked_seen(run, dovecot, certs):
    other = OtherClient(dovecot, certs)

    async def scenario():
        first = await in_thread(other.append, mail(subject="waiting already"))
        async with reading(options(dovecot, certs, imap_poll_interval=3600)) as bridge:
            message = await take(bridge.layer, "email.receive")
            await flags_become(other, first, {"\\Seen"})
            # polling is an hour away: only IDLE can bring the next one
            await wait_until_async(lambda: bridge.imap.idling, "the bridge to be in IDLE")
            second = await in_thread(other.append, mail(subject="new", text="a new one\n", message_id="<m2@x.org>"))
            pushed = await take(bridge.layer, "email.receive")
            await flags_become(other, second, {"\\Seen"})
            await nothing_more(bridge.layer)
            return bridge, message, pushed

    bridge, message, pushed = run(scenario())
    assert message["subject"] == "waiting already" and message["text"] == "Hi bot,\n\nwhat is new?"
    assert message["from"] == "ann@example.org" and message["to"] == ["bot@mail.example"]
    assert message["protocol"] == "email" and message["sender"] == "ann@example.org"
    assert message["message_id"] == "<m1@example.org>" and message["reply_channel"] == bridge.prefix + message["room"]
    assert message["authenticated"]["smtp_auth"] is None and message["headers"]["subject"] == "waiting already"
    assert pushed["subject"] == "new" and pushed["text"] == "a new one"
    assert bridge.counters["imap_delivered"] == 2 and bridge.counters["sent"] == 2
    assert bridge.port is None  # smtp = false: no SMTP server


def test_one_bridge_serves_smtp_and_reads_a_mailbox(run, dovecot, certs):
    other = OtherClient(dovecot, certs)

    def by_smtp(port: int) -> dict:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            return smtp.sendmail("carl@example.org", ["lobby@chat.example"], mail(subject="by smtp"))

    async def scenario():
        both = options(dovecot, certs, smtp=True, port=0, domains=["chat.example"])
        async with reading(both) as bridge:
            await in_thread(other.append, mail(subject="by imap"))
            first = await take(bridge.layer, "email.receive")
            refused = await in_thread(by_smtp, bridge.port)
            second = await take(bridge.layer, "email.receive")
            return first, refused, second

    first, refused, second = run(scenario())
    assert first["subject"] == "by imap" and first["from"] == "ann@example.org"
    assert refused == {} and second["subject"] == "by smtp" and second["from"] == "carl@example.org"


def test_idle_is_renewed_on_the_same_connection_and_still_hears_new_mail(run, dovecot, certs):
    other = OtherClient(dovecot, certs)

    async def scenario():
        async with reading(options(dovecot, certs, imap_idle_renew=0.2)) as bridge:
            await wait_until_async(lambda: bridge.imap.idles >= 3, "two IDLE renewals")
            uid = await in_thread(other.append, mail(subject="after renewals"))
            message = await take(bridge.layer, "email.receive")
            await flags_become(other, uid, {"\\Seen"})
            return bridge, message

    bridge, message = run(scenario())
    assert message["subject"] == "after renewals"
    assert bridge.counters["connects"] == 1 and bridge.counters["connect_failures"] == 0  # renewed, not reconnected


def test_starttls_on_imap_and_polling_without_idle(run, tmp_path, certs):
    server = DovecotServer(tmp_path / "no-idle", users={"bot": PASSWORD}, tls=certs, idle=False).start()
    other = OtherClient(server, certs)
    try:
        async def scenario():
            bridge_options = options(server, certs, imap=f"imap://bot@127.0.0.1:{server.port}/INBOX",
                                     imap_poll_interval=0.2)
            async with reading(bridge_options) as bridge:
                await wait_until_async(lambda: connected(bridge), "the bridge to log in")
                uid = await in_thread(other.append, mail(subject="polled"))
                message = await take(bridge.layer, "email.receive")
                await flags_become(other, uid, {"\\Seen"})
                return bridge, message

        bridge, message = run(scenario())
        log = server.log()
    finally:
        server.cleanup()
    assert message["subject"] == "polled"
    assert not bridge.imap.idling
    assert re.search(r"Login: user=<bot>, method=PLAIN.*TLS", log)  # STARTTLS before the password


def test_imap_without_starttls_is_refused_before_the_password_is_sent(run, tmp_path, certs):
    server = DovecotServer(tmp_path / "plain", users={"bot": PASSWORD}).start()  # no TLS at all
    try:
        async def scenario():
            bridge_options = options(server, certs, imap=f"imap://bot@127.0.0.1:{server.port}/INBOX")
            async with reading(bridge_options) as bridge:
                await wait_until_async(lambda: bridge.counters["connect_failures"] >= 1, "a failed attempt")
                return bridge.health

        health = run(scenario())
        log = server.log()
    finally:
        server.cleanup()
    assert health["state"] != "connected" and "STARTTLS" in health["reason"]
    assert "imap-login" in log and "Login: user=<bot>" not in log


def test_nothing_is_delivered_twice_after_a_restart(run, dovecot, certs):
    other = OtherClient(dovecot, certs)
    channel_layer = layer.from_url("memory://", capacity=100)  # the layer, and its key/value store, outlive the bridge

    async def scenario():
        uids = [await in_thread(other.append, mail(subject=f"mail {n}", message_id=f"<r{n}@x.org>")) for n in (1, 2)]
        async with reading(options(dovecot, certs), channel_layer):
            got = [(await take(channel_layer, "email.receive"))["subject"] for _ in uids]
            await flags_become(other, uids[1], {"\\Seen"})
        # As if the bridge had died between the layer taking mail 2 and storing its \Seen:
        await in_thread(other.command, ("uid", "STORE", str(uids[1]), "-FLAGS", "(\\Seen)"))
        third = await in_thread(other.append, mail(subject="mail 3", message_id="<r3@x.org>"))
        async with reading(options(dovecot, certs), channel_layer) as again:
            after = await take(channel_layer, "email.receive")
            await flags_become(other, third, {"\\Seen"})
            await flags_become(other, uids[1], {"\\Seen"})  # marked, not delivered again
            await nothing_more(channel_layer)
        return got, after, again

    got, after, again = run(scenario(), timeout=60)
    assert got == ["mail 1", "mail 2"] and after["subject"] == "mail 3"
    assert again.counters["imap_delivered"] == 1


def test_seen_only_after_the_layer_took_the_mail(run, tmp_path, dovecot, certs):
    other = OtherClient(dovecot, certs)
    redis = RedisServer(tmp_path / "redis").start()

    async def scenario():
        channel_layer = layer.from_url(redis.url, prefix="email-imap")
        try:
            async with reading(options(dovecot, certs), channel_layer) as bridge:
                await wait_until_async(lambda: bridge.imap.idling, "the bridge to be in IDLE")
                redis.stop()  # killed, like a crash
                uid = await in_thread(other.append, mail(subject="kept in the box"))
                await wait_until_async(lambda: bridge.counters["refused"] >= 2, "the layer to refuse twice", 30)
                unread = (await in_thread(other.flags))[uid]
                redis.start()
                message = await take(channel_layer, "email.receive", timeout=30)
                await flags_become(other, uid, {"\\Seen"})
                await nothing_more(channel_layer)
                return bridge, unread, message
        finally:
            await channel_layer.close()
            redis.stop()

    bridge, unread, message = run(scenario(), timeout=90)
    assert unread == set()  # not \Seen while the layer could not take it
    assert message["subject"] == "kept in the box"
    assert bridge.counters["imap_delivered"] == 1 and bridge.counters["sent"] == 1


def test_a_full_channel_leaves_mail_unread_and_it_follows_in_uid_order(run, dovecot, certs):
    other = OtherClient(dovecot, certs)

    async def scenario():
        uids = [await in_thread(other.append, mail(subject=f"mail {n}", message_id=f"<f{n}@x.org>"))
                for n in (1, 2, 3)]
        async with reading(options(dovecot, certs), layer.from_url("memory://", capacity=1)) as bridge:
            await wait_until_async(lambda: bridge.counters["refused"] >= 1, "the full channel to refuse mail 2")
            while_full = await in_thread(other.flags)
            got = [(await take(bridge.layer, "email.receive"))["subject"] for _ in uids]  # room again, one by one
            await flags_become(other, uids[2], {"\\Seen"})
            return uids, while_full, got

    uids, while_full, got = run(scenario(), timeout=60)
    assert while_full[uids[0]] == {"\\Seen"} and while_full[uids[1]] == while_full[uids[2]] == set()
    assert got == ["mail 1", "mail 2", "mail 3"]


def test_a_changed_uidvalidity_reads_the_unseen_mail_again(run, dovecot, certs, caplog):
    other = OtherClient(dovecot, certs)
    channel_layer = layer.from_url("memory://", capacity=100)

    async def scenario():
        await in_thread(other.command, ("create", "Bot"), mailbox=None)
        await in_thread(other.append, mail(subject="before"), "Bot")
        async with reading(options(dovecot, certs, "Bot"), channel_layer):
            before = await take(channel_layer, "email.receive")
        # The folder is made anew: its UIDs start again at 1 under a new UIDVALIDITY (a restored backup does that)
        await in_thread(other.command, ("delete", "Bot"), ("create", "Bot"), mailbox=None)
        uid = await in_thread(other.append, mail(subject="after", message_id="<new@x.org>"), "Bot")
        async with reading(options(dovecot, certs, "Bot"), channel_layer) as bridge:
            after = await take(channel_layer, "email.receive")
            await flags_become(other, uid, {"\\Seen"}, "Bot")
        return before, uid, after, bridge

    with caplog.at_level(logging.WARNING, "crossroads"):
        before, uid, after, bridge = run(scenario(), timeout=60)
    assert before["subject"] == "before" and uid == 1  # the old cursor (UID 1 done) would have skipped it
    assert after["subject"] == "after"
    assert bridge.counters["imap_uidvalidity_changes"] == 1
    assert "UIDVALIDITY" in caplog.text


def test_a_mime_bomb_is_set_aside_and_the_next_mail_delivered(run, dovecot, certs):
    other = OtherClient(dovecot, certs)
    deep = (b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + b"".join(f"--b{n}\r\nContent-Type: multipart/mixed; boundary=b{n + 1}\r\n\r\n".encode()
                       for n in range(1000)) + b"--b1000--\r\n")
    big = mail(subject="big", text=("x" * 70 + "\n") * 8000)  # 568 KB: over max_message_size, never fetched
    cc = ",\r\n ".join(f'"Member {n}" <member{n}@example.org>' for n in range(600))  # over max_address_header_bytes
    crowded = b"Cc: " + cc.encode() + b"\r\nSubject: crowded\r\n\r\nhi\r\n"

    async def scenario():
        bomb = await in_thread(other.append, deep)
        oversized = await in_thread(other.append, big)
        crowd = await in_thread(other.append, crowded)
        fine = await in_thread(other.append, mail(subject="after the bomb"))
        async with reading(options(dovecot, certs)) as bridge:
            message = await take(bridge.layer, "email.receive")
            await flags_become(other, fine, {"\\Seen"})
            await nothing_more(bridge.layer)
        flags = await in_thread(other.flags)
        return bridge, message, flags[bomb], flags[oversized], flags[crowd]

    bridge, message, bomb_flags, big_flags, crowd_flags = run(scenario())
    assert message["subject"] == "after the bomb"
    assert bomb_flags == big_flags == crowd_flags == {"\\Seen", "\\Flagged"}  # set aside: not read again
    counters = bridge.counters
    assert counters["imap_set_aside"] == 3 and counters["too_deep"] == 1 and counters["oversized"] == 1
    assert counters["address_headers_too_large"] == 1
    assert counters["imap_delivered"] == 1 and counters["errors"] == 0


def test_moved_to_folders_instead_of_flags(run, dovecot, certs):
    other = OtherClient(dovecot, certs)
    deep = (b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + b"".join(f"--b{n}\r\nContent-Type: multipart/mixed; boundary=b{n + 1}\r\n\r\n".encode()
                       for n in range(100)) + b"--b100--\r\n")

    async def scenario():
        await in_thread(other.command, ("create", "Done"), ("create", "Refused"), mailbox=None)
        await in_thread(other.append, deep)
        await in_thread(other.append, mail(subject="to be moved"))
        async with reading(options(dovecot, certs, imap_move_to="Done", imap_refused_folder="Refused")) as bridge:
            message = await take(bridge.layer, "email.receive")
            await wait_until_async(lambda: bridge.counters.get("imap_delivered") == 1, "the move")
        return message, *[await in_thread(other.flags, box) for box in ("INBOX", "Done", "Refused")]

    message, inbox, done, refused = run(scenario())
    assert message["subject"] == "to be moved"
    assert inbox == {} and len(done) == 1 and len(refused) == 1


# -- the connection ----------------------------------------------------------------------------------------------


def test_a_mail_read_from_the_mailbox_is_answered_in_its_thread_through_the_smarthost(run, dovecot, certs):
    """A bridge that only reads a mailbox (smtp = false) still sends its replies."""
    other = OtherClient(dovecot, certs)

    async def scenario():
        with Smarthost() as smarthost:
            async with reading({**options(dovecot, certs), "smarthost": smarthost.url}) as bridge:
                await in_thread(other.append, mail(subject="Question", message_id="<q1@example.org>"))
                got = await take(bridge.layer, "email.receive")
                await bridge.layer.send(got["reply_channel"], {"text": "an answer"})
                return await in_thread(smarthost.wait_for, 1)

    (sent,) = run(scenario())
    assert sent["rcpt_tos"] == ["ann@example.org"]
    data = sent["data"].decode()
    assert "In-Reply-To: <q1@example.org>" in data and "Subject: Re: Question" in data and "an answer" in data


def test_dovecot_restarted_the_bridge_reconnects_and_goes_on(run, dovecot, certs):
    other = OtherClient(dovecot, certs)

    async def scenario():
        async with reading(options(dovecot, certs)) as bridge:
            await in_thread(other.append, mail(subject="before"))
            before = await take(bridge.layer, "email.receive")
            await wait_until_async(lambda: bridge.imap.idling, "the bridge to be in IDLE")
            dovecot.stop()  # SIGKILL: the connection drops as in a crash
            await wait_until_async(lambda: not connected(bridge), "the bridge to see the connection drop")
            degraded = bridge.health
            dovecot.start()
            await wait_until_async(lambda: connected(bridge), "the bridge to reconnect", 30)
            uid = await in_thread(other.append, mail(subject="after", message_id="<after@x.org>"))
            after = await take(bridge.layer, "email.receive")
            await flags_become(other, uid, {"\\Seen"})
            await nothing_more(bridge.layer)
            return bridge, before, degraded, after, bridge.health

    bridge, before, degraded, after, health = run(scenario(), timeout=60)
    assert before["subject"] == "before" and after["subject"] == "after"
    assert degraded["state"] == "degraded" and "IMAP imaps://127.0.0.1" in degraded["reason"]
    assert bridge.counters["connects"] == 2 and health["state"] == "connected"


def test_a_wrong_password_is_a_clear_problem_retried_with_backoff(run, dovecot, certs, caplog):
    async def scenario():
        async with reading(options(dovecot, certs, imap_password="not-the-password")) as bridge:
            await wait_until_async(lambda: bridge.counters["connect_failures"] >= 2, "two failed logins", 30)
            return bridge, bridge.health, bridge.imap.reconnector.failures

    with caplog.at_level(logging.DEBUG):
        bridge, health, failures = run(scenario(), timeout=60)
    assert health["state"] == "degraded" and "login" in health["reason"] and "AUTHENTICATIONFAILED" in health["reason"]
    assert re.search(r"retrying in \d+\.\d\d s", health["reason"])
    assert failures == bridge.counters["connect_failures"]  # each attempt waited its delay: one attempt, one failure
    assert bridge.counters["connects"] == 0
    assert "not-the-password" not in caplog.text and "bot@" not in health["reason"]


# -- options -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "key", "words"), [
    ({"smtp": False}, "imap", "set imap"),
    ({"smtp": False, "imap": "imaps://bot@mail.example/INBOX"}, "imap_password", "password"),
    ({"smtp": False, "imap": "imaps://bot:pw@mail.example/INBOX", "imap_password": "x"}, "imap", "imap_password"),
    ({"smtp": False, "imap": "imaps://mail.example/INBOX", "imap_password": "x"}, "imap", "no user"),
    ({"smtp": False, "imap": "pop3://bot@mail.example", "imap_password": "x"}, "imap", "imaps://"),
    ({"imap": "imaps://bot@mail.example/INBOX", "imap_password": "x"}, "domains", "domains"),
    ({"smtp": False, "imap": "imaps://bot@mail.example/Bot", "imap_password": "x", "imap_move_to": "Bot"},
     "imap_move_to", "another folder"),
])
def test_option_errors(given, key, words):
    with pytest.raises(OptionError) as error:
        EmailBridge.validate_options(given)
    assert error.value.key == key and words in str(error.value)
    assert ":pw@" not in str(error.value)  # the option check quotes no URL with a password in it


def test_imap_alone_needs_no_domains():
    checked = EmailBridge.validate_options({"smtp": False, "imap": "imaps://bot@mail.example", "imap_password": "x"})
    assert checked["imap_idle_renew"] == 1500.0 and checked["imap_require_tls"] is True
