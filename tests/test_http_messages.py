"""bridges/http/messages.py on its own: no sockets, no reactor, every rule of docs/spec/http.md."""

from __future__ import annotations

import re

import msgpack
import pytest

from crossroads.bridges.http import messages
from crossroads.bridges.http.messages import BadReply, HttpError


def request(**overrides):
    arguments = {"reply_channel": "http.web.abc!1", "method": b"GET", "target": b"/", "version": b"HTTP/1.1",
                 "headers": [], "body": b"", "client": ["127.0.0.1", 5000], "server": ["127.0.0.1", 8000]}
    return messages.request_message(**{**arguments, **overrides})


# -- http.request --------------------------------------------------------------------------------------------


def test_request_has_every_asgi_key_and_the_shared_keys():
    message = request(method=b"post", target=b"/a%20b/c?x=1&y=%20", headers=[(b"Host", b"h"), (b"X-A", b"1")],
                      body=b"hi", root_path="/mount")
    assert message == {
        "reply_channel": "http.web.abc!1", "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/a b/c", "query_string": b"x=1&y=%20", "root_path": "/mount",
        "headers": [[b"host", b"h"], [b"x-a", b"1"]], "body": b"hi",
        "client": ["127.0.0.1", 5000], "server": ["127.0.0.1", 8000],
        "protocol": "http", "sender": "127.0.0.1:5000", "room": "/a b/c", "text": "hi",
    }


def test_request_survives_the_layer_serialization():
    message = request(body=b"\xff", headers=[(b"A", b"\xe9")])
    assert msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False) == message


def test_defaults():
    message = request()
    assert message["scheme"] == "http" and message["root_path"] == "" and message["query_string"] == b""
    assert message["body"] == b"" and message["text"] == "" and message["headers"] == []


@pytest.mark.parametrize(("version", "expected"), [(b"HTTP/1.1", "1.1"), (b"HTTP/1.0", "1.0")])
def test_http_versions(version, expected):
    assert messages.http_version(version) == expected


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"", b"HTTP/1.1 "])
def test_other_versions_are_400(version):
    with pytest.raises(HttpError) as error:
        messages.http_version(version)
    assert error.value.status == 400


@pytest.mark.parametrize(("target", "path", "query"), [
    (b"/", "/", b""),
    (b"/caf%C3%A9", "/café", b""),
    (b"/caf\xc3\xa9", "/café", b""),  # raw UTF-8, which some clients send unencoded
    (b"/a%2Fb", "/a/b", b""),  # decoded like ASGI 1.0 says; routes cannot tell %2F from /
    (b"/a+b", "/a+b", b""),  # + is a space only in query strings
    (b"/p?", "/p", b""),
    (b"/p?a=1&a=2&b=%26", "/p", b"a=1&a=2&b=%26"),
    (b"/p?q=?x", "/p", b"q=?x"),
    (b"/p#frag", "/p", b""),
    (b"http://example.com/x/y?z=1", "/x/y", b"z=1"),
    (b"HTTPS://example.com", "/", b""),
    (b"*", "*", b""),
])
def test_targets(target, path, query):
    assert messages.split_target(target) == (path, query)


@pytest.mark.parametrize("target", [b"noslash", b"%2F", b"/%FF", b"/%C3", b"ftp://x/y"])
def test_bad_targets_are_400(target):
    with pytest.raises(HttpError) as error:
        messages.split_target(target)
    assert error.value.status == 400


@pytest.mark.parametrize("method", [b"GE T", b"", b"G\x00T", b"(GET)"])
def test_methods_must_be_tokens(method):
    with pytest.raises(HttpError, match="method"):
        request(method=method)


def test_headers_are_lowercased_with_order_and_duplicates_kept():
    raw = [(b"Cookie", b"a=1"), (b"X-One", b"1"), (b"cookie", b"b=2"), (b"ACCEPT", b"*/*")]
    assert messages.request_headers(raw) == [[b"cookie", b"a=1"], [b"x-one", b"1"], [b"cookie", b"b=2"],
                                             [b"accept", b"*/*"]]


def test_header_names_with_underscores_are_dropped():
    raw = [(b"X-Real-IP", b"1.1.1.1"), (b"X_Real_IP", b"6.6.6.6"), (b"_", b"x"), (b"Host", b"h")]
    assert messages.request_headers(raw) == [[b"x-real-ip", b"1.1.1.1"], [b"host", b"h"]]


def test_text_is_none_for_a_body_that_is_not_utf8():
    assert request(body=b"\xff\xfe")["text"] is None
    assert request(body="é".encode())["text"] == "é"


def test_unix_socket_peers():
    message = request(client=None, server=["/run/http.sock", None])
    assert message["client"] is None and message["sender"] == "unix" and message["server"] == ["/run/http.sock", None]


def test_describe_peer():
    assert messages.describe_peer(["10.0.0.1", 80]) == "10.0.0.1:80"
    assert messages.describe_peer(["::1", 80]) == "[::1]:80"
    assert messages.describe_peer(None) == "unix"


# -- proxy headers -------------------------------------------------------------------------------------------


FORWARDED = [(b"X-Forwarded-For", b"203.0.113.9, 10.0.0.1"), (b"X-Forwarded-Port", b"443"),
             (b"X-Forwarded-Proto", b"HTTPS")]


def test_proxy_headers_are_ignored_unless_trusted():
    message = request(headers=FORWARDED)
    assert message["client"] == ["127.0.0.1", 5000] and message["scheme"] == "http"
    assert message["sender"] == "127.0.0.1:5000"


def test_trusted_proxy_headers_set_client_sender_and_scheme():
    message = request(headers=FORWARDED, proxy_headers=True)
    assert message["client"] == ["203.0.113.9", 443] and message["scheme"] == "https"
    assert message["sender"] == "203.0.113.9:443"
    assert [b"x-forwarded-for", b"203.0.113.9, 10.0.0.1"] in message["headers"]  # still there for the consumer


@pytest.mark.parametrize(("headers", "client", "scheme"), [
    ([], ["127.0.0.1", 5000], "http"),
    ([(b"X-Forwarded-For", b"198.51.100.1")], ["198.51.100.1", 0], "http"),  # no port header: 0
    ([(b"X-Forwarded-For", b"2001:db8::1"), (b"X-Forwarded-Port", b"x")], ["2001:db8::1", 0], "http"),
    ([(b"X-Forwarded-For", b"")], ["127.0.0.1", 5000], "http"),
    ([(b"X-Forwarded-For", b"\xff")], ["127.0.0.1", 5000], "http"),
    ([(b"X-Forwarded-Proto", b"gopher")], ["127.0.0.1", 5000], "http"),
    ([(b"X-Forwarded-Proto", b"https, http")], ["127.0.0.1", 5000], "https"),
    ([(b"X_Forwarded_For", b"6.6.6.6")], ["127.0.0.1", 5000], "http"),  # dropped before it is read
])
def test_proxy_header_edge_cases(headers, client, scheme):
    message = request(headers=headers, proxy_headers=True)
    assert (message["client"], message["scheme"]) == (client, scheme)


def test_proxy_headers_over_a_unix_socket():
    message = request(headers=[(b"X-Forwarded-For", b"192.0.2.7")], client=None, proxy_headers=True)
    assert message["client"] == ["192.0.2.7", 0] and message["sender"] == "192.0.2.7:0"


# -- http.disconnect -----------------------------------------------------------------------------------------


def test_disconnect_message():
    assert messages.disconnect_message("http.web.abc!7", "/chat") == {
        "reply_channel": "http.web.abc!7", "path": "/chat", "protocol": "http"}


# -- responses -----------------------------------------------------------------------------------------------


def test_full_response():
    response = messages.response_from_message(
        {"status": 201, "headers": [[b"Content-Type", b"application/json"], ["x-str", "yes"]], "content": b"{}"})
    assert response == messages.Response(201, [(b"Content-Type", b"application/json"), (b"x-str", b"yes")], b"{}",
                                         False)


def test_response_defaults():
    assert messages.response_from_message({}) == messages.Response(200, [], b"", False)


def test_str_content_is_utf8():
    assert messages.response_from_message({"content": "é"}).content == b"\xc3\xa9"


def test_text_alone_is_a_plain_utf8_page():
    response = messages.response_from_message({"text": "héllo"})
    assert response.status == 200 and response.content == "héllo".encode()
    assert response.headers == [(b"content-type", b"text/plain; charset=utf-8")]


def test_text_with_status_and_own_content_type():
    response = messages.response_from_message({"status": 404, "text": "<b>no</b>",
                                               "headers": [[b"Content-Type", b"text/html"]]})
    assert response.status == 404 and response.headers == [(b"Content-Type", b"text/html")]


def test_content_wins_over_text():
    response = messages.response_from_message({"content": b"bytes", "text": "text"})
    assert response.content == b"bytes" and response.headers == []


def test_duplicate_response_headers_are_kept_in_order():
    response = messages.response_from_message({"headers": [[b"set-cookie", b"a"], [b"x", b"1"], [b"set-cookie", b"b"]]})
    assert response.headers == [(b"set-cookie", b"a"), (b"x", b"1"), (b"set-cookie", b"b")]


def test_streaming_start_and_chunks():
    start = messages.response_from_message({"status": 200, "content": b"a", "more_content": True})
    assert start.more_content and start.content == b"a"
    assert messages.chunk_from_message({"content": b"b", "more_content": True}) == messages.Chunk(b"b", True)
    assert messages.chunk_from_message({"text": "c"}) == messages.Chunk(b"c", False)
    assert messages.chunk_from_message({}) == messages.Chunk(b"", False)


def test_content_length_must_match_unless_streaming():
    assert messages.response_from_message({"headers": [[b"content-length", b"2"]], "content": b"ok"}).content == b"ok"
    with pytest.raises(BadReply, match="content-length"):
        messages.response_from_message({"headers": [[b"Content-Length", b"5"]], "content": b"ok"})
    with pytest.raises(BadReply, match="content-length"):
        messages.response_from_message({"headers": [[b"content-length", b"two"]], "content": b"ok"})
    streamed = messages.response_from_message({"headers": [[b"content-length", b"5"]], "content": b"ok",
                                               "more_content": True})
    assert streamed.more_content


@pytest.mark.parametrize(("message", "problem"), [
    ([("status", 200)], "must be a dict"),
    ({"status": "200"}, "status"),
    ({"status": True}, "status"),
    ({"status": 200.0}, "status"),
    ({"status": 99}, "status"),
    ({"status": 101}, "status"),
    ({"status": 600}, "status"),
    ({"headers": {"a": "b"}}, "headers must be a list"),
    ({"headers": [[b"a"]]}, r"headers\[0\] must be a \[name, value\] pair"),
    ({"headers": [b"ab"]}, r"headers\[0\] must be"),
    ({"headers": [[1, b"x"]]}, r"headers\[0\] name must be bytes or str"),
    ({"headers": [[b"a", None]]}, r"headers\[0\] value must be bytes or str"),
    ({"headers": [["x", "€"]]}, "cannot be encoded as latin-1"),
    ({"headers": [[b"x-ok", b"1"], [b"x-bad", b"a\r\nset-cookie: evil=1"]]}, r"headers\[1\] value .* CR, LF or NUL"),
    ({"headers": [[b"x-bad", b"a\nb"]]}, "CR, LF or NUL"),
    ({"headers": [[b"x-bad", b"a\rb"]]}, "CR, LF or NUL"),
    ({"headers": [[b"x-bad", b"a\x00b"]]}, "CR, LF or NUL"),
    ({"headers": [[b"x-bad\r\nx-evil", b"1"]]}, "not a valid header name"),
    ({"headers": [[b"x bad", b"1"]]}, "not a valid header name"),
    ({"headers": [[b"x:bad", b"1"]]}, "not a valid header name"),
    ({"headers": [[b"", b"1"]]}, "not a valid header name"),
    ({"content": 5}, "content must be bytes or str"),
    ({"content": ["a"]}, "content must be bytes or str"),
    ({"text": b"bytes"}, "text must be str"),
    ({"more_content": 1}, "more_content must be true or false"),
    ({"more_content": "yes"}, "more_content"),
    ({"more_content": True, "flow_channel": 5}, "flow_channel must be a single-reader channel name"),
    ({"more_content": True, "flow_channel": "http.flow"}, "flow_channel must be a single-reader channel name"),
    ({"more_content": True, "flow_channel": "http.flow!abc"}, "flow_channel must be a single-reader channel name"),
    ({"more_content": True, "flow_channel": "http flow?abc"}, "flow_channel must be a single-reader channel name"),
])
def test_invalid_responses(message, problem):
    with pytest.raises(BadReply, match=problem):
        messages.response_from_message(message)


@pytest.mark.parametrize(("message", "problem"), [
    ("chunk", "must be a dict"),
    ({"status": 200, "content": b"x"}, "already sent"),
    ({"headers": [], "content": b"x"}, "already sent"),
    ({"content": 3}, "content must be bytes or str"),
    ({"content": b"x", "more_content": None}, "more_content"),
])
def test_invalid_chunks(message, problem):
    with pytest.raises(BadReply, match=problem):
        messages.chunk_from_message(message)


def test_header_method_finds_case_insensitively():
    response = messages.response_from_message({"headers": [[b"content-type", b"a"]]})
    assert response.header(b"Content-Type") == b"a" and response.header(b"x") is None


# -- the bridge's own answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 413, 431, 500, 503, 504])
def test_error_responses(status):
    response = messages.error_response(status, "why")
    assert response.status == status and response.content.startswith(f"{status} ".encode())
    assert b"why" in response.content
    assert response.header(b"content-length") == str(len(response.content)).encode()
    assert response.header(b"content-type") == messages.TEXT_PLAIN
    assert response.header(b"retry-after") is None


def test_retry_after():
    assert messages.error_response(503, "busy", retry_after=1).header(b"retry-after") == b"1"


def test_error_bytes_is_a_whole_closing_response():
    data = messages.error_bytes(431, "too big")
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"connection: close" in lines and b"content-length: %d" % len(body) in lines
    assert body == b"431 Request Header Fields Too Large: too big\n"


def test_reasons():
    assert messages.reason(413) == "Request Entity Too Large" or messages.reason(413) == "Content Too Large"
    assert messages.reason(799) == "Unknown Status"


# -- the access log ------------------------------------------------------------------------------------------


def test_access_log_line_is_combined_format():
    line = messages.access_log_line(client_host="10.0.0.1", when=0, method=b"GET", target=b"/a?b=1",
                                    version=b"HTTP/1.1", status=200, length=12, referer=b"http://r/",
                                    user_agent=b"curl/8")
    assert line == '10.0.0.1 - - [01/Jan/1970:00:00:00 +0000] "GET /a?b=1 HTTP/1.1" 200 12 "http://r/" "curl/8"'


def test_access_log_line_without_request_line_or_body():
    line = messages.access_log_line(client_host=None, when=0, method=None, target=None, version=None, status=400,
                                    length=0)
    assert line == '- - - [01/Jan/1970:00:00:00 +0000] "-" 400 - "-" "-"'


def test_access_log_cannot_be_forged():
    line = messages.access_log_line(client_host="1.2.3.4", when=0, method=b"GET", target=b"/", version=b"HTTP/1.1",
                                    status=200, length=1, user_agent=b'evil"\n1.1.1.1 - - [x] "GET /admin"')
    assert "\n" not in line
    assert re.search(r'"evil\\"\\n1\.1\.1\.1 - - \[x\] \\"GET /admin\\""$', line), line


# -- a port shared with a WebSocket bridge -------------------------------------------------------------------


@pytest.mark.parametrize("data, end", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody after", 27),
    (b"GET / HTTP/1.1\nHost: x\n\n", 24),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r", -1),
    (b"", -1),
])
def test_head_end(data, end):
    assert messages.head_end(data) == end


@pytest.mark.parametrize("head, upgrade", [
    (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade", True),
    (b"GET /chat HTTP/1.1\r\nupgrade:WebSocket", True),
    (b"GET /chat HTTP/1.1\r\nUpgrade: h2c, websocket", True),
    (b"GET /chat HTTP/1.1\nUpgrade: websocket", True),
    (b"GET /chat HTTP/1.1\r\nUpgrade: h2c", False),
    (b"GET /chat HTTP/1.1\r\nX-Upgrade: websocket", False),
    (b"GET /chat HTTP/1.1\r\nUpgrade: websockets", False),
    (b"GET /Upgrade: websocket HTTP/1.1\r\nHost: x", False),  # the request line is not a header
    (b"GET / HTTP/1.1", False),
])
def test_is_websocket_upgrade(head, upgrade):
    assert messages.is_websocket_upgrade(head) is upgrade


def test_a_streamed_response_may_name_its_flow_channel():
    response = messages.response_from_message({"more_content": True, "flow_channel": "crossroads.http.flow?Ab3"})
    assert response.flow_channel == "crossroads.http.flow?Ab3"
    assert messages.response_from_message({}).flow_channel is None
