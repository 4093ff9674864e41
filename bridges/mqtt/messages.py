"""MQTT <-> channel messages, with no sockets, no paho and no reactor.

This module owns the meaning of everything the MQTT bridge exchanges with
consumers: the broker URL and subscription options, topic and topic-filter
rules (MQTT 5 section 4.7), the ``mqtt.receive`` / ``mqtt.connect`` /
``mqtt.disconnect`` messages, the stable reply channel of a topic, what a
reply or an ``mqtt.publish`` message asks to publish and where, and the
bounded queue of publishes waiting for the broker. It must not touch sockets,
paho or the reactor: ``bridge.py`` feeds it plain values and performs the
``Publish`` objects it returns. docs/spec/mqtt.md is its contract.

Two rules run through it. Every message to the layer is built here, so its
keys and types are the spec's in one place. And every reply or publish request
is judged here: a valid one becomes one ``Publish``; an invalid one raises
``InvalidReply`` (or ``RefusedTopic`` for a topic outside the allow-list) and
publishes nothing, so a consumer's mistake is logged and counted by the
bridge, never performed half way.

Where a reply goes, in order of preference: the reply's own ``topic`` (which
must match the allow-list, because a consumer chose it); the MQTT 5 response
topic of the message replied to, with its correlation data echoed (the
requester chose it); the configured ``reply_topic`` template (the operator
chose it). Nothing left is an ``InvalidReply``.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from crossroads.bridges.protocol import each, problem_of, split_url

PROTOCOL = "mqtt"
RECEIVE, PUBLISH = "mqtt.receive", "mqtt.publish"
CONNECT, DISCONNECT = "mqtt.connect", "mqtt.disconnect"

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MAX_TOPIC_BYTES = 65535  # a topic is a UTF-8 string with a 16-bit length (MQTT 5 section 1.5.4)
PROTOCOL_VERSIONS = {"5": 5, "3.1.1": 4}  # option value -> the protocol level in CONNECT

# The MQTT 5 properties crossroads passes through, message key -> type. Others are the broker's business.
PROPERTY_TYPES: dict[str, type | tuple[type, ...]] = {
    "response_topic": str,
    "correlation_data": bytes,
    "content_type": str,
    "user_properties": list,
    "payload_format": int,
    "message_expiry": int,
}


class InvalidReply(ValueError):
    """A reply or ``mqtt.publish`` message that cannot be published; nothing was published."""


class RefusedTopic(InvalidReply):
    """A consumer named a topic the ``allow_publish`` filters do not match."""


# -- the broker and the options ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str = ""  # from the URL's user part, if any (the options take precedence)
    password: str = ""

    def __str__(self) -> str:
        return f"broker {'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str) -> Broker:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` (IPv6 in brackets); raises ValueError saying what is wrong.

    The messages leave the URL out: the option check that reports them quotes the value itself.
    """
    parts = split_url(url, DEFAULT_PORTS, shape="mqtt://host:port or mqtts://host:port")
    if parts.more:
        raise ValueError("must not have a path, query or fragment")
    return Broker(parts.host, parts.port, parts.scheme == "mqtts", parts.username, parts.password)


check_broker = problem_of(parse_broker)


def protocol_level(value: str | int) -> int:
    """The ``protocol`` option (``5``, ``"5"`` or ``"3.1.1"``) as the CONNECT protocol level (5 or 4)."""
    level = PROTOCOL_VERSIONS.get(str(value))
    if level is None:
        raise ValueError(f"must be 5 or \"3.1.1\", not {value!r}")
    return level


check_protocol = problem_of(protocol_level)


# -- topics ------------------------------------------------------------------------------------------------


def check_topic(topic: Any) -> str | None:
    """Why ``topic`` cannot be published to (a problem in words), or None."""
    if not isinstance(topic, str):
        return f"a topic must be a string, not {type(topic).__name__}"
    if not topic:
        return "a topic must not be empty"
    if "+" in topic or "#" in topic:
        return f"topic {topic!r} has a wildcard ('+' or '#'): those are for subscriptions only"
    if "\x00" in topic:
        return "a topic must not contain NUL"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"a topic must be at most {MAX_TOPIC_BYTES} bytes of UTF-8"
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "a topic must be valid UTF-8 (it holds a lone surrogate)"
    return None


def check_topic_filter(topic_filter: Any) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or None."""
    if not isinstance(topic_filter, str):
        return f"a topic filter must be a string, not {type(topic_filter).__name__}"
    if not topic_filter:
        return "a topic filter must not be empty"
    if "\x00" in topic_filter:
        return "a topic filter must not contain NUL"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"a topic filter must be at most {MAX_TOPIC_BYTES} bytes of UTF-8"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"topic filter {topic_filter!r}: '#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return f"topic filter {topic_filter!r}: '+' must be a whole level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` by MQTT's rules.

    ``+`` matches one level, a final ``#`` the parent level and any below it;
    a leading wildcard does not match a topic starting with ``$`` (MQTT 5
    section 4.7.2: ``$SYS/...`` is not in ``#``).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels):
            # "a/#" matches "a": '#' covers the parent level too
            return i == len(levels) and wanted[i:] == ["#"]
        if level != "+" and level != levels[i]:
            return False
    return len(wanted) == len(levels)


def allowed(topic: str, filters: Iterable[str]) -> bool:
    return any(topic_matches(f, topic) for f in filters)


@dataclass(frozen=True)
class Subscription:
    topic: str  # a topic filter
    qos: int


def parse_subscriptions(entries: list) -> list[Subscription]:
    """The ``subscribe`` option: ``[{topic = "chat/#", qos = 1}, ...]`` (qos defaults to 0). Raises ValueError."""
    subscriptions = []
    seen = set()
    for entry in entries:
        if isinstance(entry, str):  # a bare filter is accepted as {topic = filter, qos = 0}
            entry = {"topic": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"entries must be tables like {{topic = \"chat/#\", qos = 1}}, not {entry!r}")
        unknown = set(entry) - {"topic", "qos"}
        if unknown:
            raise ValueError(f"entry {entry!r} has unknown keys {sorted(unknown)}: only topic and qos")
        topic, qos = entry.get("topic"), entry.get("qos", 0)
        problem = check_topic_filter(topic)
        if problem:
            raise ValueError(problem)
        if type(qos) is not int or qos not in (0, 1, 2):
            raise ValueError(f"qos of {topic!r} must be 0, 1 or 2, not {qos!r}")
        if topic in seen:
            raise ValueError(f"{topic!r} is subscribed twice")
        seen.add(topic)
        subscriptions.append(Subscription(topic, qos))
    return subscriptions


check_subscriptions = problem_of(parse_subscriptions)
check_topic_filters = each(check_topic_filter)


def render_reply_topic(template: str, topic: str) -> str:
    """The ``reply_topic`` template with ``{topic}`` replaced by the incoming topic (no other fields)."""
    return template.replace("{topic}", topic)


def check_reply_topic(template: str) -> str | None:
    if not template:
        return None
    problem = check_topic(render_reply_topic(template, "x"))
    return f"{problem} (only {{topic}} is replaced)" if problem else None


# -- incoming publishes --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Incoming:
    """One PUBLISH from the broker, as plain values (not frozen: a frozen dataclass is slow to make, and the
    bridge makes one per message)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int  # the packet identifier: 0 at QoS 0
    dup: bool  # the broker says it may have sent this one before
    properties: dict[str, Any] = field(default_factory=dict)  # PROPERTY_TYPES keys only


def sender_of(incoming: Incoming, sender_property: str, sender_level: int) -> str:
    """The shared ``sender`` key: the ``sender_property`` user property if the message has it, else the
    topic's level number ``sender_level`` (1-based; 0, or a topic with fewer levels, gives the whole topic)."""
    if sender_property:
        for name, value in incoming.properties.get("user_properties", ()):
            if name == sender_property:
                return value
    if sender_level:
        levels = incoming.topic.split("/")
        if sender_level <= len(levels) and levels[sender_level - 1]:
            return levels[sender_level - 1]
    return incoming.topic


def reply_id(topic: str, response_topic: str | None = None, correlation_data: bytes | None = None) -> str:
    """The local id of a reply channel: stable per topic, so it can sit in a Group.

    A request carrying an MQTT 5 response topic gets a channel of its own
    (topic, response topic and correlation data), so its reply reaches its
    requester with its correlation data. A hash keeps the id within the
    layer's characters and length whatever the topic holds.
    """
    if response_topic is None:
        return "t." + hashlib.blake2s(topic.encode(), digest_size=10).hexdigest()
    digest = hashlib.blake2s(topic.encode(), digest_size=10)
    digest.update(b"\x00" + response_topic.encode() + b"\x00" + (correlation_data or b""))
    return "r." + digest.hexdigest()


@dataclass(frozen=True)
class ReplyTarget:
    """Where replies on one reply channel go, unless they name their own topic."""

    topic: str  # the topic the message came on
    response_topic: str | None = None
    correlation_data: bytes | None = None


def target_of(incoming: Incoming) -> ReplyTarget:
    response_topic = incoming.properties.get("response_topic")
    if response_topic is not None and check_topic(response_topic) is not None:
        response_topic = None  # a response topic we could not publish to is ignored (the bridge logs it)
    if response_topic is None:
        return ReplyTarget(incoming.topic)
    return ReplyTarget(incoming.topic, response_topic, incoming.properties.get("correlation_data"))


def receive_message(incoming: Incoming, *, reply_channel: str, session: str, sender: str) -> dict[str, Any]:
    """The ``mqtt.receive`` message for ``incoming``.

    The shared keys (``protocol``, ``sender``, ``room``, ``text``: see
    ``bridges/protocol.shared_keys``) are written out here rather than merged in:
    this runs once per message of a flood, and the merge cost the bridge ~4% of
    its CPU per message (0.8 µs of ~20). tests/test_mqtt_messages.py holds them to
    ``shared_keys``.
    """
    payload = incoming.payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "reply_channel": reply_channel,
        "topic": incoming.topic,
        "payload": payload,
        "qos": incoming.qos,
        "retain": incoming.retain,
        "dup": incoming.dup,
        "mid": incoming.mid,
        "session": session,
        "properties": dict(incoming.properties),
        "protocol": PROTOCOL,
        "sender": sender,
        "room": incoming.topic,
        "text": text,
    }


def connect_message(*, bridge: str, broker: str, client_id: str, session_present: bool,
                    subscriptions: list[list[Any]]) -> dict[str, Any]:
    """``mqtt.connect``: the link to the broker is up and every subscription was made (again)."""
    return {"bridge": bridge, "broker": broker, "client_id": client_id, "session_present": session_present,
            "subscriptions": subscriptions, "protocol": PROTOCOL}


def disconnect_message(*, bridge: str, broker: str, client_id: str, reason: str) -> dict[str, Any]:
    """``mqtt.disconnect``: the link to the broker went down (the bridge is reconnecting unless stopping)."""
    return {"bridge": bridge, "broker": broker, "client_id": client_id, "reason": reason, "protocol": PROTOCOL}


# -- outgoing publishes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """One PUBLISH for the bridge to send."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict[str, Any] = field(default_factory=dict)  # PROPERTY_TYPES keys only


def check_properties(properties: Any) -> dict[str, Any]:
    """Validate a consumer's ``properties``; returns a copy. Raises InvalidReply."""
    if not isinstance(properties, dict):
        raise InvalidReply(f"properties must be a dict, not {type(properties).__name__}")
    checked: dict[str, Any] = {}
    for key, value in properties.items():
        wanted = PROPERTY_TYPES.get(key)
        if wanted is None:
            raise InvalidReply(f"unknown property {key!r}; known: {', '.join(PROPERTY_TYPES)}")
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise InvalidReply(f"property {key} must be {wanted.__name__}, not {type(value).__name__}")
        if key == "user_properties":
            pairs = []
            for pair in value:
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                    raise InvalidReply(f"user_properties must be [name, value] pairs of strings, not {pair!r}")
                pairs.append([pair[0], pair[1]])
            value = pairs
        elif key == "response_topic":
            problem = check_topic(value)
            if problem:
                raise InvalidReply(f"response_topic: {problem}")
        elif key == "payload_format" and value not in (0, 1):
            raise InvalidReply("payload_format must be 0 (bytes) or 1 (UTF-8 text)")
        elif key == "message_expiry" and not 0 <= value < 2**32:
            raise InvalidReply("message_expiry must be 0 to 4294967295 seconds")
        checked[key] = value
    return checked


def _payload_of(message: dict[str, Any]) -> bytes:
    has_text, has_payload = message.get("text") is not None, message.get("payload") is not None
    if has_text == has_payload:
        raise InvalidReply("give exactly one of text (str) and payload (bytes)")
    if has_text:
        if not isinstance(message["text"], str):
            raise InvalidReply(f"text must be str, not {type(message['text']).__name__}")
        try:
            return message["text"].encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidReply("text is not encodable as UTF-8 (a lone surrogate)") from None
    if not isinstance(message["payload"], (bytes, bytearray)):
        raise InvalidReply(f"payload must be bytes, not {type(message['payload']).__name__}")
    return bytes(message["payload"])


def _qos_retain(message: dict[str, Any], default_qos: int) -> tuple[int, bool]:
    qos, retain = message.get("qos", default_qos), message.get("retain", False)
    if type(qos) is not int or qos not in (0, 1, 2):
        raise InvalidReply(f"qos must be 0, 1 or 2, not {qos!r}")
    if not isinstance(retain, bool):
        raise InvalidReply(f"retain must be true or false, not {retain!r}")
    return qos, retain


def _consumer_topic(topic: Any, allow_publish: Iterable[str]) -> str:
    problem = check_topic(topic)
    if problem:
        raise InvalidReply(problem)
    if not allowed(topic, allow_publish):
        raise RefusedTopic(f"topic {topic!r} is not in allow_publish")
    return topic


_REPLY_KEYS = {"text", "payload", "topic", "qos", "retain", "properties"}


def interpret_reply(reply: Any, target: ReplyTarget, *, reply_topic: str, allow_publish: Iterable[str],
                    default_qos: int) -> Publish:
    """What a reply on a topic's reply channel publishes (see the module docstring for where)."""
    if not isinstance(reply, dict):
        raise InvalidReply(f"a reply must be a dict, not {type(reply).__name__}")
    unknown = set(reply) - _REPLY_KEYS
    if unknown:
        raise InvalidReply(f"unknown reply keys {sorted(unknown)}; known: {', '.join(sorted(_REPLY_KEYS))}")
    payload = _payload_of(reply)
    qos, retain = _qos_retain(reply, default_qos)
    properties = check_properties(reply.get("properties", {}))
    if reply.get("topic") is not None:
        topic = _consumer_topic(reply["topic"], allow_publish)
    elif target.response_topic is not None:
        topic = target.response_topic
        if target.correlation_data is not None:
            properties.setdefault("correlation_data", target.correlation_data)
    elif reply_topic:
        topic = render_reply_topic(reply_topic, target.topic)
        problem = check_topic(topic)
        if problem:
            raise InvalidReply(f"reply_topic for {target.topic!r}: {problem}")
    else:
        raise InvalidReply(f"nowhere to publish a reply to {target.topic!r}: the reply names no topic, the message "
                           "had no response topic, and the bridge has no reply_topic")
    return Publish(topic, payload, qos, retain, properties)


_PUBLISH_KEYS = {"text", "payload", "topic", "qos", "retain", "properties"}


def interpret_publish(message: Any, *, allow_publish: Iterable[str], default_qos: int) -> Publish:
    """What an ``mqtt.publish`` message publishes: its ``topic`` is required and must be allowed."""
    if not isinstance(message, dict):
        raise InvalidReply(f"an mqtt.publish message must be a dict, not {type(message).__name__}")
    unknown = set(message) - _PUBLISH_KEYS - {"reply_channel"}
    if unknown:
        raise InvalidReply(f"unknown keys {sorted(unknown)}; known: {', '.join(sorted(_PUBLISH_KEYS))}")
    if message.get("topic") is None:
        raise InvalidReply("an mqtt.publish message needs a topic")
    topic = _consumer_topic(message["topic"], allow_publish)
    payload = _payload_of(message)
    qos, retain = _qos_retain(message, default_qos)
    return Publish(topic, payload, qos, retain, check_properties(message.get("properties", {})))


def drop_v5_only(publish: Publish, protocol: int) -> Publish:
    """MQTT 3.1.1 has no properties: a 3.1.1 link publishes without them."""
    if protocol == 5 or not publish.properties:
        return publish
    return Publish(publish.topic, publish.payload, publish.qos, publish.retain, {})


# -- publishes waiting for the broker ------------------------------------------------------------------------


class OutboundQueue:
    """Publishes made while the broker is away, bounded by count and by age.

    ``push`` drops the oldest entry when full (the newest reply is the one a
    user is waiting for); ``take`` returns the entries younger than
    ``max_age`` and discards the rest. Both say how many they dropped, so the
    bridge counts and warns.
    """

    def __init__(self, limit: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.max_age, self.clock = limit, max_age, clock
        self._entries: deque[tuple[float, Any]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: Any) -> int:
        """Queue ``item``; returns how many entries were dropped to make room (0 or 1) or by age."""
        dropped = self._expire()
        if len(self._entries) >= self.limit:
            self._entries.popleft()
            dropped += 1
        self._entries.append((self.clock(), item))
        return dropped

    def take(self) -> tuple[list[Any], int]:
        """Everything still young enough, oldest first, and the number that were too old."""
        dropped = self._expire()
        items = [item for _, item in self._entries]
        self._entries.clear()
        return items, dropped

    def _expire(self) -> int:
        cutoff = self.clock() - self.max_age
        dropped = 0
        while self._entries and self._entries[0][0] < cutoff:
            self._entries.popleft()
            dropped += 1
        return dropped
