"""Channels' side of ``bench/worker.py``: the same echo consumer as a Channels 4 ``SyncConsumer``, run by
Channels' own worker (``channels.worker.Worker``, what ``manage.py runworker`` runs), and a sender
that does what Daphne does for each connection.

Runs under the channels_redis virtualenv (``.bench-venvs/channels_redis``: channels, channels_redis,
Django; no crossroads), with ``bench/_worker_django_settings.py`` as its Django settings::

    python bench/_worker_channels.py worker REDIS_URL
    python bench/_worker_channels.py send REDIS_URL WINDOW WARMUP SECONDS WINDOWS WORKER_PID REDIS_PID
    python bench/_worker_channels.py memory WINDOW WARMUP SECONDS WINDOWS

``worker`` is ``manage.py runworker bench.request`` on channels_redis; it serves until terminated.
``send`` keeps WINDOW requests in flight through channels_redis; ``memory`` runs Channels' worker and
the sender on one event loop with Channels' in-memory layer. Both print one JSON line: the round
trips of each measured window, every latency, and the CPU time of each process involved (``bench/worker.py``
computes the statistics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from _worker_load import REQUEST_CHANNEL, Recorder, now_ns, process_cpu, request  # bench/ is first on sys.path
from asgiref.sync import async_to_sync
from channels.consumer import SyncConsumer
from channels.routing import ChannelNameRouter, ProtocolTypeRouter

FIRST_REPLY_TIMEOUT = 60.0  # Django and the worker may still be starting


class Echo(SyncConsumer):
    """crossroads' ``echo``, the Channels 4 way: a sync handler, the reply sent through the layer."""

    def bench_request(self, message: dict) -> None:
        reply = {"type": "bench.reply", "text": message["text"]}
        async_to_sync(self.channel_layer.send)(message["reply_channel"], reply)


# What the worker serves (ASGI_APPLICATION in the settings).
application = ProtocolTypeRouter({"channel": ChannelNameRouter({REQUEST_CHANNEL: Echo.as_asgi()})})


def setup_django(layer: str, url: str = "") -> None:
    os.environ["BENCH_CHANNEL_LAYER"] = layer
    os.environ["BENCH_REDIS_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "_worker_django_settings"
    import django

    django.setup()


async def drive(layer: Any, window: int, warmup: float, seconds: float, windows: int, cpu: Any) -> dict:
    """``window`` connections, each with its own reply channel from ``new_channel()``, as Daphne gives
    every connection; each sends a request and awaits its reply with ``receive(its channel)``
    (channels_redis demultiplexes its process's replies behind that call).
    """
    recorder = Recorder(warmup, seconds, windows, cpu)

    async def connection() -> None:
        name = await layer.new_channel()
        first = True
        while not recorder.stopping:
            sent = now_ns()
            await layer.send(REQUEST_CHANNEL, request(name))
            if first:  # the worker may still be starting: do not wait for it forever
                await asyncio.wait_for(layer.receive(name), FIRST_REPLY_TIMEOUT)
                first = False
            else:
                await layer.receive(name)
            now = now_ns()
            recorder.done(now - sent, now)

    await asyncio.gather(*(connection() for _ in range(window)))
    return recorder.result()


async def send(url: str, pids: dict[str, int], *figures: Any) -> dict:
    from channels_redis.core import RedisChannelLayer

    def cpu() -> dict[str, float]:
        return {"sender": time.process_time(), **{name: process_cpu(pid) for name, pid in pids.items()}}

    layer = RedisChannelLayer(hosts=[{"address": url, "socket_timeout": None}])  # see _worker_django_settings.py
    try:
        return await drive(layer, *figures, cpu)
    finally:
        await layer.close_pools()


async def in_memory(*figures: Any) -> dict:
    from channels.layers import get_channel_layer
    from channels.routing import get_default_application
    from channels.worker import Worker

    layer = get_channel_layer()  # the process's one in-memory layer, which the consumers use too
    worker = Worker(application=get_default_application(), channels=[REQUEST_CHANNEL], channel_layer=layer)
    serving = asyncio.ensure_future(worker.arun())
    try:
        return await drive(layer, *figures, lambda: {"process": time.process_time()})
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "worker":
        setup_django("redis", argv[1])
        from django.core.management import call_command

        call_command("runworker", REQUEST_CHANNEL, verbosity=0)
        return
    if len(argv) == 8 and argv[0] == "send":
        figures = (int(argv[2]), float(argv[3]), float(argv[4]), int(argv[5]))
        pids = {"worker": int(argv[6]), "redis": int(argv[7])}
        print(json.dumps(asyncio.run(send(argv[1], pids, *figures))), flush=True)
        return
    if len(argv) == 5 and argv[0] == "memory":
        setup_django("memory")
        figures = (int(argv[1]), float(argv[2]), float(argv[3]), int(argv[4]))
        print(json.dumps(asyncio.run(in_memory(*figures))), flush=True)
        return
    sys.exit("usage: _worker_channels.py worker REDIS_URL | send REDIS_URL WINDOW WARMUP SECONDS WINDOWS"
             " WORKER_PID REDIS_PID | memory WINDOW WARMUP SECONDS WINDOWS")


if __name__ == "__main__":
    main(sys.argv[1:])
