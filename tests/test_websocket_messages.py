"""Unit tests of bridges/websocket/messages.py: no sockets, no reactor, just bytes and dicts."""

from __future__ import annotations

import pytest

from crossroads.bridges.websocket import messages as m
from crossroads.bridges.websocket.messages import (
    Accept,
    BadHandshake,
    Close,
    ConnectionState,
    InvalidReply,
    Reject,
    Send,
)

HEAD = (b"GET /chat/caf%C3%A9/room%2F1?x=1&y=%20 HTTP/1.1\r\n"
        b"Host: example.com:8000\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n"
        b"Cookie: a=1\r\n"
        b"cookie: b=2\r\n"
        b"X-Spaced:   padded value \t\r\n"
        b"\r\n")


def handshake(head: bytes = HEAD, **options) -> m.Handshake:
    return m.parse_handshake(head, **{"secure": False, "client": ("10.0.0.7", 50123),
                                      "server": ("10.0.0.1", 8000), **options})


# -- the handshake ---------------------------------------------------------------------------------------------


def test_parse_handshake_keeps_what_the_spec_asks_for():
    parsed = handshake(root_path="/app")
    assert parsed.scheme == "ws"
    assert parsed.path == "/chat/café/room/1"  # percent-decoded, %2F included, as ASGI 1.0 says
    assert parsed.query_string == b"x=1&y=%20"  # not decoded
    assert parsed.root_path == "/app"
    assert parsed.headers[0] == [b"host", b"example.com:8000"]
    assert [v for n, v in parsed.headers if n == b"cookie"] == [b"a=1", b"b=2"]  # duplicates and order kept
    assert [b"x-spaced", b"padded value"] in parsed.headers
    assert all(n == n.lower() for n, _ in parsed.headers)
    assert parsed.client == ["10.0.0.7", 50123] and parsed.server == ["10.0.0.1", 8000]
    assert parsed.subprotocols == ["chat.v1", "chat.v2"]
    assert parsed.sender == "10.0.0.7:50123"
    assert parsed.header(b"host") == b"example.com:8000" and parsed.header(b"nope") is None


def test_parse_handshake_scheme_and_addresses():
    assert handshake(secure=True).scheme == "wss"
    on_unix_socket = handshake(client=None, server=None)  # a Unix socket's client has no address
    assert on_unix_socket.client is None and on_unix_socket.server is None and on_unix_socket.sender == "unix"
    assert handshake(client=("::1", 9)).sender == "[::1]:9"
    plain = handshake(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert plain.path == "/" and plain.query_string == b"" and plain.subprotocols == []


@pytest.mark.parametrize(("head", "problem"), [
    (b"GET /\r\n\r\n", "malformed request line"),
    (b"POST / HTTP/1.1\r\n\r\n", "must be a GET"),
    (b"GET / HTTP/2\r\n\r\n", "must be a GET"),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", "starting with '/'"),
    (b"GET /%FF HTTP/1.1\r\n\r\n", "not UTF-8"),
    (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\n: empty\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", "folded"),
])
def test_bad_handshakes_are_400_with_a_reason(head, problem):
    with pytest.raises(BadHandshake, match=problem) as raised:
        handshake(head)
    assert raised.value.status == 400


# -- origins ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, b"example.com", [], True),  # non-browser clients send no Origin
    (b"http://example.com", b"example.com", [], True),
    (b"https://example.com", b"example.com", [], True),  # a Host without a port: the scheme's default
    (b"http://Example.COM:80", b"example.com", [], True),
    (b"http://example.com:8000", b"example.com:8000", [], True),
    (b"http://example.com:8001", b"example.com:8000", [], False),
    (b"http://evil.example", b"example.com", [], False),
    (b"http://[::1]:8000", b"[::1]:8000", [], True),
    (b"null", b"example.com", [], False),
    (b"null", b"example.com", ["null"], True),
    (b"file://", b"example.com", [], False),
    (b"http://evil.example", b"example.com", ["*"], True),
    (b"https://app.example.com", b"api.example.com", ["https://app.example.com"], True),
    (b"https://app.example.com:443", b"api.example.com", ["https://app.example.com"], True),
    (b"http://app.example.com", b"api.example.com", ["https://app.example.com"], False),  # scheme matters
    (b"https://app.example.com:8443", b"api.example.com", ["https://app.example.com:8443"], True),
    (b"http://app.example.com:9", b"api.example.com", ["app.example.com"], True),  # a bare host: any scheme/port
    (b"https://a.b.example.com", b"x", ["*.example.com"], True),
    (b"https://example.com", b"x", ["*.example.com"], False),
    (b"https://badexample.com", b"x", ["*.example.com"], False),
    (b"http://example.com:notaport", b"example.com", [], False),
    (b"ftp://example.com", b"example.com", [], False),
    (b"http://example.com", None, [], False),  # no Host to compare with
])
def test_origin_allowed(origin, host, allowed, ok):
    assert m.origin_allowed(origin, host, allowed) is ok


def test_same_origin_uses_the_origins_default_port_when_host_has_none():
    # A Host without a port means the scheme's default port, in the Origin's scheme.
    assert m.origin_allowed(b"https://example.com", b"example.com", [])
    assert not m.origin_allowed(b"https://example.com:8443", b"example.com", [])


@pytest.mark.parametrize(("entry", "ok"), [
    ("*", True), ("null", True), ("https://example.com", True), ("http://example.com:8000", True),
    ("example.com", True), ("*.example.com", True),
    ("ftp://example.com", False), ("https://example.com/path", False), ("https://", False),
    ("https://example.com:99999", False), ("exa mple.com", False), ("*example.com", False),
])
def test_check_allowed_origin(entry, ok):
    assert (m.check_allowed_origin(entry) is None) is ok


# -- messages to the layer -------------------------------------------------------------------------------------


def test_connect_message():
    message = m.connect_message("websocket.ws.abc!1", handshake(root_path="/app"))
    assert message == {
        "reply_channel": "websocket.ws.abc!1",
        "scheme": "ws",
        "path": "/chat/café/room/1",
        "query_string": b"x=1&y=%20",
        "root_path": "/app",
        "headers": handshake().headers,
        "client": ["10.0.0.7", 50123],
        "server": ["10.0.0.1", 8000],
        "subprotocols": ["chat.v1", "chat.v2"],
        "order": 0,
        "protocol": "websocket",
        "sender": "10.0.0.7:50123",
        "room": "/chat/café/room/1",
        "text": None,  # nothing said yet: a protocol-neutral consumer sees no text, as for IRC's join
    }


def test_connect_message_is_a_copy():
    parsed = handshake()
    message = m.connect_message("r!1", parsed)
    message["headers"][0][1] = b"changed"
    message["subprotocols"].append("x")
    assert parsed.headers[0][1] == b"example.com:8000" and parsed.subprotocols == ["chat.v1", "chat.v2"]


def test_receive_message_text_and_bytes():
    text = m.receive_message("r!1", handshake(), "héllo", 1)
    assert text == {"reply_channel": "r!1", "path": "/chat/café/room/1", "text": "héllo", "bytes": None, "order": 1,
                    "protocol": "websocket", "sender": "10.0.0.7:50123", "room": "/chat/café/room/1"}
    binary = m.receive_message("r!1", handshake(), b"\x00\xff", 2)
    assert binary["bytes"] == b"\x00\xff" and binary["text"] is None and binary["order"] == 2
    assert m.receive_message("r!1", handshake(), "", 3)["text"] == ""  # an empty text frame is still text
    with pytest.raises(TypeError):
        m.receive_message("r!1", handshake(), 42, 4)


def test_disconnect_message():
    message = m.disconnect_message("r!1", handshake(), 1006, 5)
    assert message == {"reply_channel": "r!1", "path": "/chat/café/room/1", "code": 1006, "order": 5,
                       "protocol": "websocket", "sender": "10.0.0.7:50123", "room": "/chat/café/room/1",
                       "text": None}


def test_later_messages_are_the_same_from_a_handshake_without_headers():
    # The bridge keeps only this once websocket.connect is built: what follows must not change.
    parsed, kept = handshake(), handshake().without_headers()
    assert kept.headers == [] and parsed.headers  # a copy: the connect message's handshake keeps them
    assert m.receive_message("r!1", kept, "hi", 1) == m.receive_message("r!1", parsed, "hi", 1)
    assert m.disconnect_message("r!1", kept, 1000, 2) == m.disconnect_message("r!1", parsed, 1000, 2)


# -- replies ---------------------------------------------------------------------------------------------------


def opened(offered=None) -> ConnectionState:
    state = ConnectionState(offered)
    assert state.interpret({"accept": True}) == [Accept(None)]
    return state


@pytest.mark.parametrize(("reply", "actions"), [
    ({"accept": True}, [Accept(None)]),
    ({"accept": True, "subprotocol": "chat.v2"}, [Accept("chat.v2")]),
    ({"text": "hi"}, [Accept(None), Send("hi")]),  # a frame before accept implies accept
    ({"bytes": b"\x00"}, [Accept(None), Send(b"\x00")]),
    ({"text": ""}, [Accept(None), Send("")]),
    ({"text": "hi", "subprotocol": "chat.v1"}, [Accept("chat.v1"), Send("hi")]),
    ({"accept": True, "text": "hi", "close": True}, [Accept(None), Send("hi"), Close(1000)]),
    ({"text": "bye", "close": 4000}, [Accept(None), Send("bye"), Close(4000)]),
    ({"accept": True, "close": True}, [Accept(None), Close(1000)]),
    ({"accept": False}, [Reject(403)]),
    ({"accept": False, "text": "no"}, [Reject(403)]),
    ({"close": True}, [Reject(403)]),
    ({"close": 4001}, [Reject(403)]),
    ({"text": None, "bytes": None}, []),
    ({}, []),
    ({"close": False}, []),
    ({"unknown": "keys are ignored", "accept": True}, [Accept(None)]),
])
def test_replies_during_the_handshake(reply, actions):
    state = ConnectionState(["chat.v1", "chat.v2"])
    assert state.interpret(reply) == actions
    expected_phase = {Accept: m.OPEN, Reject: m.CLOSED}
    phase = m.HANDSHAKE
    for action in actions:
        phase = expected_phase.get(type(action), phase)
        if isinstance(action, Close):
            phase = m.CLOSED
    assert state.phase == phase


@pytest.mark.parametrize(("reply", "actions"), [
    ({"text": "hi"}, [Send("hi")]),
    ({"bytes": b"hi"}, [Send(b"hi")]),
    ({"text": None, "bytes": b"hi"}, [Send(b"hi")]),
    ({"accept": True}, []),  # already accepted
    ({"accept": False}, []),  # accept only means something during the handshake
    ({"close": True}, [Close(1000)]),
    ({"close": 1000}, [Close(1000)]),
    ({"close": 1011}, [Close(1011)]),
    ({"close": 3000}, [Close(3000)]),
    ({"close": 4999}, [Close(4999)]),
    ({"text": "last", "close": True}, [Send("last"), Close(1000)]),
])
def test_replies_when_open(reply, actions):
    state = opened()
    assert state.interpret(reply) == actions
    assert state.phase == (m.CLOSED if any(isinstance(a, Close) for a in actions) else m.OPEN)


def test_replies_after_close_do_nothing():
    state = opened()
    assert state.interpret({"close": True}) == [Close(1000)]
    assert state.interpret({"text": "late"}) == []
    assert state.interpret({"close": True}) == []
    rejected = ConnectionState()
    assert rejected.interpret({"close": True}) == [Reject(403)]
    assert rejected.interpret({"accept": True}) == []


@pytest.mark.parametrize(("reply", "problem"), [
    ("text", "must be a dict"),
    ({"text": "a", "bytes": b"b"}, "not both"),
    ({"text": b"bytes"}, "'text' must be a string"),
    ({"bytes": "text"}, "'bytes' must be bytes"),
    ({"accept": 1}, "'accept' must be true or false"),
    ({"accept": "yes"}, "'accept' must be true or false"),
    ({"accept": True, "subprotocol": "chat.v9"}, "was not offered"),
    ({"accept": True, "subprotocol": 2}, "must be a string"),
    ({"close": 999}, "'close' must be"),
    ({"close": 1004}, "'close' must be"),
    ({"close": 1005}, "'close' must be"),
    ({"close": 1006}, "'close' must be"),
    ({"close": 1015}, "'close' must be"),
    ({"close": 2999}, "'close' must be"),
    ({"close": 5000}, "'close' must be"),
    ({"close": "1000"}, "'close' must be"),
    ({"close": 1000.0}, "'close' must be"),
    ({"close": None, "accept": True, "text": 3}, "'text' must be a string"),
])
def test_invalid_replies_change_nothing(reply, problem):
    for state in (ConnectionState(["chat.v1"]), opened(["chat.v1"])):
        phase = state.phase
        with pytest.raises(InvalidReply, match=problem):
            state.interpret(reply)
        assert state.phase == phase


def test_close_code_allowed():
    allowed = [code for code in range(0, 6000) if m.close_code_allowed(code)]
    assert allowed == [1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)]


def test_order_counts_only_what_the_layer_stored():
    state = m.ConnectionState()
    assert state.next_order() == 1  # websocket.connect was 0
    assert state.next_order() == 1  # asking again uses nothing up: a refused frame leaves no gap
    state.stored(1)
    assert state.next_order() == 2
    state.stored(2)
    state.stored(3)
    assert state.last_order == 3 and state.next_order() == 4
