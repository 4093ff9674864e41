"""WebSocket consumers for tests/test_websocket_bridge.py: each path exercises one way to answer a connection."""

from crossroads import Channel, DenyConnection, Group, route


def connect(message):
    """Accept, choosing the last subprotocol offered; report what the bridge sent to ``test.connects``."""
    Channel("test.connects").send(dict(message.content), immediately=True)
    offered = message.get("subprotocols") or []
    reply = {"accept": True}
    if offered:
        reply["subprotocol"] = offered[-1]
    message.reply_channel.send(reply)


def echo(message):
    """Echo the frame as it came (text or bytes), with its order; a few texts are commands."""
    text = message.get("text")
    if text == "close":
        message.reply_channel.send({"close": True})
    elif text is not None and text.startswith("close "):
        message.reply_channel.send({"text": "bye", "close": int(text.split()[1])})
    elif text is not None and text.startswith("order "):
        message.reply_channel.send({"text": f"{message['order']} {text}"})
    elif text is not None:
        message.reply_channel.send({"text": text})
    else:
        message.reply_channel.send({"bytes": message["bytes"]})


def disconnect(message):
    Channel("test.disconnects").send(dict(message.content), immediately=True)


def reject(message):
    raise DenyConnection()


def reject_by_accept_false(message):
    message.reply_channel.send({"accept": False})


def reject_by_close_code(message):
    message.reply_channel.send({"close": 4000})


def text_first(message):
    """A frame before any accept accepts implicitly (ASGI 1.0)."""
    message.reply_channel.send({"text": "welcome"})


def invalid_then_accept(message):
    message.reply_channel.send({"text": "both", "bytes": b"both"})  # invalid: ignored, logged, counted
    message.reply_channel.send({"accept": "yes"})  # invalid too
    message.reply_channel.send({"accept": True})


def hold(message):
    """Tell the test the connect is in hand, wait for its release, then accept."""
    Channel("test.held").send({"path": message["path"]}, immediately=True)
    released, _ = message.channel_layer.sync.receive(["test.release"], timeout=30)
    message.reply_channel.send({"accept": released is not None})


def silent(message):
    """Never answers: the handshake times out."""


def room_join(message, room):
    Group(f"room-{room}").add(message.reply_channel)
    message.reply_channel.send({"accept": True})


def room_say(message, room):
    Group(f"room-{room}").send({"text": message.text})


def room_leave(message, room):
    Group(f"room-{room}").discard(message.reply_channel)


routes = [
    route("websocket.connect", reject, path=r"^/reject/$"),
    route("websocket.connect", reject_by_accept_false, path=r"^/accept-false/$"),
    route("websocket.connect", reject_by_close_code, path=r"^/close-first/$"),
    route("websocket.connect", text_first, path=r"^/text-first/$"),
    route("websocket.connect", invalid_then_accept, path=r"^/invalid/$"),
    route("websocket.connect", hold, path=r"^/hold/$"),
    route("websocket.connect", silent, path=r"^/silent/$"),
    route("websocket.connect", room_join, path=r"^/room/(?P<room>\w+)/$"),
    route("websocket.receive", room_say, path=r"^/room/(?P<room>\w+)/$"),
    route("websocket.disconnect", room_leave, path=r"^/room/(?P<room>\w+)/$"),
    route("websocket.connect", connect),
    route("websocket.receive", echo),
    route("websocket.disconnect", disconnect),
]
