"""The ``crossroads`` command line.

Owns argument parsing and what each command prints; the work itself belongs to
the packages it calls (``layer`` for now). Every failure ends with one line that
says what went wrong and what to do next, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import layer

from . import __version__

DEFAULT_LAYER = "memory://"


def _layer_url(args: argparse.Namespace) -> str:
    return args.layer or os.environ.get("CROSSROADS_LAYER") or DEFAULT_LAYER


def _open(url: str) -> Any:
    try:
        return layer.from_url(url)
    except ValueError as exc:
        raise SystemExit(f"crossroads: {exc}") from None


def round_trip(sync_layer: Any) -> float:
    """Send a message to a fresh single-reader channel and receive it; return the seconds it took."""
    channel = sync_layer.new_channel("crossroads.check?")
    started = time.perf_counter()
    sync_layer.send(channel, {"text": "ping"})
    got, message = sync_layer.receive([channel], timeout=5)
    elapsed = time.perf_counter() - started
    if got != channel or message != {"text": "ping"}:
        raise layer.LayerUnavailable("the message sent did not come back within 5 s")
    return elapsed


def cmd_layer_check(args: argparse.Namespace) -> int:
    url = _layer_url(args)
    channel_layer = _open(url)
    try:
        elapsed = round_trip(channel_layer.sync)
    except layer.LayerUnavailable as exc:
        print(f"crossroads: layer {url} is not working: {exc}", file=sys.stderr)
        print("Start the server it names (or fix --layer / CROSSROADS_LAYER) and run the check again.",
              file=sys.stderr)
        return 1
    finally:
        channel_layer.sync.close()
    print(f"layer {url}: ok, a message went there and back in {elapsed * 1000:.2f} ms")
    return 0


def cmd_layer_stats(args: argparse.Namespace) -> int:
    url = _layer_url(args)
    channel_layer = _open(url)
    try:
        stats = channel_layer.sync.stats()
    except layer.LayerUnavailable as exc:
        print(f"crossroads: cannot read stats of {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        channel_layer.sync.close()
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Start the gateway. Bridges and workers arrive with later releases; today: the layer, checked and watched."""
    url = _layer_url(args)
    channel_layer = _open(url)
    try:
        elapsed = round_trip(channel_layer.sync)
    except layer.LayerUnavailable as exc:
        print(f"crossroads: cannot start, layer {url} is not working: {exc}", file=sys.stderr)
        return 1
    print(f"crossroads {__version__}: layer {url} up (round trip {elapsed * 1000:.2f} ms); "
          "no bridges are configured yet. Ctrl-C to stop.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(args.interval):
            stats = channel_layer.sync.stats()
            pending = sum(stats["pending"].values())
            print(f"layer: {pending} pending, {stats['sent']} sent, {stats['received']} received, "
                  f"{stats['dropped']} dropped, {stats['expired']} expired", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        channel_layer.sync.close()
    print("crossroads: stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossroads",
        description="A protocol-bridge gateway: bridges turn protocols into messages on a channel layer, "
                    "consumers answer them.",
        epilog="The layer URL comes from --layer, else $CROSSROADS_LAYER, else memory://. "
               "Docs: docs/spec/layer.md.",
    )
    parser.add_argument("--version", action="version", version=f"crossroads {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_layer_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--layer", metavar="URL",
                         help="channel layer: memory://, redis://[:password@]host:port/db or rediss://...")

    run = commands.add_parser("run", help="start the gateway in the foreground")
    add_layer_option(run)
    run.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                     help="how often to print the layer's counters (default 10)")
    run.set_defaults(handler=cmd_run)

    layer_cmd = commands.add_parser("layer", help="check or inspect a channel layer")
    layer_commands = layer_cmd.add_subparsers(dest="layer_command", metavar="ACTION", required=True)
    check = layer_commands.add_parser("check", help="send a message through the layer and back")
    add_layer_option(check)
    check.set_defaults(handler=cmd_layer_check)
    stats = layer_commands.add_parser("stats", help="print pending messages per channel and the counters")
    add_layer_option(stats)
    stats.set_defaults(handler=cmd_layer_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
