"""bridges/email/mailbox.py: the IMAP reader's pure decisions (the URL, the server's answers, the UID cursor)."""

from __future__ import annotations

import pytest

from crossroads.bridges.email import mailbox as mb

# -- the imap option -------------------------------------------------------------------------------------------


def test_imaps_url_with_defaults():
    url = mb.parse_imap_url("imaps://bot@mail.example")
    assert url == mb.ImapUrl(True, "mail.example", 993, "bot", "INBOX")
    assert str(url) == "imaps://mail.example:993/INBOX"  # no user in logs


def test_imap_url_with_port_folder_and_encoded_user():
    url = mb.parse_imap_url("imap://bot%40example.org@127.0.0.1:1143/Lists%2Fbot")
    assert url == mb.ImapUrl(False, "127.0.0.1", 1143, "bot@example.org", "Lists/bot")


@pytest.mark.parametrize(("url", "words"), [
    ("imaps://bot:secret@mail.example/INBOX", "imap_password"),
    ("imaps://mail.example/INBOX", "no user"),
    ("pop3://bot@mail.example", "imaps://user@host/INBOX"),
    ("imaps://bot@mail.example/INBOX?x=1", "query"),
    ("imaps://bot@mail.example/Caf%C3%A9", "ASCII"),
    ("imaps://bot@mail.example/a%22b", "quotes"),
    ("imaps://bot@mail.example:99999/INBOX", "port"),
])
def test_bad_urls(url, words):
    with pytest.raises(ValueError) as error:
        mb.parse_imap_url(url)
    assert words in str(error.value) and "secret" not in str(error.value)


def test_folder_option_check():
    assert mb.imap_mailbox_check("") is None and mb.imap_mailbox_check("Done/2026") is None
    assert "quotes" in mb.imap_mailbox_check('a"b') and mb.imap_mailbox_check("Café") is not None


# -- the server's answers (as aioimaplib hands them over, from Dovecot 2.3) -------------------------------------


def test_uidvalidity_of_select():
    lines = [b"FLAGS (\\Answered \\Seen)", b"2 EXISTS", b"OK [UIDVALIDITY 1796162982] UIDs valid",
             b"OK [UIDNEXT 3] Predicted next UID", b"[READ-WRITE] Select completed."]
    assert mb.uidvalidity_of(lines) == 1796162982
    assert mb.uidvalidity_of([b"2 EXISTS", b"Select completed."]) is None


def test_uids_of_search():
    assert mb.uids_of_search([b"5 1 2", b"Search completed (0.001 + 0.000 secs)."]) == [1, 2, 5]
    assert mb.uids_of_search([b"SEARCH 3 4", b"Search completed."]) == [3, 4]
    assert mb.uids_of_search([b"Search completed."]) == []


def test_sizes_and_body_of_fetch():
    sizes = [b"1 FETCH (UID 1 RFC822.SIZE 29)", b"2 FETCH (RFC822.SIZE 31 UID 7)", b"Fetch completed."]
    assert mb.sizes_of_fetch(sizes) == {1: 29, 7: 31}
    body = [b"2 FETCH (UID 7 BODY[] {12}", bytearray(b"Subject: x\r\n"), b")", b"Fetch completed."]
    assert mb.body_of_fetch(body, 7) == b"Subject: x\r\n"
    assert mb.body_of_fetch(body, 8) is None and mb.body_of_fetch([b"Fetch completed."], 7) is None


# -- the cursor ---------------------------------------------------------------------------------------------------


def test_a_first_look_delivers_every_unseen_mail_in_uid_order():
    plan = mb.plan(mb.Cursor(), 77, [9, 3, 5, 3])
    assert plan == mb.Plan(mb.Cursor(77, 0), [3, 5, 9], [], False)


def test_unseen_mail_at_or_below_the_cursor_is_marked_not_delivered_again():
    plan = mb.plan(mb.Cursor(77, 5), 77, [4, 5, 6, 8])
    assert plan.deliver == [6, 8] and plan.mark_seen == [4, 5] and not plan.uidvalidity_changed


def test_a_changed_uidvalidity_starts_over_from_the_unseen_mail():
    plan = mb.plan(mb.Cursor(77, 500), 78, [1, 2])
    assert plan == mb.Plan(mb.Cursor(78, 0), [1, 2], [], True)


def test_cursor_records_round_trip_and_bad_ones_start_afresh():
    cursor = mb.Cursor(77, 5).after(9).after(3)
    assert cursor == mb.Cursor(77, 9)
    assert mb.Cursor.from_record(cursor.as_record()) == cursor
    for record in ({}, {"uidvalidity": "77", "last_uid": 5}, {"uidvalidity": 0, "last_uid": 5},
                   {"uidvalidity": 77, "last_uid": -1}):
        assert mb.Cursor.from_record(record) == mb.Cursor()


def test_cursor_keys_are_per_bridge_and_mailbox_and_valid_layer_keys():
    url = mb.parse_imap_url("imaps://bot@mail.example/INBOX")
    key = mb.cursor_key("mail", url)
    assert key.startswith("email.imap:mail:") and len(key) < 200
    assert key != mb.cursor_key("mail", mb.parse_imap_url("imaps://bot@mail.example/Other"))
    assert key != mb.cursor_key("mail2", url) and "bot" not in key
    assert mb.uid_set([3, 5, 9]) == "3,5,9"


# -- the envelope --------------------------------------------------------------------------------------------------


def test_envelope_from_return_path_and_delivered_to():
    assert mb.imap_envelope("<bounce@lists.example>", "Ann <ann@example.org>", "bot@mail.example",
                            "team@mail.example", None, "bot") == ("bounce@lists.example", ["bot@mail.example"])


def test_envelope_without_trace_headers_uses_from_to_and_cc():
    assert mb.imap_envelope(None, "Ann <ann@example.org>", None, "A <a@x.example>, b@y.example", "c@z.example",
                            "bot") == ("ann@example.org", ["a@x.example", "b@y.example", "c@z.example"])


def test_a_null_return_path_is_a_bounce_and_no_recipients_fall_back_to_the_user():
    assert mb.imap_envelope("<>", "MAILER-DAEMON@mx.example", None, None, None, "bot@mail.example") == (
        None, ["bot@mail.example"])
