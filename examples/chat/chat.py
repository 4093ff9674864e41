"""The chat example: one consumer function for browsers (WebSocket), MQTT clients, IRC users, mail and Slack.

- ``GET /`` redirects to ``/chat/lobby/``; ``GET /chat/<room>/`` serves the page (page.html), which
  opens a WebSocket to ``/chat/<room>/?name=<name>``.
- MQTT clients publish to ``chat/<room>`` and subscribe to ``chat/<room>/out`` (crossroads.toml:
  reply_topic); IRC users talk in ``#<room>``; mail to ``<room>@chat.localhost`` joins the room, and
  its thread hears the room as replies; a Slack channel named ``<room>`` is the room.
- ``chat`` puts every sender's reply channel in the room's group and broadcasts every message to
  it as "[protocol] sender: text". docs/chat.md walks through running it.
"""

from __future__ import annotations

import html
import os
import re
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
    published on it (MQTT has no "join"), a mail thread or a Slack channel when it says something.
    Whatever one says reaches all of them, in their own protocol, as "[protocol] sender: text" (an
    IRC or Slack channel and a mail thread do not hear their own lines back: SEEN_ALREADY).
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
    elif message.text:  # websocket.receive, mqtt.receive, irc-client.receive, email.receive, slack.receive
        members.add(message.reply_channel)  # speaking joins (MQTT, mail, Slack), and renews the membership
        sender = message.channel_session.get("name") or message.sender or "someone"
        said = {"text": f"[{message.protocol}] {sender}: {message.text}"}
        if message.protocol in SEEN_ALREADY:
            # The line is already where it was said (an IRC or Slack channel, the sender's mail thread): the
            # rest of the room hears it, its own place not again.
            for member in members.channels():
                if member != message.reply_channel.name:
                    Channel(member).send(said)
        else:  # a browser shows its own lines when they come back, as an MQTT subscriber does
            members.send(said)


# Where everyone who hears the room saw a line already when it was said: an IRC or Slack channel shows it to all in
# it, and a mail thread has the mail in its sender's client (a copy back would be one more mail for each they send).
SEEN_ALREADY = {"irc", "slack", "email"}
ROOM_ADDRESS = re.compile(rf"^(?P<room>{ROOM})@chat\.localhost$", re.IGNORECASE)


def mail(message):
    """A mail to ROOM@chat.localhost: its thread joins the room (the first such recipient's), and its text is said.

    The mail's reply channel is its thread's, so the room's lines come back as replies in that thread. Automatic
    mail (a bounce, a vacation notice, a list: ``auto``) is no line anyone said: it is not relayed, and the email
    bridge does not answer it either (it answers a thread's latest mail), so the thread hears nothing more until
    its person writes again.
    """
    if message.get("auto"):
        return None
    for address in message.get("to") or []:
        found = ROOM_ADDRESS.match(address)
        if found:
            return chat(message, room=found["room"].lower())
    return None  # the bridge's domains let in nothing else; a mail to another domain it serves is not the chat's


def slack_other(message):
    """A Slack post that is in no room: a direct message to the app gets the hint IRC's private messages get; a
    post from a channel whose name the bridge has not looked up yet, a request to say it again.

    The bridge never holds a post back for a name (docs/spec/slack.md, Names) and looks it up for the next one:
    which room the channel is cannot be known yet, and the line is not sent to a room named by the channel's id.
    """
    if message.get("private"):
        private(message)
    elif message.get("channel_name") is None:
        message.reply_channel.send({"text": "(not relayed: I am still learning this channel's name; say that again)"})


def private(message):
    """A private message to the bridge (IRC, or a Slack DM): say where the chat is."""
    message.reply_channel.send({"text": "I relay the chat rooms: join #lobby (or any #room) and talk there."})


routes = [
    route("http.request", home, path=r"^/$"),
    route("http.request", page, path=rf"^/chat/(?P<room>{ROOM})/$"),
    route(["websocket.connect", "websocket.receive", "websocket.disconnect"], chat, path=rf"^/chat/(?P<room>{ROOM})/$"),
    route("mqtt.receive", chat, topic=rf"^chat/(?P<room>{ROOM})$"),  # publish to chat/ROOM, hear chat/ROOM/out
    route(["irc-client.join", "irc-client.receive"], chat, channel=rf"^#(?P<room>{ROOM})$"),
    route("irc-client.receive", private, room=r"^[^#&+!]"),  # a private message: its room is the sender's nick
    route("email.receive", mail),  # to ROOM@chat.localhost
    route("slack.receive", chat, channel_name=rf"^(?P<room>{ROOM})$"),  # the channel #ROOM, by its name
    route("slack.receive", slack_other),  # a DM, or a channel whose name is not known yet (just after a start)
]
