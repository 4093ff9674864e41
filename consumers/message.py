"""``Message``: what a consumer receives.

It reads like the dict it carries (``message["text"]``) and knows where it came
from: ``channel``, ``reply_channel`` and ``channel_layer``. The shortcuts
``text``, ``sender``, ``room`` and ``protocol`` read the keys every
``*.receive`` message carries (ARCHITECTURE decision 5), so one consumer can
serve every protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

from .channel import Channel


class Message(Mapping):
    """A received message: a read-only mapping over ``content``, plus where it came from."""

    # Set by decorators on the messages they serve; the class holds the default, so the others cost no stores.
    channel_session: Any = None  # set by @channel_session
    http_session: Any = None  # set by crossroads.django's @http_session (a Django session)
    user: Any = None  # set by crossroads.django's @http_session_user and @channel_session_user

    def __init__(self, content: dict, channel_name: str, channel_layer: Any = None) -> None:
        self.content = content
        self._channel_name = channel_name
        self.channel_layer = channel_layer
        reply = content.get("reply_channel")
        # Built now, not when first read: an invalid reply_channel is refused before the consumer runs.
        self.reply_channel = Channel(reply, channel_layer) if reply else None

    @cached_property
    def channel(self) -> Channel:
        """The channel it came on; built when first read (most consumers never do). Its name came from a receive,
        so it is valid: nothing is refused later than before."""
        return Channel(self._channel_name, self.channel_layer)

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
        return f"<Message on {self._channel_name} {self.content!r:.120}>"
