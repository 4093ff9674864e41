"""crossroads: a protocol-bridge gateway.

Bridges translate HTTP, WebSocket, MQTT, IRC, email and Slack into messages on
named channels of a shared channel layer (``layer``); ordinary consumer
functions serve every protocol the same way. This package is the application:
the command line, config, the all-in-one runner and systemd integration, and
the public names a consumer module imports (re-exported from ``consumers``).
"""

import consumers
from consumers import *  # noqa: F403  (the public API lives in consumers/; users import it from here)

__version__ = "0.1.0"

__all__ = list(consumers.__all__)
