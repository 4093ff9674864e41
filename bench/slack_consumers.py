"""crossroads' side of ``bench/slack.py``: the consumer behind the Slack bridge.

Routed from the generated config as ``bench.slack_consumers:routes`` (the daemons run with the repository
root on ``PYTHONPATH``). It answers every ``slack.receive`` with its text on the reply channel, so the
bridge posts it back with ``chat.postMessage``: the emulator (bench/slack_peer.py) times the round trip from
the event it sent to the post it got, and counts. Nothing here measures: the emulator sees every ack and post.
With ``BENCH_SLACK_QUIET=1`` in its environment it answers nothing (the ingest path alone).
"""

from __future__ import annotations

import os

from crossroads import route

QUIET = os.environ.get("BENCH_SLACK_QUIET") == "1"


def echo(message) -> None:
    if not QUIET:
        message.reply_channel.send({"text": message["text"]})


routes = [route("slack.receive", echo)]
