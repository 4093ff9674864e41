"""Running bridges, and for ``crossroads run`` the worker too, as one daemon process.

Owns a process's life: the reactor, starting the bridges and the worker,
telling systemd, publishing each bridge's health for ``crossroads status``, and
a graceful stop on SIGTERM (bridges drain their replies, the worker finishes
the messages in hand). What a bridge does belongs to ``bridges/``; running a
message to ``consumers/``.

Health is published as the layer's key/value record ``health`` (field =
bridge name, value = ``Bridge.status()`` plus the time and pid), merged every
``HEALTH_INTERVAL`` seconds, so ``crossroads status`` run anywhere sees every
bridge process of a Redis layer. A memory:// layer lives in one process, so
there only that process could read it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from crossroads.layer import mask_url

from .config import BridgeConfig, Config
from .daemon import notify

log = logging.getLogger("crossroads")

HEALTH_INTERVAL = 5.0
HEALTH_KEY = "health"  # the layer's key/value record of every bridge's status
HEALTH_RETENTION = 86400  # seconds the record outlives the last report of any process


async def publish_health(channel_layer: Any, bridges: list[Any]) -> None:
    """Merge every bridge's status into the health record (other processes' bridges keep theirs)."""
    now = time.time()
    fields = {bridge.name: {**bridge.status(), "updated": now, "pid": os.getpid()} for bridge in bridges}
    if fields:
        await channel_layer.kv_update(HEALTH_KEY, fields, HEALTH_RETENTION)


def read_health(channel_layer: Any) -> dict[str, dict]:
    """Every bridge's last published status, with ``stale`` set when its process stopped reporting."""
    now = time.time()
    found = channel_layer.sync.kv_get(HEALTH_KEY)
    for status in found.values():
        status["stale"] = now - status["updated"] > 3 * HEALTH_INTERVAL
    return found


def serve(config: Config, channel_layer: Any, bridge_configs: list[BridgeConfig], router: Any = None,
          threads: int = 4, stats_interval: float | None = None) -> int:
    """Run the bridges (and a worker for ``router``) until SIGTERM/SIGINT; the exit status."""
    from crossroads.bridges.options import OptionError
    from crossroads.bridges.reactor import as_deferred, install_reactor
    from crossroads.bridges.registry import load_bridge_class

    reactor = install_reactor()
    bridges = [load_bridge_class(b.type)(b.name, b.options, channel_layer) for b in bridge_configs]
    by_name = {bridge.name: bridge for bridge in bridges}
    for bridge in bridges:
        try:
            bridge.attach_companions(by_name)
        except OptionError as exc:
            log.error("[bridges.%s] %s", bridge.name, exc)
            return 2
    # Companions (a WebSocket bridge on an HTTP bridge's port) start first and stop last, so the bridge
    # whose port they share never hands them a connection they are not ready for.
    companions = {name for bridge in bridges for name in bridge.companions(bridge.options)}
    bridges.sort(key=lambda bridge: bridge.name not in companions)
    worker = None
    if router is not None:
        from crossroads.consumers.worker import Worker

        try:
            worker = Worker(router, channel_layer, threads=threads, only_channels=config.worker.only_channels,
                            exclude_channels=config.worker.exclude_channels, pools=config.worker.pools,
                            prefetch=config.worker.prefetch, slow_consumer=config.worker.slow_consumer)
        except ValueError as exc:
            log.error("[worker] %s", exc)
            return 2
    failures: list[BaseException] = []
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        for bridge in bridges:
            await bridge.start()
        if worker is not None:
            worker.start()
        parts = [f"{b.name} ({b.type_name})" for b in bridges] + (["a worker"] if worker else [])
        log.info("serving: %s", ", ".join(parts) or "nothing yet (no bridges enabled, no [routing] app)")
        notify("READY=1")
        if bridges:
            tasks.append(asyncio.ensure_future(keep_publishing()))
        if stats_interval:
            tasks.append(asyncio.ensure_future(log_stats()))

    async def keep_publishing() -> None:
        while True:
            try:
                await publish_health(channel_layer, bridges)
            except Exception as exc:  # the layer being down is the bridges' problem to report, not ours
                log.debug("could not publish health: %s", exc)
            await asyncio.sleep(HEALTH_INTERVAL)

    async def log_stats() -> None:
        while True:
            await asyncio.sleep(stats_interval)
            stats = await channel_layer.stats()
            log.info("layer: %d pending, %d sent, %d received, %d dropped, %d expired",
                     sum(stats["pending"].values()), stats["sent"], stats["received"], stats["dropped"],
                     stats["expired"])

    async def shutdown() -> None:
        notify("STOPPING=1")
        log.info("stopping: draining bridges and finishing the messages in hand")
        for task in tasks:
            task.cancel()
        for bridge in reversed(bridges):
            await bridge.stop()
        if worker is not None:
            worker.stop()
            await asyncio.to_thread(worker.join, 60)
        if bridges:
            try:
                await publish_health(channel_layer, bridges)  # record "stopped"
            except Exception as exc:
                log.debug("could not publish the final health: %s", exc)
        await channel_layer.close()

    def begin() -> None:
        task = asyncio.ensure_future(start())

        def started(done: asyncio.Task) -> None:
            if not done.cancelled() and done.exception() is not None:
                failures.append(done.exception())
                log.error("could not start: %s", mask_url(str(done.exception())))  # it may name a URL
                reactor.stop()

        task.add_done_callback(started)

    reactor.callWhenRunning(begin)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: as_deferred(shutdown()))
    reactor.run()
    return 1 if failures else 0
