"""Class-based consumers: a method per channel, and ready-made WebSocket and chat behaviour.

A class is routed with ``route_class(MyConsumer, path=...)``; the router calls
``MyConsumer(message, **kwargs)``, which runs the method mapped to the
message's channel. Subclasses override methods, not dispatch.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .channel import Group
from .message import Message
from .sessions import channel_session, enforce_ordering


class BaseConsumer:
    """``method_mapping`` maps channel names to method names; each method gets the message and kwargs."""

    method_mapping: dict[str, str] = {}
    channel_session = False  # wrap every method in @channel_session

    def __init__(self, message: Message, **kwargs: Any) -> None:
        self.message = message
        self.kwargs = kwargs
        handler = self.get_handler(message)
        handler(message, **kwargs)

    @classmethod
    def channel_names(cls) -> set[str]:
        return set(cls.method_mapping)

    def get_handler(self, message: Message) -> Any:
        handler = getattr(self, self.method_mapping[message.channel.name])
        return channel_session(handler) if self.channel_session else handler


class WebsocketConsumer(BaseConsumer):
    """connect / receive / disconnect, with ``groups`` joined on connect and left on disconnect."""

    method_mapping = {
        "websocket.connect": "raw_connect",
        "websocket.receive": "raw_receive",
        "websocket.disconnect": "raw_disconnect",
    }
    groups: list[str] = []
    strict_ordering = False  # run each socket's frames in their order (uses the channel session)
    slight_ordering = False  # only hold frames back until the connect has run (Channels 1.x's name)

    def get_handler(self, message: Message) -> Any:
        handler = super().get_handler(message)
        if self.strict_ordering or self.slight_ordering:
            return enforce_ordering(handler, slight=not self.strict_ordering)
        return handler

    def connection_groups(self, **kwargs: Any) -> list[str]:
        """The groups this socket belongs to; override to depend on the path's kwargs."""
        return list(self.groups)

    def raw_connect(self, message: Message, **kwargs: Any) -> None:
        for group in self.connection_groups(**kwargs):
            Group(group).add(message.reply_channel)
        self.connect(message, **kwargs)

    def connect(self, message: Message, **kwargs: Any) -> None:
        """Accept by default; raise DenyConnection (or send {"close": True}) to refuse."""
        self.message.reply_channel.send({"accept": True})

    def raw_receive(self, message: Message, **kwargs: Any) -> None:
        if message.get("text") is not None:
            self.receive(text=message["text"], **kwargs)
        else:
            self.receive(bytes=message.get("bytes"), **kwargs)

    def receive(self, text: str | None = None, bytes: bytes | None = None, **kwargs: Any) -> None:  # noqa: A002
        """Called with the frame's text or bytes; override."""

    def send(self, text: str | None = None, bytes: bytes | None = None, close: bool | int = False) -> None:  # noqa: A002
        content: dict[str, Any] = {}
        if text is not None:
            content["text"] = text
        elif bytes is not None:
            content["bytes"] = bytes
        if close:
            content["close"] = close
        self.message.reply_channel.send(content)

    def group_send(self, name: str, text: str | None = None, bytes: bytes | None = None) -> None:  # noqa: A002
        Group(name).send({"text": text} if text is not None else {"bytes": bytes})

    def close(self, code: int | bool = True) -> None:
        self.message.reply_channel.send({"close": code})

    def raw_disconnect(self, message: Message, **kwargs: Any) -> None:
        for group in self.connection_groups(**kwargs):
            Group(group).discard(message.reply_channel)
        self.disconnect(message, **kwargs)

    def disconnect(self, message: Message, **kwargs: Any) -> None:
        """Called when the socket has closed; override."""


class JsonWebsocketConsumer(WebsocketConsumer):
    """Frames are JSON: ``receive(content)`` gets the decoded value, ``send(content)`` encodes it."""

    def raw_receive(self, message: Message, **kwargs: Any) -> None:
        if message.get("text") is None:
            return self.close(1003)  # unsupported data: this consumer speaks JSON text frames
        try:
            content = json.loads(message["text"])
        except ValueError:
            return self.close(1007)  # invalid payload
        self.receive(content, **kwargs)

    def receive(self, content: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Called with the decoded JSON of each frame; override."""

    def send(self, content: Any, close: bool | int = False) -> None:  # type: ignore[override]
        super().send(text=json.dumps(content), close=close)

    def group_send(self, name: str, content: Any) -> None:  # type: ignore[override]
        super().group_send(name, text=json.dumps(content))


def room_group(room: str) -> str:
    """The group name of a room, whatever the protocol wrote it as ('/chat/lobby', '#lobby', 'chat/lobby')."""
    cleaned = re.sub(r"[^a-zA-Z0-9_-]+", ".", room).strip(".")
    return ("room." + (cleaned or "default"))[:99]


class ChatConsumer(BaseConsumer):
    """Protocol-neutral chat on the keys every ``*.receive`` message carries: on_join, on_message, on_leave.

    Stateful protocols announce joins and leaves (WebSocket connect/disconnect);
    stateless ones (MQTT, IRC channels, email, Slack) join a room by speaking in
    it. Every member gets ``{"text": "sender: text"}`` in its own protocol.
    """

    join_channels = ["websocket.connect"]
    leave_channels = ["websocket.disconnect"]
    message_channels = ["websocket.receive", "mqtt.receive", "irc-client.receive", "email.receive", "slack.receive"]
    accept_channels = {"websocket.connect"}  # connections that wait for {"accept": True}

    @classmethod
    def channel_names(cls) -> set[str]:
        return {*cls.join_channels, *cls.leave_channels, *cls.message_channels}

    def get_handler(self, message: Message) -> Any:
        name = message.channel.name
        if name in self.join_channels:
            handler = self.raw_join
        elif name in self.leave_channels:
            handler = self.raw_leave
        else:
            handler = self.raw_message
        return channel_session(handler) if self.channel_session else handler

    def room_of(self, message: Message, **kwargs: Any) -> str:
        return kwargs.get("room") or message.room or message.get("path") or "default"

    def raw_join(self, message: Message, **kwargs: Any) -> None:
        room = self.room_of(message, **kwargs)
        if message.channel.name in self.accept_channels:
            message.reply_channel.send({"accept": True})
        Group(room_group(room)).add(message.reply_channel)
        self.on_join(room, message)

    def raw_message(self, message: Message, **kwargs: Any) -> None:
        room = self.room_of(message, **kwargs)
        if message.reply_channel is not None:  # speaking in a room joins it (and renews the membership)
            Group(room_group(room)).add(message.reply_channel)
        if message.text is not None:
            self.on_message(room, message.text, message)

    def raw_leave(self, message: Message, **kwargs: Any) -> None:
        room = self.room_of(message, **kwargs)
        Group(room_group(room)).discard(message.reply_channel)
        self.on_leave(room, message)

    def on_join(self, room: str, message: Message) -> None:
        """Someone joined ``room``; override to greet them."""

    def on_message(self, room: str, text: str, message: Message) -> None:
        """Broadcast to the room; override to change the format or filter."""
        Group(room_group(room)).send({"text": f"{message.sender or 'someone'}: {text}"})

    def on_leave(self, room: str, message: Message) -> None:
        """Someone left ``room``; override to announce it."""
