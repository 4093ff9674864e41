"""crossroads: a protocol-bridge gateway.

Bridges (``crossroads.bridges``) translate HTTP, WebSocket, MQTT and IRC (email
and Slack are planned) into messages on named channels of a shared channel layer
(``crossroads.layer``); ordinary consumer functions (``crossroads.consumers``)
serve every protocol the same way. This package is the application: the command
line, config, the all-in-one runner and systemd integration, and the public
names a consumer module imports (``from crossroads import route, Group``).

The public names are looked up on first use (PEP 562), so a bridge process that
imports ``crossroads.bridges`` or ``crossroads.layer`` does not load the consumer
runtime it never runs.
"""

from typing import Any

__version__ = "0.1.0"

# The public API lives in crossroads.consumers; keep this list equal to its __all__ (a test checks).
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
    "room_group",
    "route",
    "route_class",
    "set_default_layer",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crossroads import consumers

        value = getattr(consumers, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crossroads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
