"""Consumers for the worker's held-sends tests: one that also sends immediately; an echo, and on the same
channel one that waits without a word."""

from crossroads import route


def mixed(message):
    """Held replies of earlier messages in the worker's batch must still arrive before the immediate one."""
    n = message.get("n")
    if n % 2:
        message.reply_channel.send({"n": n, "immediately": True}, immediately=True)
    message.reply_channel.send({"n": n})


def echo(message):
    message.reply_channel.send({"n": message.get("n")})


def wait_quietly(message):
    """Wait until the test releases it (a receive, nothing sent), then answer: a slow message whose batch-mates'
    replies must not wait for it."""
    released, _ = message.channel_layer.sync.receive(["test.release"], timeout=60)
    message.reply_channel.send({"finished": message.get("n"), "released": released is not None})


routes = [
    route("test.mixed", mixed),
    route("test.echo", wait_quietly, kind="^wait$"),
    route("test.echo", echo),
]
