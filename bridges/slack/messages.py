"""Slack <-> channel messages, with no I/O: no aiohttp, no slack-sdk clients, no asyncio, no layer.

This module owns everything about the Slack bridge that can be decided without
a socket: which events become ``slack.receive`` (never our own posts, edits and
hidden subtypes as docs/spec/slack.md says), Slack's mrkdwn made readable for
``text`` with a names lookup the caller passes in, escaping and splitting what
we post, the stable reply channels per channel and per thread, judging what a
consumer sends on them, slash commands, and the small state machines the
bridge keeps (the ``event_id`` repeat window, the per-channel rate limiter, the
bounded names cache), each given ``now`` rather than reading a clock.
``bridge.py`` feeds it and carries out what it returns; docs/spec/slack.md is
its contract.

Inputs are Slack's own JSON (an Events API ``event_callback`` payload, the
``payload`` of a Socket Mode envelope, a slash command's fields): anything that
does not have the shape Slack documents raises ``BadInput``, which the bridge
logs, counts and acknowledges, since Slack would only send it again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import orjson

from crossroads.bridges.protocol import TokenBucket, shared_keys

PROTOCOL = "slack"
RECEIVE, COMMAND = "slack.receive", "slack.command"
CONNECT, DISCONNECT = "slack.connect", "slack.disconnect"

TEXT_LIMIT = 40_000  # Slack truncates a message's text beyond this (api.slack.com changelog, 2018-04)
SPLIT_AT = 4_000  # the default piece: Slack's own clients split there, and it reads better than 40,000
THREADING = ("auto", "always", "never")

# Subtypes a person (or another app) wrote and we deliver; every other subtype is Slack's own
# bookkeeping (joins, topics, deletions, "message_replied"...) and is skipped. message_changed is
# an edit, handled on its own.
DELIVERED_SUBTYPES = frozenset({None, "file_share", "thread_broadcast", "me_message", "bot_message"})
FILE_KEYS = ("id", "name", "mimetype", "size", "url_private")

_CONTROL = re.compile(r"<([^<>]*)>")
_TS = re.compile(r"^\d+\.\d+$")
_LOCAL_SAFE = re.compile(r"[A-Za-z0-9-]")
LOCAL_ID_LIMIT = 60  # leaves room for the ``slack.{bridge}.{random}!`` prefix in a 99-character name


class BadInput(ValueError):
    """An event, envelope or payload without the shape Slack documents: logged, counted and acknowledged."""


class InvalidReply(ValueError):
    """What a consumer sent on a reply channel cannot be posted: ignored with a log line and a counter."""


@dataclass(frozen=True)
class Identity:
    """Who we are in the workspace, from ``auth.test``: posts by either id are ours and never come back as input."""

    user_id: str
    bot_id: str = ""
    team: str = ""


Lookup = Callable[[str], "str | None"]  # an id to its name, None when unknown (a lookup never blocks an event)


def _no_name(_id: str) -> None:
    return None


# -- text: Slack's mrkdwn in and out -------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Plain text as Slack must receive it: ``&``, ``<`` and ``>`` as entities, nothing else (no control sequence)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _unentity(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def readable(body: str, users: Lookup = _no_name, channels: Lookup = _no_name) -> str:
    """Slack's message text as a person reads it: ``<@U1>`` as ``@name``, ``<#C1|general>`` as ``#general``,
    ``<!here>`` as ``@here``, ``<http://x|label>`` as ``label (http://x)``, entities decoded.

    ``users`` and ``channels`` give a name for an id, or None: then the label
    Slack sent, else the id itself, is shown.
    """
    if "<" not in body and "&" not in body:  # most messages: nothing to make readable
        return body

    def control(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            return "@" + (users(target[1:]) or label or target[1:])
        if target.startswith("#"):
            return "#" + (label or channels(target[1:]) or target[1:])
        if target.startswith("!"):
            special = target[1:]
            if special in ("here", "channel", "everyone"):
                return "@" + special
            if special.startswith("subteam^"):
                return label or "@" + special.partition("^")[2]
            return label or special  # <!date^...|fallback> and whatever Slack adds next
        url = _unentity(target)
        label = _unentity(label)
        shown = url.removeprefix("mailto:")
        if not label or label in (url, shown, url.partition("://")[2]):
            return label or shown
        return f"{label} ({shown})"

    return _unentity(_CONTROL.sub(control, body))


def mentions(body: str, user_id: str) -> bool:
    """Whether Slack's text @-mentions ``user_id`` (``<@U1>`` or ``<@U1|name>``)."""
    return "<@" in body and (f"<@{user_id}>" in body or f"<@{user_id}|" in body)


def split_text(text: str, limit: int = SPLIT_AT) -> list[str]:
    """``text`` escaped and cut into posts of at most ``limit`` characters *as sent*, on line boundaries.

    A line longer than ``limit`` is cut at its last space that fits, else at
    ``limit``; an entity (``&amp;``) is never cut in half. ``limit`` is capped at
    Slack's 40,000. Empty text gives one empty post (Slack refuses it: the
    caller's check, see ``parse_reply``).
    """
    limit = min(limit, TEXT_LIMIT)
    escaped = escape(text)
    if len(escaped) <= limit:  # most replies: one post, what the loop below would give (escape keeps the lines)
        return [escaped] if escaped.strip() else [""]
    posts: list[str] = []
    current: str | None = None
    for line in text.split("\n"):
        line = escape(line)
        joined = line if current is None else f"{current}\n{line}"
        if len(joined) <= limit:
            current = joined
            continue
        if current is not None:
            posts.append(current)
        while len(line) > limit:
            cut = _cut_point(line, limit)
            posts.append(line[:cut].rstrip(" "))
            line = line[cut:].lstrip(" ")
        current = line
    posts.append(current or "")
    return [post for post in posts if post.strip()] or [""]


def _cut_point(line: str, limit: int) -> int:
    """Where to cut an escaped line longer than ``limit``: after its last space that fits, never inside an entity."""
    space = line.rfind(" ", 0, limit + 1)
    if space > limit // 2:
        return space + 1
    amp = line.rfind("&", max(0, limit - 4), limit)
    if amp > 0 and line.find(";", amp) >= limit:
        return amp
    return limit  # under 5 characters an entity cannot fit whole: it is cut


# -- reply channels ------------------------------------------------------------------------------------------------


def _safe(part: str) -> str:
    if part.isascii() and part.replace("-", "").isalnum():  # Slack's ids always are: no look at each character
        return part
    return "".join(ch if _LOCAL_SAFE.fullmatch(ch) else "".join(f"_{b:02x}" for b in ch.encode()) for ch in part)


def _unsafe(part: str) -> str:
    return re.sub(r"(?:_[0-9a-f]{2})+", lambda m: bytes.fromhex(m.group(0).replace("_", "")).decode(), part)


def channel_local_id(channel: str) -> str:
    """The local id of a Slack channel's reply channel: ``c.`` and the id (``C0123``: ``c.C0123``), stable."""
    return "c." + _safe(channel)


def thread_local_id(channel: str, thread_ts: str) -> str:
    """The local id of a thread's reply channel: ``t.{channel}.{thread_ts}`` (``t.C0123.1610241741.000200``)."""
    if not _TS.match(thread_ts):
        raise BadInput(f"thread_ts {thread_ts!r} is not a Slack timestamp (digits.digits)")
    return f"t.{_safe(channel)}.{thread_ts}"


def command_local_id(trigger_id: str) -> str:
    """The local id of one slash command's reply channel: ``k.`` and a hash of its ``trigger_id`` (one per command)."""
    return "k." + hashlib.sha256(trigger_id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Target:
    """Where a reply channel's posts go: a channel, and a thread in it or none."""

    channel: str
    thread_ts: str | None = None


def target_of(local_id: str) -> Target:
    """The channel (and thread) a channel or thread local id names; ValueError for any other."""
    kind, _, rest = local_id.partition(".")
    if kind == "c" and rest:
        return Target(_unsafe(rest))
    if kind == "t":
        channel, _, ts = rest.partition(".")
        if channel and _TS.match(ts):
            return Target(_unsafe(channel), ts)
    raise ValueError(f"{local_id!r} is not a Slack channel or thread reply id")


def reply_local_id(channel: str, ts: str, thread_ts: str | None, threading: str = "auto") -> str:
    """The reply channel a message gets, by the ``threading`` option.

    ``auto``: in a thread, the thread's; elsewhere the channel's. ``always``:
    every message's thread (its own ``ts`` when it starts none), so replies
    open threads. ``never``: always the channel's.
    """
    if threading == "never":
        return channel_local_id(channel)
    if thread_ts:
        return thread_local_id(channel, thread_ts)
    return thread_local_id(channel, ts) if threading == "always" else channel_local_id(channel)


# -- events in -----------------------------------------------------------------------------------------------------


def parse_json(raw: str | bytes) -> Any:
    """JSON as ``json.loads`` reads it, through orjson when it can (a Socket Mode envelope: ~2.7x faster).

    What orjson refuses and ``json`` reads (NaN, Infinity, lone surrogates, UTF-16 bytes) goes to ``json``, so
    the same text parses; the one difference left is that orjson reads an integer beyond 64 bits as a float (no
    field Slack sends is one). ``ValueError`` (``UnicodeDecodeError`` among them) when neither can read it.
    """
    try:
        return orjson.loads(raw)
    except ValueError:  # orjson.JSONDecodeError is one
        return json.loads(raw)


def _str(mapping: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = mapping.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadInput(f"{where} has no {key!r} string")
    return value


def files_of(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The files of a message, as metadata only (the bridge never downloads them)."""
    files = event.get("files")
    if not files:
        return []
    if not isinstance(files, list):
        raise BadInput("the message's 'files' is not a list")
    return [{key: item.get(key) for key in FILE_KEYS} for item in files if isinstance(item, dict)]


@dataclass(frozen=True)
class Skip:
    """An event that makes no message, and why: the counter it goes in (``own``, ``hidden``, ``unfurl``, ...)."""

    reason: str


def event_message(payload: dict[str, Any], me: Identity, bridge: str, reply_prefix: str, *,
                  users: Lookup = _no_name, channels: Lookup = _no_name, threading: str = "auto",
                  retry_attempt: int = 0) -> dict[str, Any] | Skip:
    """The ``slack.receive`` for one Events API ``event_callback`` payload, or why it makes none.

    ``reply_prefix`` is the bridge's reply channel name up to its local id
    (``slack.work.Xy3!``). ``users``/``channels`` are the names cache's lookups.

    Called for every event: the checks of a well-formed post are inline (a
    helper call per field was a tenth of its cost), and the message is one
    dict literal.
    """
    if not isinstance(payload, dict) or payload.get("type") != "event_callback":
        raise BadInput("not an event_callback payload")
    event = payload.get("event")
    if not isinstance(event, dict):
        raise BadInput("the event_callback has no 'event' object")
    event_id = payload.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise BadInput("the event_callback has no 'event_id' string")
    kind = event.get("type")
    if kind != "message" and kind != "app_mention":
        return Skip("other event")
    subtype = event.get("subtype")
    edited = subtype == "message_changed"
    post = event
    if edited:
        post = event.get("message")
        if not isinstance(post, dict):
            raise BadInput("a message_changed event has no 'message' object")
        before = event.get("previous_message") or {}
        if isinstance(before, dict) and before.get("text") == post.get("text"):
            return Skip("unfurl")  # Slack added a link preview or reply count: nobody said anything new
        subtype = post.get("subtype")
    elif event.get("hidden") or subtype not in DELIVERED_SUBTYPES:
        return Skip("hidden")
    if subtype not in DELIVERED_SUBTYPES:
        return Skip("hidden")
    user = post.get("user")
    bot_id = post.get("bot_id")
    if (user and user == me.user_id) or (bot_id and bot_id == me.bot_id):
        return Skip("own")
    channel = event.get("channel")
    if not isinstance(channel, str) or not channel:
        raise BadInput(f"the {kind} event has no 'channel' string")
    ts = post.get("ts")
    if not isinstance(ts, str) or not ts:
        raise BadInput(f"the {kind} event has no 'ts' string")
    thread_ts = post.get("thread_ts")
    if thread_ts is not None and not isinstance(thread_ts, str):
        raise BadInput(f"the {kind} event has no 'thread_ts' string")
    body = post.get("text") or ""
    if not isinstance(body, str):
        raise BadInput(f"the {kind} event's 'text' is not a string")
    if isinstance(user, str):
        author = user
        user_name = users(user)
    elif isinstance(bot_id, str):
        author = bot_id
        user_name = post.get("username") or None
    else:
        raise BadInput(f"the {kind} event names no 'user' or 'bot_id'")
    channel_name = channels(channel)
    channel_type = event.get("channel_type")
    shared = shared_keys(PROTOCOL, user_name or author, channel_name or channel, readable(body, users, channels))
    return {
        "reply_channel": reply_prefix + reply_local_id(channel, ts, thread_ts, threading),
        "team": payload.get("team_id") or event.get("team") or me.team,
        "channel": channel, "channel_type": channel_type, "user": author, "bot_id": bot_id,
        "ts": ts, "thread_ts": thread_ts, "event_id": event_id, "event_ts": event.get("event_ts"),
        "type": kind, "subtype": subtype, "edited": edited, "body": body,
        "files": files_of(post) if "files" in post else [],
        "user_name": user_name, "channel_name": channel_name,
        "mentioned": kind == "app_mention" or mentions(body, me.user_id), "private": channel_type == "im",
        "retry_attempt": retry_attempt, "network": bridge, **shared,
    }


def repeat_keys(payload: dict[str, Any]) -> list[str]:
    """The keys that make an event a repeat: its ``event_id``, and for a post its ``channel`` and ``ts``.

    Slack sends one post twice by design when both ``message`` and
    ``app_mention`` are subscribed, under two event ids: the second key catches
    that. An edit has its own ``ts`` (the event's), so it is not a repeat of its post.
    """
    keys = [f"event:{payload.get('event_id')}"]
    event = payload.get("event") or {}
    if isinstance(event, dict) and event.get("channel") and event.get("ts"):
        keys.append(f"post:{event['channel']}:{event['ts']}")
    return keys


def command_fields(body: bytes) -> dict[str, Any]:
    """A slash command's fields from the Events API's form-encoded body (Socket Mode sends the same as JSON)."""
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)))
    except (UnicodeDecodeError, ValueError):
        raise BadInput("a slash command body that is not form-encoded UTF-8") from None


@dataclass(frozen=True)
class EventsRequest:
    """What an Events API POST (its signature already checked) asks for.

    ``kind`` is ``url_verification`` (answer ``challenge``), ``ssl_check``
    (answer 200), ``app_rate_limited`` (Slack dropped events of ours: log it,
    answer 200), ``event`` (``payload`` is the ``event_callback``) or
    ``command`` (``payload`` is the slash command's fields).
    """

    kind: str
    payload: dict[str, Any]
    challenge: str = ""


def parse_events_request(body: bytes, content_type: str) -> EventsRequest:
    """Read an Events API request body: JSON for events, form-encoded for slash commands; ``BadInput`` otherwise."""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        fields = command_fields(body)
        if fields.get("ssl_check") == "1":
            return EventsRequest("ssl_check", fields)
        return EventsRequest("command", fields)
    try:
        payload = parse_json(body)
    except ValueError:  # UnicodeDecodeError is one
        raise BadInput("an Events API body that is not JSON") from None
    if not isinstance(payload, dict):
        raise BadInput("an Events API body that is not a JSON object")
    if payload.get("type") == "url_verification":
        challenge = payload.get("challenge")
        if not isinstance(challenge, str):
            raise BadInput("a url_verification without a 'challenge' string")
        return EventsRequest("url_verification", payload, challenge)
    if payload.get("type") == "app_rate_limited":
        return EventsRequest("app_rate_limited", payload)
    if payload.get("type") != "event_callback":
        raise BadInput(f"an Events API request of unknown type {payload.get('type')!r}")
    return EventsRequest("event", payload)


def command_message(payload: dict[str, Any], bridge: str, reply_prefix: str, *, users: Lookup = _no_name,
                    channels: Lookup = _no_name, retry_attempt: int = 0) -> dict[str, Any]:
    """The ``slack.command`` for a slash command's fields (a ``slash_commands`` envelope's payload)."""
    if not isinstance(payload, dict):
        raise BadInput("a slash command payload that is not an object")
    command = _str(payload, "command", "the slash command")
    if not command.startswith("/"):
        raise BadInput(f"slash command {command!r} does not start with '/'")
    trigger_id = _str(payload, "trigger_id", "the slash command")
    user = _str(payload, "user_id", "the slash command")
    channel = _str(payload, "channel_id", "the slash command")
    text = payload.get("text") or ""
    if not isinstance(text, str):
        raise BadInput("the slash command's 'text' is not a string")
    user_name = users(user) or payload.get("user_name") or None
    channel_name = channels(channel) or payload.get("channel_name") or None
    message = {
        "reply_channel": reply_prefix + command_local_id(trigger_id),
        "command": command, "body": text, "team": payload.get("team_id"), "channel": channel, "user": user,
        "user_name": user_name, "channel_name": channel_name, "trigger_id": trigger_id,
        "response_url": payload.get("response_url"), "retry_attempt": retry_attempt, "network": bridge,
    }
    message.update(shared_keys(PROTOCOL, user_name or user, channel_name or channel, readable(text, users, channels)))
    return message


def connect_message(bridge: str, me: Identity, transport: str, url: str) -> dict[str, Any]:
    """``slack.connect``: the link is up (Socket Mode's ``hello``, or the Events API listener is serving)."""
    return {"bridge": bridge, "team": me.team, "user": me.user_id, "bot_id": me.bot_id, "transport": transport,
            "url": url, **shared_keys(PROTOCOL, me.user_id, None, None)}


def disconnect_message(bridge: str, me: Identity, transport: str, reason: str) -> dict[str, Any]:
    """``slack.disconnect``: an established link went down (or the bridge stopped)."""
    return {"bridge": bridge, "team": me.team, "user": me.user_id, "bot_id": me.bot_id, "transport": transport,
            "reason": reason, **shared_keys(PROTOCOL, me.user_id, None, None)}


# -- replies -------------------------------------------------------------------------------------------------------

POST, EPHEMERAL, REACTION, UPDATE = "message", "ephemeral", "reaction", "update"
_REPLY_KEYS = {
    POST: {"type", "text", "mrkdwn", "blocks", "thread", "thread_ts", "broadcast", "unfurl"},
    EPHEMERAL: {"type", "text", "mrkdwn", "blocks", "user", "thread", "thread_ts"},
    REACTION: {"type", "name", "ts"},
    UPDATE: {"type", "text", "mrkdwn", "blocks", "ts"},
}
_COMMAND_KEYS = {"text", "mrkdwn", "blocks", "response_type"}
_EMOJI = re.compile(r"^[a-z0-9_+'\-]+(::skin-tone-[2-6])?$")


class Reply(NamedTuple):
    """One reply, judged: what to call and with what. ``texts`` are the posts, already escaped and split.

    A NamedTuple, not a frozen dataclass: one is made per reply, and a frozen dataclass's ``__init__`` sets each of
    its ten fields through ``object.__setattr__`` (~2x the cost of the rest of ``parse_reply``).
    """

    kind: str
    texts: tuple[str, ...] = ()
    blocks: tuple[dict[str, Any], ...] | None = None
    thread_ts: str | None = None
    broadcast: bool = False
    user: str | None = None  # ephemeral: who sees it
    name: str | None = None  # reaction: the emoji
    ts: str | None = None  # reaction, update: the message
    unfurl: bool = True
    response_type: str | None = None  # a slash command's answer: "ephemeral" or "in_channel"


def _body(content: dict[str, Any], limit: int, *, split: bool = True) -> tuple[tuple[str, ...], tuple | None]:
    text, mrkdwn, blocks = content.get("text"), content.get("mrkdwn"), content.get("blocks")
    if text is not None and mrkdwn is not None:
        raise InvalidReply("give 'text' (plain, escaped for you) or 'mrkdwn' (sent as written), not both")
    for key, value in (("text", text), ("mrkdwn", mrkdwn)):
        if value is not None and not isinstance(value, str):
            raise InvalidReply(f"{key!r} must be a string, not {type(value).__name__}")
    if blocks is not None and (not isinstance(blocks, list) or not blocks
                               or not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks)):
        raise InvalidReply("'blocks' must be a non-empty list of Block Kit objects, each with a 'type'")
    if blocks is None and not (text or mrkdwn):
        raise InvalidReply("nothing to post: give a non-empty 'text', 'mrkdwn' or 'blocks'")
    if mrkdwn is not None:
        if len(mrkdwn) > TEXT_LIMIT:
            raise InvalidReply(f"'mrkdwn' is {len(mrkdwn)} characters: Slack keeps at most {TEXT_LIMIT}")
        texts: tuple[str, ...] = (mrkdwn,)
    elif text:
        pieces = split_text(text, limit)
        if not split and len(pieces) > 1:
            raise InvalidReply(f"'text' is too long for one message ({len(escape(text))} characters escaped)")
        texts = tuple(pieces)
    else:
        texts = ("",)
    if blocks is not None and len(texts) > 1:
        raise InvalidReply("a reply with 'blocks' is one message: its 'text' fallback must fit in one")
    return texts, (tuple(blocks) if blocks is not None else None)


def plain_posts(content: Any, limit: int = SPLIT_AT) -> list[str] | None:
    """The posts of the common reply, ``{"text": "..."}`` alone, as ``parse_reply`` judges it (a post to the reply
    channel's thread, if any, these its ``texts``), with no ``Reply`` built; None for any other reply.

    Why: the bridge posts such a reply from this alone, and a ``Reply`` (a NamedTuple's ``__new__``, in Python,
    with keywords) and its fields read back cost about as much as the rest of judging it.
    """
    if type(content) is dict and len(content) == 1:  # what the checks of parse_reply give for it (a test holds it)
        text = content.get("text")
        if type(text) is str and text:
            return split_text(text, limit)
    return None


def parse_reply(content: Any, target: Target, *, limit: int = SPLIT_AT) -> Reply:
    """Judge what a consumer sent on a channel or thread reply channel; ``InvalidReply`` says what is wrong."""
    texts = plain_posts(content, limit)
    if texts is not None:
        return Reply(POST, tuple(texts), thread_ts=target.thread_ts)
    if not isinstance(content, dict):
        raise InvalidReply(f"a reply must be a dict, not {type(content).__name__}")
    kind = content.get("type", EPHEMERAL if "user" in content else POST)
    if kind not in _REPLY_KEYS:
        raise InvalidReply(f"unknown reply type {kind!r}: one of {', '.join(_REPLY_KEYS)}")
    unknown = sorted(set(content) - _REPLY_KEYS[kind])
    if unknown:
        raise InvalidReply(f"unknown keys for a {kind!r} reply: {', '.join(map(repr, unknown))}")
    ts = content.get("ts")
    if kind in (REACTION, UPDATE) and not (isinstance(ts, str) and _TS.match(ts)):
        raise InvalidReply(f"a {kind!r} reply needs 'ts', the Slack timestamp of the message")
    if kind == REACTION:
        name = content.get("name")
        if not isinstance(name, str) or not _EMOJI.match(name.strip(":")):
            raise InvalidReply("a 'reaction' needs 'name', an emoji name such as 'thumbsup'")
        return Reply(REACTION, name=name.strip(":"), ts=ts)
    texts, blocks = _body(content, limit, split=kind == POST)
    if kind == UPDATE:
        return Reply(UPDATE, texts, blocks, ts=ts)
    thread_ts = _thread(content, target)
    if kind == EPHEMERAL:
        user = content.get("user")
        if not isinstance(user, str) or not user:
            raise InvalidReply("an 'ephemeral' reply needs 'user', the id of who sees it")
        return Reply(EPHEMERAL, texts, blocks, thread_ts=thread_ts, user=user)
    for key in ("broadcast", "unfurl"):
        if not isinstance(content.get(key, False), bool):
            raise InvalidReply(f"{key!r} must be true or false")
    broadcast = content.get("broadcast", False)
    if broadcast and not thread_ts:
        raise InvalidReply("'broadcast' shows a thread reply in the channel too: this reply goes in no thread")
    return Reply(POST, texts, blocks, thread_ts=thread_ts, broadcast=broadcast, unfurl=content.get("unfurl", True))


def _thread(content: dict[str, Any], target: Target) -> str | None:
    thread, thread_ts = content.get("thread", True), content.get("thread_ts")
    if not isinstance(thread, bool):
        raise InvalidReply("'thread' must be true or false")
    if thread_ts is not None:
        if not isinstance(thread_ts, str) or not _TS.match(thread_ts):
            raise InvalidReply("'thread_ts' must be a Slack timestamp such as '1610241741.000200'")
        return thread_ts
    return target.thread_ts if thread else None


def parse_command_reply(content: Any) -> Reply:
    """Judge a consumer's answer to a slash command: ``text``/``mrkdwn``/``blocks`` and ``response_type``."""
    if not isinstance(content, dict):
        raise InvalidReply(f"a reply must be a dict, not {type(content).__name__}")
    unknown = sorted(set(content) - _COMMAND_KEYS)
    if unknown:
        raise InvalidReply(f"unknown keys for a slash command's answer: {', '.join(map(repr, unknown))}")
    response_type = content.get("response_type", "ephemeral")
    if response_type not in ("ephemeral", "in_channel"):
        raise InvalidReply("'response_type' must be 'ephemeral' (only the user sees it) or 'in_channel'")
    texts, blocks = _body(content, TEXT_LIMIT, split=False)
    return Reply(POST, texts, blocks, response_type=response_type)


# -- state the bridge keeps, given now -----------------------------------------------------------------------------


class RepeatWindow:
    """The keys (``repeat_keys``) of events the layer accepted in the last ``window`` seconds, at most ``size``.

    ``seen`` asks; ``remember`` records once the layer took the message, so an
    event the layer refused is not a repeat when Slack sends it again.

    Why a dict and a deque of what each ``remember`` recorded, and not an
    OrderedDict moved on every key: an event costs one dict store per key and
    one append; expiry pops whole entries off the old end, and a key
    remembered again since is left (its newer time in the dict says so).
    """

    def __init__(self, window: float, size: int = 100_000) -> None:
        self.window, self.size = window, size
        self._at: dict[str, float] = {}  # key -> when it was last remembered
        self._order: deque[tuple[float, list[str]]] = deque()  # (when, keys) of each remember, oldest first

    def _expire(self, now: float) -> None:
        at, order, oldest = self._at, self._order, now - self.window
        while order and (order[0][0] <= oldest or len(at) > self.size):
            when, keys = order.popleft()
            for key in keys:
                if at.get(key) == when:  # not remembered again since
                    del at[key]

    def seen(self, keys: list[str], now: float) -> bool:
        order = self._order
        if order and order[0][0] <= now - self.window:
            self._expire(now)
        at = self._at
        for key in keys:  # asked once per event: a loop, not any() over a generator
            if key in at:
                return True
        return False

    def remember(self, keys: list[str], now: float) -> None:
        self.remember_all([keys], now)

    def remember_all(self, key_lists: list[list[str]], now: float) -> None:
        """``remember`` for several events at once (what one layer call stored: the bridge's way), in order."""
        at = self._at
        for keys in key_lists:
            for key in keys:
                at[key] = now
        self._order.extend([(now, keys) for keys in key_lists])
        if len(at) > self.size:  # the window's age is checked by ``seen``, which the bridge asks first
            self._expire(now)

    def __len__(self) -> int:
        return len(self._at)


class ChannelLimiter:
    """About ``rate`` posts a second per channel with bursts of ``burst``, and each channel's ``Retry-After``.

    Slack allows "one message per second per channel" and answers more with a
    429 and ``Retry-After``: that channel waits, the others go on. Buckets of
    channels idle long enough to be full again are forgotten, so memory stays
    bounded by the channels that posted in the last ``burst / rate`` seconds.
    """

    KEEP_IDLE = 1000  # buckets held before a post first forgets the idle ones

    def __init__(self, rate: float = 1.0, burst: int = 3) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, TokenBucket] = {}
        self._held: dict[str, float] = {}

    def wait(self, channel: str, now: float) -> float:
        """Seconds until ``channel`` may post (0: now)."""
        held = self._held.get(channel, 0.0) - now
        if held <= 0:
            self._held.pop(channel, None)
        bucket = self._buckets.get(channel)
        return max(held, bucket.wait(now) if bucket else 0.0, 0.0)

    def take(self, channel: str, now: float) -> None:
        """``channel`` posts now."""
        if len(self._buckets) > self.KEEP_IDLE:
            self._forget_idle(now)
        bucket = self._buckets.get(channel)
        if bucket is None:  # not setdefault: it would build a bucket on every post
            bucket = self._buckets[channel] = TokenBucket(self.rate, self.burst, now)
        bucket.take(now)

    def claim(self, channel: str, now: float) -> float:
        """``take`` when ``channel`` may post now (0), else the seconds ``wait`` gives, nothing taken: one call per
        post where ``wait`` then ``take`` refilled the bucket twice."""
        if self._held:  # a 429 is being honoured somewhere: the full check
            wait = self.wait(channel, now)
            if wait > 0:
                return wait
        bucket = self._buckets.get(channel)
        if bucket is not None and len(self._buckets) <= self.KEEP_IDLE:
            return bucket.claim(now)
        wait = self.wait(channel, now)
        if wait > 0:
            return wait
        self.take(channel, now)  # a new bucket, or idle ones to forget first
        return 0.0

    def retry_after(self, channel: str, seconds: float, now: float) -> None:
        """Slack answered 429 for ``channel``: nothing more goes there for ``seconds``."""
        self._held[channel] = max(self._held.get(channel, 0.0), now + max(seconds, 0.0))

    def _forget_idle(self, now: float) -> None:
        for channel in [c for c, b in self._buckets.items() if b.wait(now) == 0 and b.tokens >= b.burst]:
            del self._buckets[channel]


class NamesCache:
    """A bounded LRU of ids to names (``users.info``, ``conversations.info``), each kept ``max_age`` seconds.

    ``get`` answers None for an id it does not hold or holds too long: the
    bridge then delivers the event with the id and looks the name up for the
    next one, so a slow or failing lookup never holds an event back.
    """

    def __init__(self, size: int = 10_000, max_age: float = 3600.0) -> None:
        self.size, self.max_age = size, max_age
        self._names: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str, now: float) -> str | None:
        held = self._names.get(key)
        if held is None:
            return None
        if held[1] <= now - self.max_age:
            del self._names[key]
            return None
        self._names.move_to_end(key)
        return held[0]

    def put(self, key: str, name: str, now: float) -> None:
        self._names[key] = (name, now)
        self._names.move_to_end(key)
        while len(self._names) > self.size:
            self._names.popitem(last=False)

    def __len__(self) -> int:
        return len(self._names)
