"""The test project's crossroads consumers: Django's users and the ORM from WebSocket, MQTT and raw HTTP."""

import threading

from django.db import DatabaseError, connection

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


def note(message):
    """Save a Note with the message's text; answer every note's text, in order, as this worker's ORM reads them."""
    from .models import Note

    Note.objects.create(text=message["text"])
    Channel(message["reply_to"]).send({"notes": list(Note.objects.order_by("id").values_list("text", flat=True))})


def pg_backend(message):
    """Which PostgreSQL backend this thread's connection is, and how many backends this project holds now (their
    application_name is the settings' "djsite"). With ``lock``, it first waits for the test to release the
    advisory lock of that number, so a test holds every thread in a query at once. A database error is
    answered, then raised, so the worker handles it as any other."""
    answer = {"thread": threading.get_ident(), "closed_at_start": connection.connection is None}
    try:
        with connection.cursor() as cursor:
            if message.get("lock"):
                cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", [message["lock"]])
            cursor.execute("SELECT pg_backend_pid(), (SELECT count(*) FROM pg_stat_activity "
                           "WHERE application_name = 'djsite' AND backend_type = 'client backend')")
            answer["pid"], answer["backends"] = cursor.fetchone()
    except DatabaseError as exc:
        Channel(message["reply_to"]).send({**answer, "error": f"{type(exc).__name__}: {exc}"})
        raise
    Channel(message["reply_to"]).send(answer)
