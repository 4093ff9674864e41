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

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Only the consumer API's names (and __all__, for `from crossroads import *`) load the consumer
    # runtime: not probes for private names, and not `from crossroads import layer`, which asks for
    # the attribute before it imports the submodule.
    if (name.startswith("_") and name != "__all__") or importlib.util.find_spec(f"{__name__}.{name}"):
        raise AttributeError(f"module 'crossroads' has no attribute {name!r}")
    consumers = importlib.import_module("crossroads.consumers")
    if name == "__all__":
        return list(consumers.__all__)
    if name in consumers.__all__:
        value = getattr(consumers, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crossroads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *importlib.import_module("crossroads.consumers").__all__})
