"""``Message``: what a consumer receives.

It reads like the dict it carries (``message["text"]``) and knows where it came
from: ``channel``, ``reply_channel`` and ``channel_layer``. The shortcuts
``text``, ``sender``, ``room`` and ``protocol`` read the keys every
``*.receive`` message carries (ARCHITECTURE decision 5), so one consumer can
serve every protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .channel import Channel


class Message(Mapping):
    """A received message: a read-only mapping over ``content``, plus where it came from."""

    def __init__(self, content: dict, channel_name: str, channel_layer: Any = None) -> None:
        self.content = content
        self.channel = Channel(channel_name, channel_layer)
        self.channel_layer = channel_layer
        reply = content.get("reply_channel")
        self.reply_channel = Channel(reply, channel_layer) if reply else None
        self.channel_session: Any = None  # set by @channel_session
        self.http_session: Any = None  # set by crossroads.django's @http_session (a Django session)
        self.user: Any = None  # set by crossroads.django's @http_session_user and @channel_session_user

    def __getitem__(self, key: str) -> Any:
        return self.content[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.content)

    def __len__(self) -> int:
        return len(self.content)

    @property
    def text(self) -> str | None:
        return self.content.get("text")

    @property
    def sender(self) -> str | None:
        return self.content.get("sender")

    @property
    def room(self) -> str | None:
        return self.content.get("room")

    @property
    def protocol(self) -> str | None:
        return self.content.get("protocol")

    def __repr__(self) -> str:
        return f"<Message on {self.channel.name} {self.content!r:.120}>"
