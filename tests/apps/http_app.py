"""Consumers for the HTTP bridge tests (tests/test_http_bridge.py): one per behaviour the tests look at."""

import hashlib
import json

from crossroads import Channel, RequestBody, route


def _plain(value):
    """JSON cannot hold bytes: mark them, so the test can tell bytes from str."""
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def inspect(message):
    """Answer with the whole http.request message, as JSON."""
    message.reply_channel.send({"status": 200, "headers": [[b"content-type", b"application/json"]],
                                "content": json.dumps(_plain(dict(message.content))).encode()})


def text(message):
    message.reply_channel.send({"text": "héllo from text"})


def not_found(message):
    message.reply_channel.send({"status": 404, "text": "no such page"})


def stream(message):
    reply = message.reply_channel
    reply.send({"status": 201, "headers": [["x-stream", "yes"]], "content": b"first,", "more_content": True})
    reply.send({"content": "second,", "more_content": True})
    reply.send({"text": "third"})


def big(message):
    """Streams ``parts`` parts of ``size`` bytes (part i is all byte i % 256) as fast as the layer takes them."""
    query = dict(pair.split("=") for pair in message["query_string"].decode().split("&"))
    parts, size = int(query["parts"]), int(query["size"])
    for i in range(parts):
        message.reply_channel.send({"content": bytes([i % 256]) * size, "more_content": i < parts - 1},
                                   immediately=True)


def duplicate_headers(message):
    message.reply_channel.send({"headers": [[b"set-cookie", b"a=1"], [b"x-one", b"1"], [b"set-cookie", b"b=2"]],
                                "content": b"ok"})


def bad_header(message):
    value = message["query_string"].decode()
    injected = {"crlf": b"ok\r\nset-cookie: evil=1", "lf": b"ok\nx: y", "nul": b"ok\x00", "name": b"ok"}[value]
    name = b"x-bad name" if value == "name" else b"x-bad"
    message.reply_channel.send({"headers": [[name, injected]], "content": b"should not be seen"})


def bad_stream(message):
    """A streamed response whose second part is invalid: the client must not take the first as the whole."""
    message.reply_channel.send({"content": b"part one", "more_content": True})
    message.reply_channel.send({"status": 200, "content": b"status again"})


def silent(message):
    """Never answers: the bridge's http_timeout does."""


def hold(message):
    """Says it has the request, and never answers: the test hangs up and expects http.disconnect."""
    Channel("test.held").send({"path": message["path"]}, immediately=True)


def held_then_answered(message):
    """Says it has the request, waits until the test releases it, then answers."""
    Channel("test.held").send({"path": message["path"]}, immediately=True)
    released, _ = message.channel_layer.sync.receive(["test.release"], timeout=30)
    message.reply_channel.send({"text": "released" if released else "never released"})


def disconnected(message):
    Channel("test.disconnects").send(dict(message.content), immediately=True)


def upload(message):
    """Read the body as a file (streamed on its body_channel when large) and say what arrived."""
    body = RequestBody(message)
    digest, size = hashlib.sha256(), 0
    while block := body.read(65536):
        digest.update(block)
        size += len(block)
    message.reply_channel.send({"text": json.dumps({"size": size, "sha256": digest.hexdigest(),
                                                    "parts": body.parts, "streamed": body.streamed})})


def upload_refused(message):
    """Answer without reading the body."""
    message.reply_channel.send({"status": 403, "text": "not wanted"})


routes = [
    route("http.request", upload, path=r"^/upload$"),
    route("http.request", upload_refused, path=r"^/upload-refused$"),
    route("http.request", inspect, path=r"^/inspect"),
    route("http.request", text, path=r"^/text$"),
    route("http.request", not_found, path=r"^/missing$"),
    route("http.request", stream, path=r"^/stream$"),
    route("http.request", big, path=r"^/big$"),
    route("http.request", duplicate_headers, path=r"^/duplicate-headers$"),
    route("http.request", bad_header, path=r"^/bad-header$"),
    route("http.request", bad_stream, path=r"^/bad-stream$"),
    route("http.request", silent, path=r"^/silent$"),
    route("http.request", hold, path=r"^/hold$"),
    route("http.request", held_then_answered, path=r"^/held-then-answered$"),
    route("http.disconnect", disconnected),
]
