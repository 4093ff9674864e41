"""The plain paho-mqtt clients of ``bench/mqtt.py``: the load (publisher, requester) and the competitor
(a bare subscriber, a bare responder), each what a user would hand-write with paho's own loop.

Owns these four client modes, run as ``python bench/mqtt_clients.py '<json spec>'`` with the
``.bench-venvs/paho`` interpreter (paho-mqtt alone, at ``.venv``'s version, so the only difference with
crossroads is what sits between the broker and the consumer):

- ``publish``: flood ``count`` payloads of ``size`` bytes to one topic at ``qos`` as fast as paho sends them;
- ``subscribe``: count what arrives on a topic filter (the bare competitor of the bridge + counting consumer);
- ``respond``: answer every message on a filter on ``{topic}/reply`` (the floor of the round trip);
- ``request``: sequential requests, each waiting for its reply: round-trip latencies.

Every payload starts with its sequence number (8 bytes, big-endian), so a receiver can count distinct
messages (QoS 1 may deliver twice) and a requester can match its reply. Each mode prints JSON lines on
stdout: ``{"ready": true}`` once it is subscribed (where it subscribes), then its result as the last line.
Timestamps are ``time.monotonic_ns()``, one clock for every process on Linux.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

CONNECT_TIMEOUT = 10.0


def payload(seq: int, size: int) -> bytes:
    return seq.to_bytes(8, "big") + b"x" * (size - 8)


def seq_of(data: bytes) -> int:
    return int.from_bytes(data[:8], "big")


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def connected_client(spec: dict[str, Any], name: str) -> mqtt.Client:
    """A client connected (CONNACK received) with paho's own loop, no thread: the simplest hand-written client."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5 if spec.get("protocol", 5) == 5 else mqtt.MQTTv311)
    state: dict[str, Any] = {}

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        state["reason"] = reason

    client.on_connect = on_connect
    client.connect(spec["host"], spec["port"], keepalive=60)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while "reason" not in state:
        client.loop(timeout=0.1)
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no CONNACK from {spec['host']}:{spec['port']} in {CONNECT_TIMEOUT:g} s")
    if state["reason"].is_failure:
        raise SystemExit(f"{name}: connection refused: {state['reason']}")
    return client


def subscribed(client: mqtt.Client, topic: str, qos: int) -> None:
    """Subscribe and wait for the SUBACK: only then can the load start without losing its first messages."""
    acked: list[Any] = []
    client.on_subscribe = lambda client, userdata, mid, reasons, props: acked.append(reasons)
    client.subscribe(topic, qos=qos)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while not acked:
        client.loop(timeout=0.1)
        if time.monotonic() > deadline:
            raise SystemExit(f"no SUBACK for {topic}")
    if any(reason.is_failure for reason in acked[0]):
        raise SystemExit(f"subscription to {topic} refused: {acked[0]}")


def publish(spec: dict[str, Any]) -> dict[str, Any]:
    """QoS 0: publish() writes straight to the socket (no loop thread), then drain what is left.
    QoS 1: paho keeps 20 messages in flight (its default) and we read PUBACKs as we go."""
    client = connected_client(spec, "publisher")
    count, size, qos, topic = spec["count"], spec["size"], spec["qos"], spec["topic"]
    acked = [0]
    client.on_publish = lambda client, userdata, mid, reason, props: acked.__setitem__(0, acked[0] + 1)
    bodies = [payload(seq, size) for seq in range(count)]  # built before the clock starts
    start = time.monotonic_ns()
    for seq, body in enumerate(bodies):
        client.publish(topic, body, qos=qos)
        if qos and seq % 20 == 19:
            client.loop(timeout=0)  # read PUBACKs, release queued messages into flight
    deadline = time.monotonic() + spec.get("timeout", 120)
    while client.want_write() or (qos and acked[0] < count):
        client.loop(timeout=0.05)
        if time.monotonic() > deadline:
            raise SystemExit(f"publisher: {acked[0]} of {count} acknowledged before the deadline")
    end = time.monotonic_ns()
    client.disconnect()
    client.loop(timeout=0.1)
    return {"published": count, "start_ns": start, "end_ns": end, "msg_per_s": count / ((end - start) / 1e9)}


def subscribe(spec: dict[str, Any]) -> dict[str, Any]:
    """Count until ``expect`` distinct messages arrived, or none arrived for ``idle`` seconds after the first
    one (the rest are lost), or the deadline."""
    client = connected_client(spec, "subscriber")
    seen: set[int] = set()
    stamps = {"received": 0, "first_ns": 0, "last_ns": 0}
    cpu_at_first = [time.process_time()]  # the CPU this process spent receiving, not importing and connecting

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic_ns()
        if not stamps["received"]:
            stamps["first_ns"] = now
            cpu_at_first[0] = time.process_time()
        stamps["received"] += 1
        stamps["last_ns"] = now
        seen.add(seq_of(message.payload))

    client.on_message = on_message
    subscribed(client, spec["topic"], spec["qos"])
    emit({"ready": True})
    expect, idle = spec["expect"], spec.get("idle", 3.0)
    deadline = time.monotonic() + spec.get("timeout", 120)
    last_count, last_change = 0, time.monotonic()
    while len(seen) < expect:
        client.loop(timeout=0.2)  # what loop_forever() does, with our exit conditions between calls
        now = time.monotonic()
        if stamps["received"] != last_count:
            last_count, last_change = stamps["received"], now
        elif now - last_change > idle and stamps["received"] or now > deadline:
            break
    cpu = time.process_time() - cpu_at_first[0]
    client.disconnect()
    return {**stamps, "distinct": len(seen), "expected": expect, "cpu_s": cpu}


def respond(spec: dict[str, Any]) -> dict[str, Any]:
    """Echo each message's payload to ``{topic}/reply`` at ``reply_qos`` until stdin has a line (the harness says
    stop)."""
    import selectors

    client = connected_client(spec, "responder")
    answered = [0]

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        client.publish(f"{message.topic}/reply", message.payload, qos=spec["reply_qos"])
        answered[0] += 1

    client.on_message = on_message
    subscribed(client, spec["topic"], spec["qos"])
    emit({"ready": True})
    stdin = selectors.DefaultSelector()
    stdin.register(sys.stdin, selectors.EVENT_READ)
    checked = time.monotonic()
    while True:
        client.loop(timeout=0.2)
        if time.monotonic() - checked > 0.2:  # not after every message: the floor should not pay for our exit
            if stdin.select(timeout=0):
                break
            checked = time.monotonic()
    client.disconnect()
    return {"answered": answered[0]}


def request(spec: dict[str, Any]) -> dict[str, Any]:
    """``warmup`` then ``count`` requests, one at a time: publish, wait for the reply with the same sequence
    number. A reply that does not come within ``timeout`` seconds counts as lost and the next request goes."""
    client = connected_client(spec, "requester")
    replies: list[int] = []
    client.on_message = lambda client, userdata, message: replies.append(seq_of(message.payload))
    subscribed(client, f"{spec['topic']}/reply", spec["qos"])
    latencies: list[int] = []
    lost = 0
    total = spec["warmup"] + spec["count"]
    for seq in range(total):
        body = payload(seq, spec["size"])
        replies.clear()
        sent = time.monotonic_ns()
        client.publish(spec["topic"], body, qos=spec["qos"])
        deadline = time.monotonic() + spec.get("timeout", 5.0)
        while seq not in replies:
            client.loop(timeout=0.05)
            if time.monotonic() > deadline:
                lost += 1
                break
        else:
            if seq >= spec["warmup"]:
                latencies.append(time.monotonic_ns() - sent)
        if seq % 500 == 499:
            print(f"  {seq + 1:,} of {total:,} requests", file=sys.stderr, flush=True)
    client.disconnect()
    return {"latencies_ns": latencies, "lost": lost}


def versions(spec: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    return {name: version(name) for name in spec["packages"]}


MODES = {"publish": publish, "subscribe": subscribe, "respond": respond, "request": request, "versions": versions}

if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    emit(MODES[given["mode"]](given))
