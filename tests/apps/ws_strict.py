"""A room whose frames run in their ``order`` (@enforce_ordering), for several worker threads."""

from crossroads import Group, enforce_ordering, route


@enforce_ordering  # the connect is order 0: the frames wait for it
def join(message, room):
    Group(f"strict-{room}").add(message.reply_channel)
    message.reply_channel.send({"accept": True})


@enforce_ordering
def say(message, room):
    # buffered: @enforce_ordering flushes it before it releases the next frame to another thread
    Group(f"strict-{room}").send({"text": message.text})


def leave(message, room):
    Group(f"strict-{room}").discard(message.reply_channel)


routes = [
    route("websocket.connect", join, path=r"^/room/(?P<room>\w+)/$"),
    route("websocket.receive", say, path=r"^/room/(?P<room>\w+)/$"),
    route("websocket.disconnect", leave, path=r"^/room/(?P<room>\w+)/$"),
]
