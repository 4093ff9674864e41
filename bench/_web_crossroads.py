"""crossroads' side of ``bench/web.py``: the consumers its bridges are measured with.

Routed from the generated config as ``bench._web_crossroads:routes`` (the bench runs the daemons with
the repository root on ``PYTHONPATH``, so ``bench`` imports as a package). The Channels side of the same
consumers is ``_web_channels.py``.

- ``http.request``: hello world, the same bytes Daphne's ``AsyncHttpConsumer`` sends;
- ``websocket.*`` on ``/group/``: join the broadcast group on connect, send what arrives to the group;
- any other ``websocket.*``: accept, echo.
"""

from __future__ import annotations

from crossroads import Group, route

GROUP = "bench-broadcast"
HELLO = {"status": 200, "headers": [[b"content-type", b"text/plain"]], "content": b"Hello, world!"}


def hello(message) -> None:
    message.reply_channel.send(HELLO)


def accept(message) -> None:
    message.reply_channel.send({"accept": True})


def echo(message) -> None:
    if message.text is not None:
        message.reply_channel.send({"text": message.text})
    else:
        message.reply_channel.send({"bytes": message.get("bytes")})


def join(message) -> None:
    # Membership changes are immediate, so the member is in the group before its handshake completes.
    Group(GROUP).add(message.reply_channel)
    message.reply_channel.send({"accept": True})


def broadcast(message) -> None:
    Group(GROUP).send({"text": message.text})


def leave(message) -> None:
    Group(GROUP).discard(message.reply_channel)


def ignore(message) -> None:
    """An echo socket closing: nothing to do, routed so the worker does not count it as unrouted."""


routes = [
    route("http.request", hello),
    route("websocket.connect", join, path=r"^/group/"),
    route("websocket.receive", broadcast, path=r"^/group/"),
    route("websocket.disconnect", leave, path=r"^/group/"),
    route("websocket.connect", accept),
    route("websocket.receive", echo),
    route("websocket.disconnect", ignore),
]
