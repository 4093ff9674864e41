"""The email bridge's outbound side against a real smarthost: replies in the thread and ``email.send`` mails.

The smarthost is a second aiosmtpd server (``servers.Smarthost``, in a thread)
that the tests start on a free port, most of them requiring STARTTLS and AUTH
with a test CA's certificate; it records every mail it takes. Mails come in
through the bridge's own SMTP server (smtplib, in a thread), consumers are
played by the test writing to the layer, except in the last test, where the
bridge and a worker run as their own processes over Redis. Every wait has a
deadline and waits on what the smarthost received or a counter, never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from contextlib import asynccontextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from servers import Smarthost, free_port, running_in_process, take, wait_until_async, write_test_certificates
from test_cli import write_config

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.email.bridge import EmailBridge

DOMAIN = "chat.example"
USERS = {"crossroads": "relay-s3cret"}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return write_test_certificates(tmp_path_factory.mktemp("smarthost-tls"))


@pytest.fixture
def smarthost(certificates):
    """A smarthost requiring STARTTLS and AUTH (not started: the test starts it, so it can start it late)."""
    server = Smarthost(tls=certificates, users=USERS)
    yield server
    server.stop()


def through(smarthost: Smarthost, certificates: dict, **options) -> dict:
    """The bridge's options for sending through ``smarthost`` (AUTH when it has users, its CA trusted)."""
    sending = {"smarthost": smarthost.url, "smarthost_ca_file": certificates["ca"], "smarthost_retry_max": 0.2}
    if smarthost.users:
        sending.update(smarthost_user="crossroads", smarthost_password=USERS["crossroads"])
    return {**sending, **options}


@asynccontextmanager
async def serving(options: dict):
    bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN], **options}, layer.from_url("memory://"))
    async with running_in_process(bridge, None):
        yield bridge


def mail(*, subject: str = "Hello", sender: str = "Ann <ann@example.org>", message_id: str = "<first@example.org>",
         headers: dict | None = None, text: str = "Hi,\n\nis the lobby open?\n") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, f"lobby@{DOMAIN}", subject
    message["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(text)
    return message.as_bytes(policy=policy.SMTP)


def deliver(bridge: EmailBridge, raw: bytes, envelope_from: str = "ann@example.org",
            to: str = f"lobby@{DOMAIN}") -> None:
    with smtplib.SMTP("127.0.0.1", bridge.port, local_hostname="client.example", timeout=10) as client:
        assert client.sendmail(envelope_from, [to], raw) == {}


async def receive(bridge: EmailBridge, raw: bytes, envelope_from: str = "ann@example.org") -> dict:
    """Mail ``raw`` to the bridge; the ``email.receive`` a consumer gets for it."""
    await asyncio.to_thread(deliver, bridge, raw, envelope_from)
    return await take(bridge.layer, "email.receive")


async def received(smarthost: Smarthost, count: int) -> list[EmailMessage]:
    """The first ``count`` mails the smarthost took, parsed (and their envelopes on ``.envelope``)."""
    mails = []
    for entry in await asyncio.to_thread(smarthost.wait_for, count):
        parsed = message_from_bytes(entry["data"], policy=policy.default)
        parsed.envelope = entry
        mails.append(parsed)
    return mails


# -- replies in the thread -------------------------------------------------------------------------------------


def test_a_reply_answers_the_threads_latest_mail_over_starttls_and_auth(run, smarthost, certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            first = await receive(bridge, mail(subject="RE: Re: Hello"))
            await bridge.layer.send(first["reply_channel"], {"text": "Welcome, Ann."})
            # Bob answers in the same thread, asking for replies elsewhere: the next reply follows him.
            second = await receive(bridge, mail(
                subject="Re: Hello", sender="Bob <bob@example.org>", message_id="<second@example.org>",
                headers={"In-Reply-To": "<first@example.org>", "References": "<first@example.org>",
                         "Reply-To": "Bob at work <bob@work.example>"}), envelope_from="bob@example.org")
            assert second["reply_channel"] == first["reply_channel"]  # one thread: its root is <first@...>
            await bridge.layer.send(second["reply_channel"], {
                "text": "Noted, Bob.", "html": "<p>Noted, <b>Bob</b>.</p>",
                "attachments": [{"filename": "minutes.txt", "content_type": "text/plain", "content": b"none yet"}]})
            return bridge, await received(smarthost, 2)

    bridge, (to_ann, to_bob) = run(scenario())
    assert to_ann.envelope["mail_from"] == f"lobby@{DOMAIN}" and to_ann.envelope["rcpt_tos"] == ["ann@example.org"]
    assert to_ann.envelope["tls"] and to_ann.envelope["login"] == "crossroads"
    assert to_ann["To"] == "ann@example.org" and to_ann["From"] == f"lobby@{DOMAIN}"
    assert to_ann["Subject"] == "Re: Hello"  # once, whatever prefixes came in
    assert to_ann["In-Reply-To"] == "<first@example.org>" and to_ann["References"] == "<first@example.org>"
    assert to_ann["Message-ID"].endswith(f"@{DOMAIN}>") and to_ann["Message-ID"] != "<first@example.org>"
    assert to_ann["Auto-Submitted"] == "auto-replied" and to_ann["Date"]
    assert to_ann.get_content().strip() == "Welcome, Ann."

    assert to_bob.envelope["rcpt_tos"] == ["bob@work.example"] and to_bob["To"] == "bob@work.example"
    assert to_bob["Subject"] == "Re: Hello" and to_bob["In-Reply-To"] == "<second@example.org>"
    assert to_bob["References"] == "<first@example.org> <second@example.org>"
    body = to_bob.get_body(("plain",)).get_content().strip(), to_bob.get_body(("html",)).get_content().strip()
    assert body == ("Noted, Bob.", "<p>Noted, <b>Bob</b>.</p>")
    (attachment,) = to_bob.iter_attachments()
    assert attachment.get_filename() == "minutes.txt" and attachment.get_content() == "none yet"
    assert bridge.counters["mails_sent"] == 2 and bridge.counters["replies"] == 2


def test_email_send_starts_a_mail_with_cc_bcc_html_and_an_attachment(run, smarthost, certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            await bridge.layer.send("email.send", {
                "to": "Ann <ann@example.org>", "cc": ["bob@example.org"], "bcc": "audit@example.org",
                "subject": "Minutes", "text": "See the file.", "html": "<p>See the file.</p>",
                "attachments": [{"filename": "minutes.pdf", "content_type": "application/pdf", "content": b"%PDF"}],
                "headers": {"X-Meeting": "weekly", "Importance": "high"}})
            return bridge, await received(smarthost, 1)

    bridge, (sent,) = run(scenario())
    assert sent.envelope["mail_from"] == f"postmaster@{DOMAIN}"
    assert sent.envelope["rcpt_tos"] == ["ann@example.org", "bob@example.org", "audit@example.org"]
    assert sent["To"] == "Ann <ann@example.org>" and sent["Cc"] == "bob@example.org" and "Bcc" not in sent
    assert sent["Subject"] == "Minutes" and sent["Auto-Submitted"] == "auto-generated"
    assert sent["X-Meeting"] == "weekly" and sent["Importance"] == "high"
    assert sent.get_body(("html",)).get_content().strip() == "<p>See the file.</p>"
    (attachment,) = sent.iter_attachments()
    assert attachment.get_content_type() == "application/pdf" and attachment.get_content() == b"%PDF"
    assert bridge.counters["mails_sent"] == 1


def test_header_injection_and_other_invalid_messages_send_nothing(run, smarthost, certificates, caplog):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            for bad in ({"text": "hi", "headers": {"X-Note": "a\r\nBcc: victim@example.org"}},
                        {"text": "hi", "headers": {"Bcc": "victim@example.org"}},  # not a consumer's to set
                        {"text": "hi", "unknown": 1}, {"html": None}):
                await bridge.layer.send(thread, bad)
            await bridge.layer.send(thread, {"text": "the good one"})
            for bad in ({"to": "ann@example.org", "subject": "hi\nBcc: victim@example.org", "text": "x"},
                        {"to": "ann@example.org\r\nBcc: victim@example.org", "text": "x"},
                        {"to": "ann@example.org", "from": "ceo@bank.example", "text": "x"}, {"text": "no to"}):
                await bridge.layer.send("email.send", bad)
            await bridge.layer.send("email.send", {"to": "ann@example.org", "text": "the good send"})
            return bridge, await received(smarthost, 2)

    with caplog.at_level(logging.WARNING, "crossroads.bridges.email"):
        bridge, mails = run(scenario())
    # Replies and email.send come on two channels, so their order between them is not fixed; within each it is.
    assert sorted(m.get_content().strip() for m in mails) == ["the good one", "the good send"]
    assert not any("victim" in str(m.envelope) for m in mails)
    assert bridge.counters["invalid_replies"] == 8 and bridge.counters["mails_sent"] == 2
    assert "header injection" in caplog.text and "ceo@bank.example" in caplog.text


# -- no loops --------------------------------------------------------------------------------------------------

AUTOMATIC = [  # (auto kind, envelope sender, mail keywords)
    ("bounce", "", {}),
    ("bounce", "MAILER-DAEMON@example.org", {"sender": "Mail Delivery System <MAILER-DAEMON@example.org>"}),
    ("auto-replied", "ann@example.org", {"headers": {"Auto-Submitted": "auto-replied"}}),
    ("auto-generated", "ann@example.org", {"headers": {"Auto-Submitted": "auto-generated"}}),
    ("list", "ann@example.org", {"headers": {"List-Id": "<lobby.lists.example.org>"}}),
    ("bulk", "ann@example.org", {"headers": {"Precedence": "bulk"}}),
    ("own", f"lobby@{DOMAIN}", {"sender": f"lobby@{DOMAIN}"}),
]


def test_automatic_mail_is_never_answered_unless_the_reply_forces_it(run, smarthost, certificates, caplog):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates, recipients=[f"lobby@{DOMAIN}"])) as bridge:
            kinds = []
            for number, (kind, envelope_from, keywords) in enumerate(AUTOMATIC):
                message = await receive(bridge, mail(message_id=f"<auto{number}@example.org>", **keywords),
                                        envelope_from=envelope_from)
                kinds.append(message["auto"])
                await bridge.layer.send(message["reply_channel"], {"text": "not sent"})
                await bridge.layer.send(message["reply_channel"], {"text": "not sent either"})
                await bridge.layer.send(message["reply_channel"], {"text": f"forced {kind}", "force": True})
                # Replies leave in order: the forced one arriving next means the two before it were held back.
                (*_, last) = await received(smarthost, number + 1)
                assert last.get_content().strip() == f"forced {kind}"
            return bridge, kinds

    with caplog.at_level(logging.INFO, "crossroads.bridges.email"):
        bridge, kinds = run(scenario(), timeout=60)
    assert kinds == [kind for kind, _, _ in AUTOMATIC]
    assert bridge.counters["suppressed_replies"] == 2 * len(AUTOMATIC)
    assert bridge.counters["mails_sent"] == len(AUTOMATIC)
    assert caplog.text.count("not sending a reply to thread") == len(AUTOMATIC)  # once per thread, not per reply


def test_replies_to_one_recipient_are_rate_limited(run, smarthost, certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates, reply_burst=2, reply_rate=0.001)) as bridge:
            ann = (await receive(bridge, mail()))["reply_channel"]
            bob = (await receive(bridge, mail(sender="bob@example.org", message_id="<bob@example.org>"),
                                 envelope_from="bob@example.org"))["reply_channel"]
            for text in ("one", "two", "three"):
                await bridge.layer.send(ann, {"text": text})
            await bridge.layer.send(bob, {"text": "bob's"})  # another recipient: a bucket of its own
            return bridge, await received(smarthost, 3)

    bridge, mails = run(scenario())
    assert [m.get_content().strip() for m in mails] == ["one", "two", "bob's"]
    assert bridge.counters["rate_limited"] == 1


# -- the connection to the smarthost ---------------------------------------------------------------------------


def test_replies_one_after_the_other_share_one_connection(run, smarthost, certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates, smarthost_idle_timeout=60.0)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            before = smarthost.connections  # the Controller's own check that it serves
            for number in range(1, 4):  # each sent once the one before arrived: the queue is empty in between
                await bridge.layer.send(thread, {"text": f"reply {number}"})
                await received(smarthost, number)
            opened, open_while_serving = smarthost.connections - before, smarthost.open_connections
        await asyncio.to_thread(smarthost.wait_open_connections, 0)  # the bridge stopped: closed
        return bridge, opened, open_while_serving

    bridge, opened, open_while_serving = run(scenario())
    assert [m.get_content().strip() for m in smarthost.received_mails()] == ["reply 1", "reply 2", "reply 3"]
    assert opened == 1 and open_while_serving == 1  # one connect, STARTTLS and AUTH for all three
    assert bridge.counters["mails_sent"] == 3


def test_the_connection_is_closed_after_the_idle_timeout_and_opened_again_for_the_next_reply(run, smarthost,
                                                                                             certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates, smarthost_idle_timeout=0.2)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            before = smarthost.connections
            await bridge.layer.send(thread, {"text": "first"})
            await received(smarthost, 1)
            await asyncio.to_thread(smarthost.wait_open_connections, 0)  # while the bridge serves on
            await bridge.layer.send(thread, {"text": "second"})
            await received(smarthost, 2)
            return bridge, smarthost.connections - before

    bridge, opened = run(scenario())
    assert [m.get_content().strip() for m in smarthost.received_mails()] == ["first", "second"]
    assert opened == 2 and bridge.counters.get("smarthost_retries", 0) == 0


@pytest.mark.parametrize("seen", [True, False], ids=["close-seen", "close-maybe-unseen"])
def test_a_kept_connection_the_smarthost_dropped_is_opened_again_without_losing_the_reply(run, smarthost,
                                                                                          certificates, seen):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates, smarthost_idle_timeout=60.0)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            before = smarthost.connections
            await bridge.layer.send(thread, {"text": "before"})
            await received(smarthost, 1)
            smarthost.drop_connections()  # a smarthost ending idle connections on its own schedule
            if seen:
                await wait_until_async(lambda: not bridge.sending.outbox._client.is_connected,
                                       "the bridge to see the connection closed")
            await bridge.layer.send(thread, {"text": "after"})  # unseen: it may find the connection closing
            await received(smarthost, 2)
            return bridge, smarthost.connections - before

    bridge, opened = run(scenario())
    assert [m.get_content().strip() for m in smarthost.received_mails()] == ["before", "after"]
    assert opened == 2
    assert bridge.counters.get("smarthost_retries", 0) == 0  # no backoff, no degraded health: not an outage


# -- the smarthost's answers and outages -----------------------------------------------------------------------


def test_replies_wait_while_the_smarthost_is_down_and_flow_in_order_when_it_starts(run, smarthost, certificates):
    async def scenario():
        async with serving(through(smarthost, certificates)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            for text in ("first", "second", "third"):
                await bridge.layer.send(thread, {"text": text})
            await wait_until_async(lambda: bridge.counters.get("smarthost_retries", 0) >= 2,
                                   "the bridge to retry the smarthost")
            waiting, health = len(bridge.sending.outbox), bridge.health
            smarthost.start()
            mails = await received(smarthost, 3)
            await wait_until_async(lambda: bridge.health["state"] == "connected", "the bridge to be healthy again")
            return bridge, waiting, health, mails

    bridge, waiting, health, mails = run(scenario())
    assert waiting == 3
    assert health["state"] == "degraded" and "smarthost" in health["reason"] and "3 mail(s) queued" in health["reason"]
    assert [m.get_content().strip() for m in mails] == ["first", "second", "third"]
    assert bridge.counters["mails_sent"] == 3 and bridge.counters.get("outbound_dropped", 0) == 0


def test_replies_in_hand_when_the_bridge_stops_are_still_sent(run, smarthost, certificates):
    async def scenario():
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            for text in ("last words", "and these"):
                await bridge.layer.send(thread, {"text": text})
        return bridge  # stopped: its replies were queued, then sent while the smarthost answered

    bridge = run(scenario())
    bodies = [message_from_bytes(entry["data"], policy=policy.default).get_content().strip()
              for entry in smarthost.received]
    assert bodies == ["last words", "and these"]
    assert bridge.counters["mails_sent"] == 2 and bridge.counters.get("outbound_dropped", 0) == 0


def test_a_4xx_answer_is_retried_and_a_5xx_answer_dropped_and_counted(run, smarthost, certificates, caplog):
    async def scenario():
        smarthost.answers = ["451 4.3.0 busy, try again", "", "554 5.7.1 not from you"]
        smarthost.refuse = {"gone@example.org": "550 5.1.1 no such user"}
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            await bridge.layer.send(thread, {"text": "deferred once"})  # 451, then taken on the retry
            await bridge.layer.send(thread, {"text": "refused"})  # 554: dropped
            await bridge.layer.send("email.send", {"to": ["gone@example.org", "ann@example.org"], "text": "partly"})
            return bridge, await received(smarthost, 2)

    with caplog.at_level(logging.WARNING, "crossroads.bridges.email"):
        bridge, mails = run(scenario())
    assert [m.get_content().strip() for m in mails] == ["deferred once", "partly"]
    assert mails[1].envelope["rcpt_tos"] == ["ann@example.org"]
    assert bridge.counters["smarthost_retries"] == 1
    assert bridge.counters["not_delivered"] == 2  # the 554, and the refused recipient of the partial one
    assert "554 5.7.1 not from you" in caplog.text and "gone@example.org (550)" in caplog.text


def test_a_recipient_deferred_with_4xx_is_retried_alone(run, smarthost, certificates):
    async def scenario():
        smarthost.refuse = {"busy@example.org": "450 4.2.1 mailbox busy, try later"}
        smarthost.start()
        async with serving(through(smarthost, certificates)) as bridge:
            await bridge.layer.send("email.send", {"to": ["ann@example.org", "busy@example.org"], "text": "both"})
            (first,) = await received(smarthost, 1)
            await wait_until_async(lambda: bridge.counters.get("smarthost_retries", 0) >= 1, "a retry")
            del smarthost.refuse["busy@example.org"]  # the mailbox is free again
            (_, second) = await received(smarthost, 2)
            return bridge, first, second

    bridge, first, second = run(scenario())
    assert first.envelope["rcpt_tos"] == ["ann@example.org"] and second.envelope["rcpt_tos"] == ["busy@example.org"]
    assert first["Message-ID"] == second["Message-ID"]  # the same mail, to the one who had to wait
    assert bridge.counters["mails_sent"] == 2 and bridge.counters.get("not_delivered", 0) == 0


@pytest.mark.parametrize(("limit", "kept"), [({"outbound_queue_limit": 2}, 2),
                                             ({"outbound_queue_bytes": 1}, 1)])  # one mail may always wait
def test_the_queue_is_bounded_and_its_overflow_counted(run, smarthost, certificates, caplog, limit, kept):
    async def scenario():
        async with serving(through(smarthost, certificates, **limit)) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            for number in range(5):
                await bridge.layer.send(thread, {"text": f"reply {number}"})
            await wait_until_async(lambda: bridge.counters.get("outbound_dropped", 0) == 5 - kept, "the overflow")
            smarthost.start()
            mails = await received(smarthost, kept)
            await wait_until_async(lambda: bridge.counters.get("mails_sent") == kept, "the mails to be sent")
            return bridge, mails

    with caplog.at_level(logging.WARNING, "crossroads.bridges.email"):
        bridge, mails = run(scenario())
    assert [m.get_content().strip() for m in mails] == [f"reply {n}" for n in range(5 - kept, 5)]  # oldest dropped
    assert bridge.counters["outbound_dropped"] == 5 - kept and len(bridge.sending.outbox) == 0
    assert caplog.text.count("the outbound queue is full") == 1


def test_the_smarthost_certificate_is_verified_and_stop_says_what_was_not_sent(run, smarthost, certificates,
                                                                               caplog):
    async def scenario():
        smarthost.start()
        options = through(smarthost, certificates)
        del options["smarthost_ca_file"]  # the system's CAs: they never signed the test CA's certificate
        bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN], **options}, layer.from_url("memory://"))
        async with running_in_process(bridge, None):
            thread = (await receive(bridge, mail()))["reply_channel"]
            await bridge.layer.send(thread, {"text": "must not go to an unverified server"})
            await wait_until_async(lambda: bridge.counters.get("smarthost_retries", 0) >= 1, "a failed try")
            health = bridge.health
        return bridge, health

    with caplog.at_level(logging.WARNING, "crossroads.bridges.email"):
        bridge, health = run(scenario())
    assert smarthost.sessions >= 1 and smarthost.received == []  # reached: the handshake failed, not the network
    assert health["state"] == "degraded" and "certificate did not verify" in health["reason"]
    assert "stopping with 1 mail(s) still queued" in caplog.text and bridge.counters["outbound_dropped"] == 1


def test_the_password_is_never_sent_in_clear(run):
    async def scenario():
        with Smarthost() as plain:  # no STARTTLS offered
            options = {"smarthost": plain.url, "smarthost_user": "crossroads", "smarthost_password": "secret",
                       "smarthost_retry_max": 0.2}
            async with serving(options) as bridge:
                thread = (await receive(bridge, mail()))["reply_channel"]
                await bridge.layer.send(thread, {"text": "held"})
                await wait_until_async(lambda: bridge.counters.get("smarthost_retries", 0) >= 1, "a refused try")
                return bridge.health, list(plain.received)

    health, taken = run(scenario())
    assert taken == [] and "not sending the password in clear" in health["reason"]


def test_smarthost_require_tls_refuses_a_plain_smarthost(run):
    async def scenario():
        with Smarthost() as plain:
            options = {"smarthost": plain.url, "smarthost_require_tls": True, "smarthost_retry_max": 0.2}
            async with serving(options) as bridge:
                thread = (await receive(bridge, mail()))["reply_channel"]
                await bridge.layer.send(thread, {"text": "held"})
                await wait_until_async(lambda: bridge.counters.get("smarthost_retries", 0) >= 1, "a refused try")
                return bridge.health, list(plain.received)

    health, taken = run(scenario())
    assert taken == [] and "STARTTLS" in health["reason"]


def test_a_plain_local_mta_and_an_smtps_smarthost_both_work(run, certificates):
    async def scenario():
        mails = []
        for server in (Smarthost(), Smarthost(tls=certificates, implicit=True, users=USERS)):
            with server:
                async with serving(through(server, certificates)) as bridge:
                    thread = (await receive(bridge, mail()))["reply_channel"]
                    await bridge.layer.send(thread, {"text": f"via {server.url}"})
                    (sent,) = await received(server, 1)
                    mails.append((sent.get_content().strip(), sent.envelope["tls"], sent.envelope["login"]))
        return mails

    (plain, plain_tls, plain_login), (smtps, smtps_tls, smtps_login) = run(scenario())
    assert plain.startswith("via smtp://") and not plain_tls and plain_login is None
    assert smtps.startswith("via smtps://") and smtps_tls and smtps_login == "crossroads"


def test_without_a_smarthost_replies_are_counted_and_dropped(run):
    async def scenario():
        async with serving({}) as bridge:
            thread = (await receive(bridge, mail()))["reply_channel"]
            await bridge.layer.send(thread, {"text": "thanks"})
            await wait_until_async(lambda: bridge.counters.get("replies_not_sent") == 1, "the reply to be handled")
            return bridge

    bridge = run(scenario())
    assert bridge.counters["dropped"] == 1 and bridge.counters["unknown_replies"] == 0


@pytest.mark.parametrize(("options", "key"), [
    ({"smarthost": "http://relay.example"}, "smarthost"),
    ({"smarthost": "smtp://user:pw@relay.example"}, "smarthost"),
    ({"from": "not an address"}, "from"),
    ({"send_channel": "email send"}, "send_channel"),
    ({"reply_rate": 0}, "reply_rate"),
    ({"outbound_queue_limit": 0}, "outbound_queue_limit"),
])
def test_bad_sending_options_name_their_key(options, key):
    with pytest.raises(OptionError) as failed:
        EmailBridge.validate_options({"domains": [DOMAIN], **options})
    assert failed.value.key == key


def test_an_unreadable_ca_file_fails_the_start_naming_the_option(run, tmp_path):
    bridge = EmailBridge("mail", {"port": 0, "domains": [DOMAIN], "smarthost": "smtp://127.0.0.1:25",
                                  "smarthost_ca_file": str(tmp_path / "missing.pem")}, layer.from_url("memory://"))
    with pytest.raises(OptionError) as failed:
        run(bridge.start())
    assert failed.value.key == "smarthost_ca_file" and "missing.pem" in str(failed.value)


# -- as a user runs it -----------------------------------------------------------------------------------------


def test_bridge_and_worker_processes_over_redis_answer_a_mail_in_its_thread(tmp_path, redis_server, daemons,
                                                                           smarthost, certificates):
    from servers import wait_for_port
    from test_daemons import Daemon

    smarthost.start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smarthost-password").write_text(USERS["crossroads"])
    port = free_port()
    config = str(write_config(tmp_path, f"""[layer]
url = "{redis_server.url}"
prefix = "emailsmarthost{port}"

[routing]
app = "apps.email_echo:routes"

[bridges.mail]
type = "email"
port = {port}
domains = ["{DOMAIN}"]
smarthost = "{smarthost.url}"
smarthost_user = "crossroads"
smarthost_password = "${{credential:smarthost-password}}"
smarthost_ca_file = "{certificates['ca']}"
"""))
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}  # as systemd's LoadCredential= sets it
    bridge = Daemon(tmp_path, "bridge", "bridge", "mail", "--config", config, env=env)
    worker = Daemon(tmp_path, "worker", "worker", "--config", config, env=env)
    daemons += [bridge, worker]
    for daemon in (bridge, worker):
        daemon.wait_ready()
    wait_for_port(port, bridge.process)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("ann@example.org", [f"lobby@{DOMAIN}"], mail(subject="Lobby?"))
    (entry,) = smarthost.wait_for(1, timeout=30)
    answer = message_from_bytes(entry["data"], policy=policy.default)
    assert entry["tls"] and entry["login"] == "crossroads" and entry["rcpt_tos"] == ["ann@example.org"]
    assert answer["Subject"] == "Re: Lobby?" and answer["In-Reply-To"] == "<first@example.org>"
    assert answer["Auto-Submitted"] == "auto-replied"
    assert answer.get_content().replace("\r\n", "\n").strip() == "ann@example.org wrote: Hi,\n\nis the lobby open?"
    assert USERS["crossroads"] not in bridge.log()
    bridge.terminate()
    worker.terminate()
