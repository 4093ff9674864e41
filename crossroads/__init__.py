"""crossroads: a protocol-bridge gateway.

Bridges translate HTTP, WebSocket, MQTT, IRC, email and Slack into messages on
named channels of a shared channel layer (``layer``); ordinary consumer
functions serve every protocol the same way. This package is the application:
the command line, config, the all-in-one runner and systemd integration, and
the public names a consumer module imports (re-exported from ``consumers``).
"""

from consumers import (
    BaseConsumer,
    Channel,
    ChatConsumer,
    ConsumeLater,
    DenyConnection,
    Group,
    JsonWebsocketConsumer,
    Message,
    RouteError,
    Router,
    WebsocketConsumer,
    channel_session,
    consumer_finished,
    consumer_started,
    enforce_ordering,
    include,
    route,
    route_class,
    set_default_layer,
)

__version__ = "0.1.0"

__all__ = [
    "BaseConsumer",
    "Channel",
    "ChatConsumer",
    "ConsumeLater",
    "DenyConnection",
    "Group",
    "JsonWebsocketConsumer",
    "Message",
    "RouteError",
    "Router",
    "WebsocketConsumer",
    "channel_session",
    "consumer_finished",
    "consumer_started",
    "enforce_ordering",
    "include",
    "route",
    "route_class",
    "set_default_layer",
]
