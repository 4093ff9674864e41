"""Consumers for the toy line bridge (tests/toy_bridge.py): answer each line in capitals."""

from crossroads import route


def shout(message):
    message.reply_channel.send({"text": message.text.upper()})


routes = [route("toy.receive", shout)]
