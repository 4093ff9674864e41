"""Micro-benchmark of one reply's Web API call: CPU per ``chat.postMessage`` through slack-sdk's ``AsyncWebClient``
against the bridge's own ``_Poster`` (one aiohttp session, pre-built headers, a JSON body), interleaved.

Owns nothing but this measurement: the emulator (bench/slack_peer.py, the benchmark's) runs in a process of
its own pinned to the load core, so ``time.process_time`` here is the client's CPU alone; this process is
pinned to the other core. Both clients share one aiohttp session and the same logger level (WARNING, so
slack-sdk formats no debug lines), and post the same arguments the bridge posts for a text reply.

Usage: ``.venv/bin/python bench/slack_post.py [--calls N] [--rounds R]``; prints µs of CPU per call for each
client, round by round, the emulator's per call, and the median ratios. Writes nothing. Load-independent: run
one client (``--only crossroads``) under ``valgrind --tool=callgrind`` with ``--calls 100`` and ``--calls 1100``
and divide the difference of the two instruction counts by 1,000 (at 8dca7aa: slack-sdk 692,000 instructions
per call, aiohttp with headers built once 484,000, crossroads' client 157,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from slack_sdk.web.async_client import AsyncWebClient  # noqa: E402
from yarl import URL  # noqa: E402

from bench.layer import cpu_pin  # noqa: E402
from bench.slack import LOAD_CORE, SERVER_CORE, Peer  # noqa: E402
from crossroads.bridges.slack.webapi import WebAPI  # noqa: E402

ARGS = {"channel": "C000", "text": "bench 1", "unfurl_links": False, "unfurl_media": False}


class AiohttpPoster:
    """The middle way measured: aiohttp's client on the shared session, headers built once, a JSON body."""

    def __init__(self, session: aiohttp.ClientSession, api_url: str, token: str) -> None:
        self.session, self.api_url = session, api_url
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8"}
        self.urls: dict[str, URL] = {}

    async def call(self, method: str, args: dict) -> tuple[int, dict]:
        url = self.urls.get(method)
        if url is None:
            url = self.urls[method] = URL(self.api_url + method)
        async with self.session.post(url, data=json.dumps(args).encode(), headers=self.headers) as response:
            return response.status, json.loads(await response.read())


def cpu_seconds(pid: int) -> float:
    """CPU time another process has used, in ns precision (schedstat, summed over its threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return total / 1e9


async def measure(api_url: str, token: str, calls: int, rounds: int, emulator: int, only: str | None = None
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    logger = logging.getLogger("bench.slack_post.sdk")
    logger.setLevel(logging.WARNING)
    per_call: dict[str, list[float]] = {"slack-sdk AsyncWebClient": [], "aiohttp, headers built once": [],
                                        "crossroads WebAPI (bridges/slack/webapi.py)": []}
    served: dict[str, list[float]] = {name: [] for name in per_call}  # the emulator's CPU per call
    async with aiohttp.ClientSession() as session:
        web = AsyncWebClient(token=token, base_url=api_url, session=session, logger=logger)
        poster = AiohttpPoster(session, api_url, token)
        ours = WebAPI(api_url, token)

        async def sdk() -> None:
            answer = await web.chat_postMessage(**ARGS)
            assert answer["ok"]

        async def middle() -> None:
            status, answer = await poster.call("chat.postMessage", ARGS)
            assert status == 200 and answer["ok"]

        async def crossroads() -> None:
            status, answer, _ = await ours.call("chat.postMessage", ARGS)
            assert status == 200 and answer["ok"]

        clients = dict(zip(per_call, (sdk, middle, crossroads), strict=True))
        if only is not None:  # one client alone, for an instruction count (callgrind) of the whole process
            clients = {name: client for name, client in clients.items() if name.startswith(only)}
            per_call = {name: per_call[name] for name in clients}
            served = {name: served[name] for name in clients}
        for client in clients.values():  # warm: the connection, imports, caches
            for _ in range(200):
                await client()
        for _ in range(rounds):
            for name, client in clients.items():
                start, emulator_start = time.process_time(), cpu_seconds(emulator)
                for _ in range(calls):
                    await client()
                per_call[name].append((time.process_time() - start) / calls * 1e6)
                served[name].append((cpu_seconds(emulator) - emulator_start) / calls * 1e6)
        ours.close()
    return per_call, served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=("slack-sdk", "aiohttp", "crossroads"),
                        help="run one client only (for valgrind --tool=callgrind: compare two --calls counts)")
    args = parser.parse_args()
    peer = Peer("post")
    try:
        if hasattr(os, "sched_setaffinity") and cpu_pin(SERVER_CORE):
            os.sched_setaffinity(0, {SERVER_CORE})
        print(f"load average {os.getloadavg()[0]:.2f}; emulator on core {LOAD_CORE}, this process on {SERVER_CORE}; "
              f"{args.rounds} rounds × {args.calls} calls each, interleaved")
        got, served = asyncio.run(measure(peer.api_url, peer.bot_token, args.calls, args.rounds, peer.process.pid,
                                           args.only))
    finally:
        peer.stop()
    for name, values in got.items():
        print(f"  {name}: {statistics.median(values):.0f} µs CPU/call (rounds: "
              f"{', '.join(f'{v:.0f}' for v in values)}); the emulator {statistics.median(served[name]):.0f} µs/call")
    if len(got) < 3:
        return 0
    sdk, *others = got.values()
    for name, values in zip(list(got)[1:], others, strict=True):
        print(f"  {name} ÷ slack-sdk (median of the rounds' ratios): "
              f"{statistics.median(o / s for o, s in zip(values, sdk, strict=True)):.2f}")
    print(f"  load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
