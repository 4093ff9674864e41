"""bridges/email/messages.py: the pure half of the email bridge, case by case (docs/spec/email.md).

The mails below are shaped like what Gmail, Outlook, Apple Mail and Thunderbird send (their header order,
their attribution lines, their MIME layouts), and every MIME bomb is built at full size.
"""

from __future__ import annotations

import email
from email import policy

import pytest

from crossroads.bridges.base import _LOCAL_ID_RE
from crossroads.bridges.email import messages as m

LIMITS = m.Limits()
BUDGET = 1024 * 1024 - 65536  # what the bridge will hand in: the layer's 1 MiB less room for msgpack and keys
PREFIX = "email.mail.Xy3abc!"


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def receive(raw: bytes, *, envelope_from: str | None = "ann@example.org", to=("lobby@chat.test",), **kwargs):
    return m.receive_message(m.read_mail(raw, LIMITS), envelope_from=envelope_from, envelope_to=list(to),
                             reply_prefix=PREFIX, limits=LIMITS, budget=BUDGET, **kwargs)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)


GMAIL_REPLY = crlf("""\
MIME-Version: 1.0
Date: Tue, 1 Dec 2026 10:05:00 +0100
References: <root@chat.test> <CAB1=xyz@mail.gmail.com>
In-Reply-To: <CAB1=xyz@mail.gmail.com>
Message-ID: <CAB2=abc@mail.gmail.com>
Subject: Re: Lunch?
From: Ann Example <ann@example.org>
To: lobby@chat.test
Content-Type: multipart/alternative; boundary="000000000000a1b2c3"

--000000000000a1b2c3
Content-Type: text/plain; charset="UTF-8"

Thanks, that works!

On Tue, Dec 1, 2026 at 10:00 AM Lobby Bot <
lobby@chat.test> wrote:

> Lunch at noon?
>

--000000000000a1b2c3
Content-Type: text/html; charset="UTF-8"

<div dir="ltr">Thanks, that works!</div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">On Tue, Dec 1,\
 2026 at 10:00 AM Lobby Bot &lt;<a href="mailto:lobby@chat.test">lobby@chat.test</a>&gt; wrote:<br></div>\
<blockquote class="gmail_quote">Lunch at noon?</blockquote></div>

--000000000000a1b2c3--
""")

OUTLOOK_REPLY = crlf("""\
From: Bob Builder <bob@corp.example>
To: "lobby@chat.test" <lobby@chat.test>
Subject: RE: Lunch?
Thread-Topic: Lunch?
Thread-Index: AQHZ
Date: Tue, 1 Dec 2026 09:10:00 +0000
Message-ID: <DB9PR01MB1234@DB9PR01MB.eurprd01.prod.exchangelabs.com>
References: <root@chat.test>
In-Reply-To: <root@chat.test>
Content-Language: en-US
X-MS-Has-Attach:
Content-Type: text/plain; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable
MIME-Version: 1.0

Count me in, caf=E9 at 12.

________________________________
From: Lobby Bot <lobby@chat.test>
Sent: Tuesday, December 1, 2026 9:00 AM
To: Bob Builder <bob@corp.example>
Subject: Lunch?

Lunch at noon?
""")

APPLE_REPLY = crlf("""\
From: Cleo <cleo@icloud.example>
Content-Type: multipart/mixed; boundary="Apple-Mail=_5F2A"
Mime-Version: 1.0 (Mac OS X Mail 16.0)
Subject: Re: Lunch?
Date: Tue, 1 Dec 2026 10:07:00 +0100
In-Reply-To: <root@chat.test>
To: lobby@chat.test
References: <root@chat.test>
Message-Id: <A1B2C3D4-E5F6@icloud.example>

--Apple-Mail=_5F2A
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

Here is the menu.

--Apple-Mail=_5F2A
Content-Disposition: inline; filename=menu.jpg
Content-Type: image/jpeg; x-unix-mode=0644; name="menu.jpg"
Content-Id: <F00D@icloud.example>
Content-Transfer-Encoding: base64

/9j/4AAQSkZJRgABAQ==
--Apple-Mail=_5F2A
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

> On 1 Dec 2026, at 10:00, Lobby Bot <lobby@chat.test> wrote:
>
> Lunch at noon?

--Apple-Mail=_5F2A--
""")

THUNDERBIRD_INLINE = crlf("""\
Message-ID: <7f3e@thunderbird.example>
Date: Tue, 1 Dec 2026 10:09:00 +0100
MIME-Version: 1.0
User-Agent: Mozilla Thunderbird
Subject: Re: Lunch?
To: lobby@chat.test
References: <root@chat.test>
From: Dirk <dirk@example.net>
In-Reply-To: <root@chat.test>
Content-Type: text/plain; charset=UTF-8; format=flowed
Content-Transfer-Encoding: 8bit

Am 01.12.26 um 10:00 schrieb Lobby Bot:
> Lunch at noon?

Ja, gerne.

> Where?

Im Café.

--\u0020
Dirk, Hamburg
""")


# -- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("smtp://127.0.0.1", m.Smarthost("127.0.0.1", 25, False)),
    ("smtp://mail.example:587", m.Smarthost("mail.example", 587, False)),
    ("smtps://mail.example", m.Smarthost("mail.example", 465, True)),
    ("smtp://[::1]:2525", m.Smarthost("::1", 2525, False)),
])
def test_smarthost_urls(url, expected):
    assert m.parse_smarthost(url) == expected
    assert str(expected).startswith(("smtp://", "smtps://"))


@pytest.mark.parametrize(("url", "problem"), [
    ("mail.example:587", "must be smtp://host:port or smtps://host:port"), ("http://x", "must be smtp://"),
    ("smtp://u:secret@x", "credentials go in smarthost_user"), ("smtp://x/path", "must not have a path"),
    ("smtp://x:99999", "bad port"),
])
def test_bad_smarthost_urls(url, problem):
    with pytest.raises(ValueError, match=problem):
        m.parse_smarthost(url)


def test_domains_and_addresses():
    assert m.parse_domain("Chat.Example") == "chat.example"
    assert m.parse_address("Lobby@Chat.Example") == "Lobby@chat.example"  # the local part is the domain's to fold
    for bad in ("", "chat example", "chat..example", "chat.example/x", None):
        with pytest.raises(ValueError, match="must be a domain name"):
            m.parse_domain(bad)
    for bad in ("lobby", "@chat.test", "lobby@", "Ann <ann@x>", "a b@c", 5):
        with pytest.raises(ValueError, match="is not an address|must be a string"):
            m.parse_address(bad)
    with pytest.raises(m.HeaderInjection):
        m.parse_address("a@b\r\nBcc: x@y")


def test_option_checks_say_what_is_wrong():
    assert m.check_smarthost("smtp://h:587") is None and "bad port" in m.check_smarthost("smtp://h:x")
    assert m.check_domains(["chat.example", "b.example"]) is None
    assert "must be a domain name" in m.check_domains(["chat.example", "not a domain"])
    assert m.check_addresses(["lobby@chat.example"]) is None and "is not an address" in m.check_addresses(["lobby"])


# -- real-world mails ----------------------------------------------------------------------------------------------


def test_a_gmail_reply():
    received = receive(GMAIL_REPLY)
    msg = received.message
    assert msg["text"] == "Thanks, that works!"
    assert msg["body_text"].startswith("Thanks, that works!\n\nOn Tue, Dec 1")
    assert "> Lunch at noon?" in msg["body_text"]
    assert msg["html"].startswith('<div dir="ltr">')
    assert (msg["message_id"], msg["in_reply_to"]) == ("<CAB2=abc@mail.gmail.com>", "<CAB1=xyz@mail.gmail.com>")
    assert msg["references"] == ["<root@chat.test>", "<CAB1=xyz@mail.gmail.com>"]
    assert msg["thread"] == "<root@chat.test>" and msg["subject"] == "Re: Lunch?"
    assert (msg["protocol"], msg["sender"], msg["room"]) == ("email", "ann@example.org", received.local_id)
    assert msg["reply_channel"] == PREFIX + received.local_id
    assert (msg["from"], msg["to"], msg["auto"], msg["attachments"], msg["defects"]) == (
        "ann@example.org", ["lobby@chat.test"], None, [], [])
    assert msg["headers"]["from"] == "Ann Example <ann@example.org>" and "From" not in msg["headers"]
    assert msg["content"]["content-type"] == "multipart/alternative"
    assert [p["content-type"] for p in msg["content"]["parts"]] == ["text/plain", "text/html"]
    assert msg["content"]["parts"][1]["body"].startswith(b'<div dir="ltr">')


def test_an_outlook_reply_loses_its_unquoted_history_and_reads_latin1():
    msg = receive(OUTLOOK_REPLY).message
    assert msg["text"] == "Count me in, café at 12."
    assert "Sent: Tuesday" in msg["body_text"]  # body_text is the whole body
    assert msg["thread"] == "<root@chat.test>"


def test_an_apple_mail_reply_with_an_inline_image():
    msg = receive(APPLE_REPLY).message
    assert msg["text"] == "Here is the menu."
    assert msg["body_text"].endswith("> Lunch at noon?\n")  # Apple Mail's text after the image is body too
    (image,) = msg["attachments"]
    assert image == {"filename": "menu.jpg", "content_type": "image/jpeg", "size": 13,
                     "content_id": "F00D@icloud.example", "inline": True,
                     "content": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01"}


def test_a_thunderbird_inline_reply_keeps_each_answer_and_drops_the_signature():
    msg = receive(THUNDERBIRD_INLINE).message
    assert msg["text"] == "Ja, gerne.\n\nIm Café."
    assert "\n-- \nDirk, Hamburg" in msg["body_text"]


def test_same_thread_same_reply_channel_and_a_channel_name_the_layer_takes():
    channels = {receive(raw).message["reply_channel"] for raw in (GMAIL_REPLY, OUTLOOK_REPLY, APPLE_REPLY,
                                                                  THUNDERBIRD_INLINE)}
    assert len(channels) == 1
    (channel,) = channels
    assert len(channel) < 100 and _LOCAL_ID_RE.match(channel.partition("!")[2])


def test_html_only_mail_gets_its_text_from_the_html_without_the_quote():
    raw = crlf("From: ann@example.org\nSubject: hi\nMessage-ID: <h@x>\nContent-Type: text/html; charset=utf-8\n\n"
               "<html><head><style>p {}</style></head><body><p>New &amp; <b>bold</b></p><p>second</p>"
               "<div class=gmail_quote><div>On Mon, Bob wrote:</div><blockquote>old</blockquote></div></body></html>")
    msg = receive(raw).message
    assert msg["body_text"] is None and msg["html"].startswith("<html>")
    assert msg["text"] == "New & bold\n\nsecond"


def test_rfc2047_subject_and_names_and_8bit_utf8_headers_are_decoded():
    raw = (b"From: =?iso-8859-1?q?Ren=E9?= <rene@example.org>\r\nTo: lobby@chat.test\r\n"
           b"Subject: =?utf-8?b?Q2Fmw6k=?= \xc3\xa0 midi\r\nMessage-ID: <u@x>\r\n\r\nsalut\r\n")
    msg = receive(raw).message
    assert msg["subject"] == "Café à midi" and msg["headers"]["from"] == "René <rene@example.org>"


def test_rfc2231_filenames_and_a_pdf_too_big_to_carry():
    big = b"%PDF" + b"x" * (LIMITS.max_attachment_content + 1)
    raw = (crlf("From: ann@example.org\nMessage-ID: <f@x>\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
                "Content-Type: text/plain\n\nsee attached\n--b\nContent-Type: text/plain\n"
                "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.txt\n\nCV\n--b\n"
                "Content-Type: application/pdf\nContent-Disposition: attachment;\n filename*0*=utf-8''Gro%C3%9F;\n"
                " filename*1=\".pdf\"\nContent-Transfer-Encoding: base64\n\n")
           + __import__("base64").encodebytes(big).replace(b"\n", b"\r\n") + b"--b--\r\n")
    msg = receive(raw).message
    assert msg["text"] == "see attached"
    cv, pdf = msg["attachments"]
    assert (cv["filename"], cv["content"], cv["inline"]) == ("résumé.txt", b"CV", False)
    assert (pdf["filename"], pdf["size"], pdf["content"]) == ("Groß.pdf", len(big), None)
    assert msg["content"]["parts"][2]["size"] == len(big)


@pytest.mark.parametrize("charset", ["x-no-such", "unknown-8bit", "idna", "punycode", "undefined", "base64", "rot13"])
def test_every_charset_that_cannot_decode_text_is_read_as_utf8_and_flagged(charset):
    raw = crlf(f"From: ann@example.org\nSubject: =?{charset}?q?caf=C3=A9?=\n"
               f"Content-Type: text/plain; charset={charset}\n\ncaf\u00e9") + b" \xff\r\n"
    msg = receive(raw).message
    assert msg["text"] == "café \ufffd"
    assert f"part 1: unknown charset {charset!r}, read as UTF-8 with replacement characters" in msg["defects"]


def test_8bit_text_without_a_charset_is_read_as_utf8():
    raw = b"From: ann@example.org\r\nContent-Type: text/plain\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    msg = receive(raw).message
    assert msg["text"] == "Grüße" and msg["defects"] == []


def test_many_defects_are_listed_up_to_a_cap():
    raw = b"From: ann@example.org\r\n" + b"X-Junk: caf\xe9\r\n" * 200 + b"\r\nbody\r\n"
    defects = receive(raw).message["defects"]
    assert len(defects) == m.MAX_DEFECTS + 1 and defects[-1] == f"and {200 - m.MAX_DEFECTS} more"


def test_an_unknown_charset_is_read_as_utf8_and_flagged():
    raw = crlf("From: ann@example.org\nSubject: =?bogus?q?caf=E9?=\nContent-Type: text/plain; charset=x-no-such\n\n"
               "caf\u00e9\n")
    msg = receive(raw).message
    assert msg["text"] == "café" and msg["subject"] == "caf\ufffd"
    assert any("unknown charset 'x-no-such'" in d for d in msg["defects"])
    assert any("header Subject" in d for d in msg["defects"])


def test_8bit_latin1_bytes_in_headers_become_replacement_characters_not_surrogates():
    raw = b"From: ann@example.org\r\nSubject: caf\xe9\r\n\r\nbody\xe9\r\n"
    msg = receive(raw).message
    assert msg["subject"] == "caf\ufffd" and msg["text"] == "body\ufffd"
    for _name, value in msg["header_list"]:
        value.encode("utf-8")  # no lone surrogates: the layer could not carry them


def test_headers_the_stdlib_parser_chokes_on_are_given_raw():
    raw = crlf('From: ann@example.org\nTo: lobby@\nCc: "\nMessage-ID: <@>\nIn-Reply-To: <a@[b>\nSubject: ok\n\nhi\n')
    msg = receive(raw).message
    assert (msg["headers"]["to"], msg["headers"]["cc"], msg["message_id"]) == ("lobby@", '"', "<@>")
    assert msg["in_reply_to"] == "<a@[b>" and msg["text"] == "hi"
    assert [d for d in msg["defects"] if "could not be parsed" in d] == [
        f"header {name}: could not be parsed, given as it came" for name in ("To", "Cc", "Message-ID")]


def registry_reading(name: str, raw: str) -> tuple[str, str, list[str]]:
    """A header as the stdlib's header registry (policy.default) reads it: what parsed_headers gave before its
    shortcuts for plain values, which must give exactly this."""
    try:
        value = policy.default.header_fetch_parse(name, raw)
        return name, m.header_text(str(value)), [str(defect) for defect in value.defects]
    except Exception:  # noqa: BLE001 - as parsed_headers: the header given raw
        return name, m.header_text(raw), ["could not be parsed, given as it came"]


PLAIN_LOOKING = {
    "from": ["Ann <ann@example.org>", "ann@example.org", "<ann@example.org>", "Ann  Example <ann@example.org>",
             "Ann Example <ann@example.org> ", "Ann.Example <a@b>", "\"Smith, Ann\" <ann@example.org>", "a@b, c@d",
             "ann@example.org (Ann)", "Ann<ann@example.org>", "<a.@b>", "<.a@b>", "a..b@c", "a@b.", "<a@[1.2.3.4]>",
             "=?utf-8?q?J=C3=BCrgen?= <j@x.y>", "a=?b@c.d", "Ann <a@b", "a@", "@b", "<>", "", " ann@example.org",
             "undisclosed-recipients:;", "Ann\t<ann@example.org>", "Ann <ann@EXAMPLE.org>", "j\udcc3\udcbcrgen@x.de",
             "jürgen@bücher.de", "Ann\r\n <ann@example.org>", "o'brien+tag@example.org", "{x}|y~@ex-ample.org"],
    "date": ["Tue, 01 Dec 2026 12:00:00 +0000", "Tue, 1 Dec 2026 12:00:00 +0100", "1 Dec 2026 12:00 -0500",
             "Tue, 1 Dec 26 12:00:00 GMT", "Tue, 1 Dec 2026 12:00:00 -0000", "Tue, 1 Dec 2026 12:00:00 EST",
             "Tue, 1 Dec 2026 12:00:00", "garbage", "", "Tue, 31 Feb 2026 12:00:00 +0000",
             "Tue,\r\n 1 Dec 2026 12:00:00 +0000", "Tue, 1 Dec 2026 25:00:00 +0000",
             # the canonical form format_datetime writes, read without parsing: only when it gives it back
             "Mon, 01 Dec 2026 12:00:00 +0000", "Tue, 01 Dec 2026 23:59:59 -0000", "Tue, 01 Dec 2026 00:00:00 +2359",
             "Sun, 29 Feb 2026 12:00:00 +0000", "Sat, 29 Feb 2020 12:00:00 -0530", "Tue, 01 dec 2026 12:00:00 +0000",
             "Tue, 01 Dec 2026 12:00:60 +0000", "Tue, 00 Dec 2026 12:00:00 +0000", "Tue, 01 Dec 0999 12:00:00 +0000",
             "Fri, 01 Jan 1000 12:00:00 +0000", "Tue, 01 Dec 2026 12:00:00 +0000 ", "Tue, 01 Dec 2026 12:00:00 +0060"],
    "message-id": ["<a@b>", "<1.cost@client.example>", "<CAF=x+y@mail.gmail.com>", "a@b", "<a@b> ", " <a@b>",
                   "<a b@c>", "<.a@b>", "<a..b@c>", "<a@[1.2.3.4]>", "<@>", "<a@b><c@d>", "<a@b> (comment)", ""],
    "subject": ["Lunch?", "Re: Lunch?", "  two  spaces  ", "tab\there", "folded\r\n line", "=?utf-8?q?x?=",
                "a=?b", "ctl\x01x", "caf\udcc3\udca9", "é", "", "trailing  ", "a\x0bb", "\x1c"],
}


@pytest.mark.parametrize("name", sorted(PLAIN_LOOKING))
def test_header_values_read_exactly_as_the_header_registry_reads_them(name):
    values = PLAIN_LOOKING[name]
    for header in (name.title(), "To", "Reply-To", "Cc") if name == "from" else (name.title(),):
        for value in values:
            part = email.message.EmailMessage(policy=policy.default)
            part._headers.append((header, value))  # as the parser stores it: the raw value, parsed when read
            assert list(m.parsed_headers(part)) == [registry_reading(header, value)], value


def test_random_plain_header_values_read_exactly_as_the_header_registry_reads_them():
    import random

    rng = random.Random(12)
    pieces = ["ann", "Bob", "x", "o'b", "a+b", "{}", "1", ".", " ", "  ", "\t", "@", "<", ">", ",", ";", ":", '"',
              "(", ")", "[", "]", "\\", "=", "?", "=?", "-", "example.org", "\r\n "]
    for _ in range(3000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))).lstrip(" \t\r\n")
        for header in ("From", "To", "Message-ID", "Date", "Subject", "References", "X-Mailer"):
            part = email.message.EmailMessage(policy=policy.default)
            part._headers.append((header, value))
            assert list(m.parsed_headers(part)) == [registry_reading(header, value)], (header, value)


def test_random_dates_in_the_canonical_form_read_exactly_as_the_header_registry_reads_them():
    import random
    from datetime import datetime, timedelta

    rng = random.Random(7)
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    for _ in range(3000):
        moment = datetime(1000, 1, 1) + timedelta(seconds=rng.randrange(9000 * 365 * 86400))
        weekday = days[moment.weekday()] if rng.random() < 0.8 else rng.choice(days)
        zone = rng.choice(["+", "-"]) + f"{rng.randrange(25):02d}{rng.choice([0, 30, 45, 59, 60]):02d}"
        value = f"{weekday}, {moment:%d %b} {moment.year:04d} {moment:%H:%M:%S} {zone}"
        part = email.message.EmailMessage(policy=policy.default)
        part._headers.append(("Date", value))
        assert list(m.parsed_headers(part)) == [registry_reading("Date", value)], value


def test_addresses_of_from_like_values_read_as_parseaddr_reads_them():
    import random
    from email.utils import parseaddr

    rng = random.Random(5)
    pieces = ["ann", "Bob", "x", "o'b", "a+b", "{}", "1", ".", " ", "@", "<", ">", ",", '"', "(", ")", "[", "]",
              "\\", "example.org", "\t"]
    values = PLAIN_LOOKING["from"] + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
                                      for _ in range(5000)]
    for value in values:
        assert m.address_of(value) == parseaddr(value)[1], value


MIME_HEADERS = [
    None, "", "text/plain", "TEXT/PLAIN", "text/plain; charset=us-ascii", 'text/plain; charset="UTF-8"',
    "text/plain;charset=Latin1", "text/plain; CHARSET=x-mac-roman", "charset=utf-8", "text/plain; charset=",
    "text/plain; charset*=utf-8''utf-8", 'text/plain; charset="utf-8', 'text/plain; charset="a\\"b"',
    "text/plain; format=flowed; charset=utf-8", "text/plain; charset=utf-8; charset=latin1", " text/plain; charset=x",
    "text/plain; charset = utf-8", "text/plain; charset=utf-8 ", "text/plain; name=a.txt", "application/pdf; NAME=x",
    "application/pdf; name*=utf-8''%C3%A9.pdf", "text/plain; filename=a.txt", "text/plain; charset=caf\udcc3\udca9",
    "text/plain; charset=é",
]


@pytest.mark.parametrize("disposition", [None, "inline", "attachment", 'attachment; filename="a b.pdf"',
                                         "attachment; filename*=utf-8''%C3%A9.pdf", "inline; name=x"])
def test_charsets_and_filenames_read_as_the_stdlib_reads_them(disposition):
    for content_type in MIME_HEADERS:
        part = email.message.EmailMessage(policy=policy.default)
        if content_type is not None:
            part._headers.append(("Content-Type", content_type))
        if disposition is not None:
            part._headers.append(("Content-Disposition", disposition))
        assert m._charset_of(part) == part.get_content_charset(), content_type
        try:
            expected = part.get_filename()
        except Exception:  # noqa: BLE001 - filename_of gives None for a parameter the stdlib cannot read
            expected = None
        assert m.filename_of(part) == expected, (content_type, disposition)


def test_a_read_mail_forgets_its_content_type_when_its_headers_change():
    mail = m.read_mail(crlf("From: a@b\nContent-Type: text/plain\n\nhi\n"), LIMITS)
    assert mail.get_content_type() == "text/plain"
    mail.replace_header("Content-Type", "text/html")
    assert mail.get_content_type() == "text/html"
    del mail["Content-Type"]
    assert mail.get_content_type() == "text/plain"
    mail.set_default_type("message/rfc822")
    assert mail.get_content_type() == "message/rfc822"
    mail["Content-Type"] = "image/png"
    assert mail.get_content_maintype() == "image"


def test_a_mail_reads_the_same_whether_its_mime_headers_were_seen_before():
    # the MIME headers' short values are remembered across mails: a second mail, and one with the same values in
    # another case or with other parameters, reads as if it came first
    first = crlf("From: a@b\nContent-Type: text/plain; charset=iso-8859-1\n\ncaf\xe9\n".replace("\xe9", "=E9")
                 ).replace(b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n")
    assert receive(first).message["text"] == receive(first).message["text"] == "café"
    other = first.replace(b"iso-8859-1", b"utf-8")
    assert receive(other).message["text"] == "caf\ufffd"
    assert receive(first.replace(b"text/plain", b"TEXT/PLAIN")).message["content"]["content-type"] == "text/plain"


def test_the_prescan_finds_boundaries_in_any_case_and_keeps_their_case():
    head = b"From: a@b\r\nCONTENT-TYPE: Multipart/Mixed; BOUNDARY=\"XyZ\"\r\n\r\n"
    with pytest.raises(m.MailRefused) as refused:
        m.prescan(head + b"--XyZ\r\n\r\np\r\n" * 100 + b"--XyZ--\r\n", LIMITS)
    assert refused.value.counter == "too_many_parts"
    m.prescan(head + b"--xyz\r\n\r\np\r\n" * 100 + b"--XyZ--\r\n", LIMITS)  # not its boundary: one part, no refusal
    with pytest.raises(m.MailRefused) as refused:
        m.prescan(b"From: a@b\r\n" + b"Content-Type: MESSAGE/rfc822\r\n\r\n" * 101 + b"x\r\n", LIMITS)
    assert refused.value.counter == "too_many_parts"


def test_a_plain_text_mail_quoting_mime_lines_is_one_part_not_a_bomb():
    body = b"--b\r\nContent-Type: message/rfc822\r\n\r\n" * 200  # a MIME bomb pasted as text
    raw = b"From: a@b\r\nContent-Type: text/plain; boundary=b\r\n\r\n" + body
    m.prescan(raw, LIMITS)
    message = receive(raw).message
    assert message["body_text"] == body.decode().replace("\r\n", "\n") and message["attachments"] == []


def test_the_end_of_a_header_block_is_where_the_blank_line_pattern_finds_it():
    import random
    import re

    pattern = re.compile(rb"\r?\n\r?\n")
    rng = random.Random(1)
    for _ in range(20000):
        raw = bytes(rng.choice(b"ab\r\n:") for _ in range(rng.randint(0, 14)))
        start = rng.randint(0, len(raw))
        stop = rng.randint(start, len(raw) + 2)
        found = pattern.search(raw, start, stop)
        assert m._header_end(raw, start, stop) == (found.start() if found else -1), (raw, start, stop)


def test_a_one_part_mail_is_built_exactly_as_the_parser_builds_it():
    import random
    from email.parser import BytesParser

    rng = random.Random(11)
    lines = [b"From: Ann <ann@example.org>", b"To: lobby@chat.example", b"Subject: Hello", b"Subject: a\r b",
             b"Date: Tue, 01 Dec 2026 12:00:00 +0000", b"Content-Type: text/plain; charset=utf-8", b" folded",
             b"\tfolded too", b"X-Empty:", b"X-Colons: a: b: c", b"no colon here", b":no name", b"From someone",
             b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: message/rfc822", b"X-8bit: caf\xc3\xa9",
             b"Subject: =?utf-8?q?caf=C3=A9?=", b"X-Odd\x0bName: x", b"X-Sp ace: x", b"Content-Transfer-Encoding: 8bit",
             b"X-CR: a\rb"]
    bodies = [b"", b"Hi.\r\n", b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", b"a\rb\nc\r\n", b"\xff\xfe"]
    policy_ = policy.default.clone(header_factory=m._Headers())
    built = 0
    for _ in range(3000):
        end = rng.choice([b"\r\n", b"\n"])
        head = [rng.choice(lines) for _ in range(rng.randint(0, 6))]
        raw = b"".join(line + rng.choice([end, end, b"\r\n", b"\n"]) for line in head) + rng.choice([end, b"\r\n"])
        raw += rng.choice(bodies)
        direct = m._one_part(raw, policy_)
        if direct is None:
            continue
        built += 1
        parsed = BytesParser(m._ReadPart, policy=policy_).parsebytes(raw)
        assert list(direct.raw_items()) == list(parsed.raw_items()), raw
        assert direct.get_payload() == parsed.get_payload() and direct.get_unixfrom() == parsed.get_unixfrom(), raw
        assert [type(d) for d in direct.defects] == [type(d) for d in parsed.defects] == [], raw
        assert receive(raw).message == m.receive_message(parsed, envelope_from="ann@example.org",
                                                         envelope_to=["lobby@chat.test"], reply_prefix=PREFIX,
                                                         limits=LIMITS, budget=BUDGET).message, raw
    assert built > 300  # the shortcut ran for a good share of them


QUICK_HEAD = (b"From: Ann <ann@example.org>\r\nTo: lobby@chat.example\r\nSubject: Hello\r\n"
              b"Message-ID: <1@example.org>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n")


@pytest.mark.parametrize("head, body", [
    (QUICK_HEAD + b"Content-Type: text/plain; charset=us-ascii\r\n", b"Hi.\r\n"),
    (QUICK_HEAD, b"no Content-Type: text/plain in us-ascii\r\n"),
    (QUICK_HEAD + b"CONTENT-TYPE: Text/Plain; Charset=\"UTF-8\"\r\nContent-Transfer-Encoding: base64\r\n",
     b"SGk=\r\n"),
    (QUICK_HEAD + b"DKIM-Signature: v=1; b=" + b"A" * 4000 + b"\r\n", b"unstructured headers are cheap\r\n"),
    (QUICK_HEAD, b"x" * 60000 + b"\r\n"),
])
def test_a_small_plain_text_mail_is_quick_to_read(head, body):
    assert m.quick_to_read(head + b"\r\n" + body)


@pytest.mark.parametrize("head, body", [
    (QUICK_HEAD, b"x" * (m.QUICK_MAIL_BYTES + 1)),  # too big
    (QUICK_HEAD + b"X-Long: " + b"y" * m.QUICK_HEADER_BYTES + b"\r\n", b"Hi.\r\n"),  # header block too big
    (QUICK_HEAD[:-2], b""),  # no end of headers
    (QUICK_HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n\r\nHi.\r\n--b--\r\n"),
    (QUICK_HEAD + b"Content-Type: message/rfc822\r\n", QUICK_HEAD + b"\r\nHi.\r\n"),
    (QUICK_HEAD + b"Content-Type: text/html\r\n", b"<p>Hi.</p>\r\n"),
    (QUICK_HEAD + b"Content-Type:\r\n text/plain\r\n", b"Hi.\r\n"),  # folded where the check does not look
    (QUICK_HEAD + b"Content-Type: text/plain; charset=punycode\r\n", b"Hi.\r\n"),  # a charset decoded in Python
    (QUICK_HEAD + b"Content-Type: text/plain; charset*=utf-8''utf-8\r\n", b"Hi.\r\n"),  # RFC 2231
    (QUICK_HEAD.replace(b"Subject: Hello", b"Subject: =?utf-8?q?caf=C3=A9?="), b"Hi.\r\n"),  # an encoded word
    (QUICK_HEAD + b"Cc: " + b", ".join(b'"Q %d (c)" <u%d@example.org>' % (i, i) for i in range(40)) + b"\r\n",
     b"Hi.\r\n"),  # over 1 KiB of structured headers: the address parser's, milliseconds a KiB
    (QUICK_HEAD + b"cc : " + b"u@example.org, " * 80 + b"\r\n", b"Hi.\r\n"),  # so too with a space before the colon
])
def test_a_mail_that_may_cost_much_to_read_is_not_quick(head, body):
    assert not m.quick_to_read(head + b"\r\n" + body)


def test_a_header_the_stdlib_raises_on_wherever_it_is_read_refuses_the_mail_instead_of_crashing():
    raw = b"From: a@b\r\nContent-Type: text/plain; charset*=idna''%FF\r\n\r\nx\r\n"
    with pytest.raises(m.MailRefused) as refused:
        receive(raw)
    assert refused.value.smtp_reply == "554 5.6.0 message could not be read" and refused.value.counter == "unreadable"
    assert isinstance(refused.value.__cause__, UnicodeError)  # chained, for the bridge's log


def test_a_forwarded_mail_is_one_attachment_not_the_body():
    raw = crlf("From: ann@example.org\nMessage-ID: <fw@x>\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
               "Content-Type: text/plain\n\nFYI\n--b\nContent-Type: message/rfc822\n\nFrom: bob@x\nSubject: inner\n\n"
               "inner body\n--b--\n")
    msg = receive(raw).message
    assert msg["text"] == msg["body_text"] == "FYI"
    (forwarded,) = msg["attachments"]
    assert forwarded["content_type"] == "message/rfc822" and b"inner body" in forwarded["content"]


def test_bodies_that_do_not_fit_the_layer_are_left_out_and_texts_that_do_not_are_refused():
    text = "x" * 400_000
    raw = crlf(f"From: ann@example.org\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
               f"Content-Type: text/plain\n\n{text}\n--b--\n")
    msg = receive(raw).message
    assert len(msg["body_text"]) == 400_000 and msg["content"]["parts"][0]["body"] is None  # text once, not twice
    with pytest.raises(m.MailRefused) as refused:
        m.receive_message(m.read_mail(raw, LIMITS), envelope_from="a@b", envelope_to=["l@c"], reply_prefix=PREFIX,
                          limits=LIMITS, budget=700_000)
    assert refused.value.smtp_reply.startswith("552 5.3.4") and refused.value.counter == "oversized"


def test_a_multipart_without_a_boundary_keeps_its_body_as_one_leaf():
    msg = receive(crlf("From: ann@example.org\nContent-Type: multipart/mixed\n\nwhat is this\n")).message
    assert msg["content"] == {"content-type": "multipart/mixed", "size": 14, "body": b"what is this\r\n"}
    assert msg["attachments"][0]["size"] == 14 and msg["text"] == ""


def test_the_envelope_from_is_the_sender_when_the_mail_has_no_from():
    msg = receive(b"Subject: x\r\n\r\nhi\r\n", envelope_from="bob@example.org").message
    assert msg["sender"] == "bob@example.org"


# -- bounded parsing: each bomb refused fast -------------------------------------------------------------------


def nested(depth: int) -> bytes:
    raw = b"Content-Type: text/plain\r\n\r\nx\r\n"
    for i in range(depth):
        raw = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) + raw + b"\r\n--b%d--\r\n" % i
    return b"From: a@b\r\n" + raw


def many_parts(count: int) -> bytes:
    head = b"From: a@b\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
    return head + b"--x\r\n\r\np\r\n" * count + b"--x--\r\n"


def nested_messages(depth: int) -> bytes:
    return b"From: a@b\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * depth + b"\r\nx\r\n"


BIG = m.Limits(max_message_size=10 * 1024 * 1024)  # so each bomb meets the cap it is about, not the size


@pytest.mark.parametrize(("raw", "reply", "counter", "parsed_first"), [
    (nested(1000), "554 5.6.0 MIME parts nested too deep: more than 20", "too_deep", False),
    (nested(21), "554 5.6.0 MIME parts nested too deep", "too_deep", False),
    (many_parts(100_000), "554 5.6.0 too many MIME parts: more than 100", "too_many_parts", False),
    (many_parts(100), "554 5.6.0 too many MIME parts", "too_many_parts", False),
    (nested_messages(1000), "554 5.6.0 too many MIME parts", "too_many_parts", False),
    # message/* parts nest without boundaries: few enough of them are parsed, then their depth is refused
    (nested_messages(30), "554 5.6.0 MIME parts nested too deep", "too_deep", True),
    # a boundary in RFC 2231 pieces slips past the prescan; the parser is stopped at part 101 instead
    (many_parts(100_000).replace(b"boundary=x", b'boundary*0="x"'), "554 5.6.0 too many MIME parts",
     "too_many_parts", True),
    (b"X-Big: " + b"a" * 70_000 + b"\r\n\r\nbody", "552 5.3.4 header too large: more than 65536 bytes",
     "headers_too_large", False),
    (b"X-A: a\r\n" * 20_000 + b"\r\nbody", "552 5.3.4 header too large", "headers_too_large", False),
    (crlf("From: a@b\nContent-Type: multipart/mixed; boundary=x\n\n--x\n") + b"X-P: a\r\n" * 10_000
     + b"\r\nbody\r\n--x--\r\n", "552 5.3.4 header too large", "headers_too_large", False),
])
def test_mime_bombs_are_refused_with_the_reply_the_bridge_gives(monkeypatch, raw, reply, counter, parsed_first):
    parses, real_parser = [], m.BytesParser

    def counting_parser(*args, **kwargs):
        parses.append(1)
        return real_parser(*args, **kwargs)

    monkeypatch.setattr(m, "BytesParser", counting_parser)
    with pytest.raises(m.MailRefused) as refused:
        m.read_mail(raw, BIG)
    assert refused.value.smtp_reply.startswith(reply) and refused.value.counter == counter
    assert refused.value.code in (552, 554)
    assert bool(parses) == parsed_first  # a bomb is refused from its bytes, before the parser spends its CPU on it


def test_just_within_the_caps_is_read():
    assert m.read_mail(nested(20), BIG).get_content_type() == "multipart/mixed"
    assert len(m.read_mail(many_parts(99), BIG).get_payload()) == 99
    assert m.read_mail(nested_messages(20), BIG).get_content_type() == "message/rfc822"


def test_an_oversized_mail_is_refused_on_its_size():
    with pytest.raises(m.MailRefused) as refused:
        m.read_mail(b"Subject: x\r\n\r\n" + b"x" * LIMITS.max_message_size, LIMITS)
    assert refused.value.smtp_reply.startswith("552 5.3.4 message too big") and refused.value.counter == "oversized"


def address_list(size: int) -> str:
    """Quoted names, as a mailing list's Cc has them: the slow path of the stdlib's address parser."""
    addresses, n = [], 0
    while len(", ".join(addresses)) < size:
        addresses.append(f'"Member {n}" <member{n}@example.org>')
        n += 1
    return ", ".join(addresses)[:size].rstrip(", ")


def refused_unparsed(monkeypatch, raw: bytes, limits: m.Limits) -> m.MailRefused:
    """The refusal ``read_mail`` raises for ``raw``, checked to come before any address was parsed."""
    from email import headerregistry

    parsed = []
    real_parse = headerregistry.AddressHeader.parse.__func__

    def counting_parse(cls, value, kwds):
        parsed.append(value)
        return real_parse(cls, value, kwds)

    monkeypatch.setattr(headerregistry.AddressHeader, "parse", classmethod(counting_parse))
    with pytest.raises(m.MailRefused) as refused:
        m.read_mail(raw, limits)
    assert parsed == []  # refused from the raw headers: what the cap saves is the parser's CPU
    return refused.value


def test_a_mail_over_the_address_header_cap_is_refused_before_its_addresses_are_read(monkeypatch):
    raw = crlf(f"From: Ann <ann@example.org>\nTo: lobby@chat.example\nCc: {address_list(40_000)}\n"
               "Subject: everyone\n\nhi\n")
    refusal = refused_unparsed(monkeypatch, raw, LIMITS)
    assert refusal.smtp_reply.startswith("552 5.3.4 address headers too large: more than 16384 bytes")
    assert refusal.counter == "address_headers_too_large"


def test_the_address_header_cap_counts_every_header_of_every_part(monkeypatch):
    # each header well under the cap (and each header block under max_header_bytes), 64 KiB of them in all
    cc = address_list(4000)
    parts = "".join(f"--x\nContent-Type: message/rfc822\n\nFrom: a@b.example\nTo: {cc}\nCc: {cc}\n\nhi\n"
                    for _ in range(8))
    raw = crlf(f"From: a@b.example\nContent-Type: multipart/mixed; boundary=x\n\n{parts}--x--\n")
    refusal = refused_unparsed(monkeypatch, raw, LIMITS)
    assert refusal.counter == "address_headers_too_large" and refusal.code == 552


def test_address_headers_up_to_the_cap_are_read():
    cc = address_list(8000)
    raw = crlf(f"From: Ann <ann@example.org>\nTo: {cc}\nCc: {cc}\nSubject: s\n\nhi\n")
    assert len(cc) * 2 <= LIMITS.max_address_header_bytes
    mail = m.read_mail(raw, LIMITS)
    assert len(m.addresses_of(str(mail["cc"]))) == cc.count("@")
    with pytest.raises(m.MailRefused):  # the cap is the option's: a lower one refuses the same mail
        m.read_mail(raw, m.Limits(max_address_header_bytes=len(cc) * 2 - 1))
    # other headers do not count: 30 KiB of Subject is within max_header_bytes and has no address to parse
    assert m.read_mail(crlf(f"From: a@b.example\nSubject: {'s' * 30_000}\n\nhi\n"), LIMITS)["from"] == "a@b.example"


def test_dashes_in_a_body_are_not_parts():
    raw = crlf("From: a@b\nContent-Type: text/plain\n\n" + "--x\n-- \n--\n" * 5000)
    assert m.read_mail(raw, BIG).get_content_type() == "text/plain"


# -- new text ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "text"), [
    ("Yes.\n\nOn Mon, 30 Nov 2026 at 09:00, Bob <bob@x> wrote:\n> Lunch?\n", "Yes."),
    ("Ja.\n\nAm Mo., 30. Nov. 2026 um 09:00 Uhr schrieb Bob <bob@x>:\n> Mittag?\n", "Ja."),
    ("Oui.\n\nLe lun. 30 nov. 2026 à 09:00, Bob <bob@x> a écrit :\n> Midi ?\n", "Oui."),
    ("Sí.\n\nEl lun, 30 nov 2026 a las 09:00, Bob (<bob@x>) escribió:\n> ¿Almuerzo?\n", "Sí."),
    ("Sim.\n\nEm seg., 30 de nov. de 2026 às 09:00, Bob <bob@x> escreveu:\n> Almoço?\n", "Sim."),
    ("Sì.\n\nIl giorno lun 30 nov 2026 alle ore 09:00 Bob <bob@x> ha scritto:\n> Pranzo?\n", "Sì."),
    ("Ja.\n\nOp ma 30 nov. 2026 om 09:00 schreef Bob <bob@x>:\n> Lunch?\n", "Ja."),
    ("Ja.\n\nDen mån 30 nov. 2026 kl 09:00 skrev Bob <bob@x>:\n> Lunch?\n", "Ja."),
    ("Tak.\n\nW dniu 30.11.2026 o 09:00, Bob pisze:\n> Obiad?\n", "Tak."),
    ("Да.\n\n30.11.2026 09:00, Bob пишет:\n> Обед?\n", "Да."),
    ("好的\n\nBob <bob@x> 于2026年11月30日周一 09:00写道：\n> 午饭？\n", "好的"),
    ("Yes.\n\n-----Original Message-----\nFrom: Bob\nSent: Monday\nLunch?\n", "Yes."),
    ("Ja.\n\n-----Ursprüngliche Nachricht-----\nVon: Bob\nLunch?\n", "Ja."),
    ("Ja.\n\nVon: Bob <bob@x>\nGesendet: Montag, 30. November 2026 09:00\nAn: lobby\nBetreff: Lunch\n\nLunch?", "Ja."),
    ("Oui.\n\nDe : Bob <bob@x>\nEnvoyé : lundi 30 novembre 2026 09:00\nÀ : lobby\n\nMidi ?", "Oui."),
    ("Yes.\n\n*From:* Bob\n*Sent:* Monday\n*To:* lobby\n\nLunch?", "Yes."),
    ("Yes.\n\nOn Mon, Bob wrote:\nLunch? (history without quote marks)\n", "Yes."),
    ("Sure\n\nSent from my iPhone\n\n> On 30 Nov 2026, at 09:00, Bob <bob@x> wrote:\n> Lunch?", "Sure"),
    ("Sure\n-- \nAnn\nExample Inc.\n", "Sure"),
    ("> quoted only\n", ""),
    ("Thanks,\nBob <bob@x> wrote:\n> Lunch?\n", "Thanks,"),  # the line above a one-line attribution stays
    ("Thanks,\nOn Mon, Bob wrote:\n> Lunch?\n", "Thanks,"),
    ("  indented code\n\tstays\n", "  indented code\n\tstays"),
    ("I wrote:\nthis quotes nothing\n", "I wrote:\nthis quotes nothing"),  # a weak attribution needs quotes below
    ("From: the team\nwe say hello\n", "From: the team\nwe say hello"),  # a From: line alone is not Outlook's block
    ("On Monday we meet:\n- at 9\n", "On Monday we meet:\n- at 9"),  # an attribution needs its marker word
    # plain lines (nothing a rule looks for) are kept as they are, blank runs as one, up to the signature
    ("Plain line one\nplain two\n\n\n\nthree   \n--\nsig", "Plain line one\nplain two\n\nthree"),
    # a wrapped attribution whose first line is plain: the next line (ending in ":") still joins it
    ("Danke!\n\nAm Dienstag, 1. Dezember 2026 schrieb Ann\nExample <ann@example.org>:\n> Hallo\n>\n", "Danke!"),
])
def test_new_text(body, text):
    assert m.new_text(body) == text


def test_hostile_lines_are_read_as_text():
    # one 400 KB line starting with "On": mail-parser-reply 1.36 backtracks on such lines (10.9 s for 16 KB)
    line = "On " + "a " * 200_000
    assert m.new_text(line + "\nnext") == line.rstrip() + "\nnext"
    assert m.new_text("hi\n" + "From: x\n" * 50_000) == "hi\n" + "\n".join(["From: x"] * 50_000)


# -- automatic mail ------------------------------------------------------------------------------------------------


def mail_with(headers: str, envelope_from: str | None = "ann@example.org", own=()) -> str | None:
    raw = crlf(f"From: Ann <ann@example.org>\nMessage-ID: <a@x>\n{headers}\n\nI am away.\n")
    return receive(raw, envelope_from=envelope_from, own_addresses=own).message["auto"]


@pytest.mark.parametrize(("headers", "envelope_from", "kind"), [
    ("Subject: hi", None, m.BOUNCE),  # the null sender <>
    ("Subject: hi", "", m.BOUNCE),
    ("Subject: Undelivered Mail", "MAILER-DAEMON@mx.example", m.BOUNCE),
    ("Subject: x\nX-Failed-Recipients: lobby@chat.test", "ann@example.org", m.BOUNCE),
    ("Auto-Submitted: auto-replied", "ann@example.org", m.AUTO_REPLIED),
    ("Auto-Submitted: Auto-Replied (vacation)", "ann@example.org", m.AUTO_REPLIED),
    ("X-Autoreply: yes", "ann@example.org", m.AUTO_REPLIED),
    ("X-Autorespond: yes", "ann@example.org", m.AUTO_REPLIED),
    ("Auto-Submitted: auto-generated", "ann@example.org", m.AUTO_GENERATED),
    ("Auto-Submitted: auto-notified", "ann@example.org", m.AUTO_GENERATED),
    ("X-Auto-Response-Suppress: All", "ann@example.org", m.AUTO_GENERATED),
    ("X-Auto-Response-Suppress: DR, OOF, AutoReply", "ann@example.org", m.AUTO_GENERATED),
    ("List-Id: Chat <chat.lists.example>", "ann@example.org", m.LIST),
    ("List-Unsubscribe: <mailto:leave@lists.example>", "ann@example.org", m.LIST),
    ("Precedence: list", "ann@example.org", m.LIST),
    ("Precedence: bulk", "ann@example.org", m.BULK),
    ("Precedence: junk", "ann@example.org", m.BULK),
    ("Auto-Submitted: no", "ann@example.org", None),
    ("X-Auto-Response-Suppress: DR", "ann@example.org", None),
    ("Precedence: first-class", "ann@example.org", None),
])
def test_auto_kinds(headers, envelope_from, kind):
    assert mail_with(headers, envelope_from) == kind


def test_a_delivery_status_report_is_a_bounce_even_from_a_person_looking_sender():
    raw = crlf("From: postmaster-ish <notify@mx.example>\nContent-Type: multipart/report; report-type=delivery-status;"
               " boundary=r\n\n--r\nContent-Type: text/plain\n\nYour mail was not delivered.\n--r\n"
               "Content-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n"
               "Final-Recipient: rfc822; x@y\n"
               "Action: failed\nStatus: 5.1.1\n\n--r--\n")
    assert receive(raw, envelope_from="bounces@mx.example").message["auto"] == m.BOUNCE


def test_our_own_address_is_never_answered():
    assert mail_with("Subject: hi", "lobby@chat.test", own=["lobby@chat.test"]) == m.OWN
    assert mail_with("Subject: hi", "ann@example.org", own=["ANN@example.org"]) == m.OWN


def test_suppression_unless_forced():
    assert m.suppressed(None) is None
    for kind in (m.BOUNCE, m.AUTO_REPLIED, m.AUTO_GENERATED, m.LIST, m.BULK, m.OWN):
        assert "not answering" in m.suppressed(kind)
        assert m.suppressed(kind, force=True) is None


def test_the_rate_limit_is_a_token_bucket_per_recipient():
    limit = m.RateLimit(rate=0.1, burst=2)
    assert [limit.allow("ann@x", 0.0) for _ in range(3)] == [True, True, False]
    assert limit.allow("ANN@x", 5.0) is False and limit.allow("bob@x", 5.0) is True  # one bucket per address
    assert limit.allow("ann@x", 10.0) is True  # one token back after 1 / rate seconds
    assert limit.allow("ann@x", 10.0) is False


def test_the_rate_limit_remembers_a_bounded_number_of_recipients():
    limit = m.RateLimit(rate=0.0, burst=1, recipients=2)
    assert limit.allow("a@x", 0) and limit.allow("b@x", 0) and limit.allow("c@x", 0)
    assert len(limit._buckets) == 2 and not limit.allow("c@x", 0)


# -- threads ---------------------------------------------------------------------------------------------------


def test_message_ids_are_found_and_bracketed():
    assert m.message_ids("<a@x>\r\n <b@y>") == ["<a@x>", "<b@y>"]
    assert m.message_ids("a@x") == ["<a@x>"]  # Exchange-style, without brackets
    assert m.message_ids("") == [] and m.message_ids(None) == []
    assert m.message_ids("<a@x> (comment) <b@y>") == ["<a@x>", "<b@y>"]


def test_the_thread_root_is_the_first_reference_then_in_reply_to_then_the_own_id():
    assert m.thread_root("<c@x>", ["<b@x>"], ["<a@x>", "<b@x>"]) == "<a@x>"
    assert m.thread_root("<c@x>", ["<b@x>"], []) == "<b@x>"
    assert m.thread_root("<c@x>", [], []) == "<c@x>"
    assert m.thread_root(None, [], [], fallback="ann|lunch") == "ann|lunch"


def test_a_new_mail_starts_a_thread_its_reply_joins():
    first = receive(crlf("From: ann@example.org\nSubject: Lunch\nMessage-ID: <new@example.org>\n\nLunch?\n"))
    second = receive(crlf("From: bob@example.org\nSubject: Re: Lunch\nMessage-ID: <r@example.org>\n"
                          "In-Reply-To: <new@example.org>\nReferences: <new@example.org>\n\nYes\n"))
    assert first.local_id == second.local_id == m.thread_local_id("<new@example.org>")
    assert first.local_id != receive(GMAIL_REPLY).local_id


def test_mail_without_ids_threads_by_sender_and_subject():
    one = receive(crlf("From: ann@example.org\nSubject: Lunch\n\n1\n"))
    two = receive(crlf("From: ann@example.org\nSubject: RE: Re: Lunch\n\n2\n"))
    assert one.local_id == two.local_id


def test_thread_memory_is_an_lru_with_a_cap():
    memory = m.ThreadMemory(limit=2)
    thread = receive(GMAIL_REPLY).thread
    assert memory.remember("t.a", thread) == [] and memory.remember("t.b", thread) == []
    assert memory.get("t.a") is thread  # a read does not refresh: the latest *received* mail does
    assert memory.remember("t.a", thread) == []  # heard from again: now the most recent
    assert memory.remember("t.c", thread) == ["t.b"]
    assert memory.get("t.b") is None and memory.get("t.a") is thread and len(memory) == 2


# -- replies -----------------------------------------------------------------------------------------------------


def test_a_reply_threads_the_way_mail_clients_expect():
    thread = receive(GMAIL_REPLY).thread
    out = m.build_reply(thread, {"text": "See you at noon, café?"}, domain="chat.test")
    mail = parsed(out.data)
    assert (out.mail_from, out.rcpt_tos) == ("lobby@chat.test", ("ann@example.org",))
    assert mail["To"] == "ann@example.org" and mail["From"] == "lobby@chat.test"
    assert mail["Subject"] == "Re: Lunch?"
    assert mail["In-Reply-To"] == "<CAB2=abc@mail.gmail.com>"
    assert mail["References"].split() == ["<root@chat.test>", "<CAB1=xyz@mail.gmail.com>", "<CAB2=abc@mail.gmail.com>"]
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail["Message-ID"] == out.message_id and out.message_id.endswith("@chat.test>")
    assert mail["Date"] and mail.get_content().splitlines() == ["See you at noon, café?"]
    assert b"\r\n" in out.data and b"\n" not in out.data.replace(b"\r\n", b"")
    assert out.data.isascii()  # quoted-printable: any smarthost takes it, 8BITMIME or not


def test_a_reply_goes_to_reply_to_and_re_appears_once():
    raw = crlf("From: Ann <ann@example.org>\nReply-To: team@example.org, Bob <bob@example.org>\n"
               "Subject: AW: RE: Re: Plan\nMessage-ID: <p@x>\n\nplan\n")
    out = m.build_reply(receive(raw).thread, {"text": "ok"}, domain="chat.test")
    mail = parsed(out.data)
    assert out.rcpt_tos == ("team@example.org", "bob@example.org") and mail["Subject"] == "Re: Plan"
    assert (mail["In-Reply-To"], mail["References"]) == ("<p@x>", "<p@x>")


def test_references_keep_the_root_and_the_last_ten():
    chain = [f"<{i}@x>" for i in range(30)]
    refs = m.references_after(chain, "<new@x>")
    assert refs[0] == "<0@x>" and refs[-1] == "<new@x>" and len(refs) == m.MAX_REFERENCES
    assert m.references_after([], "<a@x>") == ["<a@x>"] and m.references_after([], None) == []


@pytest.mark.parametrize(("subject", "expected"), [
    ("Lunch", "Re: Lunch"), ("Re: Lunch", "Re: Lunch"), ("RE: re: Lunch", "Re: Lunch"), ("Re[2]: Lunch", "Re: Lunch"),
    ("AW: Lunch", "Re: Lunch"), ("SV: Lunch", "Re: Lunch"), ("Fwd: Lunch", "Re: Fwd: Lunch"), ("", "Re: "),
    ("Regarding lunch", "Re: Regarding lunch"),
])
def test_reply_subjects(subject, expected):
    assert m.reply_subject(subject) == expected


def test_a_reply_with_html_and_an_attachment():
    out = m.build_reply(receive(GMAIL_REPLY).thread, {"text": "menu", "html": "<b>menu</b>", "attachments": [
        {"filename": "menü.pdf", "content_type": "application/pdf", "content": b"%PDF-1"}]}, domain="chat.test")
    mail = parsed(out.data)
    assert mail.get_content_type() == "multipart/mixed"
    assert mail.get_body(("plain",)).get_content().splitlines() == ["menu"]
    assert mail.get_body(("html",)).get_content().splitlines() == ["<b>menu</b>"]
    (attachment,) = mail.iter_attachments()
    assert attachment.get_filename() == "menü.pdf" and attachment.get_content() == b"%PDF-1"


@pytest.mark.parametrize(("reply", "problem"), [
    ("text", "must be a dict"), ({}, "give text or html"), ({"text": 1}, "text must be a str"),
    ({"text": "x", "to": "eve@x"}, "unknown reply keys"), ({"text": "x", "force": "yes"}, "force must be"),
    ({"text": "x", "headers": {"Bcc": "eve@x"}}, "is the bridge's to write"),
    ({"text": "x", "headers": {"From": "eve@x"}}, "is the bridge's to write"),
    ({"text": "x", "headers": {"Bad Name": "v"}}, "is not a header name"),
    ({"text": "x", "attachments": [{"filename": "a", "content": "str"}]}, "each attachment"),
    ({"text": "x", "attachments": [{"content": b"x", "content_type": "pdf"}]}, "is not type/subtype"),
])
def test_invalid_replies(reply, problem):
    with pytest.raises(m.InvalidReply, match=problem):
        m.build_reply(receive(GMAIL_REPLY).thread, reply, domain="chat.test")


def test_a_consumer_may_set_allowed_and_x_headers():
    out = m.build_reply(receive(GMAIL_REPLY).thread, {"text": "x", "headers": {"X-Ticket": "42", "Importance": "high"}},
                        domain="chat.test")
    mail = parsed(out.data)
    assert (mail["X-Ticket"], mail["Importance"]) == ("42", "high")


INJECTIONS = ["x\r\nBcc: eve@evil.example", "x\nBcc: eve@evil.example", "x\rBcc: eve@evil.example", "x\x00", "x\x1b[0m",
              "x\x7f", "x\u2028Bcc: eve@evil.example", "x\x85", "x\tBcc: eve"]


@pytest.mark.parametrize("bad", INJECTIONS)
@pytest.mark.parametrize("where", ["to", "cc", "bcc", "from", "subject", "header value", "header name",
                                   "attachment filename", "attachment type"])
def test_header_injection_is_refused_in_every_field_of_email_send(bad, where):
    message = {"to": "ann@example.org", "subject": "hi", "text": "body"}
    if where in ("to", "cc", "bcc", "from"):
        message[where] = f"ann{bad}@example.org" if where != "from" else f"lobby{bad}@chat.test"
    elif where == "subject":
        message["subject"] = bad
    elif where == "header value":
        message["headers"] = {"X-Ticket": bad}
    elif where == "header name":
        message["headers"] = {f"X-{bad}": "1"}
    elif where == "attachment filename":
        message["attachments"] = [{"filename": bad, "content_type": "text/plain", "content": b"x"}]
    else:
        message["attachments"] = [{"filename": "a", "content_type": f"text/plain{bad}", "content": b"x"}]
    with pytest.raises(m.HeaderInjection, match="control character"):
        m.build_send(message, domain="chat.test", default_from="lobby@chat.test", domains=["chat.test"])


@pytest.mark.parametrize("bad", INJECTIONS[:3])
def test_header_injection_through_a_thread_is_refused_too(bad):
    thread = receive(GMAIL_REPLY).thread
    with pytest.raises(m.HeaderInjection):
        m.build_reply(thread, {"text": "x", "headers": {"X-A": bad}}, domain="chat.test")
    poisoned = m.Thread(("ann@example.org",), "lobby@chat.test", f"Lunch{bad}", "<a@x>", (), None)
    with pytest.raises(m.HeaderInjection):
        m.build_reply(poisoned, {"text": "x"}, domain="chat.test")


@pytest.mark.parametrize(("encoded", "subject"), [
    ("Hi=0D=0ABcc=3A_eve=40evil=2Eexample", "Hi Bcc: eve@evil.example"),  # CR LF unfolds, as in any header
    ("Hi=0DBcc=3A_eve=40evil=2Eexample", "Hi\rBcc: eve@evil.example"),  # a lone CR stays in the message's subject
])
def test_a_subject_that_decodes_to_a_line_break_is_answered_without_it(encoded, subject):
    raw = crlf(f"From: ann@example.org\nMessage-ID: <s@x>\nSubject: =?utf-8?q?{encoded}?=\n\nx\n")
    received = receive(raw)
    assert received.message["subject"] == subject
    out = m.build_reply(received.thread, {"text": "ok"}, domain="chat.test")
    mail = parsed(out.data)
    assert mail["Subject"] == "Re: Hi Bcc: eve@evil.example" and mail["Bcc"] is None
    assert out.rcpt_tos == ("ann@example.org",)


def test_a_consumers_header_replaces_the_bridges_own():
    out = m.build_send({"to": "ann@example.org", "text": "x", "headers": {
        "In-Reply-To": "<earlier@chat.test>", "References": "<root@chat.test> <earlier@chat.test>",
        "Auto-Submitted": "no"}}, domain="chat.test", default_from="lobby@chat.test", domains=["chat.test"])
    mail = parsed(out.data)
    assert mail.get_all("Auto-Submitted") == ["no"] and mail.get_all("In-Reply-To") == ["<earlier@chat.test>"]
    out = m.build_reply(receive(GMAIL_REPLY).thread, {"text": "x", "headers": {"In-Reply-To": "<other@x>"}},
                        domain="chat.test")
    assert parsed(out.data).get_all("In-Reply-To") == ["<other@x>"]


def test_a_header_value_the_stdlib_cannot_write_is_an_invalid_reply():
    with pytest.raises(m.InvalidReply, match="cannot write this mail"):
        m.build_send({"to": "ann@example.org", "text": "x", "headers": {"Reply-To": "a@"}}, domain="chat.test",
                     default_from="lobby@chat.test", domains=["chat.test"])


def test_email_send_starts_a_mail():
    out = m.build_send({"to": ["Ann <ann@example.org>"], "cc": "bob@example.org", "bcc": ["carl@example.org"],
                        "subject": "Minutes", "text": "attached", "reply_channel": "ignored"},
                       domain="chat.test", default_from="lobby@chat.test", domains=["chat.test"])
    mail = parsed(out.data)
    assert out.rcpt_tos == ("ann@example.org", "bob@example.org", "carl@example.org")
    assert mail["To"] == "Ann <ann@example.org>" and mail["Cc"] == "bob@example.org" and mail["Bcc"] is None
    assert mail["From"] == "lobby@chat.test" and mail["Auto-Submitted"] == "auto-generated"
    assert mail["In-Reply-To"] is None and mail["Subject"] == "Minutes"


@pytest.mark.parametrize(("message", "problem"), [
    ({"text": "x"}, "needs to"), ({"to": "ann@example.org", "text": "x", "from": "eve@evil.example"}, "not in one of"),
    ({"to": "not an address", "text": "x"}, "is not an address"), ({"to": 5, "text": "x"}, "must be an address"),
    ({"to": "ann@example.org", "text": "x", "date": "now"}, "unknown keys"), ([], "must be a dict"),
])
def test_invalid_sends(message, problem):
    with pytest.raises(m.InvalidReply, match=problem):
        m.build_send(message, domain="chat.test", default_from="lobby@chat.test", domains=["chat.test"])


def test_a_non_ascii_address_needs_smtputf8():
    out = m.build_send({"to": "jürgen@exämple.org", "text": "x"}, domain="chat.test", default_from="lobby@chat.test",
                       domains=["chat.test"])
    assert out.smtputf8 and "jürgen@exämple.org".encode() in out.data


# -- who authenticated the sender ----------------------------------------------------------------------------------


def test_authentication_results_are_read_only_from_our_relay():
    headers = [["Authentication-Results", "mx.chat.test; spf=pass smtp.mailfrom=example.org; dkim=pass header.d=x;"
                                          " dmarc=pass"],
               ["Authentication-Results", "mx.chat.test; spf=fail"],  # further down: not the relay's newest
               ["Authentication-Results", "evil.example; dkim=pass"]]
    assert m.authentication(relay="10.0.0.2:25", authserv_id="mx.chat.test", headers=headers) == {
        "smtp_auth": None, "relay": "10.0.0.2:25", "spf": "pass", "dkim": "pass", "dmarc": "pass", "arc": None}
    assert m.authentication(relay="r", authserv_id="MX.chat.test", headers=[["authentication-results",
                            "mx.chat.test 1; dkim=fail (bad signature) header.d=x"]])["dkim"] == "fail"
    forged = [["Authentication-Results", "evil.example; dkim=pass"]]
    assert m.authentication(relay="10.0.0.2:25", authserv_id="mx.chat.test", headers=forged)["dkim"] is None
    assert m.authentication(relay=None, authserv_id="mx.chat.test", headers=headers)["spf"] is None  # not via relay
    assert m.authentication(smtp_login="ann")["smtp_auth"] == "ann"


def test_the_receive_message_carries_what_authenticated_the_sender():
    msg = receive(GMAIL_REPLY, authenticated=m.authentication(smtp_login="ann")).message
    assert msg["authenticated"]["smtp_auth"] == "ann"
