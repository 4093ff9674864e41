"""The IMAP mailbox's decisions, with no sockets, no IMAP client and no layer: what to fetch, deliver and mark.

This module owns what the email bridge's IMAP reader (``imap.py``) can decide
without I/O: the ``imap`` option's URL, reading the few server answers it needs
(UIDVALIDITY, a UID SEARCH, a FETCH's sizes and literal), and the bookkeeping
that keeps a mail from being delivered twice. It must not touch the network,
aioimaplib or the layer. docs/spec/email.md ("Reading a mailbox over IMAP") is
its contract.

The bookkeeping rule: a mail is identified by (mailbox, UIDVALIDITY, UID), and
UIDs only grow within one UIDVALIDITY (RFC 3501 section 2.3.1.1), so a cursor,
the last UID delivered (or set aside), says exactly what was done: every unseen
mail above it is new, every unseen mail at or below it was delivered but its
``\\Seen`` was not stored (the connection dropped in between) and is marked
without being delivered again. A changed UIDVALIDITY voids the cursor: the
unseen mail is read again from the start, which is the only safe reading.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses, parseaddr
from urllib.parse import unquote, urlsplit

from crossroads.bridges.protocol import split_url

DEFAULT_PORTS = {"imap": 143, "imaps": 993}

_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH_RE = re.compile(rb"^\d+ FETCH \((.*)", re.IGNORECASE)
_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_MAILBOX_RE = re.compile(r"[\x20-\x7e]{1,200}")  # ASCII: a non-ASCII name would need modified UTF-7 (RFC 3501 5.1.3)


@dataclass(frozen=True)
class ImapUrl:
    """The ``imap`` option: ``imaps://user@host[:port]/MAILBOX`` (TLS from the first byte) or ``imap://`` (STARTTLS)."""

    implicit_tls: bool
    host: str
    port: int
    user: str
    mailbox: str

    def __str__(self) -> str:
        """For logs and health: no user name (it is half a credential) and never a password."""
        return f"{'imaps' if self.implicit_tls else 'imap'}://{self.host}:{self.port}/{self.mailbox}"


def parse_imap_url(url: str) -> ImapUrl:
    """Split the ``imap`` option; ValueError says what is wrong (without repeating the URL)."""
    parts = split_url(url, DEFAULT_PORTS, shape="imaps://user@host/INBOX or imap://user@host/INBOX")
    if parts.password:
        raise ValueError("the password goes in imap_password (\"${credential:imap-password}\"), not in the URL")
    if not parts.username:
        raise ValueError("names no user: imaps://user@host/INBOX")
    split = urlsplit(url)
    if split.query or split.fragment:
        raise ValueError("must not have a query or fragment")
    mailbox = unquote(split.path.lstrip("/")) or "INBOX"
    if not _MAILBOX_RE.fullmatch(mailbox) or '"' in mailbox or "\\" in mailbox:
        raise ValueError("the mailbox must be printable ASCII without quotes or backslashes (INBOX, Lists/bot)")
    return ImapUrl(parts.scheme == "imaps", parts.host, parts.port, parts.username, mailbox)


def imap_mailbox_check(value: str) -> str | None:
    """An option check for a folder name (``imap_move_to``, ``imap_refused_folder``): ``""`` is none."""
    if value and (not _MAILBOX_RE.fullmatch(value) or '"' in value or "\\" in value):
        return "must be a folder name of printable ASCII without quotes or backslashes"
    return None


def quoted_mailbox(name: str) -> str:
    """A mailbox name as an IMAP quoted string (the names are checked to hold no quote or backslash)."""
    return f'"{name}"'


# -- reading the server's answers ----------------------------------------------------------------------------------


def uidvalidity_of(lines: Iterable[bytes | bytearray]) -> int | None:
    """The UIDVALIDITY in a SELECT's answer, or None when the server sent none (then no UID can be trusted)."""
    for line in lines:
        found = _UIDVALIDITY_RE.search(bytes(line))
        if found:
            return int(found.group(1))
    return None


def uids_of_search(lines: Sequence[bytes | bytearray]) -> list[int]:
    """The UIDs of a ``UID SEARCH`` answer (aioimaplib gives its untagged lines without ``* SEARCH``), ascending."""
    uids: set[int] = set()
    for line in lines[:-1]:  # the last line is the tagged OK's text
        text = bytes(line).removeprefix(b"SEARCH").strip()
        uids.update(int(word) for word in text.split() if word.isdigit())
    return sorted(uids)


def sizes_of_fetch(lines: Iterable[bytes | bytearray]) -> dict[int, int]:
    """{UID: RFC822.SIZE} from the answer to ``UID FETCH set (RFC822.SIZE)``."""
    sizes = {}
    for line in lines:
        line = bytes(line)
        if not _FETCH_RE.match(line):
            continue
        uid, size = _UID_RE.search(line), _SIZE_RE.search(line)
        if uid and size:
            sizes[int(uid.group(1))] = int(size.group(1))
    return sizes


def body_of_fetch(lines: Sequence[bytes | bytearray], uid: int) -> bytes | None:
    """The mail's bytes from the answer to ``UID FETCH uid (BODY.PEEK[])``: the literal after the FETCH line that
    names ``uid``; None when the answer has none (the mail was expunged meanwhile)."""
    for i, line in enumerate(lines[:-1]):
        if isinstance(line, bytes) and _FETCH_RE.match(line):
            found = _UID_RE.search(line)
            if found and int(found.group(1)) == uid and i + 1 < len(lines) and isinstance(lines[i + 1], bytearray):
                return bytes(lines[i + 1])
    return None


# -- the bookkeeping -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """How far one mailbox was read: the last UID delivered or set aside, under one UIDVALIDITY."""

    uidvalidity: int | None = None
    last_uid: int = 0

    def as_record(self) -> dict[str, int]:
        return {"uidvalidity": self.uidvalidity or 0, "last_uid": self.last_uid}

    @classmethod
    def from_record(cls, record: dict) -> Cursor:
        uidvalidity, last_uid = record.get("uidvalidity"), record.get("last_uid")
        if not isinstance(uidvalidity, int) or not isinstance(last_uid, int) or uidvalidity <= 0 or last_uid < 0:
            return cls()  # none stored, or not ours: start from the unseen mail
        return cls(uidvalidity, last_uid)

    def after(self, uid: int) -> Cursor:
        return Cursor(self.uidvalidity, max(self.last_uid, uid))


@dataclass(frozen=True)
class Plan:
    """What one look at the mailbox's unseen mail leads to."""

    cursor: Cursor  # the cursor to go on from (a fresh one when UIDVALIDITY changed)
    deliver: list[int]  # UIDs to fetch and deliver, in this order (ascending)
    mark_seen: list[int]  # UIDs delivered before whose \\Seen was never stored: mark them, deliver nothing
    uidvalidity_changed: bool  # the stored cursor was for another UIDVALIDITY: log it


def plan(cursor: Cursor, uidvalidity: int, unseen: Iterable[int]) -> Plan:
    """Split the mailbox's unseen UIDs by the cursor; a cursor of another UIDVALIDITY is dropped (all unseen mail is
    new again: the old UIDs name nothing any more)."""
    changed = cursor.uidvalidity is not None and cursor.uidvalidity != uidvalidity
    if cursor.uidvalidity != uidvalidity:
        cursor = Cursor(uidvalidity, 0)
    ordered = sorted(set(unseen))
    return Plan(cursor, [uid for uid in ordered if uid > cursor.last_uid],
                [uid for uid in ordered if uid <= cursor.last_uid], changed)


def cursor_key(bridge_name: str, url: ImapUrl) -> str:
    """The layer key/value record of one bridge's cursor in one mailbox (a hash: the layer's key characters)."""
    where = f"{url.user}@{url.host}:{url.port}/{url.mailbox}".encode()
    return f"email.imap:{bridge_name}:{hashlib.sha256(where).hexdigest()[:24]}"


def uid_set(uids: Sequence[int]) -> str:
    """``1,3,5`` for a UID STORE, MOVE or FETCH."""
    return ",".join(str(uid) for uid in uids)


# -- the envelope a mailbox has no record of -----------------------------------------------------------------------


def imap_envelope(return_path: str | None, from_header: str | None, delivered_to: str | None, to_header: str | None,
                  cc_header: str | None, user: str) -> tuple[str | None, list[str]]:
    """The ``from`` and ``to`` of a mail read from a mailbox, where no SMTP envelope is left: ``Return-Path`` (the
    envelope sender the delivering server recorded; ``<>`` is a bounce) else the From address; ``Delivered-To``, else
    the To and Cc addresses, else the IMAP user."""
    if return_path is not None:
        sender = parseaddr(return_path)[1] or None  # "<>": the null sender, as SMTP's MAIL FROM:<>
    else:
        sender = parseaddr(from_header or "")[1] or None
    if delivered_to and "@" in parseaddr(delivered_to)[1]:
        return sender, [parseaddr(delivered_to)[1]]
    recipients = [spec for _, spec in getaddresses([to_header or "", cc_header or ""]) if "@" in spec]
    return sender, recipients or [user]
