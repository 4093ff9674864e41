"""crossroads: a protocol-bridge gateway.

Bridges translate HTTP, WebSocket, MQTT, IRC, email and Slack into messages on
named channels of a shared channel layer (``layer``); ordinary consumer
functions serve every protocol the same way. This package is the application:
the command line now, and config, the all-in-one runner and systemd
integration as they land.
"""

__version__ = "0.1.0"
