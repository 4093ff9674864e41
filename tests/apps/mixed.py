"""A consumer for the worker's held-sends test: a buffered reply, and on odd messages an immediate one first."""

from crossroads import route


def mixed(message):
    """Held replies of earlier messages in the worker's batch must still arrive before the immediate one."""
    n = message.get("n")
    if n % 2:
        message.reply_channel.send({"n": n, "immediately": True}, immediately=True)
    message.reply_channel.send({"n": n})


routes = [route("test.mixed", mixed)]
