"""Email <-> channel messages, with no sockets, no SMTP and no reactor (the ASGI 1.0 ``email`` draft, extended).

This module owns everything about the email bridge that can be decided without
I/O: reading one mail's bytes, within limits, into the ``email.receive``
message; the new text of a reply (quoted history and signature cut off); which
mails are automatic (RFC 3834) and must never be answered; the thread a mail
belongs to and the bounded memory of threads; and building a reply or an
``email.send`` mail as bytes for the smarthost. It must not touch sockets,
aiosmtpd, the layer or the reactor: the bridge feeds it bytes and envelopes and
sends what it returns. docs/spec/email.md is its contract.

Three rules run through it. A mail is read **bounded**: its size, the bytes of
every header block, the number of MIME parts and their nesting are capped, and
the caps are checked on the raw bytes before the stdlib parser builds a tree
(a 1,000-deep nesting would raise RecursionError inside it, 100,000 parts take
seconds of CPU); so are the bytes of its address headers, all parts together,
before any is parsed (the stdlib's address parser costs ~6 ms a KiB); a mail
beyond them raises ``MailRefused`` carrying the SMTP reply and the counter.
Nothing a consumer sends can add a header: every header value is checked for
CR, LF and every other control character (``HeaderInjection``), and a consumer
may set only the headers of ``ALLOWED_HEADERS``. And no reply goes to an
automatic mail unless the consumer forces it.

The new text is cut by our own line rules (``new_text``), not a library:
email-reply-parser (PyPI 0.5.12, 2020) is unmaintained and English only; talon
(PyPI 1.4.4, 2017) is unmaintained there and pulls numpy, scipy and
scikit-learn; mail-parser-reply (1.36, 2025-12) is maintained and
multi-language, but its regular expressions backtrack: one 16 KB line starting
with ``On`` took 10.9 s of CPU in 1.36 (measured), which a stranger's mail to
an SMTP server must not be able to cost, and it keeps inline ``>`` quotes
while stripping every line's indentation. Our rules look at one line (or two)
at a time with string tests, so the time is linear in the text.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from email import policy
from email.headerregistry import Address, AddressHeader, BaseHeader, DateHeader, MessageIDHeader, UnstructuredHeader
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import format_datetime, formatdate, getaddresses, make_msgid, parseaddr, parsedate_to_datetime
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any

from crossroads.bridges.protocol import each, problem_of, shared_keys, split_url

PROTOCOL = "email"
RECEIVE, SEND = "email.receive", "email.send"
DEFAULT_PORTS = {"smtp": 25, "smtps": 465}

# Auto kinds (the ``auto`` key): why a mail must not be answered automatically.
BOUNCE, AUTO_REPLIED, AUTO_GENERATED = "bounce", "auto-replied", "auto-generated"
LIST, BULK, OWN = "list", "bulk", "own"

MAX_DEFECTS = 50  # defects listed in a message; a mail of 10,000 broken headers says so in one line more
MAX_REFERENCES = 11  # a reply's References: the root and the last 10 (RFC 5322 section 3.6.4 lets them be trimmed)

# -- errors --------------------------------------------------------------------------------------------------------


class MailRefused(Exception):
    """A mail we will not take: the SMTP reply the bridge gives (``code status reason``) and the counter to add to."""

    def __init__(self, code: int, status: str, reason: str, counter: str) -> None:
        super().__init__(reason)
        self.code, self.status, self.reason, self.counter = code, status, reason, counter

    @property
    def smtp_reply(self) -> str:
        return f"{self.code} {self.status} {self.reason}"


def _too_big(reason: str, counter: str) -> MailRefused:
    return MailRefused(552, "5.3.4", reason, counter)  # RFC 3463: message too big for system


def _bad_mime(reason: str, counter: str) -> MailRefused:
    return MailRefused(554, "5.6.0", reason, counter)  # RFC 3463: other or undefined media error


class InvalidReply(ValueError):
    """A reply or ``email.send`` message that cannot be sent; nothing of it is sent."""


class HeaderInjection(InvalidReply):
    """A header value holds CR, LF or another control character: it could end the header and add another."""


# -- options ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How much of a mail the bridge reads (the ``max_*`` options)."""

    max_message_size: int = 524288  # bytes of the whole mail: half the layer's 1 MiB, as text and html may repeat it
    max_header_bytes: int = 65536  # bytes of any one header block (the mail's, or a part's)
    max_parts: int = 100  # MIME parts, containers included
    max_depth: int = 20  # nesting of multipart and message/* parts
    max_attachment_content: int = 65536  # attachments up to this many bytes carry their content
    # bytes of address headers (From, To, Cc, Reply-To, ...) in the whole mail, its parts included: reading them is
    # the stdlib's address parser, ~6 ms of CPU per KiB, so 512 KiB of them would cost seconds
    max_address_header_bytes: int = 16384


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    tls: bool  # smtps://: TLS from the first byte (smtp:// upgrades with STARTTLS when offered)

    def __str__(self) -> str:
        return f"{'smtps' if self.tls else 'smtp'}://{self.host}:{self.port}"


def parse_smarthost(url: str) -> Smarthost:
    """``smtp://host[:port]`` (STARTTLS when offered, port 25) or ``smtps://host[:port]`` (port 465). ValueError."""
    parts = split_url(url, DEFAULT_PORTS, shape="smtp://host:port or smtps://host:port")
    if parts.username or parts.password:
        raise ValueError("credentials go in smarthost_user and smarthost_password, not in the URL")
    if parts.more:
        raise ValueError(f"must not have a path, query or fragment: {url!r}")
    return Smarthost(parts.host, parts.port, parts.scheme == "smtps")


def parse_domain(domain: str) -> str:
    """A mail domain of the ``domains`` option, lowercased; ValueError when it is not a host name."""
    if not isinstance(domain, str) or not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", domain):
        raise ValueError(f"must be a domain name like \"example.org\", not {domain!r}")
    return domain.lower()


def parse_address(address: Any) -> str:
    """One addr-spec (``name@domain``, no display name), the domain lowercased; ValueError saying what is wrong."""
    if not isinstance(address, str):
        raise ValueError(f"an address must be a string, not {type(address).__name__}")
    check_header_value("address", address)
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain or " " in address.strip() or "<" in address or ">" in address:
        raise ValueError(f"{address!r} is not an address like name@example.org")
    return f"{local}@{domain.lower()}"


# The checks of the smarthost, domains and recipients options, for the bridge's option table.
check_smarthost = problem_of(parse_smarthost)
check_domains = each(problem_of(parse_domain))
check_addresses = each(problem_of(parse_address))


# -- reading a mail, bounded -------------------------------------------------------------------------------------

# Matched against the mail lowercased (ASCII only, so at the same offsets): a case-sensitive pattern starting with
# a literal is found by a fast search, where IGNORECASE tries every byte (190 µs on a 20 KiB mail, 10 this way).
_BOUNDARY_RE = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))')
_MESSAGE_TYPE_RE = re.compile(rb"content-type:\s*message/")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_PLAIN_RE = re.compile(r"[ -~\t\r\n]*")  # printable ASCII, tabs and folding


def _header_end(raw: bytes, start: int, stop: int) -> int:
    """Where the header block at ``start`` ends: the line end before its blank line (``\\r?\\n\\r?\\n``), that
    blank line within ``raw[start:stop]``; -1 without one. Two ``bytes.find``s: a pattern starting with an optional
    byte is tried at every position, ~10 µs for a small mail's header block."""
    crlf = raw.find(b"\n\r\n", start, stop)
    lf = raw.find(b"\n\n", start, crlf + 1 if crlf >= 0 else stop)  # only before it: a CRLF mail has no \n\n
    end = lf if lf >= 0 else crlf
    if end < 0:
        return -1
    return end - 1 if end > start and raw[end - 1] == 13 else end  # its CR too (13)


def _header_block_size(raw: bytes, start: int, cap: int) -> int:
    """The bytes of the header block at ``start`` (up to the blank line), looking no further than ``cap`` + 4."""
    end = _header_end(raw, start, start + cap + 4)
    return (end if end >= 0 else min(len(raw), start + cap + 4)) - start


def prescan(raw: bytes, limits: Limits) -> None:
    """Refuse a mail beyond ``limits`` from its bytes alone, before any tree is built; raises ``MailRefused``.

    Linear in the mail and stops at the first cap crossed. A mail whose own header
    block names no multipart or message/* type is one part (the parser takes its
    body as it is), so its body is not scanned. Each multipart part
    declares its ``boundary=``; every line ``--boundary`` opens a part of it,
    and the order of those lines gives the nesting. The parsed tree is checked
    again exactly (``check_tree``): this scan is what keeps the parser from
    ever seeing a bomb.
    """
    if len(raw) > limits.max_message_size:
        raise _too_big(f"message too big: {len(raw)} bytes, at most {limits.max_message_size}", "oversized")
    head_size = _header_block_size(raw, 0, limits.max_header_bytes)
    if head_size > limits.max_header_bytes:
        raise _too_big(f"header too large: more than {limits.max_header_bytes} bytes", "headers_too_large")
    if _single_part(raw[:head_size].lower()):
        return  # the parser reads the body as one payload: nothing in it can open a part
    # message/* parts nest without boundaries; at most max_parts of them keep the parser's recursion shallow
    # (it fails near 1,000 levels), and check_tree then finds their exact depth.
    lowered = raw.lower()
    messages = sum(1 for _ in _MESSAGE_TYPE_RE.finditer(lowered))
    if messages > limits.max_parts:
        raise _bad_mime(f"too many MIME parts: more than {limits.max_parts}", "too_many_parts")
    boundaries = {raw[slice(*found.span(1 if found.group(1) else 2))] for found in _BOUNDARY_RE.finditer(lowered)}
    if not boundaries:
        return
    open_boundaries: list[bytes] = []  # the nesting, outermost first
    parts = 0
    start = 0
    while True:
        line_start = raw.find(b"\n--", start)
        if line_start < 0:
            break
        line_end = raw.find(b"\n", line_start + 3)
        line = raw[line_start + 3:line_end if line_end >= 0 else len(raw)].rstrip()
        start = line_start + 1
        closing = line.endswith(b"--") and line[:-2] in boundaries
        boundary = line[:-2] if closing else line
        if boundary not in boundaries:
            continue
        if boundary in open_boundaries:
            del open_boundaries[open_boundaries.index(boundary) + (0 if closing else 1):]
        elif not closing:
            open_boundaries.append(boundary)
        if closing:
            continue
        parts += 1
        if parts + 1 > limits.max_parts:  # the parts and the mail itself, as check_tree counts them
            raise _bad_mime(f"too many MIME parts: more than {limits.max_parts}", "too_many_parts")
        if len(open_boundaries) > limits.max_depth:
            raise _bad_mime(f"MIME parts nested too deep: more than {limits.max_depth}", "too_deep")
        if line_end >= 0 and _header_block_size(raw, line_end + 1, limits.max_header_bytes) > limits.max_header_bytes:
            raise _too_big(f"header too large: more than {limits.max_header_bytes} bytes", "headers_too_large")


def _single_part(head: bytes) -> bool:
    """Whether a mail whose header block is ``head`` (lowercased) is one part: no multipart or message/* type in
    it, nor an encoded word that could hide one (the type is read from the header's text, unfolded: a type folded
    or commented apart, ``multi(c)part``, is no multipart type to the parser either)."""
    return b"=?" not in head and b"multipart" not in head and b"message/" not in head


def _children(part: Message) -> list[Message]:
    # is_multipart() first: get_payload() of a leaf decodes it by its charset, and raises on some (idna, undefined)
    return part.get_payload() if part.is_multipart() else []


def _container(part: Message) -> bool:
    """A multipart that parsed into parts. A message/* part is a leaf here (its body is the embedded mail), and
    so is a multipart without a usable boundary (its body is kept as bytes)."""
    return part.is_multipart() and part.get_content_maintype() == "multipart"  # is_multipart(): an isinstance


def walk(mail: Message) -> Iterable[tuple[Message, int]]:
    """Every part with its depth, in order, without recursion (``Message.walk`` recurses)."""
    stack = [(mail, 0)]
    while stack:
        part, depth = stack.pop()
        yield part, depth
        stack.extend((child, depth + 1) for child in reversed(_children(part)))


def check_tree(mail: Message, limits: Limits) -> None:
    """The exact caps, on the parsed tree; raises ``MailRefused``. Before any header is read: the address headers'
    bytes are counted raw, as the parser left them, so a mail over ``max_address_header_bytes`` costs no parsing."""
    addresses = 0  # the mail's, all parts together: a cap per header would let 30 headers of the cap each through
    for count, (part, depth) in enumerate(walk(mail), 1):
        if count > limits.max_parts:
            raise _bad_mime(f"too many MIME parts: more than {limits.max_parts}", "too_many_parts")
        if depth > limits.max_depth:
            raise _bad_mime(f"MIME parts nested too deep: more than {limits.max_depth}", "too_deep")
        size = 0
        for name, value in part.raw_items():
            size += len(name) + len(str(value)) + 4
            if name.lower() in _ADDRESS_NAMES:
                addresses += len(str(value))
        if size > limits.max_header_bytes:
            raise _too_big(f"header too large: more than {limits.max_header_bytes} bytes", "headers_too_large")
        if addresses > limits.max_address_header_bytes:
            raise _too_big(f"address headers too large: more than {limits.max_address_header_bytes} bytes of From, "
                           "To, Cc, Reply-To and the like in one mail", "address_headers_too_large")


class _TooManyParts(Exception):
    pass


def _counted_parts(limit: int) -> Callable[..., EmailMessage]:
    """A message factory for the parser that stops it past ``limit`` parts, however the parts are declared (a
    ``boundary*0=`` in RFC 2231 pieces gets past the prescan's pattern, not past this). The parser makes one
    message more than the tree it returns holds, hence the ``+ 1``."""
    made = 0

    def factory(*args: Any, **kwargs: Any) -> EmailMessage:
        nonlocal made
        made += 1
        if made > limit + 1:
            raise _TooManyParts
        return _ReadPart(*args, **kwargs)

    return factory


class _ReadPart(EmailMessage):
    """A part of a mail being read: its content type, asked ~8 times a part by the parser and by the reading (each
    a header lookup and a split, ~5 µs), is worked out once. Whatever changes its headers forgets it."""

    _type: str | None = None
    # The first field of each (lowercased) name, for ``get``: the stdlib's walks every field, lowercasing its name,
    # and a part is asked ~7 times (its type, charset, disposition, transfer encoding). Kept with the list of fields
    # and its length it was made from: anything that replaces or extends the list (the stdlib's own ``add_header``,
    # ``set_boundary``) makes it be built again, and the methods below forget it.
    _index: tuple[list, int, dict[str, tuple[str, Any]]] | None = None

    def get_content_type(self) -> str:
        if self._type is None:
            self._type = super().get_content_type()
        return self._type

    def get(self, name: str, failobj: Any = None) -> Any:
        index = self._index
        fields = self._headers
        if index is None or index[0] is not fields or index[1] != len(fields):
            first: dict[str, tuple[str, Any]] = {}
            for key, value in fields:
                first.setdefault(key.lower(), (key, value))
            index = self._index = (fields, len(fields), first)
        found = index[2].get(name.lower())
        return failobj if found is None else self.policy.header_fetch_parse(*found)

    def set_raw(self, name: str, value: Any) -> None:
        self._type = self._index = None
        super().set_raw(name, value)

    def __setitem__(self, name: str, value: Any) -> None:
        self._type = self._index = None
        super().__setitem__(name, value)

    def __delitem__(self, name: str) -> None:
        self._type = self._index = None
        super().__delitem__(name)

    def replace_header(self, name: str, value: Any) -> None:
        self._type = self._index = None
        super().replace_header(name, value)

    def set_default_type(self, ctype: str) -> None:
        self._type = None
        super().set_default_type(ctype)


_REGISTRY = policy.default.header_factory
# Headers the registry gives a class of its own (addresses, dates, ids, MIME parameters); any other is unstructured.
_STRUCTURED = frozenset(name for name, kind in _REGISTRY.registry.items() if not issubclass(kind, UnstructuredHeader))
_SHARED = frozenset({"content-type", "content-disposition", "content-transfer-encoding", "mime-version"})
_SHARED_LENGTH = 200  # characters: a value worth remembering across mails is a short one


@lru_cache(maxsize=256)
def _shared_header(name: str, value: str) -> BaseHeader:
    return _REGISTRY(name, value)


class _Headers:
    """``policy.default``'s header factory, parsing each header of one mail once.

    The stdlib parses a header again every time it is read (``get_content_type()``
    reads Content-Type, and the parser, ``check_tree``, the bodies and the
    ``content`` tree each ask): ten parses of the same value per part, most of a
    mail's CPU. Header objects are immutable, so the first one made is handed out
    again; the memory is the mail's (one factory per mail: it goes with it). The
    MIME headers' common short values ("text/plain; charset=utf-8") are shared by
    all mails through a small LRU.
    """

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name, value)
        header = self._made.get(key)
        if header is None:
            if len(value) <= _SHARED_LENGTH and name.lower() in _SHARED:
                header = _shared_header(name, value)
            else:
                header = _REGISTRY(name, value)
            self._made[key] = header
        return header

    def __getitem__(self, name: str) -> type[BaseHeader]:  # the policy asks the class for a header's max_count
        return _REGISTRY[name]


def read_mail(raw: bytes, limits: Limits) -> EmailMessage:
    """Parse one mail's bytes (``policy.default``) within ``limits``; raises ``MailRefused`` beyond them."""
    prescan(raw, limits)
    try:
        with _unreadable():
            mail_policy = policy.default.clone(header_factory=_Headers())
            mail = _one_part(raw, mail_policy) or BytesParser(_counted_parts(limits.max_parts),
                                                              policy=mail_policy).parsebytes(raw)
    except _TooManyParts:
        raise _bad_mime(f"too many MIME parts: more than {limits.max_parts}", "too_many_parts") from None
    except RecursionError:  # the part cap keeps the nesting far from it; if not, the mail is refused, not a crash
        raise _bad_mime(f"MIME parts nested too deep: more than {limits.max_depth}", "too_deep") from None
    with _unreadable():
        check_tree(mail, limits)
    return mail


_FIELD_LINE_RE = re.compile(r"[\041-\071\073-\176]+:")  # a field's first line, to the parser: a name, a colon


def _source_parse(lines: list[str]) -> tuple[str, str]:
    """``policy.default.header_source_parse``, its code (one call a field saved): the name, and the value with its
    leading blanks and the last line end cut; the folding is kept."""
    name, value = lines[0].split(":", 1)
    return name, (value.lstrip(" \t") + "".join(lines[1:])).rstrip("\r\n")


def _one_part(raw: bytes, mail_policy: Any) -> EmailMessage | None:
    """The mail as ``BytesParser`` builds it, built directly where that is sure to be the same: one part (its header
    block names no multipart or message/* type, nor an encoded word), every header line a field's first line or its
    continuation (so no ``From `` line), lines ended by CRLF or LF only. The parser reads the mail line by line through
    a generator (~40 µs a 256-byte mail, ~150 a 20 KiB one); here the fields go to ``set_raw`` as the parser's
    ``_parse_headers`` gives them and the body is the payload whole. None for any other mail: the parser's."""
    end = _header_end(raw, 0, len(raw))
    if end <= 0:
        return None
    head = raw[:end]
    if head.count(b"\r") != head.count(b"\r\n") or not _single_part(head.lower()):  # a bare CR ends a line there
        return None
    text = raw.decode("ascii", "surrogateescape")  # as BytesParser reads the bytes
    fields_end = end + (2 if raw[end] == 13 else 1)  # after the last field's line end
    body_start = fields_end + (2 if raw[fields_end] == 13 else 1)  # after the blank line
    mail = _ReadPart(policy=mail_policy)
    field: list[str] = []
    for line in text[:fields_end].split("\n")[:-1]:
        line += "\n"
        if line[0] in " \t":
            if not field:
                return None  # a continuation first: the parser's defect
            field.append(line)
            continue
        if not _FIELD_LINE_RE.match(line):
            return None  # the parser would end the header block here, or note a defect
        if field:
            mail.set_raw(*_source_parse(field))
        field = [line]
    if field:
        mail.set_raw(*_source_parse(field))
    mail.set_payload(text[body_start:])
    return mail


# What ``quick_to_read`` lets through: a plain-text mail whose reading costs little whatever it holds. The bounds are
# the stdlib's costly cases, measured here (read_mail + receive_message, CPU): the body is linear (64 KiB of text,
# ~0.4 ms); unstructured headers are cheap (8 KiB, ~0.2 ms); structured ones are not, quoted names and comments in an
# address list cost ~2.9 ms a KiB and more beyond (2 KiB, 11 ms), Content-Type parameters ~3 ms a KiB; encoded words,
# HTML, charsets implemented in Python (punycode is quadratic) and MIME parts are left out altogether. So the worst
# mail let through costs ~4 ms, about the GIL switch interval (5 ms) for which a reading thread holds up the loop.
QUICK_MAIL_BYTES = 65536
QUICK_HEADER_BYTES = 8192
QUICK_STRUCTURED_BYTES = 1024
_QUICK_CHARSETS = frozenset({b"us-ascii", b"ascii", b"utf-8", b"utf8", b"latin1", b"latin-1", b"iso-8859-15",
                             *(b"iso-8859-%d" % n for n in range(1, 11)),
                             *(b"windows-%d" % n for n in range(1250, 1259))})
_CHARSET_RE = re.compile(rb"charset[ \t]*(\*?)[ \t]*=[ \t]*\"?([^\s;\"]*)")


_STRUCTURED_NAMES = frozenset(name.encode() for name in _STRUCTURED)


def quick_to_read(raw: bytes) -> bool:
    """Whether reading ``raw`` is sure to be cheap (a few ms at most, ``QUICK_*``): a small single-part text/plain
    mail with no encoded word, a charset decoded in C and few bytes of structured headers. The bridge reads such a
    mail on its loop, which saves the hand-off to its reading thread and back; any other goes to the thread. Decided
    on the header block's bytes alone, erring towards the thread; ``read_mail``'s caps apply either way."""
    if len(raw) > QUICK_MAIL_BYTES:
        return False
    end = _header_end(raw, 0, QUICK_HEADER_BYTES + 4)
    if end < 0:
        return False
    head = raw[:end].lower()
    if not _single_part(head):
        return False
    if any(star or charset not in _QUICK_CHARSETS for star, charset in _CHARSET_RE.findall(head)):
        return False
    structured = 0
    counting = False  # the field the line belongs to is a structured one
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):  # a folded field's next line
            structured += len(line) + 1 if counting else 0
            continue
        name, _, value = line.partition(b":")
        name = name.rstrip(b" \t")
        counting = name in _STRUCTURED_NAMES
        structured += len(line) + 1 if counting else 0
        if name == b"content-type" and value.lstrip(b" \t").split(b";", 1)[0].rstrip() != b"text/plain":
            return False  # another type, or one folded onto the next line
    return structured <= QUICK_STRUCTURED_BYTES


@contextmanager
def _unreadable() -> Iterator[None]:
    """Turn any failure of the stdlib on a hostile mail into a refusal: the header parser raises on some values
    (``charset*=idna''%FF`` raises UnicodeError wherever Content-Type is read), and a bridge must not crash on
    them. The cause stays chained for the bridge's log."""
    try:
        yield
    except (MailRefused, _TooManyParts, RecursionError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the parser raised, the answer to the sender is the same
        raise _bad_mime("message could not be read", "unreadable") from exc


# -- headers, text and parts -----------------------------------------------------------------------------------


def header_text(text: str) -> str:
    """A header value as one line of text the layer can carry: unfolded, undecodable bytes as U+FFFD."""
    return _no_surrogates(re.sub(r"\r?\n[ \t]*", " ", text))


def parsed_headers(part: Message) -> Iterable[tuple[str, str, list[str]]]:
    """Each header of ``part`` as (name, decoded value, defects). ``policy.default`` raises on some odd addresses and
    ids (``To: a@``, ``Message-ID: <@>``: a bare IndexError, python/cpython#151857): such a header is given raw."""
    for name, raw in part.raw_items():
        lowered = name.lower()
        plain = _plain_value(lowered, raw)
        if plain is not None:
            yield name, plain, []
            continue
        if lowered in _SHARED and len(raw) <= _SHARED_LENGTH:
            try:
                text, defects = _shared_reading(name, raw)
            except Exception:  # noqa: BLE001 - as below
                yield name, header_text(raw), ["could not be parsed, given as it came"]
                continue
            yield name, text, list(defects)
            continue
        try:
            value = part.policy.header_fetch_parse(name, raw)
            yield name, header_text(str(value)), [str(defect) for defect in getattr(value, "defects", ())]
        except Exception:  # noqa: BLE001 - any failure of the header parser leaves the header as it came
            yield name, header_text(raw), ["could not be parsed, given as it came"]


@lru_cache(maxsize=256)
def _shared_reading(name: str, raw: str) -> tuple[str, tuple[str, ...]]:
    """What ``parsed_headers`` gives for a MIME header's short value (``_SHARED``: "text/plain; charset=utf-8",
    "1.0"), the same in most mails: the registry's reading of it (``header_fetch_parse``), remembered."""
    value = policy.default.header_fetch_parse(name, raw)
    return header_text(str(value)), tuple(str(defect) for defect in getattr(value, "defects", ()))


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"  # RFC 5322 atext
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_PLAIN_MAILBOX_RE = re.compile(rf"(?:(?P<name>{_ATEXT}(?: {_ATEXT})*) <(?P<named>{_ADDR_SPEC})>"
                               rf"|<(?P<angled>{_ADDR_SPEC})>|(?P<bare>{_ADDR_SPEC}))")
_PLAIN_MSG_ID_RE = re.compile(rf"<{_ADDR_SPEC}>")
PLAIN_PATH_RE = re.compile(rf"<({_ADDR_SPEC})>")  # an SMTP path <a@b> of atoms only (the bridge's MAIL FROM, RCPT TO)
_ADDRESS_NAMES = frozenset(name for name, kind in _REGISTRY.registry.items() if issubclass(kind, AddressHeader))
_DATE_NAMES = frozenset(name for name, kind in _REGISTRY.registry.items() if issubclass(kind, DateHeader))
_MSG_ID_NAMES = frozenset(name for name, kind in _REGISTRY.registry.items() if issubclass(kind, MessageIDHeader))


def _plain_value(name: str, raw: str) -> str | None:
    """What ``policy.default``'s header class makes of a plain value (printable ASCII, no encoded word), worked out
    without building it; None for any other value, which the registry parses.

    Building a header object costs 30-120 µs (an address, a date), most of the reading of a small mail. The plain
    forms here are the common ones, and for each the registry's result is known exactly: an unstructured value loses
    only its line breaks (``header_fetch_parse``), whitespace kept and no defect; ``Name <a@b>``, ``<a@b>`` and
    ``a@b`` with atoms only come out as ``Name <a@b>``, ``a@b``, ``a@b``; a date is written again by
    ``format_datetime``; ``<a@b>`` stays. tests/test_email_messages.py holds each to the registry's answer."""
    if "=?" in raw or not _PLAIN_RE.fullmatch(raw):
        return None
    value = raw.replace("\r", "").replace("\n", "")
    if name not in _STRUCTURED:
        return value
    if name in _ADDRESS_NAMES:
        found = _PLAIN_MAILBOX_RE.fullmatch(value)
        if found is None:
            return None
        return f"{found['name']} <{found['named']}>" if found["name"] else found["angled"] or found["bare"]
    if name in _DATE_NAMES:
        if _written_as_format_datetime(value):
            return value
        try:
            return format_datetime(parsedate_to_datetime(value))
        except Exception:  # noqa: BLE001 - the registry says what is wrong with it
            return None
    if name in _MSG_ID_NAMES and _PLAIN_MSG_ID_RE.fullmatch(value):
        return value
    return None


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CANONICAL_DATE_RE = re.compile(rf"({'|'.join(_DAY_NAMES)}), ([0-3][0-9]) ({'|'.join(_MONTH_NAMES)}) ([1-9][0-9]{{3}}) "
                                r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9] [+-](?:[01][0-9]|2[0-3])[0-5][0-9]")


def _written_as_format_datetime(value: str) -> bool:
    """Whether ``format_datetime(parsedate_to_datetime(value))`` gives ``value`` back (~45 µs saved): it is in that
    form exactly (two-digit day, four-digit year, a numeric zone, ``-0000`` included) and its weekday is the date's."""
    found = _CANONICAL_DATE_RE.fullmatch(value)
    if found is None:
        return False
    try:
        weekday = date(int(found[4]), _MONTH_NAMES.index(found[3]) + 1, int(found[2])).weekday()
    except ValueError:  # 31 Feb, day 00
        return False
    return _DAY_NAMES[weekday] == found[1]


def _header(part: Message, wanted: str) -> str:
    """The first ``wanted`` header of ``part`` (lowercase name), decoded, or ``""``."""
    for name, value, _ in parsed_headers(part):
        if name.lower() == wanted:
            return value
    return ""


def _no_surrogates(text: str) -> str:
    """8-bit bytes the parser could not decode arrive as surrogates, which no layer can carry: U+FFFD instead."""
    return _SURROGATE_RE.sub("\ufffd", text)


def headers_of(mail: Message, defects: list[str]) -> tuple[dict[str, str], list[list[str]]]:
    """The draft's ``headers`` (lowercased names, decoded, the first of repeats) and our ``header_list``."""
    listed: list[list[str]] = []
    first: dict[str, str] = {}
    for name, text, found in parsed_headers(mail):
        if "\ufffd" in text and not found:
            found = ["bytes in an unknown charset, shown as U+FFFD"]
        defects.extend(f"header {name}: {defect}" for defect in found)
        listed.append([name, text])
        first.setdefault(name.lower(), text)
    return first, listed


def _charset_decode(data: bytes, charset: str | None, where: str, defects: list[str]) -> str:
    charset = (charset or "us-ascii").strip().lower()
    if charset in ("us-ascii", "ascii") and not data.isascii():  # 8-bit text sent without its charset: UTF-8 mostly
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError):  # unknown (bogus, unknown-8bit), not text (base64), or refusing 'replace'
        defects.append(f"{where}: unknown charset {charset!r}, read as UTF-8 with replacement characters")
        return data.decode("utf-8", "replace")


_SIMPLE_CHARSET_RE = re.compile(r'[^;"\\\s]+;[ \t]*[Cc][Hh][Aa][Rr][Ss][Ee][Tt]=("?)([A-Za-z0-9_.:+-]+)\1')


def _charset_of(part: Message) -> str | None:
    """``part.get_content_charset()``, read directly from a Content-Type of the common shapes (``type/sub``, or
    with one plain ``charset=`` parameter, quoted or not), where the stdlib parses every parameter (~25 µs)."""
    value = part.get("content-type")
    if value is None:
        return None
    if ";" not in value and "=" not in value:  # no parameter at all ("charset=x" alone is one, to the stdlib)
        return None
    found = _SIMPLE_CHARSET_RE.fullmatch(value)
    return found[2].lower() if found is not None else part.get_content_charset()


def text_of_part(part: Message, where: str, defects: list[str]) -> str:
    data = part.get_payload(decode=True) or b""
    return _charset_decode(data, _charset_of(part), where, defects).replace("\r\n", "\n")


def filename_of(part: Message) -> str | None:
    """The part's filename, RFC 2231 (``filename*=utf-8''...``) and RFC 2047 decoded; None without one."""
    if part.get("content-disposition") is None and "name" not in str(part.get("content-type", "")).lower():
        return None  # neither a filename= nor a name= parameter can be there: the stdlib's parse saved (~35 µs)
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001 - a malformed parameter is a missing filename
        return None
    return _no_surrogates(name) if name is not None else None


def _is_attachment(part: Message) -> bool:
    """Attached rather than the body: so marked, or named by a filename (Apple Mail names inline text files)."""
    return (part.get_content_disposition() or "") == "attachment" or filename_of(part) is not None


class _Budget:
    """Bytes left for bodies within one layer message: bodies are included while they fit, never half."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True


def _content_tree(mail: Message, budget: _Budget) -> dict[str, Any]:
    """The draft's ``content``: ``content-type`` and ``parts`` for containers, the transfer-decoded ``body`` bytes
    for leaves (``None`` with ``size`` when it no longer fits the layer message). Built without recursion."""
    root: dict[str, Any] = {}
    stack: list[tuple[Message, dict[str, Any]]] = [(mail, root)]
    while stack:
        part, node = stack.pop()
        node["content-type"] = part.get_content_type()
        if _container(part):
            children = _children(part)
            node["parts"] = [{} for _ in children]
            stack.extend(zip(children, node["parts"], strict=True))
            continue
        body = _leaf_bytes(part)
        node["size"] = len(body)
        node["body"] = body if budget.take(len(body)) else None
    return root


@dataclass
class _Bodies:
    text: str | None = None
    html: str | None = None
    attached: list[tuple[Message, dict[str, Any]]] = field(default_factory=list)  # each part and its metadata


def _bodies(mail: Message, defects: list[str]) -> _Bodies:
    """The text/plain and the text/html parts that are not attachments, each kind joined in order, and every other
    leaf as an attachment. A forwarded mail (message/rfc822) is one attachment: its body is not this mail's."""
    found = _Bodies()
    stack = [mail]
    number = 0
    while stack:
        part = stack.pop()
        number += 1
        if _container(part):
            stack.extend(reversed(_children(part)))
            continue
        where, kind = f"part {number}", part.get_content_type()
        if kind == "text/plain" and not _is_attachment(part):  # Apple Mail splits text around inline images
            found.text = (found.text + "\n" if found.text else "") + text_of_part(part, where, defects)
        elif kind == "text/html" and not _is_attachment(part):
            found.html = (found.html + "\n" if found.html else "") + text_of_part(part, where, defects)
        else:
            content_id = _header(part, "content-id").strip("<> ")
            found.attached.append((part, {
                "filename": filename_of(part),
                "content_type": kind,
                "size": len(_leaf_bytes(part)),
                "content_id": content_id or None,
                "inline": (part.get_content_disposition() or "") == "inline",
                "content": None,
            }))
    return found


def _leaf_bytes(part: Message) -> bytes:
    """A leaf's transfer-decoded bytes; a message/* part's whole text."""
    if part.get_content_maintype() == "message":
        try:
            return b"".join(child.as_bytes() for child in _children(part))
        except Exception:  # noqa: BLE001 - an embedded mail the generator cannot write back has no content for us
            return b""
    return part.get_payload(decode=True) or b""


class _HtmlText(HTMLParser):
    """Text of an HTML body, with blockquoted text marked ``> `` so ``new_text`` cuts quotes in HTML mail too."""

    _BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self.quote = 0
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        if tag in self._BLOCKS:
            self.lines.append("")
        if tag == "blockquote":
            self.quote += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)
        if tag == "blockquote":
            self.quote = max(0, self.quote - 1)
        if tag in self._BLOCKS:
            self.lines.append("")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        for i, piece in enumerate(data.split("\n")):
            if i:
                self.lines.append("")
            piece = " ".join(piece.split())
            if piece:
                if not self.lines[-1] and self.quote:
                    self.lines[-1] = "> " * self.quote
                self.lines[-1] += (" " if self.lines[-1] and not self.lines[-1].endswith(" ") else "") + piece


def html_to_text(html: str) -> str:
    """Plain text of an HTML body: one line per block, scripts and styles dropped, blockquotes ``> ``-quoted."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    text = "\n".join(line.rstrip() for line in parser.lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# -- the new text of a reply -----------------------------------------------------------------------------------

# "On <date>, <name> wrote:" in common languages and clients: (what the line starts with, what it holds); the
# line ends with ":" (or the full-width "："). Those with no start are trusted only above quoted lines.
ATTRIBUTIONS = [
    ("On ", " wrote"),  # Gmail, Apple Mail, Thunderbird in English
    ("Am ", " schrieb"),  # German
    ("Le ", " a écrit"),  # French
    ("El ", " escribió"),  # Spanish
    ("Em ", " escreveu"),  # Portuguese
    ("Il ", " ha scritto"),  # Italian
    ("Op ", " schreef"),  # Dutch
    ("Den ", " skrev"),  # Swedish, Danish, Norwegian
    ("W dniu ", " pisze"),  # Polish (Thunderbird)
    ("", " napisał"),  # Polish (Gmail)
    ("", " пишет"),  # Russian (Thunderbird)
    ("", " написал"),  # Russian
    ("", "写道"),  # Chinese
    ("", " wrote"),  # "Bob <bob@example.org> wrote:" (older clients)
]
# Outlook's quoted header block ("From: ...", then "Sent: ..." or "Date: ..."), in the languages Outlook writes.
FROM_FIELDS = {"from", "von", "de", "da", "van", "från", "fra", "od", "от", "发件人"}
NEXT_FIELDS = {"sent", "date", "to", "subject", "cc", "gesendet", "datum", "an", "betreff", "envoyé", "à", "objet",
               "enviado", "para", "asunto", "inviato", "data", "a", "oggetto", "verzonden", "aan", "onderwerp",
               "skickat", "till", "ämne", "sendt", "til", "emne", "wysłano", "do", "temat", "отправлено", "кому",
               "тема", "发送时间", "收件人", "主题"}
SEPARATORS = {"original message", "ursprüngliche nachricht", "message d'origine", "mensaje original",
              "messaggio originale", "oorspronkelijk bericht", "ursprungligt meddelande", "mensagem original"}
PHONE_SIGNATURES = ("Sent from my ", "Get Outlook for ", "Envoyé de mon ", "Von meinem ", "Enviado desde mi ")
MAX_ATTRIBUTION = 500  # characters: an attribution is one short line (or two, wrapped)
_COLONS = (":", "：")  # an attribution line ends with one of them


def _quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def _attribution(line: str) -> tuple[bool, bool]:
    """(is an attribution line, is a strong one: it starts with its language's word)."""
    line = line.strip()
    if len(line) > MAX_ATTRIBUTION or not line.endswith(_COLONS):
        return False, False
    for start, marker in ATTRIBUTIONS:
        if line.startswith(start) and marker in line:
            return True, bool(start)
    return False, False


def _field(line: str) -> str:
    name, colon, _ = line.strip().strip("*").partition(":")
    return name.strip(" *").lower() if colon and len(name) < 30 else ""


def _outlook_block(lines: list[str], i: int) -> bool:
    if _field(lines[i]) not in FROM_FIELDS:
        return False
    return any(_field(line) in NEXT_FIELDS for line in lines[i + 1:i + 4])


def _separator(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("-----") and stripped.endswith("-----") and \
        stripped.strip("- ").lower() in SEPARATORS


def _next_text(lines: list[str], i: int) -> str | None:
    for line in lines[i:]:
        if line.strip():
            return line
    return None


def new_text(body: str) -> str:
    """What the sender wrote in this mail: the body without quoted (``>``) lines, the attribution above them, the
    history after an Outlook header block or an ``Original Message`` line, and the signature after ``-- ``.

    Inline answers between quoted lines are kept. Linear in ``body``.
    """
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # A plain line cannot be a separator ("-----"), a header field or an attribution (":", "："), nor quoted (">"):
    # most lines of a long body. One followed by another plain line (no wrapped attribution) is only kept or not.
    plain = [not ("-----" in line or ":" in line or ">" in line or "：" in line) for line in lines]
    plain.append(True)
    kept: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        end = line.rstrip()
        if end == "--":  # the signature delimiter "-- " (RFC 3676 4.3), often sent without its space
            break
        if plain[i] and plain[i + 1]:
            if end or (kept and kept[-1]):  # one blank line where quotes were cut
                kept.append(end)
            i += 1
            continue
        # Each test below runs only on a line that could pass it ("-----" in a separator, ":" in a header field, a
        # line ending in a colon for an attribution).
        if ("-----" in line and _separator(line)) or (":" in line and _outlook_block(lines, i)):
            while kept and (not kept[-1].strip() or set(kept[-1].strip()) <= {"_", "-"}):
                kept.pop()  # Outlook's line of underscores above its header block
            break
        is_attribution, strong = _attribution(line) if end.endswith(_COLONS) else (False, False)
        wrapped = 0
        if not is_attribution and i + 1 < len(lines) and lines[i + 1].rstrip().endswith(_COLONS) and line.strip() \
                and not _quoted(line):
            # Gmail wraps a long attribution over two lines; only one starting with its word, or "Thanks," above
            # "Bob wrote:" would read as one
            is_attribution, strong = _attribution(line.rstrip() + " " + lines[i + 1].strip())
            is_attribution = is_attribution and strong
            wrapped = 1 if is_attribution else 0
        if is_attribution:
            following = _next_text(lines, i + 1 + wrapped)
            if following is not None and _quoted(following):
                i += 1 + wrapped  # an attribution above quoted lines: both go
                continue
            if strong:
                break  # an attribution above unquoted history: everything from here is history
        if not _quoted(line) and (line.strip() or (kept and kept[-1])):  # one blank line where quotes were cut
            kept.append(line.rstrip())
        i += 1
    while kept and (not kept[-1].strip() or kept[-1].strip().startswith(PHONE_SIGNATURES)):
        kept.pop()
    return "\n".join(kept)


# -- automatic mail (RFC 3834) ---------------------------------------------------------------------------------

_DAEMONS = {"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"}


def _local_part(address: str | None) -> str:
    return (address or "").rpartition("@")[0].lower() if "@" in (address or "") else (address or "").lower()


_KEYWORD_END_RE = re.compile(r"[\s;(]")


def auto_kind(mail: Message, envelope_from: str | None, headers: dict[str, str],
              own_addresses: Iterable[str] = ()) -> str | None:
    """Why ``mail`` must not be answered automatically (``BOUNCE``, ``AUTO_REPLIED``, ``AUTO_GENERATED``, ``LIST``,
    ``BULK``, ``OWN``), or None for a mail a person sent. The first that applies, in that order."""
    sender = address_of(headers.get("from", ""))
    if (envelope_from in (None, "", "<>") or _local_part(envelope_from) in _DAEMONS or _local_part(sender) in _DAEMONS
            or (mail.get_content_type() == "multipart/report"
                and (mail.get_param("report-type") or "").lower() == "delivery-status")
            or "x-failed-recipients" in headers):
        return BOUNCE
    submitted = _KEYWORD_END_RE.split(headers.get("auto-submitted", "").strip().lower(), maxsplit=1)[0]  # its keyword
    if submitted == "auto-replied" or "x-autoreply" in headers or "x-autorespond" in headers:
        return AUTO_REPLIED
    suppress = {word.strip().lower() for word in headers.get("x-auto-response-suppress", "").split(",")}
    if (submitted and submitted != "no") or suppress & {"all", "oof", "autoreply"}:
        return AUTO_GENERATED
    precedence = headers.get("precedence", "").strip().lower()
    if precedence == "list" or any(name in headers for name in ("list-id", "list-unsubscribe", "list-post",
                                                                "mailing-list")):
        return LIST
    if precedence in ("bulk", "junk"):
        return BULK
    own = {address.lower() for address in own_addresses}
    if sender.lower() in own or (envelope_from or "").lower() in own:
        return OWN
    return None


def suppressed(auto: str | None, *, force: bool = False) -> str | None:
    """Why an automatic reply to a mail of kind ``auto`` is not sent (the words to log), or None to send it."""
    if auto is None or force:
        return None
    return f"not answering {'our own' if auto == OWN else 'a ' + auto} mail (RFC 3834); a consumer may force it"


class RateLimit:
    """A token bucket per recipient: ``burst`` mails at once, then one every ``1 / rate`` seconds; pure (the caller
    passes ``now``), and bounded (the ``recipients`` least recently seen are forgotten, which gives them a full
    bucket: a forgotten recipient has waited long)."""

    def __init__(self, rate: float, burst: int, recipients: int = 10000) -> None:
        self.rate, self.burst, self.recipients = rate, burst, recipients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)

    def allow(self, recipient: str, now: float) -> bool:
        key = recipient.lower()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.recipients:
            self._buckets.popitem(last=False)
        return allowed


# -- threads ---------------------------------------------------------------------------------------------------

_MSG_ID_RE = re.compile(r"<[^<>\s]{1,995}>")


def message_ids(value: str | None) -> list[str]:
    """The ``<id>``s of a Message-ID, In-Reply-To or References value, in order; ids sent without their brackets
    (some Exchange servers) are bracketed."""
    if not value:
        return []
    found = _MSG_ID_RE.findall(value)
    if found:
        return found
    return [f"<{word.strip('<>')}>" for word in value.split() if "@" in word]


def thread_root(message_id: str | None, in_reply_to: Sequence[str], references: Sequence[str],
                fallback: str = "") -> str:
    """The id a thread is known by: the first of References (the root), else In-Reply-To, else the mail's own
    Message-ID; a mail with none of them is its own thread, named by ``fallback``."""
    if references:
        return references[0]
    if in_reply_to:
        return in_reply_to[0]
    return message_id or fallback


def thread_local_id(root: str) -> str:
    """The reply channel's local id of a thread: stable for the thread, within the layer's characters."""
    return "t." + hashlib.blake2s(root.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


@dataclass(frozen=True)
class Thread:
    """What a reply to a thread needs of its latest mail."""

    reply_to: tuple[str, ...]  # its Reply-To addresses, else its From
    our_address: str  # the address it was sent to: our replies come from it
    subject: str
    message_id: str | None
    references: tuple[str, ...]  # its References
    auto: str | None


class ThreadMemory:
    """The latest mail of the ``limit`` threads heard from most recently (like the MQTT bridge's topics)."""

    def __init__(self, limit: int = 100000) -> None:
        self.limit = limit
        self._threads: OrderedDict[str, Thread] = OrderedDict()

    def __len__(self) -> int:
        return len(self._threads)

    def remember(self, local_id: str, thread: Thread) -> list[str]:
        """Keep ``thread`` as the latest of ``local_id``; returns the local ids forgotten to make room (the bridge
        stops routing their replies)."""
        self._threads.pop(local_id, None)
        self._threads[local_id] = thread
        forgotten = []
        while len(self._threads) > self.limit:
            forgotten.append(self._threads.popitem(last=False)[0])
        return forgotten

    def get(self, local_id: str) -> Thread | None:
        return self._threads.get(local_id)


def address_of(value: str) -> str:
    """The addr-spec of a From-like header value (``"Ann <ann@example.org>"`` -> ``"ann@example.org"``), or ``""``.
    The plain forms (``Name <a@b>``, ``<a@b>``, ``a@b``, atoms only) are read by pattern, as ``parseaddr`` reads
    them; any other by ``parseaddr``."""
    found = _PLAIN_MAILBOX_RE.fullmatch(value)
    if found is not None:
        return found["named"] or found["angled"] or found["bare"]
    return parseaddr(value)[1]


def addresses_of(value: str) -> list[str]:
    return [spec for _, spec in getaddresses([value]) if "@" in spec]


# -- email.receive -----------------------------------------------------------------------------------------------


def authentication(*, smtp_login: str | None = None, relay: str | None = None, authserv_id: str | None = None,
                   headers: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """The ``authenticated`` key: the SMTP AUTH login, and, for mail from a trusted relay, the results of the
    relay's topmost ``Authentication-Results`` whose authserv-id is ``authserv_id`` (RFC 8601 section 5: any other
    may have been written by the sender)."""
    results: dict[str, str] = {}
    if relay is not None and authserv_id:
        for name, value in headers:
            if name.lower() != "authentication-results":
                continue
            server, _, rest = value.partition(";")
            if server.strip().lower().split()[:1] != [authserv_id.lower()]:  # a host name: any case
                continue
            for clause in rest.split(";"):
                method, equals, result = clause.strip().partition("=")
                if equals and method.strip().lower() in ("spf", "dkim", "dmarc", "arc"):
                    results.setdefault(method.strip().lower(), result.split()[0].lower() if result.split() else "")
            break
    return {"smtp_auth": smtp_login, "relay": relay, **{m: results.get(m) for m in ("spf", "dkim", "dmarc", "arc")}}


@dataclass(frozen=True)
class Received:
    """One mail read into its ``email.receive`` message, with the thread a reply to it goes to."""

    message: dict[str, Any]
    local_id: str  # the thread's reply channel local id
    thread: Thread


def _strip_reply_prefixes(subject: str) -> str:
    return _REPLY_PREFIX_RE.sub("", subject).strip()


def _capped(defects: list[str]) -> list[str]:
    if len(defects) <= MAX_DEFECTS:
        return defects
    return [*defects[:MAX_DEFECTS], f"and {len(defects) - MAX_DEFECTS} more"]


def receive_message(mail: EmailMessage, *, envelope_from: str | None, envelope_to: Sequence[str], reply_prefix: str,
                    limits: Limits, budget: int, authenticated: dict[str, Any] | None = None,
                    own_addresses: Iterable[str] = ()) -> Received:
    """The ``email.receive`` message of a mail from ``read_mail``, and its thread.

    ``reply_prefix`` is the bridge's reply queue (``email.{name}.{random}!``):
    the reply channel is it plus the thread's local id. ``budget`` is how many
    bytes of headers and bodies fit in one layer message (the bridge works it
    out from the layer's limit). Headers and the texts go in first; attachment
    contents and the ``content`` tree's bodies only while they fit (``None``
    beyond). A mail whose headers and texts alone do not fit raises
    ``MailRefused`` (552 5.3.4).
    """
    with _unreadable():  # the stdlib raises on some hostile headers wherever they are read: a refusal, not a crash
        return _receive(mail, envelope_from=envelope_from, envelope_to=envelope_to, reply_prefix=reply_prefix,
                        limits=limits, budget=budget, authenticated=authenticated, own_addresses=own_addresses)


def _receive(mail: EmailMessage, *, envelope_from: str | None, envelope_to: Sequence[str], reply_prefix: str,
             limits: Limits, budget: int, authenticated: dict[str, Any] | None = None,
             own_addresses: Iterable[str] = ()) -> Received:
    defects: list[str] = [f"message: {defect}" for defect in mail.defects]
    headers, header_list = headers_of(mail, defects)
    bodies = _bodies(mail, defects)
    shown = bodies.text if bodies.text is not None else html_to_text(bodies.html) if bodies.html is not None else ""
    text = new_text(shown)
    left = _Budget(budget)
    needed = sum(len(n) + len(v.encode()) for n, v in header_list) * 2  # headers and header_list
    needed += sum(len(piece.encode()) for piece in (text, bodies.text, bodies.html) if piece is not None)
    if not left.take(needed):
        raise _too_big("message too big for the channel layer once decoded", "oversized")
    for part, attachment in bodies.attached:
        if attachment["size"] <= limits.max_attachment_content and left.take(attachment["size"]):
            attachment["content"] = _leaf_bytes(part)
    message_id = (message_ids(headers.get("message-id")) or [None])[0]
    in_reply_to = message_ids(headers.get("in-reply-to"))
    references = message_ids(headers.get("references"))
    subject = headers.get("subject", "")
    sender = address_of(headers.get("from", "")) or envelope_from or ""
    root = thread_root(message_id, in_reply_to, references)
    if not root:  # no id at all: the thread is the sender's and the subject's (worked out only then)
        root = f"{sender.lower()}|{_strip_reply_prefixes(subject).lower()}"
    local_id = thread_local_id(root)
    auto = auto_kind(mail, envelope_from, headers, own_addresses)
    reply_to = headers.get("reply-to")
    reply_to = (tuple(addresses_of(reply_to)) if reply_to else ()) or ((sender,) if sender else ())
    # An encoded word can decode to CR LF (=?utf-8?q?a=0D=0Ab?=): the subject our replies repeat is made safe here,
    # so the thread can still be answered; the message's own subject key is left as the sender wrote it.
    safe_subject = _CONTROL_RE.sub(" ", subject)
    our_address = envelope_to[0] if envelope_to else ""
    thread = Thread(reply_to, our_address, safe_subject, message_id, tuple(references), auto)
    message = {
        "reply_channel": reply_prefix + local_id,
        "from": envelope_from or None,
        "to": list(envelope_to),
        "headers": headers,
        "header_list": header_list,
        "content": _content_tree(mail, left),
        "message_id": message_id,
        "in_reply_to": in_reply_to[0] if in_reply_to else None,
        "references": references,
        "thread": root,
        "subject": subject,
        "body_text": bodies.text,
        "html": bodies.html,
        "attachments": [attachment for _, attachment in bodies.attached],
        "auto": auto,
        "authenticated": authenticated or authentication(),
        "defects": _capped(defects),
        **shared_keys(PROTOCOL, sender, local_id, text),
    }
    return Received(message, local_id, thread)


# -- building mails --------------------------------------------------------------------------------------------

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_REPLY_PREFIX_RE = re.compile(r"^(?:\s*(?:re|aw|sv|vs|antw|odp|ref|res|rif|tr)\s*(?:\[\d+\])?\s*[:：])+",
                              re.IGNORECASE)
ALLOWED_HEADERS = {"reply-to", "in-reply-to", "references", "keywords", "comments", "importance", "priority",
                   "sensitivity", "list-id", "list-unsubscribe", "list-unsubscribe-post", "auto-submitted",
                   "x-auto-response-suppress"}  # and every X- header; everything else is the bridge's to write
_NAME_RE = re.compile(r"^[!-9;-~]{1,76}$")  # a header field name: printable ASCII but ':' (RFC 5322 section 2.2)


def check_header_value(name: str, value: str) -> str:
    """``value`` if it holds no CR, LF or other control character (which could end a header and start another);
    ``HeaderInjection`` otherwise."""
    found = _CONTROL_RE.search(value)
    if found:
        raise HeaderInjection(f"{name} holds the control character {found.group()!r}: refused (header injection)")
    return value


def reply_subject(subject: str) -> str:
    """``Re: `` exactly once, in front of the subject without its reply prefixes (Re:, RE:, Re[2]:, AW:, SV:...)."""
    return "Re: " + (_strip_reply_prefixes(subject) or "")


def references_after(references: Sequence[str], message_id: str | None) -> list[str]:
    """The References of a reply to a mail with ``references`` and ``message_id``: its chain plus its id, trimmed to
    the root and the most recent (RFC 5322 section 3.6.4)."""
    chain = [*references, *([message_id] if message_id else [])]
    return chain if len(chain) <= MAX_REFERENCES else [chain[0], *chain[-(MAX_REFERENCES - 1):]]


@dataclass(frozen=True)
class Outgoing:
    """A mail for the smarthost: the envelope and the bytes (CRLF line ends)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message_id: str
    smtputf8: bool = False  # an address is not ASCII: the smarthost must offer SMTPUTF8


def _addresses(key: str, value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidReply(f"{key} must be an address or a list of addresses")
    checked = []
    for entry in values:
        check_header_value(key, entry)
        name, spec = parseaddr(entry)
        try:
            local, _, domain = parse_address(spec).rpartition("@")
        except ValueError as exc:
            raise InvalidReply(f"{key}: {exc}") from None
        checked.append(str(Address(display_name=name, username=local, domain=domain)))  # UTF-8 allowed: SMTPUTF8
    return checked


def _text(reply: dict[str, Any], key: str) -> str | None:
    value = reply.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidReply(f"{key} must be a str, not {type(value).__name__}")
    return value


def _attach(mail: EmailMessage, attachments: Any) -> None:
    if not isinstance(attachments, list):
        raise InvalidReply("attachments must be a list of {filename, content_type, content}")
    for entry in attachments:
        if not isinstance(entry, dict) or set(entry) - {"filename", "content_type", "content"} or \
                not isinstance(entry.get("content"), (bytes, bytearray)):
            raise InvalidReply("each attachment is {filename: str, content_type: str, content: bytes}")
        filename = check_header_value("attachment filename", str(entry.get("filename") or "attachment"))
        content_type = check_header_value("attachment content_type",
                                          str(entry.get("content_type") or "application/octet-stream"))
        maintype, slash, subtype = content_type.partition("/")
        if not slash or not _NAME_RE.match(maintype) or not _NAME_RE.match(subtype):
            raise InvalidReply(f"attachment content_type {content_type!r} is not type/subtype")
        mail.add_attachment(bytes(entry["content"]), maintype=maintype, subtype=subtype, filename=filename)


def _extra_headers(headers: Any) -> list[tuple[str, str]]:
    if not isinstance(headers, dict):
        raise InvalidReply("headers must be a dict of name: value")
    extra = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidReply("header names and values must be str")
        check_header_value("a header name", name)
        check_header_value(f"header {name}", value)
        if not _NAME_RE.match(name):
            raise InvalidReply(f"{name!r} is not a header name")
        if name.lower() not in ALLOWED_HEADERS and not name.lower().startswith("x-"):
            raise InvalidReply(f"header {name} is the bridge's to write; a consumer may set X- headers and "
                               f"{', '.join(sorted(ALLOWED_HEADERS))}")
        extra.append((name, value))
    return extra


def _compose(*, sender: str, to: list[str], cc: list[str], bcc: list[str], subject: str, text: str | None,
             html: str | None, attachments: Any, headers: list[tuple[str, str]], domain: str,
             in_reply_to: str | None, references: list[str], auto_submitted: str) -> Outgoing:
    if text is None and html is None:
        raise InvalidReply("give text or html (or both)")
    check_header_value("subject", subject)
    mail = EmailMessage(policy=_SEVEN_BIT)
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    if cc:
        mail["Cc"] = ", ".join(cc)
    mail["Subject"] = subject
    mail["Date"] = formatdate(usegmt=True)
    message_id = make_msgid(domain=domain)
    mail["Message-ID"] = message_id
    if in_reply_to:
        mail["In-Reply-To"] = in_reply_to
    if references:
        mail["References"] = " ".join(references)
    mail["Auto-Submitted"] = auto_submitted
    addresses = [parseaddr(a)[1] for a in (*to, *cc, *bcc)]
    envelope_from = parseaddr(sender)[1]
    smtputf8 = not all(a.isascii() for a in (*addresses, envelope_from))
    try:
        for name, value in headers:
            del mail[name]  # a consumer's header replaces the bridge's own of that name (In-Reply-To, Auto-Submitted)
            mail[name] = value
        if text is not None:
            mail.set_content(text)
            if html is not None:
                mail.add_alternative(html, subtype="html")
        else:
            mail.set_content(html, subtype="html")
        if attachments:
            _attach(mail, attachments)
        data = mail.as_bytes(policy=policy.SMTPUTF8 if smtputf8 else policy.SMTP)
    except InvalidReply:
        raise
    except Exception as exc:  # noqa: BLE001 - the stdlib's header classes raise many kinds on values they reject
        raise InvalidReply(f"cannot write this mail: {exc}") from exc
    return Outgoing(envelope_from, tuple(dict.fromkeys(addresses)), data, message_id, smtputf8)


# Bodies quoted-printable or base64, so any smarthost takes them (8BITMIME is not everywhere); lines end in CRLF.
_SEVEN_BIT = policy.SMTP.clone(cte_type="7bit")
_REPLY_KEYS = {"text", "html", "attachments", "force", "headers"}


def build_reply(thread: Thread, reply: Any, *, domain: str) -> Outgoing:
    """The mail a reply on a thread's reply channel sends: to the latest mail's Reply-To (or From), from the address
    it was sent to, ``Re:`` once, threaded by In-Reply-To and References, ``Auto-Submitted: auto-replied``, a
    Message-ID under ``domain``. Whether it may go at all is ``suppressed()``'s and the rate limit's to say."""
    if not isinstance(reply, dict):
        raise InvalidReply(f"a reply must be a dict, not {type(reply).__name__}")
    unknown = set(reply) - _REPLY_KEYS
    if unknown:
        raise InvalidReply(f"unknown reply keys {sorted(unknown)}; known: {', '.join(sorted(_REPLY_KEYS))}")
    if not isinstance(reply.get("force", False), bool):
        raise InvalidReply("force must be true or false")
    if not thread.reply_to:
        raise InvalidReply("the mail replied to names nobody to answer (no Reply-To, no From)")
    return _compose(sender=_addresses("from", thread.our_address)[0], to=_addresses("to", list(thread.reply_to)),
                    cc=[], bcc=[], subject=reply_subject(thread.subject), text=_text(reply, "text"),
                    html=_text(reply, "html"), attachments=reply.get("attachments"),
                    headers=_extra_headers(reply.get("headers", {})), domain=domain,
                    in_reply_to=thread.message_id, references=references_after(thread.references, thread.message_id),
                    auto_submitted="auto-replied")


_SEND_KEYS = {"to", "cc", "bcc", "from", "subject", "text", "html", "attachments", "headers"}


def build_send(message: Any, *, domain: str, default_from: str, domains: Iterable[str]) -> Outgoing:
    """The mail an ``email.send`` message starts: ``to`` required, ``from`` one of our ``domains`` (else
    ``default_from``), ``Auto-Submitted: auto-generated`` unless the consumer's headers say otherwise."""
    if not isinstance(message, dict):
        raise InvalidReply(f"an email.send message must be a dict, not {type(message).__name__}")
    unknown = set(message) - _SEND_KEYS - {"reply_channel"}
    if unknown:
        raise InvalidReply(f"unknown keys {sorted(unknown)}; known: {', '.join(sorted(_SEND_KEYS))}")
    if not message.get("to"):
        raise InvalidReply("an email.send message needs to")
    sender = _addresses("from", message.get("from") or default_from)[0]
    if parseaddr(sender)[1].rpartition("@")[2].lower() not in {d.lower() for d in domains}:
        raise InvalidReply(f"from {sender!r} is not in one of the bridge's domains")
    subject = _text(message, "subject") or ""
    return _compose(sender=sender, to=_addresses("to", message["to"]), cc=_addresses("cc", message.get("cc", [])),
                    bcc=_addresses("bcc", message.get("bcc", [])), subject=subject, text=_text(message, "text"),
                    html=_text(message, "html"), attachments=message.get("attachments"),
                    headers=_extra_headers(message.get("headers", {})), domain=domain, in_reply_to=None,
                    references=[], auto_submitted="auto-generated")
