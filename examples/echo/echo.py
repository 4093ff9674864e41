"""The echo example: whatever arrives on any protocol goes back to where it came from.

HTTP requests get their body (or path) back as text; every ``websocket.receive``, ``mqtt.receive``
and ``irc-client.receive`` message gets ``{"text": ...}`` on its reply channel, which each bridge
renders in its own protocol (a frame, a publish on the reply topic, a PRIVMSG to the channel).
"""

from __future__ import annotations

from crossroads import route


def echo_http(message):
    body = message.get("body") or message["path"].encode()
    message.reply_channel.send({"status": 200, "headers": [[b"content-type", b"text/plain; charset=utf-8"]],
                                "content": body})


def accept(message):
    message.reply_channel.send({"accept": True})


def echo(message):
    if message.text is not None:
        message.reply_channel.send({"text": message.text})
    elif message.get("bytes") is not None:
        message.reply_channel.send({"bytes": message["bytes"]})
    elif message.get("payload") is not None:  # MQTT payloads that are not UTF-8 go back as they came
        message.reply_channel.send({"payload": message["payload"]})


routes = [
    route("http.request", echo_http),
    route("websocket.connect", accept),
    route(["websocket.receive", "mqtt.receive", "irc-client.receive"], echo),
]
