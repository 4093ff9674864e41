"""A user's consumer module: function consumers, a session, groups, an include and a class."""

from crossroads import ChatConsumer, Group, channel_session, include, route, route_class


@channel_session
def chat_connect(message, room):
    message.channel_session["room"] = room
    message.channel_session["name"] = message.get("sender") or "anon"
    Group(f"chat-{room}").add(message.reply_channel)
    message.reply_channel.send({"accept": True})


@channel_session
def chat_receive(message):
    session = message.channel_session
    Group(f"chat-{session['room']}").send({"text": f"{session['name']}: {message.text}"})


routes = [
    route("websocket.connect", chat_connect, path=r"^/chat/(?P<room>\w+)/$"),
    route("websocket.receive", chat_receive, path=r"^/chat/"),
    include("apps.stats:routes", path=r"^/stats/"),
    route_class(ChatConsumer, path=r"^/rooms/"),
]
