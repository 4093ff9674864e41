"""Consumers for worker tests: a request/reply echo, an async one, and one that waits to be released."""

from crossroads import Channel, route


def echo(message):
    message.reply_channel.send({"text": message.text, "n": message.get("n")})


async def shout(message):
    message.reply_channel.send({"text": message.text.upper()})


def hold(message):
    """Announce the message is in hand, wait until the test releases it, then answer."""
    Channel("test.started").send({"n": message.get("n")}, immediately=True)
    sync = message.channel_layer.sync
    released, _ = sync.receive(["test.release"], timeout=60)
    message.reply_channel.send({"finished": message.get("n"), "released": released is not None})


routes = [
    route("test.echo", echo),
    route("test.shout", shout),
    route("test.hold", hold),
]
