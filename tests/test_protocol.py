"""bridges/protocol.py, the pure module every messages.py shares: the shared keys, text, addresses, option checks."""

from __future__ import annotations

import ast
import pathlib

import pytest

from crossroads.bridges import protocol
from crossroads.bridges.http import messages as http_messages
from crossroads.bridges.irc import messages as irc_messages
from crossroads.bridges.mqtt import messages as mqtt_messages
from crossroads.bridges.websocket import messages as websocket_messages
from crossroads.layer.base import MAX_MESSAGE_SIZE

BRIDGES = pathlib.Path(protocol.__file__).parent

# -- the shared keys -------------------------------------------------------------------------------------------


def test_shared_keys_are_the_four_every_protocol_carries():
    assert protocol.shared_keys("mqtt", "sensor-1", "home/temp", "21.5") == {
        "protocol": "mqtt", "sender": "sensor-1", "room": "home/temp", "text": "21.5"}
    assert protocol.shared_keys("irc", "server.example", None, None) == {
        "protocol": "irc", "sender": "server.example", "room": None, "text": None}


def test_shared_keys_are_a_new_dict_each_time():
    first = protocol.shared_keys("http", "a", "/", "x")
    first["text"] = "changed"
    assert protocol.shared_keys("http", "a", "/", "x")["text"] == "x"


def test_every_receive_message_carries_the_shared_keys():
    """One consumer serves every protocol only if each bridge's *.receive has the same four keys."""
    http = http_messages.request_message(reply_channel="r!1", method=b"POST", target=b"/room?x=1", version=b"HTTP/1.1",
                                         headers=[], body="héllo".encode(), client=["10.0.0.1", 5], server=None)
    handshake = websocket_messages.parse_handshake(b"GET /room HTTP/1.1\r\nHost: h\r\n\r\n", secure=False,
                                                   client=("::1", 7), server=None)
    websocket = websocket_messages.receive_message("r!1", handshake, "héllo", 1)
    irc = irc_messages.receive_message("r!1", "message", "ann!a@h", "#room", "\x02héllo\x02", "net")
    incoming = mqtt_messages.Incoming(topic="room", payload="héllo".encode(), qos=0, retain=False, dup=False, mid=0,
                                      properties={})
    mqtt = mqtt_messages.receive_message(incoming, reply_channel="r!1", session="s", sender="ann")
    assert {k: http[k] for k in ("protocol", "sender", "room", "text")} == {
        "protocol": "http", "sender": "10.0.0.1:5", "room": "/room", "text": "héllo"}
    assert {k: websocket[k] for k in ("protocol", "sender", "room", "text")} == {
        "protocol": "websocket", "sender": "[::1]:7", "room": "/room", "text": "héllo"}
    assert {k: irc[k] for k in ("protocol", "sender", "room", "text")} == {
        "protocol": "irc", "sender": "ann", "room": "#room", "text": "héllo"}
    assert {k: mqtt[k] for k in ("protocol", "sender", "room", "text")} == {
        "protocol": "mqtt", "sender": "ann", "room": "room", "text": "héllo"}


# -- text from bytes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, text", [
    (b"", ""),
    (b"plain", "plain"),
    ("héllo wörld ✓ 🎉".encode(), "héllo wörld ✓ 🎉"),
    (b"\x00nul inside", "\x00nul inside"),  # NUL is valid UTF-8: still text
])
def test_text_of_utf8(data, text):
    assert protocol.text_of(data) == text


@pytest.mark.parametrize("data", [
    b"\xff",
    b"\xe9t\xe9",  # Latin-1
    "héllo".encode()[:2],  # cut inside a character
    b"\xed\xa0\x80",  # a UTF-16 surrogate, which UTF-8 forbids
    b"\xc0\xaf",  # an overlong encoding of '/'
    b"\x89PNG\r\n\x1a\n",
])
def test_text_of_not_utf8_is_none(data):
    assert protocol.text_of(data) is None


def test_a_non_utf8_payload_has_no_text_in_http_and_mqtt():
    http = http_messages.request_message(reply_channel="r!1", method=b"POST", target=b"/", version=b"HTTP/1.1",
                                         headers=[], body=b"\xff\xfe", client=None, server=None)
    incoming = mqtt_messages.Incoming(topic="t", payload=b"\xff\xfe", qos=0, retain=False, dup=False, mid=0,
                                      properties={})
    mqtt = mqtt_messages.receive_message(incoming, reply_channel="r!1", session="s", sender="t")
    assert http["text"] is None and http["body"] == b"\xff\xfe"
    assert mqtt["text"] is None and mqtt["payload"] == b"\xff\xfe"


# -- peers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, name", [
    (["10.0.0.1", 80], "10.0.0.1:80"),
    (("127.0.0.1", 0), "127.0.0.1:0"),
    (["::1", 8000], "[::1]:8000"),
    (["fe80::1%eth0", 9], "[fe80::1%eth0]:9"),
    (None, "unix"),
    ([], "unix"),
])
def test_describe_peer(address, name):
    assert protocol.describe_peer(address) == name


def test_http_and_websocket_name_peers_alike():
    for address in (["10.0.0.1", 80], ["::1", 8], None):
        handshake = websocket_messages.parse_handshake(b"GET / HTTP/1.1\r\n\r\n", secure=False, client=address,
                                                       server=None)
        assert handshake.sender == http_messages.describe_peer(address) == protocol.describe_peer(address)


# -- scheme://host[:port] --------------------------------------------------------------------------------------

PORTS = {"tcp": 100, "tls": 200}
SHAPE = "tcp://host[:port] or tls://host[:port]"


@pytest.mark.parametrize("url, expected", [
    ("tcp://example.org", protocol.Url("tcp", "example.org", 100)),
    ("tls://example.org", protocol.Url("tls", "example.org", 200)),
    ("tcp://example.org:7", protocol.Url("tcp", "example.org", 7)),
    ("TCP://Example.ORG:7", protocol.Url("tcp", "example.org", 7)),  # scheme and host are case-insensitive
    ("tcp://example.org:0", protocol.Url("tcp", "example.org", 100)),  # no port to connect to: the default
    ("tcp://example.org:65535", protocol.Url("tcp", "example.org", 65535)),
    ("tcp://[::1]:9", protocol.Url("tcp", "::1", 9)),
    ("tcp://[::1]", protocol.Url("tcp", "::1", 100)),
    ("tcp://127.0.0.1/", protocol.Url("tcp", "127.0.0.1", 100)),  # a bare trailing slash is no path
    ("tcp://ann@h", protocol.Url("tcp", "h", 100, "ann")),
    ("tcp://ann:s%40cret@h:5", protocol.Url("tcp", "h", 5, "ann", "s@cret")),  # percent-decoded
    ("tcp://h/path", protocol.Url("tcp", "h", 100, more=True)),
    ("tcp://h?q=1", protocol.Url("tcp", "h", 100, more=True)),
    ("tcp://h#f", protocol.Url("tcp", "h", 100, more=True)),
])
def test_split_url(url, expected):
    assert protocol.split_url(url, PORTS, shape=SHAPE) == expected


@pytest.mark.parametrize("url, problem", [
    ("udp://h", f"must be {SHAPE}"),
    ("h:5", f"must be {SHAPE}"),
    ("tcp:h", f"must be {SHAPE}"),  # a scheme without // names no host
    ("", f"must be {SHAPE}"),
    ("tcp://h:99999", "bad port: it must be a number from 1 to 65535"),
    ("tcp://h:-1", "bad port: it must be a number from 1 to 65535"),
    ("tcp://h:port", "bad port: it must be a number from 1 to 65535"),
    ("tcp://:5", "names no host"),
    ("tcp://", "names no host"),
    ("tcp://ann@", "names no host"),
])
def test_split_url_problems(url, problem):
    with pytest.raises(ValueError) as raised:
        protocol.split_url(url, PORTS, shape=SHAPE)
    assert str(raised.value) == problem


def test_irc_and_mqtt_keep_their_own_rules_on_the_shared_shape():
    assert str(irc_messages.parse_server("ircs://irc.example.org")) == "ircs://irc.example.org:6697"
    assert mqtt_messages.parse_broker("mqtts://ann:pw@[::1]") == mqtt_messages.Broker("::1", 8883, True, "ann", "pw")
    with pytest.raises(ValueError, match="only irc"):
        irc_messages.parse_server("irc://ann@irc.example.org")  # IRC takes no credentials in the URL
    with pytest.raises(ValueError, match="channels go in"):
        irc_messages.parse_server("irc://irc.example.org/#chat")
    with pytest.raises(ValueError, match="must not have a path"):
        mqtt_messages.parse_broker("mqtt://broker/topic")
    with pytest.raises(ValueError, match="must name the scheme"):
        irc_messages.parse_server("irc.example.org")


# -- option checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check, good, bad, problem", [
    (protocol.positive, [1, 0.001, 10**9], [0, -1, -0.5], "must be more than 0"),
    (protocol.positive_seconds, [0.001, 60.0], [0, 0.0, -3.0], "must be a positive number of seconds"),
    (protocol.seconds_or_off, [0, 0.0, 20.0], [-0.001, -20], "must be 0 (off) or a number of seconds"),
    (protocol.port_number, [0, 1, 8000, 65535], [-1, 65536, 10**6],
     "must be a TCP port number from 0 to 65535 (0 picks a free one)"),
])
def test_value_checks(check, good, bad, problem):
    assert [check(value) for value in good] == [None] * len(good)
    assert [check(value) for value in bad] == [problem] * len(bad)


def test_problem_of_turns_a_parser_into_a_check():
    def parse_even(value: int) -> int:
        if value % 2:
            raise ValueError(f"{value} is odd")
        return value

    check = protocol.problem_of(parse_even)
    assert check(4) is None and check(0) is None
    assert check(3) == "3 is odd"


def test_problem_of_lets_other_errors_through():
    """Only ValueError is a problem with the value; anything else is a bug in the parser, and must show."""
    def broken(value):
        raise KeyError(value)

    with pytest.raises(KeyError):
        protocol.problem_of(broken)("x")


def test_each_reports_the_first_problem_of_a_list():
    check = protocol.each(lambda v: None if v > 0 else f"{v} is not positive")
    assert check([]) is None and check([1, 2, 3]) is None
    assert check([1, -2, -3]) == "-2 is not positive"
    assert check((5, 0)) == "0 is not positive"


@pytest.mark.parametrize("headroom", [0, 4096, 65536])
def test_payload_limit(headroom):
    check = protocol.payload_limit(MAX_MESSAGE_SIZE, headroom)
    most = MAX_MESSAGE_SIZE - headroom
    assert check(1) is None and check(most) is None
    problem = f"must be from 1 to {most} bytes (the layer holds at most 1 MiB per message)"
    assert check(0) == problem and check(-1) == problem and check(most + 1) == problem


def test_payload_limit_names_a_limit_that_is_not_whole_mebibytes_in_bytes():
    assert protocol.payload_limit(5000, 1000)(4001) == "must be from 1 to 4000 bytes (the layer holds at most 5000 " \
                                                       "bytes per message)"


def test_the_bridges_option_checks_come_from_here():
    """The option checks that bridges had each written for themselves are these, by identity."""
    from crossroads.bridges.irc.bridge import IrcBridge
    from crossroads.bridges.mqtt.bridge import MqttBridge
    from crossroads.bridges.websocket.bridge import WebsocketBridge

    assert IrcBridge.OPTIONS["flood_rate"].check is protocol.positive
    assert MqttBridge.OPTIONS["queue_age"].check is protocol.positive
    assert WebsocketBridge.OPTIONS["ping_interval"].check is protocol.seconds_or_off
    assert WebsocketBridge.OPTIONS["port"].check is protocol.port_number


def test_the_size_options_follow_the_layers_limit():
    """max_message_size (WebSocket) and max_payload (MQTT) are bounded by the layer's own constant, not a copy."""
    from crossroads.bridges.base import OptionError
    from crossroads.bridges.mqtt.bridge import MqttBridge
    from crossroads.bridges.websocket.bridge import WebsocketBridge

    size = WebsocketBridge.OPTIONS["max_message_size"]
    assert size.normalize("max_message_size", MAX_MESSAGE_SIZE - 4096) == MAX_MESSAGE_SIZE - 4096
    with pytest.raises(OptionError, match="1 MiB"):
        size.normalize("max_message_size", MAX_MESSAGE_SIZE - 4095)
    payload = MqttBridge.OPTIONS["max_payload"]
    assert payload.normalize("max_payload", MAX_MESSAGE_SIZE - 65536) == MAX_MESSAGE_SIZE - 65536
    with pytest.raises(OptionError, match="1 MiB"):
        payload.normalize("max_payload", MAX_MESSAGE_SIZE - 65535)


# -- shared by all ----------------------------------------------------------------------------------------------------


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module or "")
    return names


def test_every_messages_module_uses_the_shared_protocol_module():
    """The shared keys and parsers are written once (their purity is import-linter's: tests/test_layering.py)."""
    messages = sorted(BRIDGES.glob("*/messages.py"))
    assert len(messages) >= 4
    for path in messages:
        assert "crossroads.bridges.protocol" in _imports(path), f"{path} does not use bridges/protocol.py"


# -- the fair queue --------------------------------------------------------------------------------------------


def drain(queue: protocol.FairQueue) -> list[tuple[str, str]]:
    taken = []
    while queue:
        taken.append(queue.take())
    return taken


def test_fair_queue_takes_one_item_per_target_in_turn_keeping_each_targets_order():
    queue = protocol.FairQueue(per_target=100, total=1000)
    for i in range(5):
        assert queue.put("#loud", f"loud {i}") is None
    assert queue.put("#quiet", "quiet 0") is None
    assert queue.put("bob", "bob 0") is None
    assert queue.put("#quiet", "quiet 1") is None
    assert len(queue) == 8 and queue.waiting("#loud") == 5 and queue.waiting("nobody") == 0
    assert drain(queue) == [("#loud", "loud 0"), ("#quiet", "quiet 0"), ("bob", "bob 0"), ("#loud", "loud 1"),
                            ("#quiet", "quiet 1"), ("#loud", "loud 2"), ("#loud", "loud 3"), ("#loud", "loud 4")]
    assert len(queue) == 0 and not queue


def test_fair_queue_a_target_arriving_late_waits_for_one_item_of_each_busy_target():
    queue = protocol.FairQueue(per_target=500, total=1000)
    for i in range(500):
        queue.put("#probe", i)
    queue.take()
    queue.put("#other", "hello")
    assert [queue.take() for _ in range(2)] == [("#probe", 1), ("#other", "hello")]


def test_fair_queue_refuses_past_each_bound_and_says_which():
    queue = protocol.FairQueue(per_target=2, total=3)
    assert [queue.put("#a", i) for i in range(3)] == [None, None, protocol.FairQueue.FULL_TARGET]
    assert queue.put("#b", 0) is None
    assert queue.put("#c", 0) == protocol.FairQueue.FULL_TOTAL  # 3 in all, though #c has none
    assert queue.take() == ("#a", 0)
    assert queue.put("#a", 9) is None  # room again for #a
    assert queue.clear() == 3 and not queue and queue.waiting("#a") == 0
    with pytest.raises(IndexError):
        queue.take()


# -- allowed hosts -----------------------------------------------------------------------------------------------


def test_an_empty_allowed_hosts_means_loopback_names_on_loopback_and_any_host_elsewhere():
    assert protocol.effective_allowed_hosts([], "127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert protocol.effective_allowed_hosts([], "::1") == ("localhost", "127.0.0.1", "::1")
    assert protocol.effective_allowed_hosts([], "0.0.0.0") == ("*",)
    assert protocol.effective_allowed_hosts([], None) == ("*",)  # a Unix socket: a proxy in front says
    assert protocol.effective_allowed_hosts(["Chat.Example"], "127.0.0.1") == ("chat.example",)


@pytest.mark.parametrize("host, allowed", [
    (b"127.0.0.1:8000", True), (b"localhost:8000", True), (b"LOCALHOST", True), (b"[::1]:8000", True),
    (b"localhost.", True), (None, True),
    (b"evil.example", False), (b"evil.example:8000", False), (b"127.0.0.1.evil.example", False),
    (b"localhost:80x", False), (b"[::1]x", False), (b"", False), (b":8000", False),
])
def test_host_allowed_on_a_loopback_listener(host, allowed):
    assert protocol.host_allowed(host, protocol.LOOPBACK_NAMES) is allowed


def test_host_allowed_by_name_and_subdomain_pattern():
    allowed = ("chat.example.com", "*.internal.example")
    assert protocol.host_allowed(b"chat.example.com:443", allowed)
    assert protocol.host_allowed(b"a.internal.example", allowed)
    assert not protocol.host_allowed(b"internal.example", allowed)  # the pattern is for subdomains
    assert not protocol.host_allowed(b"xinternal.example", allowed)
    assert not protocol.host_allowed(b"example.com", allowed)
    assert protocol.host_allowed(b"anything", ("*",))


def test_allowed_host_entries_are_checked():
    assert protocol.check_allowed_host("chat.example.com") is None
    assert protocol.check_allowed_host("*.example.com") is None
    assert protocol.check_allowed_host("::1") is None
    assert "no port" in protocol.check_allowed_host("example.com:8000")
    assert "must be strings" in protocol.check_allowed_host(8000)
