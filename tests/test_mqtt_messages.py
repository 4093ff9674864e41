"""bridges/mqtt/messages.py: the pure half of the MQTT bridge, case by case (docs/spec/mqtt.md)."""

from __future__ import annotations

import re

import pytest

from crossroads.bridges.base import _LOCAL_ID_RE
from crossroads.bridges.mqtt import messages as m
from crossroads.bridges.protocol import shared_keys, text_of

# -- the broker and the options ----------------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker.example", m.Broker("broker.example", 1883, False)),
    ("mqtts://broker.example", m.Broker("broker.example", 8883, True)),
    ("MQTT://10.0.0.5:1884", m.Broker("10.0.0.5", 1884, False)),
    ("mqtts://[::1]:8884/", m.Broker("::1", 8884, True)),
    ("mqtt://user:p%40ss@h", m.Broker("h", 1883, False, "user", "p@ss")),
])
def test_broker_urls(url, expected):
    assert m.parse_broker(url) == expected
    assert m.check_broker(url) is None


@pytest.mark.parametrize("url, problem", [
    ("http://h", "must be mqtt://host:port or mqtts://host:port"),
    ("h:1883", "must be mqtt://host:port"),
    ("mqtt://h:99999", "bad port"),
    ("mqtt://:1883", "names no host"),
    ("mqtt://h/path", "must not have a path"),
    ("mqtt://h?x=1", "must not have a path, query"),
])
def test_bad_broker_urls(url, problem):
    assert problem in m.check_broker(url)


def test_broker_describes_itself_without_credentials():
    assert str(m.parse_broker("mqtts://u:secret@h:1")) == "broker mqtts://h:1"


@pytest.mark.parametrize("value, level", [(5, 5), ("5", 5), ("3.1.1", 4)])
def test_protocol_levels(value, level):
    assert m.protocol_level(value) == level and m.check_protocol(value) is None


@pytest.mark.parametrize("value", [4, "4", "3.1", "v5", 3.1])
def test_bad_protocols(value):
    assert "must be 5 or" in m.check_protocol(value)


# -- topics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "a/b", "/a", "a/", "$SYS/x", "café/☕", " ", "a//b"])
def test_publishable_topics(topic):
    assert m.check_topic(topic) is None


@pytest.mark.parametrize("topic, problem", [
    ("", "must not be empty"),
    ("a/+", "wildcard"),
    ("a/#", "wildcard"),
    ("a+b", "wildcard"),
    ("a\x00b", "NUL"),
    ("x" * 65536, "at most 65535 bytes"),
    ("é" * 32768, "at most 65535 bytes"),  # bytes, not characters
    ("\ud800", "lone surrogate"),
    (b"a", "must be a string"),
    (None, "must be a string"),
])
def test_unpublishable_topics(topic, problem):
    assert problem in m.check_topic(topic)


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/#", "a/+/b", "+/+", "/#", "a/b", "$SYS/#"])
def test_valid_filters(topic_filter):
    assert m.check_topic_filter(topic_filter) is None


@pytest.mark.parametrize("topic_filter, problem", [
    ("", "must not be empty"),
    ("a/#/b", "'#' must be a whole level and the last one"),
    ("a#", "'#' must be a whole level"),
    ("a/b+", "'+' must be a whole level"),
    ("a\x00", "NUL"),
    (1, "must be a string"),
])
def test_invalid_filters(topic_filter, problem):
    assert problem in m.check_topic_filter(topic_filter)


@pytest.mark.parametrize("topic_filter, topic, matches", [
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a/", True),  # an empty level is a level
    ("+/b", "a/b", True),
    ("a/#", "a", True),  # '#' includes the parent
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "$SYS/x", False),  # wildcards at the start do not match $ topics
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/b/c", "a/b", False),
    ("a/+/c", "a/b", False),
    ("a/b", "a/b/c", False),
])
def test_topic_matching(topic_filter, topic, matches):
    assert m.topic_matches(topic_filter, topic) is matches


def test_allowed_is_any_filter():
    assert m.allowed("x/1", ["a/#", "x/+"]) and not m.allowed("y", ["a/#", "x/+"]) and not m.allowed("y", [])


def test_subscriptions():
    assert m.parse_subscriptions([{"topic": "chat/#", "qos": 1}, {"topic": "a"}, "b/+"]) == [
        m.Subscription("chat/#", 1), m.Subscription("a", 0), m.Subscription("b/+", 0)]
    assert m.check_subscriptions([]) is None


@pytest.mark.parametrize("entries, problem", [
    ([{"topic": "a", "qos": 3}], "qos of 'a' must be 0, 1 or 2"),
    ([{"topic": "a", "qos": True}], "qos of 'a' must be 0, 1 or 2"),
    ([{"topic": "a", "qos": "1"}], "must be 0, 1 or 2"),
    ([{"qos": 1}], "must be a string"),
    ([{"topic": "a/#/b"}], "'#' must be a whole level"),
    ([{"topic": "a", "retain": 1}], "unknown keys ['retain']"),
    ([{"topic": "a"}, {"topic": "a", "qos": 1}], "'a' is subscribed twice"),
    ([3], "entries must be tables"),
])
def test_bad_subscriptions(entries, problem):
    assert problem in m.check_subscriptions(entries)


def test_reply_topic_template():
    assert m.render_reply_topic("{topic}/reply", "chat/a") == "chat/a/reply"
    assert m.render_reply_topic("replies/{topic}/{topic}", "x") == "replies/x/x"
    assert m.render_reply_topic("fixed", "x") == "fixed"
    assert m.render_reply_topic("{other}", "x") == "{other}"  # only {topic} is a field
    assert m.check_reply_topic("") is None and m.check_reply_topic("{topic}/reply") is None
    assert "wildcard" in m.check_reply_topic("{topic}/#")
    assert "only {topic} is replaced" in m.check_reply_topic("a\x00")


def test_topic_filter_lists():
    assert m.check_topic_filters(["a/#", "b"]) is None
    assert "'+' must be a whole level" in m.check_topic_filters(["a/#", "b+"])


# -- incoming ------------------------------------------------------------------------------------------------


def incoming(topic="chat/lobby", payload=b"hi", qos=1, **kw) -> m.Incoming:
    return m.Incoming(topic=topic, payload=payload, qos=qos, retain=kw.pop("retain", False), mid=kw.pop("mid", 7),
                      dup=kw.pop("dup", False), properties=kw.pop("properties", {}))


def test_receive_message_has_every_key():
    message = m.receive_message(incoming(retain=True, properties={"content_type": "text/plain"}),
                                reply_channel="mqtt.b.x!t.1", session="crossroads-b", sender="lobby")
    assert message == {"reply_channel": "mqtt.b.x!t.1", "topic": "chat/lobby", "payload": b"hi", "qos": 1,
                       "retain": True, "dup": False, "mid": 7, "session": "crossroads-b",
                       "properties": {"content_type": "text/plain"}, "protocol": "mqtt", "sender": "lobby",
                       "room": "chat/lobby", "text": "hi"}


def test_receive_message_shared_keys_are_protocol_shared_keys():
    # receive_message writes the shared keys out (it is the hottest path); they must stay shared_keys' own.
    for payload in (b"hi", b"\xff"):
        message = m.receive_message(incoming("devices/d1", payload=payload), reply_channel="c!1", session="s",
                                    sender="d1")
        expected = shared_keys("mqtt", "d1", "devices/d1", text_of(payload))
        assert {key: message[key] for key in expected} == expected


@pytest.mark.parametrize("payload, text", [(b"", ""), ("é".encode(), "é"), (b"\xff", None), (b"\xc3\x28", None),
                                           (b"\x00", "\x00")])
def test_text_is_utf8_or_none(payload, text):
    message = m.receive_message(incoming(payload=payload), reply_channel="c!1", session="s", sender="x")
    assert message["text"] == text and message["payload"] == payload


def test_sender_from_property_then_level_then_topic():
    with_property = incoming("devices/d1/status", properties={"user_properties": [["x", "1"], ["sender", "ann"]]})
    assert m.sender_of(with_property, "sender", 2) == "ann"
    assert m.sender_of(with_property, "", 2) == "d1"  # no property configured
    assert m.sender_of(incoming("devices/d1/status"), "sender", 2) == "d1"
    assert m.sender_of(incoming("devices/d1/status"), "sender", 0) == "devices/d1/status"
    assert m.sender_of(incoming("devices"), "sender", 2) == "devices"  # too few levels: the whole topic
    assert m.sender_of(incoming("devices//x"), "sender", 2) == "devices//x"  # an empty level names nobody


def test_reply_ids_are_stable_valid_and_distinct():
    topics = ["chat/lobby", "#weird topic/ü", "x" * 5000, "chat/lobby2"]
    ids = [m.reply_id(t) for t in topics]
    assert ids == [m.reply_id(t) for t in topics]  # stable: a topic's reply channel can sit in a Group
    assert len(set(ids)) == len(ids)
    requests = [m.reply_id("a", "resp", b"1"), m.reply_id("a", "resp", b"2"), m.reply_id("a", "resp2", b"1"),
                m.reply_id("a", "resp", None)]
    assert len(set(requests + ids)) == len(requests + ids)
    for local_id in ids + requests:
        assert _LOCAL_ID_RE.match(local_id) and len(local_id) < 40


def test_target_of():
    assert m.target_of(incoming()) == m.ReplyTarget("chat/lobby")
    request = incoming(properties={"response_topic": "r/1", "correlation_data": b"\x01"})
    assert m.target_of(request) == m.ReplyTarget("chat/lobby", "r/1", b"\x01")
    assert m.target_of(incoming(properties={"response_topic": "r/#"})) == m.ReplyTarget("chat/lobby")


def test_link_messages():
    assert m.connect_message(bridge="b", broker="broker mqtt://h:1", client_id="c", session_present=True,
                             subscriptions=[["a/#", 1]]) == {
        "bridge": "b", "broker": "broker mqtt://h:1", "client_id": "c", "session_present": True,
        "subscriptions": [["a/#", 1]], "protocol": "mqtt"}
    assert m.disconnect_message(bridge="b", broker="x", client_id="c", reason="connection lost")["reason"] == \
        "connection lost"


# -- replies ---------------------------------------------------------------------------------------------------


CHAT_A = m.ReplyTarget("chat/a")


def reply(message, target=CHAT_A, reply_topic="{topic}/reply", allow=("ok/#",), qos=1):
    return m.interpret_reply(message, target, reply_topic=reply_topic, allow_publish=list(allow), default_qos=qos)


def test_reply_goes_to_its_own_topic_first():
    request = m.ReplyTarget("chat/a", "resp/1", b"c")
    assert reply({"text": "x", "topic": "ok/1"}, request) == m.Publish("ok/1", b"x", 1, False, {})


def test_reply_goes_to_the_response_topic_with_correlation_data():
    request = m.ReplyTarget("chat/a", "resp/1", b"c")
    assert reply({"text": "x"}, request) == m.Publish("resp/1", b"x", 1, False, {"correlation_data": b"c"})
    no_correlation = m.ReplyTarget("chat/a", "resp/1")
    assert reply({"text": "x"}, no_correlation) == m.Publish("resp/1", b"x", 1, False, {})
    # a consumer may set its own correlation data
    assert reply({"text": "x", "properties": {"correlation_data": b"mine"}}, request).properties == \
        {"correlation_data": b"mine"}


def test_reply_goes_to_the_template_last():
    assert reply({"payload": b"\x00"}) == m.Publish("chat/a/reply", b"\x00", 1, False, {})
    assert reply({"text": "x", "qos": 0, "retain": True}) == m.Publish("chat/a/reply", b"x", 0, True, {})
    with pytest.raises(m.InvalidReply, match="nowhere to publish a reply to 'chat/a'"):
        reply({"text": "x"}, reply_topic="")


def test_reply_topic_outside_the_allow_list_is_refused():
    with pytest.raises(m.RefusedTopic, match="topic 'elsewhere' is not in allow_publish"):
        reply({"text": "x", "topic": "elsewhere"})
    with pytest.raises(m.RefusedTopic):
        reply({"text": "x", "topic": "ok/1"}, allow=())  # an empty allow-list allows nothing


@pytest.mark.parametrize("message, problem", [
    ("text", "a reply must be a dict"),
    ({}, "exactly one of text (str) and payload (bytes)"),
    ({"text": "a", "payload": b"a"}, "exactly one of text"),
    ({"text": b"a"}, "text must be str"),
    ({"payload": "a"}, "payload must be bytes"),
    ({"text": "\ud800"}, "lone surrogate"),
    ({"text": "a", "qos": 3}, "qos must be 0, 1 or 2"),
    ({"text": "a", "qos": True}, "qos must be 0, 1 or 2"),
    ({"text": "a", "retain": 1}, "retain must be true or false"),
    ({"text": "a", "topic": "ok/#"}, "wildcard"),
    ({"text": "a", "topic": "ok/\x00"}, "NUL"),
    ({"text": "a", "topic": ""}, "must not be empty"),
    ({"text": "a", "close": True}, "unknown reply keys ['close']"),
    ({"text": "a", "properties": []}, "properties must be a dict"),
    ({"text": "a", "properties": {"bogus": 1}}, "unknown property 'bogus'"),
    ({"text": "a", "properties": {"content_type": 1}}, "content_type must be str"),
    ({"text": "a", "properties": {"correlation_data": "s"}}, "correlation_data must be bytes"),
    ({"text": "a", "properties": {"user_properties": [["a"]]}}, "[name, value] pairs of strings"),
    ({"text": "a", "properties": {"user_properties": [["a", 1]]}}, "[name, value] pairs of strings"),
    ({"text": "a", "properties": {"response_topic": "r/+"}}, "response_topic: "),
    ({"text": "a", "properties": {"payload_format": 2}}, "payload_format must be 0"),
    ({"text": "a", "properties": {"payload_format": True}}, "payload_format must be int"),
    ({"text": "a", "properties": {"message_expiry": -1}}, "message_expiry must be 0 to"),
])
def test_invalid_replies(message, problem):
    with pytest.raises(m.InvalidReply, match=re.escape(problem)):
        reply(message)


def test_reply_properties_pass_through():
    properties = {"content_type": "application/json", "user_properties": [("k", "v")], "payload_format": 1,
                  "message_expiry": 30, "response_topic": "back/here", "correlation_data": b"\x01"}
    published = reply({"text": "{}", "properties": properties})
    assert published.properties == {**properties, "user_properties": [["k", "v"]]}


def test_template_producing_a_bad_topic_is_an_invalid_reply():
    with pytest.raises(m.InvalidReply, match="reply_topic for"):
        reply({"text": "x"}, m.ReplyTarget("a"), reply_topic="{topic}" + "x" * 65535)


# -- mqtt.publish ----------------------------------------------------------------------------------------------


def publish(message, allow=("out/#",), qos=1):
    return m.interpret_publish(message, allow_publish=list(allow), default_qos=qos)


def test_publish_requests():
    assert publish({"topic": "out/1", "text": "hi"}) == m.Publish("out/1", b"hi", 1, False, {})
    assert publish({"topic": "out/1", "payload": b"\x00", "qos": 2, "retain": True,
                    "properties": {"content_type": "x"}, "reply_channel": "ignored"}) == \
        m.Publish("out/1", b"\x00", 2, True, {"content_type": "x"})


@pytest.mark.parametrize("message, error, problem", [
    ({"text": "hi"}, m.InvalidReply, "needs a topic"),
    ({"topic": "elsewhere", "text": "hi"}, m.RefusedTopic, "not in allow_publish"),
    ({"topic": "out/#", "text": "hi"}, m.InvalidReply, "wildcard"),
    ({"topic": "out/1"}, m.InvalidReply, "exactly one of text"),
    ({"topic": "out/1", "text": "x", "extra": 1}, m.InvalidReply, "unknown keys ['extra']"),
    ([1], m.InvalidReply, "must be a dict"),
])
def test_invalid_publish_requests(message, error, problem):
    with pytest.raises(error, match=re.escape(problem)):
        publish(message)


def test_mqtt311_publishes_without_properties():
    with_properties = m.Publish("t", b"x", 1, False, {"content_type": "a"})
    assert m.drop_v5_only(with_properties, 4).properties == {}
    assert m.drop_v5_only(with_properties, 5) is with_properties


# -- the outbound queue ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_outbound_queue_keeps_order_and_drops_the_oldest_when_full():
    queue = m.OutboundQueue(limit=2, max_age=60, clock=Clock())
    assert [queue.push(n) for n in (1, 2, 3)] == [0, 0, 1]
    assert len(queue) == 2
    assert queue.take() == ([2, 3], 0)
    assert queue.take() == ([], 0) and len(queue) == 0


def test_outbound_queue_drops_entries_older_than_max_age():
    clock = Clock()
    queue = m.OutboundQueue(limit=10, max_age=5, clock=clock)
    queue.push("old")
    clock.now += 3
    queue.push("newer")
    clock.now += 2.5  # "old" is 5.5 s old, "newer" 2.5 s
    assert queue.take() == (["newer"], 1)
    queue.push("a")
    clock.now += 6
    assert queue.push("b") == 1  # pushing expires too
    assert queue.take() == (["b"], 0)
