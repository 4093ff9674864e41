"""IRC <-> channel messages, with no sockets and no reactor (the ASGI 1.0 ``irc-client`` draft, extended).

This module owns everything about the IRC bridge that can be decided without
I/O: reading the ``server`` and ``channels`` options, parsing lines from the
server, building the ``irc-client.*`` messages for the layer, judging what a
consumer sends on a reply channel, and turning text into IRC lines that fit
the protocol. It must not touch sockets, twisted.words or the reactor:
``bridge.py`` feeds it and carries out what it returns. docs/spec/irc.md is
its contract.

Two rules run through it. Nothing a consumer sends can become more than the
one IRC command it asked for: text is cut at every line break and stripped of
NUL before it is split, targets and keys are checked, and ``command()``
refuses (``UnsafeText``) any parameter that could still end a line. And every
line we send fits in 512 bytes *as the server relays it*, that is with the
``:nick!user@host`` prefix it adds in front, cut on UTF-8 character
boundaries (at a space when there is one near the end), so nobody receives
half a character or a line the server truncated.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from crossroads.bridges.protocol import FairQueue as FairQueue  # one queue per target, round robin
from crossroads.bridges.protocol import TokenBucket as TokenBucket  # the flood control, shared with Slack
from crossroads.bridges.protocol import shared_keys, split_url

PROTOCOL = "irc"
CONNECT, JOIN, PART, RECEIVE = "irc-client.connect", "irc-client.join", "irc-client.part", "irc-client.receive"
MESSAGE, ACTION, NOTICE = "message", "action", "notice"

LINE_LIMIT = 512  # bytes, CR LF included (RFC 1459 section 2.3)
HOST_LIMIT = 63  # the longest host name a server shows for us until we have seen our own prefix
DEFAULT_PORTS = {"irc": 6667, "ircs": 6697}
CHANNEL_PREFIXES = "#&+!"
SERVER_LOCAL_ID = "server"  # the local id of irc-client.connect's reply channel: it has no default target

_FORBIDDEN = re.compile(r"[\x00\r\n]")
_NICK_RE = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]*$")
# Formatting: bold, color (^C fg[,bg]), hex color (^D rrggbb[,rrggbb]), reset, monospace, reverse, italic,
# strikethrough, underline.
_FORMATTING = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?"
                         r"|[\x02\x0f\x11\x16\x1d\x1e\x1f]")
_LOCAL_ID_SAFE = re.compile(r"[A-Za-z0-9-]")


def breaks_lines(text: str) -> bool:
    """Whether ``text`` holds CR, LF or NUL, any of which would end an IRC line early."""
    return _FORBIDDEN.search(text) is not None


class UnsafeText(ValueError):
    """A parameter would end the IRC line early or add another parameter: nothing is sent."""


class InvalidReply(ValueError):
    """A consumer's reply that cannot be performed; nothing of it is performed."""


class BadLine(ValueError):
    """A line from the server that is not an IRC message."""


# -- options ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'ircs' if self.tls else 'irc'}://{self.host}:{self.port}"


def parse_server(url: str) -> ServerAddress:
    """``irc://host[:port]`` (plain, 6667) or ``ircs://host[:port]`` (TLS, 6697); ValueError says what is wrong."""
    if "://" not in url:  # a bare host name: say which scheme means what rather than guess (TLS or not)
        raise ValueError(f"must name the scheme: \"ircs://{url}\" (TLS, port 6697) or \"irc://{url}\" "
                         f"(plain text, port 6667)")
    parts = split_url(url, DEFAULT_PORTS, shape="irc://host[:port] or ircs://host[:port]")
    if parts.more or parts.username:
        raise ValueError(f"only irc[s]://host[:port] is understood, not {url!r} (channels go in `channels`)")
    return ServerAddress(parts.host, parts.port, parts.scheme == "ircs")


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    key: str = ""


def channel_problem(name: Any) -> str | None:
    """Why ``name`` cannot be joined as a channel, or None."""
    if not isinstance(name, str) or not name:
        return f"a channel name must be a non-empty string, not {name!r}"
    if name[0] not in CHANNEL_PREFIXES:
        return f"channel {name!r} must start with one of {CHANNEL_PREFIXES}"
    if re.search(r"[\x00\x07\r\n ,:]", name) or len(name.encode("utf-8")) > 200:
        return f"channel {name!r} may not contain spaces, commas, colons, BEL, CR, LF or NUL (and <= 200 bytes)"
    return None


def nick_problem(nick: Any) -> str | None:
    """Why ``nick`` is not a valid nickname (RFC 2812 section 2.3.1, any length), or None."""
    if not isinstance(nick, str) or not _NICK_RE.match(nick):
        return (f"{nick!r} is not a nickname: a letter or one of []\\`_^{{|}} first, then letters, digits, "
                f"those or '-'")
    return None


def target_problem(target: Any) -> str | None:
    """Why ``target`` can be neither a channel nor a nick to talk to, or None."""
    if isinstance(target, str) and target[:1] in CHANNEL_PREFIXES:
        return channel_problem(target)
    return nick_problem(target)


def parse_channels(value: list) -> list[ChannelSpec]:
    """The ``channels`` option: names, or ``{name = ..., key = ...}`` tables. ValueError says what is wrong."""
    specs = []
    for entry in value:
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "key"}
            if unknown:
                raise ValueError(f"a channel table takes name and key, not {', '.join(sorted(unknown))}")
            name, key = entry.get("name"), entry.get("key", "")
        else:
            name, key = entry, ""
        problem = channel_problem(name)
        if problem:
            raise ValueError(problem)
        if not isinstance(key, str) or re.search(r"[\x00\r\n ,]", key):
            raise ValueError(f"the key of {name} must be a string without spaces, commas, CR, LF or NUL")
        specs.append(ChannelSpec(name, key))
    return specs


# -- names -----------------------------------------------------------------------------------------------------


def irc_lower(name: str, casemapping: str = "rfc1459") -> str:
    """``name`` in lower case as the server compares names: under rfc1459 ``[]\\~`` are ``{}|^`` in upper case."""
    name = name.translate(_ASCII_LOWER)
    if casemapping == "rfc1459":
        return name.translate(_RFC1459_EXTRA)
    if casemapping == "strict-rfc1459":
        return name.translate(_STRICT_EXTRA)
    return name


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_RFC1459_EXTRA = str.maketrans("[]\\~", "{}|^")
_STRICT_EXTRA = str.maketrans("[]\\", "{}|")


def target_local_id(target: str, casemapping: str = "rfc1459", limit: int = 60) -> str:
    """The stable local id of a channel or private peer: ``c.`` or ``p.`` and the folded name, escaped.

    Characters other than ASCII letters, digits and '-' become ``_xx`` (their
    UTF-8 bytes in hex), so ``#Chat`` and ``#chat`` share ``c._23chat``. A name
    too long for ``limit`` becomes a hash of it, still stable.
    """
    kind = "c." if target[:1] in CHANNEL_PREFIXES else "p."
    folded = irc_lower(target, casemapping)
    escaped = "".join(ch if _LOCAL_ID_SAFE.match(ch) else "".join(f"_{b:02x}" for b in ch.encode("utf-8"))
                      for ch in folded)
    if len(kind) + len(escaped) <= limit:
        return kind + escaped
    return kind + "h." + hashlib.sha256(folded.encode("utf-8")).hexdigest()[:32]


def nick_of(prefix: str) -> str:
    """The nick in a ``nick!user@host`` prefix (a server name stays as it is)."""
    return prefix.split("!", 1)[0].split("@", 1)[0]


RFC_NICK_LENGTH = 9  # RFC 1459's NICKLEN, and Debian's ngircd's: every server takes nicks this long
MAX_NICK_ATTEMPTS = 20  # nicks asked for in one registration before the attempt fails


def nick_candidates(nick: str, alternates: list[str], limit: int | None = None) -> Iterator[str]:
    """The nicks to ask for, in order: ``nick``, the configured alternates, then ``nick`` with ``_`` and then
    2, 3, ... at its end. Each is cut to ``limit`` (the server's NICKLEN), the variations cut before their
    suffix so it survives; a nick that cutting made equal to an earlier one is not repeated. Endless without
    a limit; with one, it ends when no suffix fits beside one character of ``nick``."""
    seen: set[str] = set()

    def wanted() -> Iterator[str]:
        yield nick
        yield from alternates
        for n in itertools.count(1):
            suffix = "_" if n == 1 else str(n)
            room = len(nick) if limit is None else min(len(nick), limit - len(suffix))
            if room < 1:
                return
            yield nick[:room] + suffix

    for name in wanted():
        name = name if limit is None else name[:limit]
        folded = irc_lower(name)
        if folded not in seen:
            seen.add(folded)
            yield name


def advertised_nick_length(tokens: list[str]) -> int | None:
    """The ``NICKLEN=n`` among the tokens of an ``RPL_ISUPPORT`` (005) line, or None."""
    for token in tokens:
        key, _, value = token.partition("=")
        if key.upper() == "NICKLEN" and value.isdigit() and int(value) > 0:
            return int(value)
    return None


class NickChoice:
    """Which nick to ask for while registering, and which to win back once registered.

    Servers refuse a nick longer than their NICKLEN (ngircd, with 432) or cut it
    silently, and they advertise NICKLEN only after registration (005). So a
    refusal of a nick longer than RFC 1459's 9 is taken as "too long": we cut to
    the limit the server's reason states, else to 9, which every server takes,
    and ask again; once the server advertises its NICKLEN, ``wanted`` is our
    nick cut to that, which the bridge then asks for (it may be longer than 9).
    """

    def __init__(self, nick: str, alternates: list[str], limit: int | None = None) -> None:
        self.nick, self.alternates, self.limit = nick, list(alternates), limit
        self.tried: set[str] = set()  # folded nicks asked for in this registration
        self.attempted = ""

    @property
    def wanted(self) -> str:
        """Our own nick as the server allows it."""
        return self.nick if self.limit is None else self.nick[:self.limit]

    def next(self) -> str | None:
        """The next nick to ask for (the first call: ``wanted``); None once ``MAX_NICK_ATTEMPTS`` were asked for
        or every candidate was."""
        if len(self.tried) >= MAX_NICK_ATTEMPTS:
            return None
        for name in nick_candidates(self.nick, self.alternates, self.limit):
            if irc_lower(name) not in self.tried:
                self.tried.add(irc_lower(name))
                self.attempted = name
                return name
        return None

    def refused(self, reason: str) -> str | None:
        """After the server refused ``attempted`` (432) while registering: the nick to ask for instead, cut to
        the length the server allows; None when the refusal cannot be about length (the nick already fits)."""
        stated = re.search(r"(\d+) char", reason)  # ngircd: "Nickname too long, max. 9 characters"
        limit = int(stated.group(1)) if stated and int(stated.group(1)) > 0 else RFC_NICK_LENGTH
        if self.limit is not None:
            limit = min(limit, self.limit)
        if len(self.attempted) <= limit:
            return None
        self.limit = limit
        return self.next()

    def advertised(self, tokens: list[str]) -> None:
        """Learn the server's NICKLEN from an ``RPL_ISUPPORT`` line's tokens (if it names one)."""
        self.limit = advertised_nick_length(tokens) or self.limit


# -- lines from the server -------------------------------------------------------------------------------------


@dataclass
class Line:
    command: str
    params: list[str]
    prefix: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def decode(raw: bytes) -> tuple[str, bool]:
    """A line's text and whether it was UTF-8; other bytes are read as Latin-1 (the usual legacy charset)."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("latin-1"), False


def parse_line(text: str) -> Line:
    """One line from the server (CR LF removed): ``[@tags] [:prefix] COMMAND params [:trailing]``."""
    rest = text.rstrip("\r")
    tags: dict[str, str] = {}
    if rest.startswith("@"):
        raw_tags, _, rest = rest[1:].partition(" ")
        for tag in raw_tags.split(";"):
            key, _, value = tag.partition("=")
            tags[key] = value
    rest = rest.lstrip(" ")
    prefix = ""
    if rest.startswith(":"):
        prefix, _, rest = rest[1:].partition(" ")
        rest = rest.lstrip(" ")
    if rest.startswith(":"):
        raise BadLine(f"no command in {text[:100]!r}")
    if " :" in rest:
        head, _, trailing = (" " + rest).partition(" :")
        params = head.split() + [trailing]
    else:
        params = rest.split()
    if not params or params[0].startswith(":") or not params[0].isalnum():
        raise BadLine(f"no command in {text[:100]!r}")
    command = params.pop(0).upper()
    return Line(command, params, prefix, tags)


def strip_formatting(text: str) -> str:
    """``text`` without mIRC formatting codes (bold, colors, italics, ...), as a person reads it."""
    return _FORMATTING.sub("", text)


def parse_ctcp(body: str) -> tuple[str, str] | None:
    """(command, argument) of a CTCP query such as ``\\x01ACTION waves\\x01``; None for plain text."""
    if len(body) < 2 or body[0] != "\x01":
        return None
    inner = body[1:-1] if body.endswith("\x01") else body[1:]
    command, _, argument = inner.partition(" ")
    return command.upper(), argument


# -- lines to the server ---------------------------------------------------------------------------------------


def command(name: str, *params: str, trailing: str | None = None) -> str:
    """One IRC line (without CR LF). Raises ``UnsafeText`` if any part could end it or add a parameter."""
    for part in (name, *params):
        if not part or _FORBIDDEN.search(part) or " " in part or part.startswith(":"):
            raise UnsafeText(f"{part!r} cannot be an IRC parameter")
    if trailing is not None and _FORBIDDEN.search(trailing):
        raise UnsafeText("CR, LF and NUL cannot be sent in an IRC line")
    return " ".join((name, *params)) + ("" if trailing is None else " :" + trailing)


def text_lines(text: str) -> list[str]:
    """The lines of a consumer's text, each to be said on its own: split at every line break, NUL removed,
    trailing spaces removed (servers drop them), blank lines dropped (IRC cannot send an empty message)."""
    lines = text.replace("\x00", "").splitlines()
    return [line.rstrip() for line in lines if line.strip()]


def split_utf8(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-8 bytes, cut between characters, at a space when one is in
    the last quarter of a piece. That space is dropped: the line break stands for it (and servers strip
    trailing spaces anyway)."""
    if limit < 4:
        raise ValueError("a piece must hold at least one character (4 bytes)")
    pieces = []
    while len(text.encode("utf-8")) > limit:
        cut, size = 0, 0
        for ch in text:
            width = len(ch.encode("utf-8"))
            if size + width > limit:
                break
            size += width
            cut += 1
        space = text.rfind(" ", 0, cut + 1)  # a space just after the cut counts too
        if space >= cut * 3 // 4 and space > 0:
            pieces.append(text[:space])
            text = text[space + 1:]
        else:
            pieces.append(text[:cut])
            text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def prefix_length(nick: str, user: str | None, host: str | None) -> int:
    """Bytes of the ``:nick!user@host `` prefix the server puts in front of what we say. Until we know our
    user and host, assume an ident-less ``~user`` and the longest host name."""
    user_len = len(user.encode("utf-8")) if user else 11  # '~' and up to 10 characters
    host_len = len(host.encode("utf-8")) if host else HOST_LIMIT
    return 1 + len(nick.encode("utf-8")) + 1 + user_len + 1 + host_len + 1


def say_lines(kind: str, target: str, text: str, prefix_len: int) -> list[str]:
    """The IRC lines that say ``text`` to ``target`` as a message, action or notice, every one (with the
    server's prefix of ``prefix_len`` bytes and CR LF) at most 512 bytes. Raises ``UnsafeText``/ValueError
    for a bad target."""
    problem = target_problem(target)
    if problem:
        raise UnsafeText(problem)
    verb = "NOTICE" if kind == NOTICE else "PRIVMSG"
    opening, closing = ("\x01ACTION ", "\x01") if kind == ACTION else ("", "")
    overhead = prefix_len + len(f"{verb} {target} :".encode()) + len(opening) + len(closing) + 2
    room = LINE_LIMIT - overhead
    if room < 16:
        raise UnsafeText(f"target {target!r} is too long to leave room for text")
    lines = []
    for line in text_lines(text):
        for piece in split_utf8(line, room):
            lines.append(command(verb, target, trailing=opening + piece + closing))
    return lines


def join_line(channel: ChannelSpec) -> str:
    return command("JOIN", channel.name, channel.key) if channel.key else command("JOIN", channel.name)


def part_line(channel: str, reason: str = "") -> str:
    reason = " ".join(text_lines(reason))  # one line, whatever the consumer sent
    return command("PART", channel, trailing=reason) if reason else command("PART", channel)


def sasl_plain(username: str, password: str) -> list[str]:
    """The ``AUTHENTICATE`` arguments carrying SASL PLAIN credentials: base64 in 400-byte pieces, then ``+`` when
    the last piece is exactly 400 bytes (IRCv3 sasl-3.1), so the server knows the payload ended."""
    payload = base64.b64encode(f"{username}\0{username}\0{password}".encode()).decode("ascii")
    pieces = [payload[i:i + 400] for i in range(0, len(payload), 400)] or ["+"]
    if len(pieces[-1]) == 400:
        pieces.append("+")
    return pieces


# -- who is where ----------------------------------------------------------------------------------------------


class Membership:
    """The nicks in each channel we are in (from NAMES, JOIN, PART, KICK, NICK, QUIT), by folded names, so a QUIT
    can be told to consumers as a part from each channel the user was in."""

    def __init__(self, casemapping: str = "rfc1459") -> None:
        self.casemapping = casemapping
        self.channels: dict[str, dict[str, str]] = {}  # folded channel -> folded nick -> nick

    def _fold(self, name: str) -> str:
        return irc_lower(name, self.casemapping)

    def names(self, channel: str, nicks: list[str]) -> None:
        members = self.channels.setdefault(self._fold(channel), {})
        for nick in nicks:
            nick = nick.lstrip("~&@%+!")  # channel status prefixes
            if nick:
                members[self._fold(nick)] = nick

    def joined(self, channel: str, nick: str) -> None:
        self.channels.setdefault(self._fold(channel), {})[self._fold(nick)] = nick

    def parted(self, channel: str, nick: str, ours: bool = False) -> None:
        if ours:
            self.channels.pop(self._fold(channel), None)
        else:
            self.channels.get(self._fold(channel), {}).pop(self._fold(nick), None)

    def quit(self, nick: str) -> list[str]:
        """Removes ``nick`` everywhere; the (folded) channels it was in."""
        folded, left = self._fold(nick), []
        for channel, members in self.channels.items():
            if members.pop(folded, None) is not None:
                left.append(channel)
        return left

    def renamed(self, old: str, new: str) -> None:
        for members in self.channels.values():
            if members.pop(self._fold(old), None) is not None:
                members[self._fold(new)] = new

    def clear(self) -> None:
        self.channels.clear()


# -- messages to the layer -------------------------------------------------------------------------------------


def connect_message(reply_channel: str, server: ServerAddress, nick: str, network: str) -> dict[str, Any]:
    return {"reply_channel": reply_channel, "server": [server.host, server.port], "nick": nick,
            "network": network, **shared_keys(PROTOCOL, server.host, None, None)}


def join_message(reply_channel: str, channel: str, prefix: str, ours: bool, network: str) -> dict[str, Any]:
    nick = nick_of(prefix)
    return {"reply_channel": reply_channel, "channel": channel, "nick": nick, "user": prefix,
            "ours": ours, "network": network, **shared_keys(PROTOCOL, nick, channel, None)}


def part_message(reply_channel: str, channel: str, prefix: str, ours: bool, network: str, *, how: str = "part",
                 reason: str = "", by: str | None = None) -> dict[str, Any]:
    """``how``: ``part``, ``kick`` (``by`` who) or ``quit`` (the user left the network)."""
    nick = nick_of(prefix)
    return {"reply_channel": reply_channel, "channel": channel, "nick": nick, "user": prefix,
            "ours": ours, "how": how, "reason": reason, "by": by, "network": network,
            **shared_keys(PROTOCOL, nick, channel, None)}


def receive_message(reply_channel: str, kind: str, prefix: str, target: str, body: str, network: str,
                    ) -> dict[str, Any]:
    """``target`` is where it was said: a channel, or our own nick for a private message (then ``channel`` is
    None and ``room`` is the sender)."""
    nick = nick_of(prefix)
    private = target[:1] not in CHANNEL_PREFIXES
    return {"reply_channel": reply_channel, "type": kind, "user": prefix, "nick": nick,
            "channel": None if private else target, "private": private, "body": body,
            "network": network, **shared_keys(PROTOCOL, nick, nick if private else target, strip_formatting(body))}


# -- replies from consumers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    kind: str  # message, action or notice
    target: str
    text: str


@dataclass(frozen=True)
class Join:
    channel: ChannelSpec


@dataclass(frozen=True)
class Part:
    channel: str
    reason: str = ""


def interpret_reply(message: Any, default_target: str | None) -> list[Say | Join | Part]:
    """What a reply asks for. ``{"text": ...}`` says the text to the reply channel's target; a ``type`` of
    message/action/notice/join/part is the draft's control message, ``channel`` defaulting to the target.
    Raises ``InvalidReply`` (nothing is performed) for anything else."""
    if not isinstance(message, dict):
        raise InvalidReply(f"a reply must be a dict, not {type(message).__name__}")
    kind = message.get("type")
    target = message.get("channel") or default_target  # None too: a private message's channel, echoed back
    if target is None:
        raise InvalidReply("this reply channel has no target of its own: name one with 'channel'")
    problem = target_problem(target)
    if problem:
        raise InvalidReply(problem)
    if kind is None:
        if "text" not in message:
            raise InvalidReply("a reply needs 'text', or a 'type' (message, action, notice, join, part)")
        text = message["text"]
        if not isinstance(text, str):
            raise InvalidReply(f"'text' must be str, not {type(text).__name__}")
        return [Say(MESSAGE, target, text)] if text_lines(text) else []
    if kind in (MESSAGE, ACTION, NOTICE):
        body = message.get("body", message.get("text"))
        if not isinstance(body, str):
            raise InvalidReply(f"a {kind} needs 'body' as str, not {type(body).__name__}")
        return [Say(kind, target, body)] if text_lines(body) else []
    if kind == "join":
        key = message.get("key", "")
        try:
            (spec,) = parse_channels([{"name": target, "key": key}])
        except ValueError as exc:
            raise InvalidReply(str(exc)) from None
        return [Join(spec)]
    if kind == "part":
        problem = channel_problem(target)
        reason = message.get("body", "")
        if problem:
            raise InvalidReply(problem)
        if not isinstance(reason, str):
            raise InvalidReply(f"a part's 'body' (the reason) must be str, not {type(reason).__name__}")
        return [Part(target, reason)]
    raise InvalidReply(f"unknown type {kind!r}: use message, action, notice, join or part")
