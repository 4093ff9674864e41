"""The programming model: what a user's consumer module touches.

Users import these names from ``crossroads`` (``from crossroads import route, Group``);
this package holds them: ``Message`` (message.py), ``Channel``/``Group`` and the
send buffer (channel.py), routing (routing.py), sessions and ordering
(sessions.py), class-based consumers (generic.py), running one message
(dispatch.py), the worker (worker.py), the test client (testing.py) and a request body
read as a file, streamed when large (body.py).
"""

from .body import BodyUnavailable, RequestBody
from .channel import Channel, Group, set_default_layer
from .exceptions import ConsumeLater, DenyConnection, RouteError
from .generic import BaseConsumer, ChatConsumer, JsonWebsocketConsumer, WebsocketConsumer, room_group
from .message import Message
from .routing import Router, include, route, route_class
from .sessions import channel_session, enforce_ordering
from .signals import consumer_finished, consumer_started

__all__ = [
    "BaseConsumer",
    "BodyUnavailable",
    "Channel",
    "ChatConsumer",
    "ConsumeLater",
    "DenyConnection",
    "Group",
    "JsonWebsocketConsumer",
    "Message",
    "RequestBody",
    "RouteError",
    "Router",
    "WebsocketConsumer",
    "channel_session",
    "consumer_finished",
    "consumer_started",
    "enforce_ordering",
    "include",
    "room_group",
    "route",
    "route_class",
    "set_default_layer",
]
