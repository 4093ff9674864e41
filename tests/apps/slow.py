"""Consumers for worker tests: a request/reply echo, an async one, ones that wait to be released, and a quick one."""

import asyncio

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


async def hold_async(message):
    """``hold`` as an ``async def`` consumer: it waits in a coroutine, not in its thread."""
    Channel("test.started").send({"n": message.get("n")}, immediately=True)
    sync = message.channel_layer.sync
    released, _ = await asyncio.to_thread(sync.receive, ["test.release"], timeout=60)
    message.reply_channel.send({"finished": message.get("n"), "released": released is not None})


def tick(message):
    """As quick as a consumer gets: answers only a message that asks (the last of a burst)."""
    if message.get("reply_channel"):
        message.reply_channel.send({"n": message.get("n")})


routes = [
    route("test.echo", echo),
    route("test.shout", shout),
    route("test.hold", hold),
    route("test.hold_async", hold_async),
    route("test.tick", tick),
]
