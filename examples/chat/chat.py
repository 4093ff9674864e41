"""The chat example: one consumer function for browsers (WebSocket), MQTT clients and IRC users.

- ``GET /`` redirects to ``/chat/lobby/``; ``GET /chat/<room>/`` serves the page (page.html), which
  opens a WebSocket to ``/chat/<room>/?name=<name>``.
- MQTT clients publish to ``chat/<room>`` and subscribe to ``chat/<room>/out`` (crossroads.toml:
  reply_topic); IRC users talk in ``#<room>``.
- ``chat`` puts every sender's reply channel in the room's group and broadcasts every message to
  it as "[protocol] sender: text". docs/chat.md walks through running it.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import parse_qs

from crossroads import Channel, Group, channel_session, room_group, route

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


ROOM = r"[\w-]{1,40}"


@channel_session
def chat(message, room):
    """The whole chat, for every protocol: who is in a room, and saying something to it.

    A room's members are reply channels in ``Group(room_group(room))``: a browser's socket joins
    when it connects, an IRC channel when the bridge joins it, an MQTT topic when something is
    published on it (MQTT has no "join"). Whatever one says reaches all of them, in their own
    protocol, as "[protocol] sender: text" (an IRC channel does not hear its own lines back).
    """
    members = Group(room_group(room))
    kind = message.channel.name
    if kind == "websocket.connect":
        query = parse_qs((message.get("query_string") or b"").decode("latin-1"))
        message.channel_session["name"] = (query.get("name") or [""])[0].strip()[:40] or "guest"
        message.reply_channel.send({"accept": True})
        members.add(message.reply_channel)
    elif kind == "websocket.disconnect":
        members.discard(message.reply_channel)
    elif kind == "irc-client.join":
        if message["ours"]:  # the bridge itself joined #room: the IRC channel hears the room from now on
            members.add(message.reply_channel)
    elif message.text:  # websocket.receive, mqtt.receive, irc-client.receive
        members.add(message.reply_channel)  # speaking joins (MQTT), and renews the membership before it expires
        sender = message.channel_session.get("name") or message.sender or "someone"
        said = {"text": f"[{message.protocol}] {sender}: {message.text}"}
        if message.protocol == "irc":
            # Everyone in the IRC channel saw the line already: the rest of the room hears it, the channel not again.
            for member in members.channels():
                if member != message.reply_channel.name:
                    Channel(member).send(said)
        else:  # a browser shows its own lines when they come back, as an MQTT subscriber does
            members.send(said)


def private(message):
    """A private IRC message to the bridge: say where the chat is."""
    message.reply_channel.send({"text": "I relay the chat rooms: join #lobby (or any #room) and talk there."})


routes = [
    route("http.request", home, path=r"^/$"),
    route("http.request", page, path=rf"^/chat/(?P<room>{ROOM})/$"),
    route(["websocket.connect", "websocket.receive", "websocket.disconnect"], chat, path=rf"^/chat/(?P<room>{ROOM})/$"),
    route("mqtt.receive", chat, topic=rf"^chat/(?P<room>{ROOM})$"),  # publish to chat/ROOM, hear chat/ROOM/out
    route(["irc-client.join", "irc-client.receive"], chat, channel=rf"^#(?P<room>{ROOM})$"),
    route("irc-client.receive", private, room=r"^[^#&+!]"),  # a private message: its room is the sender's nick
]
