"""crossroads' side of ``bench/mqtt.py``: the consumers behind the MQTT bridge, and how they report.

Routed from the generated config as ``bench.mqtt_consumers:routes`` (the daemons run with the repository
root on ``PYTHONPATH``, so ``bench`` imports as a package). The plain
paho side of the same work is ``bench/mqtt_clients.py``.

- ``mqtt.receive`` on ``<setup>/q0/<run>`` and ``<setup>/q1/<run>``: count (messages, distinct sequence
  numbers, first and last arrival), per topic, so every run has its own counters;
- ``mqtt.receive`` on ``<setup>/rt/<name>``: echo the payload on the reply channel (the bridge publishes it on
  ``{topic}/reply``), at QoS 0, or at the bridge's default QoS for ``<setup>/rt/default``.

Reporting: ``bench/_arrivals.py`` writes the counters to the file named by ``BENCH_MQTT_STATE`` (a lock and a
set insert per message, the same as the bare subscriber's set).
"""

from __future__ import annotations

import os

from bench._arrivals import Arrivals
from crossroads import route

arrivals = Arrivals()
arrivals.report_to(os.environ.get("BENCH_MQTT_STATE"), "bench-mqtt-state")


def count(message) -> None:
    arrivals.count(message["topic"], int.from_bytes(message["payload"][:8], "big"))


def echo(message) -> None:
    # At QoS 0, like the requests and the bare responder; ``<setup>/rt/default`` leaves the QoS to the bridge
    # (its ``qos`` option, 1 by default), which is what a consumer that does not think about it gets.
    if message["topic"].endswith("/default"):
        message.reply_channel.send({"payload": message["payload"]})
    else:
        message.reply_channel.send({"payload": message["payload"], "qos": 0})


routes = [
    route("mqtt.receive", count, topic=r"^[^/]+/q[01]/"),
    route("mqtt.receive", echo, topic=r"^[^/]+/rt/"),
]
