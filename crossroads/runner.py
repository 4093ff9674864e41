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
there only that process could read it: ``crossroads status`` reads its
``/readyz`` instead (``[metrics] listen``, crossroads/metrics.py).

Also here: the process's metrics server (``start_metrics``), the systemd
watchdog's pings (from the loop, held while the worker is stuck), and reload on
SIGHUP (``apply_reload``: unchanged bridges keep their connections).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from crossroads.layer import mask_url

from .config import BridgeConfig, Config
from .daemon import notify, watchdog_interval

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
          threads: int = 4, stats_interval: float | None = None, command: str = "run",
          reload: Callable[[], tuple[Config, list[BridgeConfig]]] | None = None) -> int:
    """Run the bridges (and a worker for ``router``) until SIGTERM/SIGINT; the exit status.

    With ``[metrics] listen`` it serves /metrics, /healthz and /readyz (crossroads/metrics.py). Under a
    systemd ``WatchdogSec=`` it sends ``WATCHDOG=1`` from the event loop itself, so a blocked loop stops
    the pings, and holds them while every worker thread is stuck (``Worker.stuck``).

    SIGHUP calls ``reload`` (in a thread: it reads files and imports) for the new config and the bridges
    this process should run, and applies the difference (``apply_reload``); ``reload`` raising leaves the
    running bridges alone, its message logged.
    """
    from crossroads.bridges.options import OptionError
    from crossroads.bridges.reactor import as_deferred, install_reactor
    from crossroads.bridges.registry import load_bridge_class

    reactor = install_reactor()
    bridges = [load_bridge_class(b.type)(b.name, b.options, channel_layer) for b in bridge_configs]
    running_configs = {b.name: b for b in bridge_configs}  # what each running bridge was made from
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
    loops: list[asyncio.AbstractEventLoop] = []  # the running loop, once it runs (for /healthz's thread)
    metrics = None
    if config.metrics.listen:
        metrics = start_metrics(config.metrics.listen, command, channel_layer, bridges, worker, loops,
                                config.worker.stuck_after)
        if metrics is None:
            return 2
    watchdog = watchdog_interval()
    phase = ["starting"]  # starting, serving, stopping: a SIGHUP reloads only while serving

    async def start() -> None:
        for bridge in bridges:
            await bridge.start()
        if worker is not None:
            worker.start()
        parts = [f"{b.name} ({b.type_name})" for b in bridges] + (["a worker"] if worker else [])
        log.info("serving: %s", ", ".join(parts) or "nothing yet (no bridges enabled, no [routing] app)")
        notify("READY=1")
        phase[0] = "serving"
        if watchdog:
            tasks.append(asyncio.ensure_future(keep_pinging(watchdog)))
        tasks.append(asyncio.ensure_future(keep_publishing()))  # a reload may add bridges to a process with none
        if stats_interval:
            tasks.append(asyncio.ensure_future(log_stats()))

    async def keep_publishing() -> None:
        while True:
            try:
                await publish_health(channel_layer, bridges)
            except Exception as exc:  # the layer being down is the bridges' problem to report, not ours
                log.debug("could not publish health: %s", exc)
            await asyncio.sleep(HEALTH_INTERVAL)

    async def keep_pinging(interval: float) -> None:
        held = None
        while True:
            # The worker's check waits on its threads' slots and its own loop: off this loop, which it must
            # not block; this loop being blocked stops the pings by itself.
            problem = await asyncio.to_thread(worker.stuck, config.worker.stuck_after) if worker else None
            if problem is None:
                notify("WATCHDOG=1")
                if held:
                    log.info("watchdog: pinging systemd again")
            elif problem != held:
                log.error("watchdog: not pinging systemd, which restarts the service after WatchdogSec=: %s",
                          problem)
            held = problem
            await asyncio.sleep(interval)

    async def log_stats() -> None:
        while True:
            await asyncio.sleep(stats_interval)
            stats = await channel_layer.stats()
            log.info("layer: %d pending, %d sent, %d received, %d dropped, %d expired",
                     sum(stats["pending"].values()), stats["sent"], stats["received"], stats["dropped"],
                     stats["expired"])

    async def shutdown() -> None:
        phase[0] = "stopping"
        if reloading and not reloading[-1].done():  # let a reload finish, so nothing it starts outlives us
            await asyncio.wait([reloading[-1]], timeout=30)
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
        if metrics is not None:
            metrics.stop()

    reloading: list[asyncio.Task] = []

    async def reload_config() -> None:
        nonlocal config
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        log.info("reloading the config (SIGHUP)")
        try:
            new_config, new_configs = await asyncio.to_thread(reload)
        except Exception as exc:  # the messages `crossroads check` prints, and the running config stays
            for line in str(exc).splitlines():
                if line.strip():
                    log.error("reload refused, the running config stays: %s", line)
            notify("READY=1")
            return
        for part in ("layer", "routing_app", "worker", "metrics"):
            if getattr(new_config, part) != getattr(config, part):
                shown = "[routing]" if part == "routing_app" else f"[{part}]"
                log.warning("reload: %s changed; it takes effect when the process restarts", shown)
        try:
            summary = await apply_reload(bridges, running_configs, new_configs, channel_layer)
        except Exception:
            log.exception("reload: applying the new bridges failed")
            summary = "failed (see above)"
        config = dataclasses.replace(new_config, layer=config.layer, routing_app=config.routing_app,
                                     worker=config.worker, metrics=config.metrics)
        log.info("reloaded: %s", summary)
        notify("READY=1")

    def on_hangup() -> None:
        if reload is None:
            log.warning("SIGHUP: this process cannot reload; restart it to apply a new config")
        elif phase[0] != "serving":
            log.warning("SIGHUP while %s: not reloading", phase[0])
        elif not (reloading and not reloading[-1].done()):  # one reload at a time
            reloading[:] = [asyncio.ensure_future(reload_config())]

    def begin() -> None:
        loops.append(asyncio.get_event_loop())
        # Twisted's way for a signal handler: callFromThread is safe there and runs on the loop.
        signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(on_hangup))
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


def start_metrics(listen: str, command: str, channel_layer: Any, bridges: list[Any], worker: Any,
                  loops: list[asyncio.AbstractEventLoop], stuck_after: float | None) -> Any:
    """The process's metrics server, listening; None (the error logged) when it cannot listen."""
    from .metrics import BridgeCollector, LayerCollector, MetricsServer, WorkerCollector, readiness

    def healthz() -> tuple[bool, dict[str, Any]]:
        if not loops:
            return False, {"alive": False, "reason": "starting: the event loop does not run yet"}
        try:  # the loop answers: a coroutine scheduled from here runs
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loops[0]).result(LOOP_ANSWER)
        except Exception:
            return False, {"alive": False, "reason": f"the event loop did not answer within {LOOP_ANSWER:g} s"}
        problem = worker.stuck(stuck_after) if worker is not None else None
        if problem:
            return False, {"alive": False, "reason": problem}
        return True, {"alive": True}

    server = MetricsServer(listen, command, healthz, lambda: readiness(bridges, worker))
    server.register(BridgeCollector(lambda: bridges))
    server.register(LayerCollector(channel_layer))
    if worker is not None:
        server.register(WorkerCollector(worker))
    try:
        server.start()
    except OSError as exc:
        log.error("[metrics] listen = %r: cannot listen there: %s", listen, exc.strerror or exc)
        return None
    return server


LOOP_ANSWER = 2.0  # seconds /healthz waits for the event loop to run a coroutine


def companion_groups(configs: dict[str, BridgeConfig]) -> dict[str, set[str]]:
    """Each bridge -> the bridges that run with it on one port (its owner and companions, itself included)."""
    from crossroads.bridges.registry import load_bridge_class

    groups = {name: {name} for name in configs}
    for name, bridge in configs.items():
        for companion in load_bridge_class(bridge.type).companions(bridge.options):
            group = groups[name] | groups.get(companion, {companion})
            for member in group:
                groups[member] = group
    return groups


async def apply_reload(bridges: list[Any], running: dict[str, BridgeConfig], wanted: list[BridgeConfig],
                       channel_layer: Any) -> str:
    """Make ``bridges`` (changed in place) the ``wanted`` ones: a bridge whose table is the same keeps running and
    its connections; a removed one stops gracefully; a new one starts; a changed one (or one whose companion
    changed: they share a port) is stopped, then started anew. A bridge that fails to start is logged and left
    out. What was done, in words."""
    from crossroads.bridges.registry import load_bridge_class

    new = {bridge.name: bridge for bridge in wanted}
    changed = {name for name, old in running.items()
               if name not in new or (new[name].type, new[name].options) != (old.type, old.options)}
    changed |= {name for name in new if name not in running}
    for groups in (companion_groups(running), companion_groups(new)):
        for name in list(changed):
            changed |= groups.get(name, set())
    stopping = [bridge for bridge in bridges if bridge.name in changed]
    for bridge in reversed(stopping):  # companions last, as at shutdown
        await bridge.stop()
    if stopping:
        try:
            await publish_health(channel_layer, stopping)  # record "stopped" for the ones gone
        except Exception as exc:
            log.debug("could not publish health: %s", exc)
    bridges[:] = [bridge for bridge in bridges if bridge.name not in changed]
    for name in [name for name in running if name in changed]:
        del running[name]
    made = [load_bridge_class(b.type)(b.name, b.options, channel_layer) for b in wanted if b.name in changed]
    by_name = {bridge.name: bridge for bridge in [*bridges, *made]}
    companions = {name for bridge in made for name in bridge.companions(bridge.options)}
    made.sort(key=lambda bridge: bridge.name not in companions)
    failed = []
    for bridge in made:
        try:
            bridge.attach_companions(by_name)
            await bridge.start()
        except Exception as exc:  # OptionError from attach_companions, or the start itself
            log.error("reload: [bridges.%s] could not start: %s", bridge.name, mask_url(str(exc)))
            failed.append(bridge.name)
            continue
        bridges.append(bridge)
        running[bridge.name] = new[bridge.name]
    kept = sorted(set(new) - changed)
    started = [b.name for b in made if b.name not in failed]
    restarted = sorted(name for name in started if name in {b.name for b in stopping})
    parts = [f"kept {', '.join(kept)}" if kept else "",
             f"stopped {', '.join(sorted(b.name for b in stopping if b.name not in new))}"
             if any(b.name not in new for b in stopping) else "",
             f"restarted {', '.join(restarted)}" if restarted else "",
             f"started {', '.join(sorted(set(started) - set(restarted)))}" if set(started) - set(restarted) else "",
             f"failed to start {', '.join(failed)}" if failed else ""]
    return "; ".join(part for part in parts if part) or "no bridges"
