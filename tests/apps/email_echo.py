"""An email consumer for tests/test_email_smarthost.py: answer a mail in its thread, saying what it read."""

from crossroads import route


def answer(message):
    message.reply_channel.send({"text": f"{message['sender']} wrote: {message['text']}"})


routes = [route("email.receive", answer)]
