"""Channels' side of ``bench/web.py``: the ASGI application Daphne serves, ``_web_channels:application``.

Runs in the channels_redis virtualenv (``.bench-venvs/channels_redis``: Daphne, Channels, Django,
channels_redis; no crossroads) with bench/ on ``PYTHONPATH`` and ``bench/_worker_django_settings.py``
as its settings, which pick the layer: ``BENCH_CHANNEL_LAYER=memory`` for ``InMemoryChannelLayer``,
else channels_redis at ``BENCH_REDIS_URL``.

What a Channels user would write, consumer for consumer with ``_web_crossroads.py``:

- HTTP: an ``AsyncHttpConsumer`` (Channels' own HTTP consumer; a Django view would add Django's request
  machinery, which crossroads' consumer does not have, so this is the like-for-like choice);
- WebSocket echo: the tutorial's synchronous ``WebsocketConsumer``;
- broadcast: a ``WebsocketConsumer`` with ``groups = [...]`` (``group_add`` on connect, ``group_discard``
  on disconnect) whose ``receive`` does ``group_send`` and whose handler sends to its socket.
"""

from __future__ import annotations

import django

django.setup()  # what an asgi.py does (via get_asgi_application) before importing consumers

from asgiref.sync import async_to_sync  # noqa: E402  (after django.setup(), as in an asgi.py)
from channels.generic.http import AsyncHttpConsumer  # noqa: E402
from channels.generic.websocket import WebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path, re_path  # noqa: E402

GROUP = "bench-broadcast"


class Hello(AsyncHttpConsumer):
    async def handle(self, body: bytes) -> None:
        await self.send_response(200, b"Hello, world!", headers=[(b"content-type", b"text/plain")])


class Echo(WebsocketConsumer):
    """Accepts on connect (the default ``connect``), echoes text and bytes."""

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.send(text_data=text_data, bytes_data=bytes_data)


class Broadcast(WebsocketConsumer):
    groups = [GROUP]

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        async_to_sync(self.channel_layer.group_send)(GROUP, {"type": "broadcast.message", "text": text_data})

    def broadcast_message(self, event: dict) -> None:
        self.send(text_data=event["text"])


application = ProtocolTypeRouter({
    "http": Hello.as_asgi(),
    "websocket": URLRouter([path("group/", Broadcast.as_asgi()), re_path(r"", Echo.as_asgi())]),
})
