"""Micro-benchmark of the Slack bridge's reply path: a reply handed to the bridge -> chat.postMessage -> its answer.

Owns nothing but this measurement. The bridge (Socket Mode to the benchmark's emulator, bench/slack_peer.py, in a
process of its own, a memory:// layer) is given replies as its receive loop gives them (``_dispatch``, in batches
of 100, 5 per channel over 20 channels, as a flood's replies come), and each batch's posts are awaited. Its
limiter is opened wide as bench/slack.py opens it.

Usage: ``.venv/bin/python bench/slack_reply.py [--batches N]``; prints µs of CPU per reply. Load-independent:
run it under ``valgrind --tool=callgrind`` with ``--batches 10`` and ``--batches 60`` and divide the difference of
the two instruction counts by 5,000 (``--callgrind`` does that).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.slack import CHANNELS, Peer  # noqa: E402
from crossroads import layer  # noqa: E402
from crossroads.bridges.slack.bridge import SlackBridge  # noqa: E402

BATCH = 100


class CountingBridge(SlackBridge):
    """Sets ``done`` once ``want`` posts were made."""

    want = 0
    done: asyncio.Future | None = None

    def count(self, name: str, n: int = 1) -> None:
        super().count(name, n)
        if name == "posted" and self._counters["posted"] >= self.want and self.done and not self.done.done():
            self.done.set_result(None)


async def measure(peer: Peer, batches: int) -> float:
    channel_layer = layer.from_url("memory://", capacity=1000)
    bridge = CountingBridge("bench", {"bot_token": peer.bot_token, "app_token": peer.app_token,
                                      "api_url": peer.api_url, "rate": 1e6, "burst": 1000000,
                                      "max_queued": 1000000}, channel_layer)
    await bridge.start()
    for _ in range(1000):
        if bridge.link_up:
            break
        await asyncio.sleep(0.01)
    channels = [f"c.{channel}" for channel in CHANNELS]
    for local_id in channels:
        bridge._route(local_id)
    loop = asyncio.get_running_loop()

    async def rounds(count: int, run: str) -> None:
        seq = 0
        for _ in range(count):
            bridge.want = bridge._counters["posted"] + BATCH
            bridge.done = loop.create_future()
            for _ in range(BATCH // len(channels)):
                for local_id in channels:
                    bridge._dispatch(local_id, {"text": f"{run} {seq}"})
                    seq += 1
            await bridge.done

    await rounds(20, "warm")
    start = time.process_time()
    await rounds(batches, "bench")
    cpu = time.process_time() - start
    await bridge.stop()
    await channel_layer.close()
    return cpu / (batches * BATCH) * 1e6


def callgrind(low: int, high: int) -> None:
    counts = []
    with tempfile.TemporaryDirectory() as workdir:
        for batches in (low, high):
            out = Path(workdir) / f"cg.{batches}"
            subprocess.run(["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--batches", str(batches)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            counts.append(int(next(line for line in out.read_text().splitlines()
                                   if line.startswith("summary:")).split()[1]))
    print(f"{(counts[1] - counts[0]) / ((high - low) * BATCH):,.0f} instructions per reply "
          f"(callgrind, {low} and {high} batches of {BATCH})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--callgrind", action="store_true", help="instructions per reply under callgrind")
    args = parser.parse_args()
    if args.callgrind:
        callgrind(10, 60)
        return 0
    logging.basicConfig(level=logging.WARNING)
    peer = Peer("post")
    try:
        per_reply = asyncio.run(measure(peer, args.batches))
    finally:
        peer.stop()
    print(f"{per_reply:.1f} µs CPU per reply (load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
