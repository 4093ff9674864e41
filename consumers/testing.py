"""Test your consumers without any server.

    from crossroads.testing import Client

    def test_echo():
        client = Client("myapp.routing:routes")
        client.send_and_consume("websocket.receive", {"text": "hi", "path": "/echo/"})
        assert client.receive() == {"text": "hi"}

The client has its own in-memory layer and its own reply channel, and runs each
message through the same ``Dispatcher`` the worker uses: routing, sessions,
buffered sends, exceptions and all. Nothing runs in the background, so tests
are deterministic: a message is consumed exactly when you say ``consume``.
"""

from __future__ import annotations

from typing import Any

from crossroads import layer

from .channel import Group
from .dispatch import Dispatcher


class Client:
    """Sends messages to your routes, runs the consumers, and reads what they sent."""

    def __init__(self, routing: Any, channel_layer: Any = None) -> None:
        self.channel_layer = channel_layer or layer.from_url("memory://")
        self.sync = self.channel_layer.sync
        self.dispatcher = Dispatcher(routing, self.channel_layer)
        self.reply_channel = self.sync.new_channel("test.client?")

    def send(self, channel: str, content: dict | None = None, reply_channel: str | None = None) -> None:
        """Put a message on ``channel``; it carries this client's reply channel unless it names one."""
        content = dict(content or {})
        content.setdefault("reply_channel", reply_channel or self.reply_channel)
        self.sync.send(channel, content)

    def consume(self, channel: str, fail_on_none: bool = True) -> bool:
        """Take the next message on ``channel`` and run its consumer; False if there was none."""
        got, content = self.sync.receive([channel], timeout=0)
        if got is None:
            if fail_on_none:
                raise AssertionError(f"no message on {channel} to consume")
            return False
        self.dispatcher.handle(got, content)
        return True

    def send_and_consume(self, channel: str, content: dict | None = None, reply_channel: str | None = None) -> None:
        self.send(channel, content, reply_channel)
        self.consume(channel)

    def receive(self, channel: str | None = None) -> dict | None:
        """The next message sent to this client's reply channel (or ``channel``), or None."""
        return self.sync.receive([channel or self.reply_channel], timeout=0)[1]

    def receive_all(self, channel: str | None = None) -> list[dict]:
        messages = []
        while (message := self.receive(channel)) is not None:
            messages.append(message)
        return messages

    def join_group(self, name: str) -> None:
        """Make this client's reply channel a member of group ``name``."""
        Group(name, self.channel_layer).add(self.reply_channel)

    @property
    def counters(self) -> Any:
        """What the dispatcher counted: consumed, errors, unrouted, requeued, ..."""
        return self.dispatcher.counters
