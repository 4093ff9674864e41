"""Slack consumers for tests/test_slack_bridge.py: echo what is said, answer slash commands, report the link."""

from crossroads import Channel, route


def echo(message):
    """Answer every post on its reply channel (its thread's, when it came from one) and report it to ``test.slack``."""
    Channel("test.slack").send(dict(message.content), immediately=True)
    message.reply_channel.send({"text": f"echo: {message.text}"})


def command(message):
    """Answer a slash command (in its acknowledgement, when in time)."""
    message.reply_channel.send({"text": f"ran {message['command']} {message.text}".strip()})


def link(message):
    Channel("test.links").send(dict(message.content), immediately=True)


routes = [
    route("slack.receive", echo),
    route("slack.command", command),
    route(["slack.connect", "slack.disconnect"], link),
]
