"""crossroads' side of ``bench/mail.py``: the consumer behind the email bridge, and how it reports.

Routed from the generated config as ``bench.email_consumers:routes`` (the daemons run with the repository
root on ``PYTHONPATH``, so ``bench`` imports as a package). The load and the bare server are
``bench/email_clients.py``.

- ``email.receive`` with a Subject ``<run> <seq>``: count per run (mails, distinct sequence numbers, first and
  last arrival), so every run has its own counters and a mail delivered twice shows.

- ``email.receive`` with a Subject ``rt-<...> <seq>`` (the reply-latency scenario): answered at once on
  ``message.reply_channel`` with one line of text; the bridge sends the reply through the smarthost, where the
  harness times its arrival. Nothing is counted here.

Reporting: a daemon thread writes the counters as JSON to the file named by ``BENCH_EMAIL_STATE`` (atomically:
a temporary file, then a rename) whenever they changed, at most every 50 ms. The harness reads that file
with a deadline; nothing rides on the layer or SMTP, which are what is being measured. Counting costs a lock
and a set insert per mail.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from crossroads import route

STATE_PATH = os.environ.get("BENCH_EMAIL_STATE")
WRITE_EVERY = 0.05

_lock = threading.Lock()
_counts: dict[str, dict[str, Any]] = {}
_seen: dict[str, set[int]] = {}
_version = 0


def count(message) -> None:
    now = time.monotonic_ns()
    run, _, seq = message["subject"].rpartition(" ")
    global _version
    with _lock:  # the worker runs 4 consumer threads by default
        counters = _counts.get(run)
        if counters is None:
            counters = _counts[run] = {"received": 0, "first_ns": now, "last_ns": now}
            _seen[run] = set()
        counters["received"] += 1
        counters["last_ns"] = now
        _seen[run].add(int(seq))
        _version += 1


def snapshot() -> dict[str, Any]:
    with _lock:
        return {run: {**c, "distinct": len(_seen[run])} for run, c in _counts.items()}


def _writer(path: str) -> None:
    written = 0
    while True:
        time.sleep(WRITE_EVERY)
        if _version == written:
            continue
        written = _version
        state = snapshot()
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as out:
            json.dump(state, out)
        os.replace(temporary, path)


if STATE_PATH:  # only where the harness asked for it: importing the routing table elsewhere starts nothing
    threading.Thread(target=_writer, args=(STATE_PATH,), name="bench-email-state", daemon=True).start()

def answer(message) -> None:
    message.reply_channel.send({"text": f"Re {message['subject']}\n"})


routes = [
    route("email.receive", answer, subject=r"^rt-\S* \d+$"),  # first: the route that matches first wins
    route("email.receive", count, subject=r"^\S+ \d+$"),
]
