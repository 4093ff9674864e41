"""The test project's crossroads consumers: Django's users and the ORM from WebSocket, MQTT and raw HTTP."""

from django.db import connection

from crossroads import Channel
from crossroads.django import channel_session_user, channel_session_user_from_http, http_session_user


def _name(user):
    return user.username if user.is_authenticated else "anonymous"


@channel_session_user_from_http
def ws_connect(message):
    message.reply_channel.send({"accept": True})
    message.reply_channel.send({"text": f"hello {_name(message.user)}"})


@channel_session_user
def ws_receive(message):
    message.reply_channel.send({"text": f"{_name(message.user)}: {message.text}"})


@channel_session_user
def mqtt_receive(message):
    message.reply_channel.send({"text": f"{_name(message.user)} said {message.text}"})


@http_session_user
def http_whoami(message):
    message.reply_channel.send({"text": _name(message.user)})


def db_state(message):
    """Whether this thread's connection was closed when the consumer started, and which one it uses now."""
    closed = connection.connection is None
    from django.contrib.auth.models import User

    count = User.objects.count()
    Channel(message["reply_to"]).send({"closed_at_start": closed, "connection": id(connection.connection),
                                       "users": count})


async def async_orm(message):
    from django.contrib.auth.models import User

    await User.objects.acount()  # the async API works
    User.objects.count()  # the sync one raises SynchronousOnlyOperation here
