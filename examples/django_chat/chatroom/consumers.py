"""The chat's crossroads consumers: one lobby for browsers (WebSocket), MQTT clients and an IRC channel.

Every line is saved to ``Message`` (the ORM, in the worker's thread) and relayed to everyone, as "[protocol]
name: text": to the members of ``Group("lobby")`` (each browser's socket, and the IRC channel once the bridge
has joined it) and to the MQTT topic ``chat/lobby`` through ``mqtt.publish`` (MQTT has no "join", so the topic
hears the lobby from the first line on, subscribed or not). Who said it is Django's user: a browser's login
comes with its session cookie on connect (``@channel_session_user_from_http``) and stays with the socket
(``@channel_session_user``); an MQTT client is named by its topic, ``chat/from/<username>``, and mapped to a
user by the ``[django] identify`` hook (chatroom/identity.py). Browsers must log in to talk; MQTT and IRC
speak under their own names, with the author set when the hook knows one.
"""

from crossroads import Channel, Group, route
from crossroads.django import channel_session_user, channel_session_user_from_http

from .models import Message

LOBBY = Group("lobby")
MQTT_TOPIC = "chat/lobby"  # crossroads.toml allows the MQTT bridge to publish here (allow_publish)
IRC_CHANNEL = "#lobby"


@channel_session_user_from_http
def connect(message):
    message.reply_channel.send({"accept": True})
    if message.user.is_authenticated:
        message.reply_channel.send({"text": f"hello {message.user.get_username()}"})
    else:
        message.reply_channel.send({"text": "hello guest: log in to talk"})
    LOBBY.add(message.reply_channel)


@channel_session_user
def receive(message):
    if not message.text:
        return  # a binary frame: nothing the chat can show
    if not message.user.is_authenticated:  # logged out (or never in): this socket may listen, not talk
        message.reply_channel.send({"text": "(not sent: log in to talk)"})
        return
    say(message, message.user.get_username(), message.user)


def disconnect(message):
    LOBBY.discard(message.reply_channel)


@channel_session_user
def mqtt_receive(message):
    if not message.text:
        return
    user = message.user if message.user.is_authenticated else None
    say(message, user.get_username() if user else message.sender, user)


def irc_join(message):
    if message["ours"]:  # the bridge itself joined #lobby: the IRC channel hears the lobby from now on
        LOBBY.add(message.reply_channel)


@channel_session_user
def irc_receive(message):
    if message.text:
        say(message, message.sender, message.user if message.user.is_authenticated else None)


def say(message, name, author):
    """Save the line, then relay it (the sends go out when the consumer returns, so only once it is saved)."""
    Message.objects.create(author=author, protocol=message.protocol, sender=name, text=message.text)
    line = {"text": f"[{message.protocol}] {name}: {message.text}"}
    if message.protocol == "irc":
        # #lobby showed the line to everyone in it when it was said: the rest hear it, the channel not again.
        for member in LOBBY.channels():
            if member != message.reply_channel.name:
                Channel(member).send(line)
    else:  # a browser shows its own lines when they come back, as an MQTT subscriber does
        LOBBY.send(line)
    Channel("mqtt.publish").send({"topic": MQTT_TOPIC, **line})


routes = [
    route("websocket.connect", connect, path=r"^/chat/socket/$"),
    route("websocket.receive", receive, path=r"^/chat/socket/$"),
    route("websocket.disconnect", disconnect, path=r"^/chat/socket/$"),
    route("mqtt.receive", mqtt_receive, topic=r"^chat/from/[^/]+$"),
    route("irc-client.join", irc_join, channel=rf"^{IRC_CHANNEL}$"),
    route("irc-client.receive", irc_receive, channel=rf"^{IRC_CHANNEL}$"),
    # every other http.request goes to the Django views: [django] in crossroads.toml appends django_view
]
