"""crossroads' side of ``bench/mail.py``: the consumer behind the email bridge, and how it reports.

Routed from the generated config as ``bench.email_consumers:routes`` (the daemons run with the repository
root on ``PYTHONPATH``, so ``bench`` imports as a package). The load and the bare server are
``bench/email_clients.py``.

- ``email.receive`` with a Subject ``<run> <seq>``: count per run (mails, distinct sequence numbers, first and
  last arrival), so every run has its own counters and a mail delivered twice shows.

- ``email.receive`` with a Subject ``rt-<...> <seq>`` (the reply-latency scenario): answered at once on
  ``message.reply_channel`` with one line of text; the bridge sends the reply through the smarthost, where the
  harness times its arrival. Nothing is counted here.

Reporting: ``bench/_arrivals.py`` writes the counters to the file named by ``BENCH_EMAIL_STATE``.
"""

from __future__ import annotations

import os

from bench._arrivals import Arrivals
from crossroads import route

arrivals = Arrivals()
arrivals.report_to(os.environ.get("BENCH_EMAIL_STATE"), "bench-email-state")


def count(message) -> None:
    run, _, seq = message["subject"].rpartition(" ")
    arrivals.count(run, int(seq))


def answer(message) -> None:
    message.reply_channel.send({"text": f"Re {message['subject']}\n"})


routes = [
    route("email.receive", answer, subject=r"^rt-\S* \d+$"),  # first: the route that matches first wins
    route("email.receive", count, subject=r"^\S+ \d+$"),
]
