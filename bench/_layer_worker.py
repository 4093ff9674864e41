"""One side of one channel-layer benchmark case, run in its own process by ``bench/layer.py``.

Owns the contenders' client code (crossroads' Redis layer, sync and async faces; channels_redis 4.x;
plain redis-py) behind one small async interface, and the three roles a process can play:
``consume``, ``produce`` and ``group``. It measures and reports raw figures (timestamps, latencies,
call times) as one JSON line on stdout; every statistic is computed by ``bench/layer.py``.

This file runs under two interpreters: the project's ``.venv`` (crossroads, redis-py) and the
channels_redis virtualenv, which has no crossroads. So it imports only the standard library,
msgpack and redis at the top, and each contender's package when that contender is chosen.

Usage (by bench/layer.py only): ``python bench/_layer_worker.py '<JSON spec>'``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import sys
import threading
import time
from typing import Any

import msgpack

MESSAGE_BYTES = 256
GROUP = "bench.group"
IDLE_LIMIT = 15.0  # seconds without a message before a consumer gives up and reports what it got


def bench_message() -> dict[str, Any]:
    """A message whose msgpack form is exactly MESSAGE_BYTES with any ``t`` from time.monotonic_ns().

    monotonic_ns() is above 2**32 after 4.3 s of uptime, so it always packs as a 9-byte uint64.
    """
    overhead = len(msgpack.packb({"text": "", "t": 2**62}, use_bin_type=True))
    # A str of 32..255 bytes takes one more header byte than an empty one.
    return {"text": "x" * (MESSAGE_BYTES - overhead - 1), "t": 0}


class Contender:
    """The operations the benchmark needs; each contender maps them onto its own API.

    Everything is a coroutine so that one driver serves blocking and async clients alike. For a
    blocking client the wrapper costs well under a microsecond per call (no suspension happens),
    against tens of microseconds for the Redis round trip it wraps.
    """

    async def new_channel(self) -> tuple[str, list[str]]:
        """A process-local channel: (name to send to, channels to receive on)."""
        raise NotImplementedError

    async def send(self, channel: str, message: dict) -> None:
        raise NotImplementedError

    async def send_batch(self, items: list[tuple[str, dict]]) -> None:
        raise NotImplementedError

    async def receive(self, channels: list[str]) -> list[dict]:
        """One message, as a one-item list so single and batched receives share the consumer loop."""
        raise NotImplementedError

    async def receive_batch(self, channels: list[str], limit: int) -> list[dict]:
        raise NotImplementedError

    async def group_add(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def group_send(self, group: str, message: dict) -> int | None:
        """Send to a group; return the drops the layer reported, or None if it reports nothing."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


class CrossroadsSync(Contender):
    """crossroads' Redis layer, blocking face (``layer.sync``), as worker threads use it."""

    def __init__(self, url: str, capacity: int) -> None:
        from crossroads import layer

        self.layer = layer.from_url(url, capacity=capacity)
        self.face = self.layer.sync

    async def new_channel(self) -> tuple[str, list[str]]:
        return self.face.new_channel("bench!"), ["bench!"]

    async def send(self, channel: str, message: dict) -> None:
        self.face.send(channel, message)

    async def send_batch(self, items: list[tuple[str, dict]]) -> None:
        self.face.send_many(items)

    async def receive(self, channels: list[str]) -> list[dict]:
        return [self.face.receive(channels)[1]]

    async def receive_batch(self, channels: list[str], limit: int) -> list[dict]:
        return [message for _, message in self.face.receive_many(channels, limit)]

    async def group_add(self, group: str, channel: str) -> None:
        self.face.group_add(group, channel)

    async def group_send(self, group: str, message: dict) -> int | None:
        return self.face.group_send(group, message).dropped

    async def close(self) -> None:
        self.face.close()


class CrossroadsAsync(CrossroadsSync):
    """crossroads' Redis layer, async face, as bridges on the event loop use it."""

    async def new_channel(self) -> tuple[str, list[str]]:
        return await self.layer.new_channel("bench!"), ["bench!"]

    async def send(self, channel: str, message: dict) -> None:
        await self.layer.send(channel, message)

    async def send_batch(self, items: list[tuple[str, dict]]) -> None:
        await self.layer.send_many(items)

    async def receive(self, channels: list[str]) -> list[dict]:
        return [(await self.layer.receive(channels))[1]]

    async def receive_batch(self, channels: list[str], limit: int) -> list[dict]:
        return [message for _, message in await self.layer.receive_many(channels, limit)]

    async def group_add(self, group: str, channel: str) -> None:
        await self.layer.group_add(group, channel)

    async def group_send(self, group: str, message: dict) -> int | None:
        return (await self.layer.group_send(group, message)).dropped

    async def close(self) -> None:
        await self.layer.close()


class ChannelsRedis(Contender):
    """channels_redis 4.x ``RedisChannelLayer`` (async only, no batch API, group_send returns None)."""

    def __init__(self, url: str, capacity: int) -> None:
        from channels_redis.core import RedisChannelLayer

        self.layer = RedisChannelLayer(hosts=[url], capacity=capacity)

    async def new_channel(self) -> tuple[str, list[str]]:
        name = await self.layer.new_channel("bench")
        return name, [name]

    async def send(self, channel: str, message: dict) -> None:
        await self.layer.send(channel, message)

    async def receive(self, channels: list[str]) -> list[dict]:
        return [await self.layer.receive(channels[0])]

    async def group_add(self, group: str, channel: str) -> None:
        await self.layer.group_add(group, channel)

    async def group_send(self, group: str, message: dict) -> int | None:
        await self.layer.group_send(group, message)
        return None

    async def close(self) -> None:
        await self.layer.close_pools()


class PlainRedis(Contender):
    """The floor: blocking redis-py, one list per channel, msgpack bodies, nothing else."""

    def __init__(self, url: str, capacity: int) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)

    async def send(self, channel: str, message: dict) -> None:
        self.redis.rpush(channel, msgpack.packb(message, use_bin_type=True))

    async def send_batch(self, items: list[tuple[str, dict]]) -> None:
        # The fastest a hand-written client gets: one multi-value RPUSH per channel, pipelined.
        bodies: dict[str, list[bytes]] = {}
        for channel, message in items:
            bodies.setdefault(channel, []).append(msgpack.packb(message, use_bin_type=True))
        pipe = self.redis.pipeline(transaction=False)
        for channel, values in bodies.items():
            pipe.rpush(channel, *values)
        pipe.execute()

    async def receive(self, channels: list[str]) -> list[dict]:
        _, body = self.redis.blpop(channels, 0)
        return [msgpack.unpackb(body)]

    async def receive_batch(self, channels: list[str], limit: int) -> list[dict]:
        _, bodies = self.redis.execute_command("BLMPOP", 0, len(channels), *channels, "LEFT", "COUNT", limit)
        return [msgpack.unpackb(body) for body in bodies]

    async def close(self) -> None:
        self.redis.close()


CONTENDERS: dict[str, type[Contender]] = {
    "crossroads-sync": CrossroadsSync,
    "crossroads-async": CrossroadsAsync,
    "channels_redis": ChannelsRedis,
    "redis-py": PlainRedis,
}


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Watchdog:
    """Reports a stuck consumer instead of hanging the benchmark.

    A thread, so the receive loop itself carries no timeout: channels_redis has none of its own,
    and wrapping every receive in asyncio.wait_for would charge it a task per message.
    """

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        seen, since = -1, time.monotonic()
        while True:
            time.sleep(0.5)
            if self.state["received"] != seen:
                seen, since = self.state["received"], time.monotonic()
            elif time.monotonic() - since > IDLE_LIMIT:
                emit({**self.state, "latencies_ns": [], "stuck": True})
                os._exit(3)


async def consume(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Receive warmup + count messages; time the measured ones (and their latency if asked)."""
    if spec["channel"] is None:
        target, channels = await contender.new_channel()
    else:
        target, channels = spec["channel"], [spec["channel"]]
    emit({"ready": True, "channel": target})
    warmup, total, batch = spec["warmup"], spec["warmup"] + spec["count"], spec["batch"]
    state: dict[str, Any] = {"received": 0, "first_ns": None, "last_ns": None}
    Watchdog(state)
    latencies: list[int] = []
    keep_latency = spec["latency"]
    received = 0
    while received < total:
        messages = await (contender.receive(channels) if batch == 1 else contender.receive_batch(channels, batch))
        now = time.monotonic_ns()
        for message in messages:
            received += 1
            if received <= warmup:
                continue
            if state["first_ns"] is None:
                state["first_ns"] = now
            if keep_latency:
                latencies.append(now - message["t"])
        state["received"] = received
        state["last_ns"] = now
    state["received"] = received - warmup
    return {**state, "latencies_ns": latencies}


async def produce(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Send warmup + count messages, flat out (rate 0) or at a fixed rate, singly or in batches."""
    message = bench_message()
    channel, batch, rate = spec["channel"], spec["batch"], spec["rate"]
    total = spec["warmup"] + spec["count"]
    start = time.monotonic()
    sent = 0
    while sent < total:
        if rate:
            # A blocking sleep is precise to ~0.1 ms (asyncio.sleep rounds to whole milliseconds), and
            # a producer runs no other task that it could starve.
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        message["t"] = time.monotonic_ns()
        if batch == 1:
            await contender.send(channel, message)
            sent += 1
        else:
            n = min(batch, total - sent)
            await contender.send_batch([(channel, message)] * n)
            sent += n
    return {"sent": sent, "seconds": time.monotonic() - start}


async def group(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    """Fill a group of ``members`` normal channels, then time ``sends`` group_send calls."""
    started = time.perf_counter()
    for i in range(spec["members"]):
        await contender.group_add(GROUP, f"bench.member.{i}")
    add_seconds = time.perf_counter() - started
    message = bench_message()
    call_ns: list[int] = []
    reported: int | None = None
    for _ in range(spec["sends"]):
        message["t"] = time.monotonic_ns()
        began = time.perf_counter_ns()
        dropped = await contender.group_send(GROUP, message)
        call_ns.append(time.perf_counter_ns() - began)
        if dropped is not None:
            reported = (reported or 0) + dropped
    return {"call_ns": call_ns, "reported_dropped": reported, "group_add_seconds": add_seconds}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    contender = CONTENDERS[spec["contender"]](spec["url"], spec["capacity"])
    try:
        role = {"consume": consume, "produce": produce, "group": group}[spec["role"]]
        return await role(contender, spec)
    finally:
        await contender.close()


def versions(names: list[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["role"] == "versions":
        emit(versions(spec["packages"]))
    else:
        emit(asyncio.run(run(spec)))


if __name__ == "__main__":
    main()
