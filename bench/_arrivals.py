"""What a benchmark's consumer counts, and how the harness learns it: ``Arrivals``.

Shared by bench/mqtt_consumers.py and bench/email_consumers.py. Per key (a topic, a run): messages received,
distinct sequence numbers (so a message delivered twice shows), first and last arrival. The worker runs several
consumer threads, so counting takes a lock and a set insert per message, as a bare client's own counting would.

Reporting: ``report_to(path)`` starts a daemon thread that writes the counters as JSON to ``path`` (atomically:
a temporary file, then a rename) whenever they changed, at most every 50 ms. The harness reads that file with
a deadline; nothing rides on the layer or the protocol, which are what is being measured.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

WRITE_EVERY = 0.05


class Arrivals:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, set[int]] = {}
        self._version = 0

    def count(self, key: str, seq: int) -> None:
        now = time.monotonic_ns()
        with self._lock:
            counters = self._counts.get(key)
            if counters is None:
                counters = self._counts[key] = {"received": 0, "first_ns": now, "last_ns": now}
                self._seen[key] = set()
            counters["received"] += 1
            counters["last_ns"] = now
            self._seen[key].add(seq)
            self._version += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {key: {**c, "distinct": len(self._seen[key])} for key, c in self._counts.items()}

    def report_to(self, path: str | None, name: str) -> None:
        """Keep ``path`` up to date from a daemon thread; nothing when ``path`` is None (imported elsewhere)."""
        if path:
            threading.Thread(target=self._writer, args=(path,), name=name, daemon=True).start()

    def _writer(self, path: str) -> None:
        written = 0
        while True:
            time.sleep(WRITE_EVERY)
            if self._version == written:
                continue
            written = self._version
            state = self.snapshot()
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "w") as out:
                json.dump(state, out)
            os.replace(temporary, path)
