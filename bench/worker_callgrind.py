"""The worker's instructions per message, under valgrind's callgrind: a load-independent figure to compare commits.

Usage: ``.venv/bin/python bench/worker_callgrind.py [--quiet] [--prefetch N]``; writes nothing.

A redis-server of its own holds N ``slack.receive`` messages shaped like the Slack bridge's (reply channels on a
bridge's process queue, over 20 Slack channels, as in ``bench/slack.py``'s flood); a ``Worker`` with 4 threads and
``bench/slack_consumers.py``'s echo consumer (``--quiet``: answers nothing) consumes them all under callgrind, and
the process's total is read. Instructions per message = (the N=2100 run - the N=100 run) / 2000, so start-up and
shutdown cancel out. The messages are sent before the worker starts, by this process without valgrind.

Batching decides much of the cost per message, and the worker sizes its batches by how long messages took, which
valgrind's slowdown would shrink: here every consumer counts as quick and every thread takes ``--prefetch`` (16 by
default, about what ``bench/slack.py``'s flood sees: ~0.06 receives per event) per receive, so the figure is
steady from run to run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHANNELS = [f"C{n:03d}" for n in range(20)]
REPLY_PREFIX = "slack.slack.Ab3dEf6hIj9kLm2n!"  # a bridge's process queue, as bridges/base.py names it
OPTIONS = {"prefix": "bench-worker-callgrind", "channel_capacity": {"slack.receive": 1000000},
           "process_capacity": 1000000}
COUNTS = (100, 2100)


def message(seq: int) -> dict:
    """A ``slack.receive`` with the keys the Slack bridge sends (bridges/slack/messages.py's event_message)."""
    channel = CHANNELS[seq % len(CHANNELS)]
    ts = f"{1700000000 + seq}.000123"
    text = f"counted {seq}"
    return {
        "reply_channel": f"{REPLY_PREFIX}c.{channel}", "team": "T0001", "channel": channel,
        "channel_type": "channel", "user": "U0001", "bot_id": None, "ts": ts, "thread_ts": None,
        "event_id": f"Evcounted{seq}", "event_ts": ts, "type": "message", "subtype": None, "edited": False,
        "body": text, "files": [], "user_name": "bench-user", "channel_name": f"bench-{channel[1:]}",
        "mentioned": False, "private": False, "retry_attempt": 0, "network": "slack",
        "protocol": "slack", "sender": "bench-user", "room": f"bench-{channel[1:]}", "text": text,
    }


def serve(url: str, count: int, prefetch: int) -> None:
    """The measured process: a worker that consumes ``count`` messages, then stops."""
    from crossroads import layer
    from crossroads.consumers import worker as worker_module

    worker_module.HOLD = 1e9  # every consumer quick, every batch ``prefetch``: see the module doc
    from slack_consumers import routes  # noqa: I001 (bench/ is this script's directory)

    channel_layer = layer.from_url(url, **OPTIONS)
    worker = worker_module.Worker(routes, channel_layer, threads=4, prefetch=prefetch)
    worker.start()
    while worker.dispatcher.counters.consumed < count:
        time.sleep(0.2)
    worker.stop()
    worker.join(60)
    c = worker.dispatcher.counters
    if c.errors or c.undelivered:
        raise SystemExit(f"errors {c.errors}, undelivered {c.undelivered}")


def instructions(url: str, count: int, quiet: bool, prefetch: int, workdir: Path) -> int:
    from crossroads import layer

    channel_layer = layer.from_url(url, **OPTIONS)
    channel_layer.sync.flush()
    channel_layer.sync.send_many([("slack.receive", message(seq)) for seq in range(count)])
    out = workdir / f"callgrind.{count}"
    env = {**os.environ, "PYTHONHASHSEED": "0", "BENCH_SLACK_QUIET": "1" if quiet else "0"}
    subprocess.run(["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}",
                    sys.executable, __file__, "serve", url, str(count), str(prefetch)],
                   check=True, env=env, capture_output=True)
    replies = channel_layer.sync.stats()
    channel_layer.sync.close()
    summary = next(line for line in out.read_text().splitlines() if line.startswith("summary:"))
    print(f"  N={count}: {int(summary.split()[1]):,} instructions; layer after: {replies}", file=sys.stderr)
    return int(summary.split()[1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="the consumer answers nothing")
    parser.add_argument("--prefetch", type=int, default=16, help="messages a thread takes per receive")
    args = parser.parse_args()
    from servers import RedisServer

    with tempfile.TemporaryDirectory(prefix="worker-callgrind-") as workdir, \
            RedisServer(Path(workdir) / "redis") as redis_server:
        low, high = (instructions(redis_server.url, n, args.quiet, args.prefetch, Path(workdir)) for n in COUNTS)
    print(f"{(high - low) / (COUNTS[1] - COUNTS[0]):,.0f} instructions per message "
          f"({'quiet' if args.quiet else 'with replies'}, prefetch {args.prefetch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
