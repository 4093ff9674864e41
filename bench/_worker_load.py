"""What both request/reply senders of ``bench/worker.py`` share: the request and the clock.

Owns the request message and ``Recorder``, which splits a run into warm-up and measured windows
and keeps the round-trip latencies. Standard library only: it is imported by crossroads' sender
(``_worker_crossroads.py``, in ``.venv``) and by Channels' sender (``_worker_channels.py``, in the
channels_redis virtualenv, which has no crossroads), so both measure the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

REQUEST_CHANNEL = "bench.request"
TEXT = "x" * 100  # a short chat line; the consumer echoes it


def request(reply_channel: str) -> dict[str, Any]:
    """A request shaped like a bridge's ``*.receive`` message (ARCHITECTURE decision 5).

    ``type`` is there for Channels, whose worker refuses a message without one; crossroads
    ignores it.
    """
    return {"type": "bench.request", "protocol": "bench", "sender": "bench", "room": None, "text": TEXT,
            "reply_channel": reply_channel}


class Recorder:
    """Round trips completed, per phase: warm-up, then ``windows`` measured windows of ``seconds``.

    The clock starts at the first reply, so a worker's start-up time is never measured. A round
    trip counts in the window in which its reply arrived. ``cpu``, if given, returns CPU seconds
    used so far by name (``cpu_seconds``); it is read when the measured windows start and end.
    """

    def __init__(self, warmup: float, seconds: float, windows: int,
                 cpu: Callable[[], dict[str, float]] | None = None) -> None:
        self.warmup_ns = round(warmup * 1e9)
        self.window_ns = round(seconds * 1e9)
        self.windows = windows
        self.ends: list[int] = []  # end of warm-up, then of each window (perf_counter_ns)
        self.phase = 0  # 0 warm-up, 1..windows measured, windows + 1 stopping
        self.counts = [0] * (windows + 2)
        self.latencies_ns: list[int] = []
        self.cpu = cpu
        self.cpu_marks: list[dict[str, float]] = []

    @property
    def stopping(self) -> bool:
        return self.phase > self.windows

    def done(self, latency_ns: int, now: int) -> None:
        if not self.ends:
            start = now + self.warmup_ns
            self.ends = [start + i * self.window_ns for i in range(self.windows + 1)]
        while self.phase <= self.windows and now >= self.ends[self.phase]:
            self.phase += 1
            if self.cpu is not None and self.phase in (1, self.windows + 1):
                self.cpu_marks.append(self.cpu())
        self.counts[self.phase] += 1
        if 1 <= self.phase <= self.windows:
            self.latencies_ns.append(latency_ns)

    def result(self) -> dict[str, Any]:
        result = {"round_trips": self.counts[1:-1], "window_seconds": self.window_ns / 1e9,
                  "warmup_round_trips": self.counts[0], "latencies_ns": self.latencies_ns}
        if len(self.cpu_marks) == 2:
            start, end = self.cpu_marks
            result["cpu_seconds"] = {name: end[name] - start[name] for name in start}
        return result


def now_ns() -> int:
    return time.perf_counter_ns()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) another process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
