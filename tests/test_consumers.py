"""The consumer programming model through the test Client: routing, sends, sessions, ordering, errors."""

from __future__ import annotations

import logging

import pytest

from crossroads import (
    Channel,
    ConsumeLater,
    DenyConnection,
    Group,
    JsonWebsocketConsumer,
    RouteError,
    Router,
    WebsocketConsumer,
    consumer_finished,
    consumer_started,
    enforce_ordering,
    include,
    layer,
    route,
    route_class,
)
from crossroads.consumers import channel as channel_module
from crossroads.consumers.dispatch import MAX_CONSUME_LATER, Dispatcher
from crossroads.consumers.testing import Client


def test_message_reads_like_its_content():
    seen = []
    client = Client([route("mqtt.receive", seen.append)])
    client.send_and_consume("mqtt.receive", {"text": "hi", "sender": "ann", "room": "a/b", "protocol": "mqtt"})
    message = seen[0]
    assert message["text"] == "hi" and dict(message)["sender"] == "ann" and "room" in message
    assert (message.text, message.sender, message.room, message.protocol) == ("hi", "ann", "a/b", "mqtt")
    assert message.channel == Channel("mqtt.receive")
    assert message.reply_channel.name == client.reply_channel


def test_a_message_builds_its_channel_when_first_read_and_keeps_it():
    seen = []
    client = Client([route("mqtt.receive", seen.append)])
    client.send_and_consume("mqtt.receive", {"text": "hi"})
    message = seen[0]
    assert message.reply_channel.name == client.reply_channel  # built with the message, so checked before the run
    assert "channel" not in vars(message)  # the consumer never read it: never built
    assert repr(message).startswith("<Message on mqtt.receive ")
    channel = message.channel
    assert channel == Channel("mqtt.receive") and channel.channel_layer is client.channel_layer
    assert message.channel is channel  # built once
    message.channel = Channel("elsewhere")  # still a plain attribute to set
    assert message.channel == Channel("elsewhere")
    assert (message.channel_session, message.http_session, message.user) == (None, None, None)


def test_a_consumer_finds_its_layer_alone_or_in_a_batch_and_it_is_reset_after():
    first, second = layer.from_url("memory://"), layer.from_url("memory://")
    seen = []
    inner = Dispatcher([route("b", lambda message: seen.append(("b", channel_module.current_layer.get())))], second)
    dispatcher = Dispatcher([route("a", lambda message: seen.append(("a", channel_module.current_layer.get()))),
                             route("c", lambda message: inner.handle("b", {}))], first)
    dispatcher.handle("a", {})
    assert channel_module.current_layer.get() is None
    with dispatcher.holding():  # the worker's batch: the layer is set once, for every message of it
        dispatcher.handle("a", {})
        dispatcher.handle("c", {})  # another dispatcher's run inside sets its own layer, then gives this one back
        dispatcher.handle("a", {})
    assert channel_module.current_layer.get() is None
    assert seen == [("a", first), ("a", first), ("b", second), ("a", first)]


def test_sends_are_buffered_until_the_consumer_returns(channel_layer):
    observed = {}

    def consumer(message):
        message.reply_channel.send({"text": "buffered"})
        Channel("side").send({"text": "now"}, immediately=True)
        observed["reply_waiting"] = channel_layer.sync.receive([message.reply_channel.name], timeout=0)
        observed["side_waiting"] = channel_layer.sync.receive(["side"], timeout=0)

    client = Client([route("a", consumer)], channel_layer)
    client.send_and_consume("a", {})
    assert observed["reply_waiting"] == (None, None), "a buffered send left before the consumer returned"
    assert observed["side_waiting"] == ("side", {"text": "now"})
    assert client.receive() == {"text": "buffered"}


def test_runs_are_counted_by_channel_and_consumer_with_their_durations_raising_ones_too():
    def fine(message):
        pass

    def broken(message):
        raise RuntimeError("boom")

    client = Client([route("a", fine), route("b", broken)])
    for channel in ("a", "a", "b"):
        client.send_and_consume(channel, {})
    runs = {(stats.channel, stats.consumer): stats for stats in client.counters.by_consumer.values()}
    prefix = "test_consumers.test_runs_are_counted_by_channel_and_consumer_with_their_durations_raising_ones_too"
    assert {key: stats.count for key, stats in runs.items()} == {
        ("a", f"{prefix}.<locals>.fine"): 2, ("b", f"{prefix}.<locals>.broken"): 1}
    for stats in runs.values():
        assert sum(stats.buckets) == stats.count and stats.seconds > 0


class UnhashableConsumer:
    """A callable that cannot be a dict key (it defines __eq__ without __hash__)."""

    def __init__(self) -> None:
        self.seen = 0

    def __eq__(self, other: object) -> bool:
        return other is self

    def __call__(self, message) -> None:
        self.seen += 1
        message.reply_channel.send({"seen": self.seen})


def test_an_unhashable_consumer_runs_and_is_counted_under_its_name():
    consumer = UnhashableConsumer()
    client = Client([route("a", consumer)])
    for _ in range(2):
        client.send_and_consume("a", {})
    assert [client.receive(), client.receive()] == [{"seen": 1}, {"seen": 2}]
    (key,) = client.counters.by_consumer
    assert key == ("a", f"test_consumers.{consumer!r}") and client.counters.by_consumer[key].count == 2


def test_buffered_sends_leave_even_when_the_consumer_raises(channel_layer, caplog):
    def consumer(message):
        message.reply_channel.send({"text": "before the error"})
        Group("g").send({"text": "to the group"})
        raise RuntimeError("boom")

    client = Client([route("a", consumer)], channel_layer)
    client.join_group("g")
    client.send_and_consume("a", {})
    assert client.receive_all() == [{"text": "before the error"}, {"text": "to the group"}]
    assert client.counters.errors == 1
    assert "consumer test_consumers.test_buffered_sends_leave_even_when_the_consumer_raises.<locals>" \
           ".consumer raised on a message on a" in caplog.text


@pytest.mark.parametrize("url", ["memory://", "redis"])
def test_sends_refused_by_a_full_channel_are_counted_one_by_one(url, request, caplog):
    # Five buffered sends into a channel with room for two: three are lost, and the worker's counter says three
    # (it once said one: the number of full channels, not of messages).
    if url == "redis":
        url = request.getfixturevalue("redis_server").url
    small = layer.from_url(url, capacity=2, prefix="t-undelivered")
    small.sync.flush()

    def consumer(message):
        for i in range(5):
            Channel("narrow").send({"i": i})

    client = Client([route("a", consumer)], small)
    client.send_and_consume("a", {})
    assert client.counters.undelivered == 3
    assert small.sync.receive_many(["narrow"], 10) == [("narrow", {"i": 0}), ("narrow", {"i": 1})]
    assert "3 of 5 messages refused" in caplog.text
    small.sync.flush()
    small.sync.close()


def test_a_send_copies_the_message():
    def consumer(message):
        content = {"items": [1]}
        message.reply_channel.send(content)
        content["items"].append(2)

    client = Client([route("a", consumer)])
    client.send_and_consume("a", {})
    assert client.receive() == {"items": [1]}


def test_routing_filters_kwargs_and_first_match(channel_layer):
    client = Client("apps.chat:routes", channel_layer)
    client.send_and_consume("websocket.connect", {"path": "/chat/lobby/", "sender": "ann"})
    assert client.receive() == {"accept": True}
    client.send_and_consume("websocket.receive", {"path": "/chat/lobby/", "text": "hello"})
    assert client.receive() == {"text": "ann: hello"}


def test_include_strips_its_prefix():
    client = Client("apps.chat:routes")
    client.send_and_consume("http.request", {"path": "/stats/detail/disk/"})
    assert client.receive() == {"text": "detail disk"}
    client.send_and_consume("http.request", {"path": "/stats/"})
    assert client.receive() == {"text": "stats for /stats/ rest={}"}
    router = Router("apps.chat:routes")
    assert router.channels >= {"websocket.connect", "websocket.receive", "http.request", "mqtt.receive"}


def test_routes_on_bytes_values_and_missing_keys():
    seen = []
    router = Router([route("a", lambda m, **kw: seen.append(kw), topic=r"^rooms/(?P<room>\w+)$")])
    assert router.match("a", {"topic": b"rooms/x"})[1] == {"room": "x"}
    assert router.match("a", {"topic": b"\xff"}) is None
    assert router.match("a", {}) is None
    assert router.match("b", {"topic": "rooms/x"}) is None


def test_the_dispatcher_prepares_what_the_router_matches():
    def first(message): ...
    def second(message): ...
    def captured(message, name): ...

    dispatcher = Dispatcher([route("a", first, path=r"^/x"), route("a", second), route("b", second),
                             route("c", captured, path=r"^/(?P<name>\w+)$")], layer.from_url("memory://"))
    for channel, content, consumer, kwargs in [("a", {"path": "/x"}, first, {}), ("a", {"path": "/y"}, second, {}),
                                               ("b", {}, second, {}), ("c", {"path": "/ann"}, captured,
                                                                       {"name": "ann"})]:
        got, got_kwargs, message, retries = dispatcher.prepare(channel, dict(content))
        assert (got, got_kwargs, dict(message), message.channel.name, retries) == (consumer, kwargs, content,
                                                                                   channel, 0)
    assert dispatcher.prepare("c", {"path": "/a/b"}) is None and dispatcher.counters.unrouted == 1
    first_kwargs = dispatcher.prepare("b", {})[1]
    first_kwargs["changed"] = True  # each message's keyword arguments are its own
    assert dispatcher.prepare("b", {})[1] == {}


def test_a_route_without_filters_never_overtakes_an_earlier_entry_for_its_channel():
    def first(message): ...
    def second(message): ...
    def inner(message): ...
    def outer(message): ...

    router = Router([route("a", first, path=r"^/x"), route("a", second), route(["b", "a"], outer),
                     include([route("c", inner)], path=r"^/p"), route("c", outer), route("d", outer)])
    assert router.match("a", {"path": "/x"}) == (first, {})
    assert router.match("a", {"path": "/y"}) == (second, {}) and router.match("a", {}) == (second, {})
    assert router.match("b", {}) == (outer, {}) and router.match("d", {"path": "/p"}) == (outer, {})
    assert router.match("c", {"path": "/p/q"}) == (inner, {}) and router.match("c", {"path": "/z"}) == (outer, {})
    assert router.match("e", {}) is None
    kwargs = router.match("d", {})[1]
    kwargs["changed"] = True  # each match's keyword arguments are its own
    assert router.match("d", {}) == (outer, {})


def test_bad_routing_tables_say_what_is_wrong():
    with pytest.raises(RouteError, match="not a valid regex"):
        route("a", print, path="(")
    with pytest.raises(RouteError, match="not callable"):
        route("a", "not a function")
    with pytest.raises(RouteError, match="cannot import module 'no_such_module'"):
        Router("no_such_module:routes")
    with pytest.raises(RouteError, match="has no attribute 'nope'"):
        Router("apps.chat:nope")
    with pytest.raises(RouteError, match="route_class needs"):
        route_class(object)
    with pytest.raises(RouteError, match="route\\(\\), route_class\\(\\) or include\\(\\)"):
        Router([print])
    with pytest.raises(RouteError, match="not a valid regex"):
        include([], path="[")


def test_channel_session_is_per_reply_channel_and_survives_errors(channel_layer):
    from crossroads import channel_session

    @channel_session
    def count(message):
        message.channel_session["n"] = message.channel_session.get("n", 0) + 1
        message.reply_channel.send({"n": message.channel_session["n"]})
        if message.get("fail"):
            raise ValueError("after the change")

    client = Client([route("a", count)], channel_layer)
    other = client.sync.new_channel("other?")
    for _ in range(2):
        client.send_and_consume("a", {})
    client.send_and_consume("a", {}, reply_channel=other)
    client.send_and_consume("a", {"fail": True})
    client.send_and_consume("a", {})
    assert [m["n"] for m in client.receive_all()] == [1, 2, 3, 4]
    assert client.receive(other) == {"n": 1}


def test_enforce_ordering_runs_frames_in_order(channel_layer, caplog):
    seen = []

    @enforce_ordering
    def receive(message):
        seen.append(message["order"])

    client = Client([route("websocket.receive", receive)], channel_layer)
    for order in (2, 0, 3, 1, 1):  # out of order, and 1 twice
        client.send("websocket.receive", {"order": order, "text": str(order)})
    while client.consume("websocket.receive", fail_on_none=False):
        pass
    assert seen == [0, 1, 2, 3]
    assert "order 1" in caplog.text and "already past it" in caplog.text


def test_slight_ordering_runs_the_connect_first_then_the_rest_as_they_come(channel_layer, caplog):
    """Channels 1.x's enforce_ordering(slight=True): frames wait for the connect, not for each other."""
    seen = []

    @enforce_ordering(slight=True)
    def connect(message):
        message.channel_session["user"] = "ann"
        seen.append(("connect", message["order"]))

    @enforce_ordering(slight=True)
    def receive(message):
        seen.append((message.channel_session["user"], message["order"]))

    client = Client([route("websocket.connect", connect), route("websocket.receive", receive)], channel_layer)
    client.send("websocket.receive", {"order": 3, "text": "3"})
    client.send("websocket.receive", {"order": 2, "text": "2"})
    assert client.consume("websocket.receive") and client.consume("websocket.receive")
    assert seen == [], "frames ran before the connect"
    client.send("websocket.connect", {"order": 0, "path": "/"})
    assert client.consume("websocket.connect")
    client.send("websocket.receive", {"order": 5, "text": "5"})
    client.send("websocket.receive", {"order": 1, "text": "1"})
    client.send("websocket.connect", {"order": 0, "path": "/"})  # a repeated connect is dropped
    while client.consume("websocket.receive", fail_on_none=False) or client.consume("websocket.connect",
                                                                                   fail_on_none=False):
        pass
    assert seen[0] == ("connect", 0)
    assert sorted(seen[1:]) == [("ann", 1), ("ann", 2), ("ann", 3), ("ann", 5)]
    assert seen[1:] != sorted(seen[1:]), "slight ordering must not wait for the frames' own order"
    assert "order 0" in caplog.text and "already past it" in caplog.text


def test_consume_later_requeues_then_gives_up(channel_layer, caplog):
    attempts = []

    def not_yet(message):
        attempts.append(message.get("__consume_later"))
        if len(attempts) < 3 or message.get("forever"):
            raise ConsumeLater()
        message.reply_channel.send({"done": len(attempts)})

    client = Client([route("a", not_yet)], channel_layer)
    client.send("a", {})
    while client.consume("a", fail_on_none=False):
        pass
    assert client.receive() == {"done": 3}
    assert attempts == [None, None, None], "the retry count is the worker's business, not the consumer's"
    attempts.clear()
    client.send("a", {"forever": True})
    while client.consume("a", fail_on_none=False):
        pass
    assert len(attempts) == MAX_CONSUME_LATER + 1
    assert client.counters.gave_up == 1
    assert "raised ConsumeLater 11 times" in caplog.text


def test_deny_connection_closes():
    def connect(message):
        raise DenyConnection()

    client = Client([route("websocket.connect", connect)])
    client.send_and_consume("websocket.connect", {"path": "/"})
    assert client.receive() == {"close": True}


def test_unrouted_messages_are_counted_and_logged_once_per_channel(caplog):
    client = Client([route("a", print)])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            client.send_and_consume("b", {"x": 1})
    assert client.counters.unrouted == 3
    assert caplog.text.count("no route matches a message on b") == 1


def test_unrouted_requests_and_connects_are_answered_at_once(caplog):
    client = Client([route("http.request", print, path=r"^/$"), route("websocket.connect", print, path=r"^/ws/$")])
    with caplog.at_level(logging.WARNING):
        client.send_and_consume("http.request", {"path": "/favicon.ico", "method": "GET"})
        assert client.receive() == {"status": 404, "text": "Not Found: no route matches this path\n"}
        client.send_and_consume("websocket.connect", {"path": "/elsewhere/"})
        assert client.receive() == {"accept": False}  # the bridge answers 403
        client.send_and_consume("websocket.receive", {"path": "/elsewhere/", "text": "x"})
        assert client.receive() is None  # nobody waits on a frame: nothing to answer
    assert "http.request (path '/favicon.ico', keys: method, path, reply_channel), answered 404" in caplog.text
    assert client.counters.unrouted == 3


def test_signals_surround_every_consumer():
    events = []

    def started(message, consumer):
        events.append(("started", message.channel.name))

    def finished(message, consumer, error):
        events.append(("finished", type(error).__name__ if error else None))

    consumer_started.connect(started)
    consumer_finished.connect(finished)
    try:
        client = Client([route("ok", lambda m: None), route("bad", lambda m: 1 / 0)])
        client.send_and_consume("ok", {})
        client.send_and_consume("bad", {})
    finally:
        consumer_started.disconnect(started)
        consumer_finished.disconnect(finished)
    assert events == [("started", "ok"), ("finished", None), ("started", "bad"), ("finished", "ZeroDivisionError")]


def test_an_interrupt_in_a_consumer_goes_on_up_once_its_sends_left_and_it_is_signalled(channel_layer):
    finished = []

    def consumer(message):
        message.reply_channel.send({"text": "sent before"})
        raise KeyboardInterrupt

    def on_finished(message, consumer, error):
        finished.append(error)

    client = Client([route("a", consumer)], channel_layer)
    consumer_finished.connect(on_finished)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.send_and_consume("a", {})
    finally:
        consumer_finished.disconnect(on_finished)
    assert client.receive() == {"text": "sent before"} and finished == [None]
    assert (client.counters.consumed, client.counters.errors) == (0, 0)
    assert sum(stats.count for stats in client.counters.by_consumer.values()) == 1


def test_held_sends_a_full_channel_refused_are_logged_naming_their_consumers(caplog):
    small = layer.from_url("memory://", capacity=1)
    dispatcher = Dispatcher([route("a", lambda message: Channel("narrow").send({"n": message["n"]}))], small)
    with dispatcher.holding():
        for n in range(3):
            dispatcher.handle("a", {"n": n})
        assert small.sync.receive(["narrow"], timeout=0) == (None, None)  # held until the batch is done
    assert dispatcher.counters.undelivered == 2
    assert small.sync.receive_many(["narrow"], 10) == [("narrow", {"n": 0})]
    assert "3 consumers (consumer test_consumers." \
           "test_held_sends_a_full_channel_refused_are_logged_naming_their_consumers.<locals>.<lambda> on a): " \
           "send_many: 2 of 3 messages refused" in caplog.text


def test_async_consumers_run_too(channel_layer):
    async def consumer(message):
        message.reply_channel.send({"text": message.text.upper()})

    client = Client([route("a", consumer)], channel_layer)
    client.send_and_consume("a", {"text": "quiet"})
    assert client.receive() == {"text": "QUIET"}


class Echo(WebsocketConsumer):
    groups = ["everyone"]

    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text, bytes=bytes)
        self.group_send("everyone", text=f"{kwargs.get('room')} said {text}")


class JsonEcho(JsonWebsocketConsumer):
    def receive(self, content, **kwargs):
        self.send({"got": content})


def test_websocket_consumer_accepts_echoes_and_manages_groups(channel_layer):
    client = Client([route_class(Echo, path=r"^/echo/(?P<room>\w+)$")], channel_layer)
    listener = client.sync.new_channel("listener?")
    Group("everyone", channel_layer).add(listener)
    client.send_and_consume("websocket.connect", {"path": "/echo/r1"})
    assert client.receive() == {"accept": True}
    assert sorted(Group("everyone", channel_layer).channels()) == sorted([listener, client.reply_channel])
    client.send_and_consume("websocket.receive", {"path": "/echo/r1", "text": "hey"})
    assert client.receive_all() == [{"text": "hey"}, {"text": "r1 said hey"}]
    assert client.receive(listener) == {"text": "r1 said hey"}
    client.send_and_consume("websocket.receive", {"path": "/echo/r1", "bytes": b"\x00"})
    assert client.receive() == {"bytes": b"\x00"}
    client.send_and_consume("websocket.disconnect", {"path": "/echo/r1", "code": 1000})
    assert Group("everyone", channel_layer).channels() == [listener]


def test_json_websocket_consumer(channel_layer):
    client = Client([route_class(JsonEcho)], channel_layer)
    client.send_and_consume("websocket.receive", {"text": '{"a": [1, 2]}'})
    assert client.receive() == {"text": '{"got": {"a": [1, 2]}}'}
    client.send_and_consume("websocket.receive", {"text": "{not json"})
    assert client.receive() == {"close": 1007}
    client.send_and_consume("websocket.receive", {"bytes": b"{}"})
    assert client.receive() == {"close": 1003}


def test_chat_consumer_joins_rooms_across_protocols(channel_layer):
    client = Client("apps.chat:routes", channel_layer)
    web = client.reply_channel
    mqtt = "mqtt.replies!rooms.lobby"  # a bridge's stable reply channel for one topic
    client.send_and_consume("websocket.connect", {"path": "/rooms/lobby", "room": "lobby", "sender": "web"})
    assert client.receive(web) == {"accept": True}
    client.send_and_consume("mqtt.receive", {"path": "/rooms/x", "room": "lobby", "sender": "sensor", "text": "hi"},
                            reply_channel=mqtt)
    assert client.receive(web) == {"text": "sensor: hi"}
    assert client.sync.receive(["mqtt.replies!"], timeout=0) == (mqtt, {"text": "sensor: hi"})
    client.send_and_consume("websocket.disconnect", {"path": "/rooms/lobby", "room": "lobby"})
    client.send_and_consume("mqtt.receive", {"path": "/rooms/x", "room": "lobby", "sender": "sensor", "text": "again"},
                            reply_channel=mqtt)
    assert client.receive(web) is None, "a socket that left still got the room's messages"
