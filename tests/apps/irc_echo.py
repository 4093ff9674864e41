"""An IRC consumer for tests/test_irc_bridge.py: answer what is said in a channel or in private, with who said it."""

from crossroads import route


def echo(message):
    message.reply_channel.send({"text": f"{message['sender']} said: {message['text']}"})


routes = [route("irc-client.receive", echo)]
