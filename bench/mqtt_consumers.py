"""crossroads' side of ``bench/mqtt.py``: the consumers behind the MQTT bridge, and how they report.

Routed from the generated config as ``bench.mqtt_consumers:routes`` (the daemons run with the repository
root on ``PYTHONPATH``, so ``bench`` imports as a package). The plain
paho side of the same work is ``bench/mqtt_clients.py``.

- ``mqtt.receive`` on ``<setup>/q0/<run>`` and ``<setup>/q1/<run>``: count (messages, distinct sequence
  numbers, first and last arrival), per topic, so every run has its own counters;
- ``mqtt.receive`` on ``<setup>/rt/<name>``: echo the payload on the reply channel (the bridge publishes it on
  ``{topic}/reply``), at QoS 0, or at the bridge's default QoS for ``<setup>/rt/default``.

Reporting: a daemon thread writes the counters as JSON to the file named by ``BENCH_MQTT_STATE`` (atomically:
a temporary file, then a rename) whenever they changed, at most every 50 ms. The harness reads that file
with a deadline; nothing rides on the layer or the broker, which are what is being measured. Counting costs
a lock and a set insert per message, the same as the bare subscriber's set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from crossroads import route

STATE_PATH = os.environ.get("BENCH_MQTT_STATE")
WRITE_EVERY = 0.05

_lock = threading.Lock()
_counts: dict[str, dict[str, Any]] = {}
_seen: dict[str, set[int]] = {}
_version = 0


def count(message) -> None:
    now = time.monotonic_ns()
    topic = message["topic"]
    seq = int.from_bytes(message["payload"][:8], "big")
    global _version
    with _lock:  # the worker runs 4 consumer threads by default
        counters = _counts.get(topic)
        if counters is None:
            counters = _counts[topic] = {"received": 0, "first_ns": now, "last_ns": now}
            _seen[topic] = set()
        counters["received"] += 1
        counters["last_ns"] = now
        _seen[topic].add(seq)
        _version += 1


def echo(message) -> None:
    # At QoS 0, like the requests and the bare responder; ``<setup>/rt/default`` leaves the QoS to the bridge
    # (its ``qos`` option, 1 by default), which is what a consumer that does not think about it gets.
    if message["topic"].endswith("/default"):
        message.reply_channel.send({"payload": message["payload"]})
    else:
        message.reply_channel.send({"payload": message["payload"], "qos": 0})


def snapshot() -> dict[str, Any]:
    with _lock:
        return {topic: {**c, "distinct": len(_seen[topic])} for topic, c in _counts.items()}


def _writer(path: str) -> None:
    written = 0
    while True:
        time.sleep(WRITE_EVERY)
        if _version == written:
            continue
        written = _version
        state = snapshot()
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as out:
            json.dump(state, out)
        os.replace(temporary, path)


if STATE_PATH:  # only where the harness asked for it: importing the routing table elsewhere starts nothing
    threading.Thread(target=_writer, args=(STATE_PATH,), name="bench-mqtt-state", daemon=True).start()

routes = [
    route("mqtt.receive", count, topic=r"^[^/]+/q[01]/"),
    route("mqtt.receive", echo, topic=r"^[^/]+/rt/"),
]
