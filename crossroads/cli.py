"""The ``crossroads`` command line.

Owns argument parsing and what each command prints; the work belongs to the
packages it calls (``crossroads.config``, ``consumers``, ``layer``). Every
failure ends with lines that say what went wrong and what to do next, and a
non-zero exit status: 1 when something is wrong or down, 2 for a bad config
or command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from crossroads import layer

from . import __version__
from .config import DEFAULT_PATH, BridgeConfig, Config, ConfigError, MetricsConfig, load_config, parse_listen
from .daemon import notify, raise_open_files_limit, setup_logging, tune_gc, watchdog_interval

log = logging.getLogger("crossroads")


class CommandError(Exception):
    """A failure the user can act on: printed as is, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def bridge_validator(type_name: str, options: dict) -> dict:
    """Check one bridge table's own keys with its bridge class (see bridges/options.py)."""
    from crossroads.bridges.registry import load_bridge_class

    return load_bridge_class(type_name).validate_options(options)


def load(args: argparse.Namespace) -> Config:
    try:
        config = load_config(args.config, bridge_validator=bridge_validator)
    except ConfigError as exc:
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        raise CommandError(f"{exc}\nFix the lines above and run `crossroads check` again.", code=2) from None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    check_companions(config)
    listen = getattr(args, "metrics_listen", None)
    if listen:  # one config for every unit, a port for each process: the flag beats [metrics] listen
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise CommandError(f"--metrics-listen: {exc}", code=2) from None
        config = dataclasses.replace(config, metrics=MetricsConfig(listen=listen))
    return config


def companions_of(bridge: BridgeConfig) -> list[str]:
    """The bridges that run in ``bridge``'s process (an http bridge's ``websocket``)."""
    from crossroads.bridges.registry import load_bridge_class

    return load_bridge_class(bridge.type).companions(bridge.options)


def owner_of(config: Config, name: str) -> BridgeConfig | None:
    """The enabled bridge whose process runs bridge ``name`` beside it, if any."""
    return next((b for b in config.enabled_bridges() if name in companions_of(b)), None)


def check_companions(config: Config) -> None:
    """Every companion an enabled bridge names exists, is enabled, and belongs to that bridge alone."""
    owners: dict[str, str] = {}
    for bridge in config.enabled_bridges():
        for name in companions_of(bridge):
            other = config.bridges.get(name)
            if other is None or not other.enabled:
                state = "there is no such table" if other is None else "it has enabled = false"
                raise CommandError(f"{where(config)}: [bridges.{bridge.name}] names [bridges.{name}] to run beside "
                                   f"it, but {state}: add or enable it, or correct the name", code=2)
            if name in owners:
                raise CommandError(f"{where(config)}: [bridges.{name}] is named by both [bridges.{owners[name]}] "
                                   f"and [bridges.{bridge.name}]; one bridge can share the port of only one other",
                                   code=2)
            owners[name] = bridge.name


def where(config: Config) -> str:
    return str(config.path) if config.path else "(no config file: defaults)"


def importable_next_to(config: Config) -> None:
    if config.path is not None and str(config.path.parent.resolve()) not in sys.path:
        # Like a Django project's manage.py: modules next to the config import without installing them.
        sys.path.insert(0, str(config.path.parent.resolve()))


def django_of(config: Config) -> str | None:
    """With a [django] table, set Django up (once per process, before the router imports views or models);
    the settings module, or None without the table."""
    if config.django is None:
        return None
    from .django import DjangoSetupError, set_identify, set_static, settings_module, setup_django

    settings = settings_module(config.django.settings)
    if settings is None:
        raise CommandError(f"{where(config)}: [django] settings: not set, and DJANGO_SETTINGS_MODULE is empty; add\n\n"
                           '    [django]\n    settings = "mysite.settings"\n\nnaming your settings module '
                           "(docs/django.md)", code=2)
    importable_next_to(config)
    try:
        setup_django(settings)
    except DjangoSetupError as exc:
        source = "[django] settings" if config.django.settings else "[django] (DJANGO_SETTINGS_MODULE)"
        raise CommandError(f"{where(config)}: {source}: {exc}", code=2) from None
    try:
        set_identify(config.django.identify)
    except Exception as exc:  # RouteError (not importable), TypeError (not callable), or the module raised
        raise CommandError(f"{where(config)}: [django] identify: {exc}", code=2) from None
    try:
        set_static(config.django.static)
    except ValueError as exc:
        raise CommandError(f"{where(config)}: [django] static: {exc}", code=2) from None
    return settings


def router_of(config: Config, required: bool = True) -> Any:
    """The routing table of [routing] app; with a [django] table, ending with django_view for http.request; and
    ending with ``unheeded`` for the disconnects no route takes (``with_unheeded``)."""
    router = _router_of(config, required and not (config.django and config.django.view))
    if config.django is not None and config.django.view:
        from .django import with_django_view

        router = with_django_view(router)
    return with_unheeded(router)


# Events a bridge sends whatever the consumers do, given that they consume its connections: a table routing the
# first channel gets a do-nothing route for the second unless it routes it. Left unconsumed, thousands of clients
# leaving within the layer's expiry would fill its channel, and the bridge, refused, would take the layer for its
# problem (degraded, /readyz failing) while nothing is wrong.
UNHEEDED = {"http.request": "http.disconnect", "websocket.connect": "websocket.disconnect"}


def unheeded(message: Any) -> None:
    """The consumer of the disconnects no route of the table takes: nothing to do."""


def with_unheeded(router: Any) -> Any:
    if router is None:
        return None
    from crossroads.consumers.routing import Router, route

    missing = sorted({then for first, then in UNHEEDED.items() if first in router.channels} - router.channels)
    return Router([*router.routes, route(missing, unheeded)]) if missing else router


def _router_of(config: Config, required: bool) -> Any:
    from crossroads.consumers.routing import RouteError, Router

    if not config.routing_app:
        if not required:
            return None
        raise CommandError(f"{where(config)}: [routing] app is not set; add\n\n    [routing]\n    "
                           'app = "yourpackage.routing:routes"\n\nnaming your routing table (docs/consumers.md)',
                           code=2)
    importable_next_to(config)
    try:
        return Router(config.routing_app)
    except RouteError as exc:
        raise CommandError(f"{where(config)}: [routing] app: {exc}", code=2) from None
    except Exception as exc:  # the user's module raised while importing
        raise CommandError(f"{where(config)}: [routing] app: importing {config.routing_app!r} raised "
                           f"{type(exc).__name__}: {exc}", code=2) from None


def open_layer(config: Config, shared: bool) -> Any:
    """The configured layer; ``shared`` commands talk to other processes, which memory:// cannot."""
    if shared and config.layer.url.startswith("memory://"):
        raise CommandError(f"{where(config)}: [layer] url is memory://, which lives inside one process; this command "
                           "talks to other processes: set [layer] url = \"redis://...\" (or use `crossroads run`, "
                           "which runs everything in one process; with [metrics] listen set, `crossroads status` "
                           "reads its /readyz)", code=2)
    try:
        return layer.from_url(config.layer.url, **config.layer.options)
    except (ValueError, TypeError, ImportError) as exc:
        raise CommandError(f"{where(config)}: [layer]: {exc}", code=2) from None


def round_trip(sync_layer: Any) -> float:
    """Send a message to a fresh single-reader channel and receive it; return the seconds it took."""
    channel = sync_layer.new_channel("crossroads.check?")
    started = time.perf_counter()
    sync_layer.send(channel, {"text": "ping"})
    got, message = sync_layer.receive([channel], timeout=5)
    if got != channel or message != {"text": "ping"}:
        raise layer.LayerUnavailable("the message sent did not come back within 5 s")
    return time.perf_counter() - started


# The channel each listening bridge's peers wait on for an answer, and the option saying how long they wait:
# with no route for it at all, nothing ever answers them (the worker does not even listen there).
AWAITED = {"http": ("http.request", "http_timeout"), "websocket": ("websocket.connect", "handshake_timeout")}


def unanswered_bridges(config: Config, router: Any) -> list[str]:
    """Warnings for the enabled HTTP and WebSocket bridges whose peers no route answers."""
    warnings = []
    for bridge in config.enabled_bridges():
        if bridge.type not in AWAITED:
            continue
        channel, timeout = AWAITED[bridge.type]
        if channel not in router.channels:
            wait = bridge.options.get(timeout)
            warnings.append(f"{where(config)}: [bridges.{bridge.name}] ({bridge.type}) sends {channel}, which no "
                            f"route in [routing] app {config.routing_app} takes: every peer waits {timeout} "
                            f"({wait:g} s) for a 504; add route(\"{channel}\", ...)")
    return warnings


# -- commands --


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    settings = django_of(config)
    if settings is not None:
        from .django import system_check_problems

        errors, warnings = system_check_problems()
        for warning in warnings:
            print(f"warning: Django: {warning}", file=sys.stderr)
        if errors:
            raise CommandError(f"{where(config)}: [django] settings {settings}: Django's system checks found "
                               f"{len(errors)} error(s):\n" + "\n".join(f"  {error}" for error in errors), code=2)
    router = router_of(config, required=False)
    print(f"{where(config)}: ok")
    print(f"  layer: {layer.from_url(config.layer.url, **config.layer.options)!r}")
    if settings is not None:
        import django

        print(f"  django: {settings} (Django {django.get_version()}), system checks passed")
    if router is None:
        print("  routing: none set ([routing] app); `crossroads run` serves its bundled example")
    else:
        source = config.routing_app or "django_view alone ([django])"
        print(f"  routing: {source} consumes {', '.join(sorted(router.channels)) or 'nothing'}")
        for line in worker_pools(config, router):
            print(f"  {line}")
        for warning in unanswered_bridges(config, router):
            print(f"warning: {warning}", file=sys.stderr)
    enabled = config.enabled_bridges()
    print(f"  bridges: {', '.join(f'{b.name} ({b.type})' for b in enabled) or 'none enabled'}")
    return 0


def worker_pools(config: Config, router: Any) -> list[str]:
    """What each worker pool serves, for `crossroads check`; a channel two pools' patterns match is a config error."""
    from crossroads.consumers.worker import Pool, assign_pools, select_channels

    if not config.worker.pools:
        return []
    channels = select_channels(router.channels, config.worker.only_channels, config.worker.exclude_channels)
    try:
        assigned = assign_pools(channels, {name: Pool(*pool) for name, pool in config.worker.pools.items()},
                                config.worker.threads)
    except ValueError as exc:
        raise CommandError(f"{where(config)}: [worker] pools: {exc}", code=2) from None
    lines = []
    for name, threads in [*((name, pool[1]) for name, pool in config.worker.pools.items()),
                          ("default", config.worker.threads)]:
        if assigned.get(name, ((), 0))[0]:
            lines.append(f"worker pool {name}: {', '.join(assigned[name][0])} ({threads} thread(s))")
        elif name != "default":
            lines.append(f"worker pool {name}: none of its channels is routed (no threads)")
    return lines


def cmd_worker(args: argparse.Namespace) -> int:
    from crossroads.consumers.worker import Worker

    config = load(args)
    django_of(config)
    router = router_of(config)
    channel_layer = open_layer(config, shared=True)
    try:
        worker = Worker(router, channel_layer, threads=args.threads or config.worker.threads,
                        only_channels=args.only_channels or config.worker.only_channels,
                        exclude_channels=args.exclude_channels or config.worker.exclude_channels,
                        pools=config.worker.pools, prefetch=args.prefetch or config.worker.prefetch,
                        slow_consumer=config.worker.slow_consumer)
    except ValueError as exc:
        raise CommandError(f"{where(config)}: [worker] {exc}", code=2) from None
    metrics = None
    if config.metrics.listen:
        from .metrics import LayerCollector, MetricsServer, WorkerCollector, readiness

        def healthz() -> tuple[bool, dict]:
            problem = worker.stuck(config.worker.stuck_after)
            return (False, {"alive": False, "reason": problem}) if problem else (True, {"alive": True})

        metrics = MetricsServer(config.metrics.listen, "worker", healthz, lambda: readiness([], worker))
        metrics.register(WorkerCollector(worker))
        metrics.register(LayerCollector(channel_layer))
        try:
            metrics.start()
        except OSError as exc:
            raise CommandError(f"[metrics] listen = {config.metrics.listen!r}: cannot listen there: "
                               f"{exc.strerror or exc}") from None
    def recheck() -> None:  # SIGHUP: threads and routes cannot change under running consumers
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            load(args)
        except CommandError as exc:
            for line in str(exc).splitlines():
                if line.strip():
                    log.error("reload refused, the running config stays: %s", line)
        else:
            log.warning("reload: a worker applies a new config when it restarts (systemctl restart); it keeps "
                        "running as it is")
        notify("READY=1")

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=recheck, daemon=True).start())
    interval = watchdog_interval()
    held: list[str | None] = [None]
    pinged = [0.0]

    def watch() -> None:  # on the main thread, every tick: only a worker that is not stuck feeds systemd
        if time.monotonic() - pinged[0] < interval:
            return
        problem = worker.stuck(config.worker.stuck_after)
        if problem is None:
            notify("WATCHDOG=1")
            pinged[0] = time.monotonic()
            if held[0]:
                log.info("watchdog: pinging systemd again")
        elif problem != held[0]:
            log.error("watchdog: not pinging systemd, which restarts the service after WatchdogSec=: %s", problem)
        held[0] = problem

    worker.run(on_ready=lambda: notify("READY=1"), on_stopping=lambda: notify("STOPPING=1"),
               on_tick=watch if interval else None, tick=min(1.0, interval or 1.0))
    if metrics is not None:
        metrics.stop()
    channel_layer.sync.close()
    return 0


def read_message_argument(value: str) -> str:
    """The JSON text ``value`` names: itself, ``-`` for stdin, or ``@path`` for a file's contents.

    A command-line argument is capped by the kernel (about 128 KiB on Linux), so larger
    messages come from stdin or a file.
    """
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read the message from {value[1:]}: {exc.strerror}", code=2) from None
    return value


def cmd_send(args: argparse.Namespace) -> int:
    try:
        content = json.loads(read_message_argument(args.json))
    except ValueError as exc:
        raise CommandError(f"the message is not valid JSON ({exc}); quote it for the shell, e.g. "
                           "'{\"text\": \"hello\"}'", code=2) from None
    if not isinstance(content, dict):
        raise CommandError("the message must be a JSON object, e.g. '{\"text\": \"hello\"}'", code=2)
    config = load(args)
    channel_layer = open_layer(config, shared=True)
    try:
        channel_layer.sync.send(args.channel, content)
    except (layer.InvalidChannelName, layer.MessageTooLarge) as exc:
        raise CommandError(str(exc), code=2) from None
    except (layer.ChannelFull, layer.LayerUnavailable) as exc:
        raise CommandError(f"not sent: {exc}") from None
    finally:
        channel_layer.sync.close()
    print(f"sent to {args.channel}")
    return 0


def status_over_http(config: Config, as_json: bool) -> int:
    """`crossroads status` for a memory:// process: its /readyz (and the layer's depths from its /metrics)."""
    import urllib.error
    import urllib.request

    from .config import parse_listen

    host, port = parse_listen(config.metrics.listen)
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, with the same body
        body = json.loads(exc.read())
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {base}/readyz ([metrics] listen): {exc}; is `crossroads run` running with "
                           "this config?") from None
    if as_json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    print(f"process at {base}: {'ready' if body.get('ready') else 'not ready: ' + body.get('reason', '')}")
    print("bridges")
    for name in sorted(body.get("bridges", {})):
        status = body["bridges"][name]
        print(f"  {name}: {status['state']}" + (f": {status['reason']}" if status.get("reason") else ""))
    if "worker" in body:
        worker = body["worker"]
        print(f"worker: {'serving' if worker['serving'] else 'not serving'} with {worker['threads']} thread(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    if config.layer.url.startswith("memory://") and config.metrics.listen:
        return status_over_http(config, args.json)
    channel_layer = open_layer(config, shared=True)
    from .runner import read_health

    try:
        stats = channel_layer.sync.stats()
        health = read_health(channel_layer)
    except layer.LayerUnavailable as exc:
        raise CommandError(f"cannot read the layer: {exc}") from None
    finally:
        channel_layer.sync.close()
    health = {name: status for name, status in health.items() if name in config.bridges}
    if args.json:
        print(json.dumps({"layer": stats, "bridges": health}, indent=2, sort_keys=True))
        return 0
    print(f"layer {layer.mask_url(config.layer.url)}")
    pending = stats["pending"]
    if not pending:
        print("  no messages waiting")
    for queue, count in sorted(pending.items(), key=lambda item: -item[1]):
        print(f"  {count:>8}  {queue}")
    print("bridges")
    for name in sorted(config.bridges):  # another config's bridges on the same layer are not this deployment's
        status = health.get(name)
        if status is None:
            state = "never reported (not started?)"
        elif status["stale"]:
            state = f"not running (last report {time.ctime(status['updated'])}: {status['health']['state']})"
        else:
            reason = status["health"].get("reason")
            state = status["health"]["state"] + (f": {reason}" if reason else "")
        print(f"  {name}: {state}")
    return 0


def cmd_layer_check(args: argparse.Namespace) -> int:
    if args.url and args.layer and args.url != args.layer:
        raise CommandError(f"two layer URLs given ({layer.mask_url(args.url)} and --layer "
                           f"{layer.mask_url(args.layer)}): give one", code=2)
    url = args.url or args.layer or "memory://"
    shown = layer.mask_url(url)  # the URL may carry the Redis password: never print it
    try:
        channel_layer = layer.from_url(url)
    except ValueError as exc:
        raise CommandError(str(exc), code=2) from None
    try:
        elapsed = round_trip(channel_layer.sync)
    except layer.AuthenticationFailed as exc:
        raise CommandError(f"layer {shown} is not working: {exc}\nFix the password in --layer and run the check "
                           "again.") from None
    except layer.LayerUnavailable as exc:
        raise CommandError(f"layer {shown} is not working: {exc}\nStart the server it names (or fix --layer) "
                           "and run the check again.") from None
    finally:
        channel_layer.sync.close()
    print(f"layer {shown}: ok, a message went there and back in {elapsed * 1000:.2f} ms")
    return 0


# Bridge options whose values are files the daemon opens (tls_cert, ca_file, unix_socket, ...).
PATH_OPTION_ENDINGS = ("_file", "_cert", "_key", "_ca", "unix_socket")

BUNDLED_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chat" / "crossroads.toml"
# The bundled chat's addresses, which the environment may change when 8000, 1883 or 6667 is not the one to use:
# variable -> (bridge, option). Said in `crossroads run --help` and docs/chat.md.
BUNDLED_ADDRESSES = {
    "CROSSROADS_CHAT_PORT": ("web", "port"),
    "CROSSROADS_CHAT_BROKER": ("mqtt", "broker"),
    "CROSSROADS_CHAT_IRC": ("irc", "server"),
    "CROSSROADS_CHAT_SMTP": ("email", "port"),
    "CROSSROADS_CHAT_SMARTHOST": ("email", "smarthost"),
}


def bundled_chat(config: Config) -> Config:
    """The bundled chat's config with the addresses set in the environment (``BUNDLED_ADDRESSES``)."""
    bridges = dict(config.bridges)
    for variable, (name, key) in BUNDLED_ADDRESSES.items():
        value = os.environ.get(variable)
        if value:
            bridge = bridges[name]
            try:
                options = bridge_validator(bridge.type, {**bridge.options, key: value})
            except ValueError as exc:
                raise CommandError(f"{variable}={value!r}: {exc}", code=2) from None
            bridges[name] = dataclasses.replace(bridge, options=options)
    return dataclasses.replace(config, bridges=bridges)


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import serve

    if args.config is None and not Path(DEFAULT_PATH).exists() and BUNDLED_EXAMPLE.exists():
        args.config = BUNDLED_EXAMPLE
        config = bundled_chat(load(args))
        web, mqtt, irc, email = (config.bridges[name].options for name in ("web", "mqtt", "irc", "email"))
        print(f"No ./{DEFAULT_PATH} here: serving the bundled chat example ({BUNDLED_EXAMPLE}); open "
              f"http://127.0.0.1:{web['port']}/ in two windows. Its MQTT and IRC bridges look for a broker at "
              f"{mqtt['broker']} and an IRC server at {irc['server']}; mail to lobby@chat.localhost on "
              f"smtp://127.0.0.1:{email['port']} is answered through a smarthost at {email['smarthost']} "
              "(docs/chat.md). Write a crossroads.toml (docs/configuration.md) to serve your own consumers.",
              file=sys.stderr, flush=True)
    else:
        config = load(args)
    django_of(config)
    router = router_of(config, required=False)
    channel_layer = open_layer(config, shared=False)
    if router is None and not config.enabled_bridges():
        log.warning("nothing to serve yet: no bridges enabled and no [routing] app in %s; the layer's counters "
                    "are logged every %.0fs (see docs/configuration.md)", where(config), args.interval)
    def reload() -> tuple[Config, list[BridgeConfig]]:
        again = load(args)
        if args.config == BUNDLED_EXAMPLE:
            again = bundled_chat(again)
        return again, again.enabled_bridges()

    return serve(config, channel_layer, config.enabled_bridges(), router=router,
                 threads=config.worker.threads, stats_interval=args.interval, reload=reload)


def cmd_bridge(args: argparse.Namespace) -> int:
    from .runner import serve

    config = load(args)
    bridges = bridge_and_companions(config, args.name)
    channel_layer = open_layer(config, shared=True)

    def reload() -> tuple[Config, list[BridgeConfig]]:
        again = load(args)
        return again, bridge_and_companions(again, args.name)

    return serve(config, channel_layer, bridges, command=f"bridge {args.name}", reload=reload)


def bridge_and_companions(config: Config, name: str) -> list[BridgeConfig]:
    """What `crossroads bridge NAME` runs: [bridges.NAME] and the bridges sharing its port."""
    chosen = config.bridges.get(name)
    if chosen is None:
        names = ", ".join(sorted(config.bridges)) or "none"
        raise CommandError(f"{where(config)} has no [bridges.{name}] table (configured bridges: {names})", code=2)
    if not chosen.enabled:
        raise CommandError(f"{where(config)}: [bridges.{name}] has enabled = false; set it to true to run it",
                           code=2)
    owner = owner_of(config, name)
    if owner is not None:
        raise CommandError(f"[bridges.{name}] serves the port of [bridges.{owner.name}]: run `crossroads bridge "
                           f"{owner.name}`, which runs both", code=2)
    return [chosen, *(config.bridges[companion] for companion in companions_of(chosen))]


def units_of(config: Config) -> dict[str, list[BridgeConfig]]:
    """The unit instances that run bridges -> the bridges each runs."""
    if config.layer.url.startswith("memory://"):
        return {"crossroads.service": config.enabled_bridges()}  # one process: memory:// cannot be shared
    # a companion (an http bridge's websocket) runs in its owner's unit, not in one of its own
    return {f"crossroads-bridge@{b.name}.service": [b, *(config.bridges[name] for name in companions_of(b))]
            for b in config.enabled_bridges() if owner_of(config, b.name) is None}


def cmd_systemd(args: argparse.Namespace) -> int:
    from crossroads.bridges.base import load_bridge_class

    from .systemd import credentials_used, files_used, render_units, write_units

    config_path = args.config or Path(DEFAULT_PATH)
    config_text = config_path.read_text() if config_path.exists() else ""
    used = credentials_used(config_text)
    with tempfile.TemporaryDirectory() as stand_ins:
        # Credentials are read by systemd when a unit starts, not here: stand-ins let the rest be checked.
        for name in used:
            (Path(stand_ins) / name).write_text("stand-in")
        previous = os.environ.get("CREDENTIALS_DIRECTORY")
        os.environ["CREDENTIALS_DIRECTORY"] = stand_ins
        try:
            config = load(args)
        finally:
            if previous is None:
                del os.environ["CREDENTIALS_DIRECTORY"]
            else:
                os.environ["CREDENTIALS_DIRECTORY"] = previous
    if config.path is None:
        raise CommandError(f"no config file: write one (docs/configuration.md) and pass --config, or run this "
                           f"where ./{DEFAULT_PATH} is", code=2)
    executable = shutil.which("crossroads") or str(Path(sys.argv[0]).resolve())
    bridge_units = units_of(config)
    instances = list(bridge_units)
    if not config.layer.url.startswith("memory://") and config.routing_app:
        instances += [f"crossroads-worker@{i}.service" for i in range(1, args.workers + 1)]
    listening = {}  # the instances that take clients, and how many their bridges may hold at once
    for instance, bridges in bridge_units.items():
        caps = [b.options.get("max_connections", load_bridge_class(b.type).OPTIONS["max_connections"].default)
                for b in bridges if "max_connections" in load_bridge_class(b.type).OPTIONS]
        if caps:
            listening[instance] = sum(int(cap) for cap in caps)
    metrics = {}
    if config.metrics.listen:  # a port for each process, counted up from the config's
        from .systemd import metrics_ports

        metrics = metrics_ports(config.metrics.listen, [i for i in instances if i != "crossroads.target"])
    units = render_units(executable=executable, config=str(config.path.resolve()), credentials=used,
                         wants=instances, listening=listening, metrics=metrics)
    for path in write_units(args.output, units):
        print(f"wrote {path}")
    warn_about_sandbox(config, executable, files_used(config_text))
    print("\nInstall and start them (as root):\n")
    print(f"    cp -r {args.output}/crossroads* /etc/systemd/system/")
    print("    systemctl daemon-reload")
    print(f"    systemctl enable --now crossroads.target {' '.join(instances)}")
    for instance, address in metrics.items():
        print(f"{instance} serves /metrics on http://{address}/metrics")
    for name in used:
        print(f"\nThe config reads ${{credential:{name}}}: put the secret in /etc/crossroads/credentials/{name} "
              "(mode 0600, owned by root).")
    return 0


def warn_about_sandbox(config: Config, executable: str, files: list[str]) -> None:
    """Say which paths the units need but their sandbox (or their dynamic user) keeps from them."""
    from .systemd import interpreter_of, sandbox_problems

    folder = config.path.parent.absolute()
    needed = {"ExecStart's program": Path(executable), **interpreter_of(Path(executable)),
              "the crossroads package it imports": Path(__file__).resolve().parent,
              "--config (and the modules next to it)": config.path.absolute(),
              **{f"${{file:{name}}}": folder / name for name in files}}
    for bridge in config.enabled_bridges():
        for key, value in bridge.options.items():
            if isinstance(value, str) and key.endswith(PATH_OPTION_ENDINGS) and Path(value).is_absolute():
                needed[f"[bridges.{bridge.name}] {key}"] = Path(value)
    problems = sandbox_problems(needed)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if problems:
        print("warning: these units cannot start as they are: install crossroads where a service can read it "
              "(a virtualenv under /opt, or system-wide) and keep the config and the files it reads under "
              "/etc/crossroads (docs/running.md, \"Installing for systemd\")", file=sys.stderr)


def add_metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", default=os.environ.get("CROSSROADS_METRICS_LISTEN"),
                        help="serve /metrics, /healthz and /readyz there (default: $CROSSROADS_METRICS_LISTEN, "
                             "else [metrics] listen; off if neither is set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossroads",
        description="A protocol-bridge gateway: bridges turn protocols into messages on a channel layer, "
                    "consumers answer them.",
        epilog="Start with `crossroads check`. Docs: docs/configuration.md, docs/consumers.md, docs/spec/layer.md.",
    )
    parser.add_argument("--version", action="version", version=f"crossroads {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=None, metavar="PATH",
                         help=f"the config file (default ./{DEFAULT_PATH})")
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", cmd_run, "run every enabled bridge and the worker in one process (the all-in-one gateway)")
    if BUNDLED_EXAMPLE.exists():  # a source checkout ships it; a wheel does not
        run.epilog = (f"With no --config and no ./{DEFAULT_PATH}, it serves the bundled chat example "
                      f"({BUNDLED_EXAMPLE}) on http://127.0.0.1:8000/ (docs/chat.md).")
    run.add_argument("--interval", type=float, default=60.0, metavar="SECONDS",
                     help="how often to log the layer's counters (default 60)")
    run.epilog = ("With no --config and no ./crossroads.toml it serves the bundled chat example on "
                  "http://127.0.0.1:8000/, with a broker at mqtt://127.0.0.1:1883 and an IRC server at "
                  "irc://127.0.0.1:6667, mail on port 2525 answered through smtp://127.0.0.1:2526; set "
                  "CROSSROADS_CHAT_PORT, CROSSROADS_CHAT_BROKER, CROSSROADS_CHAT_IRC, CROSSROADS_CHAT_SMTP (a port) "
                  "or CROSSROADS_CHAT_SMARTHOST to use others.")
    add_metrics_flag(run)
    bridge = command("bridge", cmd_bridge, "run one bridge instance as its own daemon")
    add_metrics_flag(bridge)
    bridge.add_argument("name", metavar="NAME", help="the bridge's table name: [bridges.NAME]")
    command("check", cmd_check, "validate the config and the routing import; name every mistake")
    worker = command("worker", cmd_worker, "run consumers for messages on the layer (a daemon)")
    add_metrics_flag(worker)
    worker.add_argument("--threads", type=int, metavar="N",
                        help="threads of the default pool (default: [worker] threads)")
    worker.add_argument("--prefetch", type=int, metavar="N",
                        help="messages a thread takes per receive, at most; a killed worker loses them "
                             "(default: [worker] prefetch)")
    worker.add_argument("--only-channels", nargs="+", metavar="PATTERN",
                        help="serve only channels matching these patterns ('*' is the wildcard)")
    worker.add_argument("--exclude-channels", nargs="+", metavar="PATTERN",
                        help="never serve channels matching these patterns")
    send = command("send", cmd_send, "put one message on a channel of the configured layer")
    send.add_argument("channel", metavar="CHANNEL")
    send.add_argument("json", metavar="JSON",
                      help="the message, a JSON object; - reads it from stdin, @PATH from a file (for large ones)")
    systemd = command("systemd", cmd_systemd, "write systemd unit files for this config")
    systemd.add_argument("--output", type=Path, default=Path("systemd-units"), metavar="DIR",
                         help="where to write them (default ./systemd-units)")
    systemd.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes to start (default 1)")
    status = command("status", cmd_status, "show the layer's waiting messages per channel and each bridge's health")
    status.add_argument("--json", action="store_true", help="print JSON")

    layer_cmd = commands.add_parser("layer", help="check a channel layer by URL, without a config file")
    layer_commands = layer_cmd.add_subparsers(dest="layer_command", metavar="ACTION", required=True)
    check = layer_commands.add_parser("check", help="send a message through the layer and back")
    urls = "memory:// (the default), redis://[:password@]host:port/db or rediss://..."
    check.add_argument("url", nargs="?", metavar="URL", help=urls)
    check.add_argument("--layer", metavar="URL", help=f"the same as URL: {urls}")
    check.set_defaults(handler=cmd_layer_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    files, was = raise_open_files_limit()
    if getattr(args, "command", None) in ("run", "worker", "bridge"):  # daemons say what they run with
        log.info("open files limit: %d%s", files, f" (raised from {was})" if files != was else "")
        tune_gc()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack on stderr, for a daemon that hangs
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except CommandError as exc:
        print(f"crossroads {args.command}: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
