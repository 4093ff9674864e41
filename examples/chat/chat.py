"""The chat example: rooms by path, one consumer for every protocol, and the page that joins a room.

- ``GET /`` redirects to ``/chat/lobby/``; ``GET /chat/<room>/`` serves the page (page.html).
- The page opens a WebSocket to ``/chat/<room>/?name=<name>``; ``Chat`` (a ChatConsumer) adds the
  socket to the room's group, and every message said in the room, on any protocol, reaches everyone.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import parse_qs

from crossroads import ChatConsumer, Group, room_group, route, route_class

PAGE = (Path(__file__).parent / "page.html").read_text()
# The port of the WebSocket bridge the page connects to, when it has one of its own; empty (as in
# crossroads.toml, where [bridges.sockets] serves the HTTP bridge's port) means the page's own port.
WEBSOCKET_PORT = os.environ.get("CHAT_WEBSOCKET_PORT", "")


def page(message, room):
    body = PAGE.replace("{{room}}", html.escape(room)).replace("{{websocket_port}}", html.escape(WEBSOCKET_PORT))
    message.reply_channel.send({
        "status": 200,
        "headers": [[b"content-type", b"text/html; charset=utf-8"], [b"cache-control", b"no-store"]],
        "content": body.encode(),
    })


def home(message):
    message.reply_channel.send({"status": 302, "headers": [[b"location", b"/chat/lobby/"]], "content": b""})


class Chat(ChatConsumer):
    """Chat with names: a WebSocket says who it is in its URL (``?name=``); other protocols bring a sender."""

    channel_session = True

    def on_join(self, room, message):
        query = parse_qs((message.get("query_string") or b"").decode("latin-1"))
        name = (query.get("name") or [""])[0].strip()[:40]
        message.channel_session["name"] = name or message.sender or "someone"

    def on_message(self, room, text, message):
        name = message.channel_session.get("name") or message.sender or "someone"
        Group(room_group(room)).send({"text": f"{name}: {text}"})


routes = [
    route("http.request", home, path=r"^/$"),
    route("http.request", page, path=r"^/chat/(?P<room>[\w-]{1,40})/$"),
    route_class(Chat, path=r"^/chat/(?P<room>[\w-]{1,40})/$"),
]
