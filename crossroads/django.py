"""Serving a Django project through crossroads: ``django.setup()`` for a process, and ``django_view``.

This module owns what crossroads does with Django: setting it up once per process from ``[django]
settings`` (``setup_django``, called by ``crossroads run``/``worker``/``check`` before any worker thread
starts), and ``django_view``, the ``http.request`` consumer that runs a request through the project's
own views. It must not know the HTTP bridge's internals: it reads ``http.request`` as docs/spec/http.md
defines it and answers on the reply channel in that spec's response messages.

It also owns Django's sessions and users in every other consumer (Channels 1.x's names and meaning):
``http_session`` and ``http_session_user`` read the session from the cookie of an ``http.request`` or
``websocket.connect``; ``channel_session_user_from_http`` copies the login into crossroads' channel
session on connect, and ``channel_session_user`` reads it back on later frames; for protocols without
cookies, the ``[django] identify`` hook names the user. Setting Django up also hangs
``close_old_connections`` on ``consumer_started`` and ``consumer_finished``, so every consumer's ORM
use gets the connection hygiene of a Django request (before as well as after: Channels 2 leaked
connections without the "before").

Why Django's WSGI handler, not its ASGI handler. Our consumers are synchronous and each runs on a
worker thread of its own (docs/consumers.md), which is a WSGI server's model exactly: calling
``WSGIHandler`` with a PEP 3333 environ built from the message, and closing what it returns, is what
gunicorn's sync worker does, so middleware, URL routing, sessions, auth, CSRF, messages,
``ALLOWED_HOSTS``, ``request_started``/``request_finished`` (and with them ``close_old_connections``,
so ``CONN_MAX_AGE`` and health checks) and ``response.close()`` behave as they do there, with one
database connection per worker thread. The ASGI handler would run every sync view through
``sync_to_async`` onto a thread it picks, add an event loop per request, and need a ``receive()``
that blocks until a disconnect crossroads sends as a separate message on another channel.

Responses go out as docs/spec/http.md's messages: one when the body fits in ``PART_SIZE``, else a
start and parts, each sent at once (not buffered until the consumer returns). ``FileResponse`` is
read in ``PART_SIZE`` blocks through our ``wsgi.file_wrapper`` (Django's own ``block_size`` is 4 KiB:
256 messages per MiB). A streaming view's own chunks go out as it yields them (a server-sent event
must not wait for 256 KiB to gather), split when larger than ``PART_SIZE``. A streamed response names
a ``flow_channel`` of its own, on which the HTTP bridge reports how much of the body it has written to
the client, and that the client left: the view runs at most ``FLOW_WINDOW`` bytes ahead of its
client (so neither the bridge nor the layer holds a 20 MB file, and a slow client is not cut off for
falling behind a fast disk), and stops iterating when the client is gone. Closing the response then
closes the view's iterator or file and fires ``request_finished``. A request body the bridge streams
on a ``body_channel`` (over its ``max_body``) is Django's ``wsgi.input`` through
``consumers.body.RequestBody``, read part by part as Django's parsers ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from crossroads.consumers.body import RequestBody
from crossroads.consumers.message import Message
from crossroads.consumers.routing import Router, import_object, route
from crossroads.consumers.sessions import Session, channel_session
from crossroads.consumers.signals import consumer_finished, consumer_started
from crossroads.layer import base

log = logging.getLogger("crossroads.django")

PART_SIZE = 256 * 1024  # bytes of body per reply message: well under the layer's 1 MiB, few messages per file
FLOW_WINDOW = 3 * PART_SIZE  # body bytes a streamed response may run ahead of what its client has taken
FLOW_TIMEOUT = 90.0  # seconds to wait for the bridge's next flow report (it cuts a client off at idle_timeout, 60)
FULL_RETRY = 30.0  # seconds a part may wait for room in the bridge's full queue before the response is given up

_setup_lock = threading.Lock()
_set_up: str | None = None  # the settings module this process was set up with
_handler: Any = None
_handler_lock = threading.Lock()
_static: bool | None = None  # [django] static: serve STATIC_URL from the worker; None: when DEBUG is on
_identify: Any = None  # the [django] identify hook, once imported
_identify_path: str | None = None


class DjangoSetupError(Exception):
    """Django could not be set up from the named settings; the message says what to fix."""


def settings_module(configured: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The settings module to use: ``[django] settings``, else ``$DJANGO_SETTINGS_MODULE``, else None."""
    environ = os.environ if environ is None else environ
    return configured or environ.get("DJANGO_SETTINGS_MODULE") or None


def setup_django(settings: str) -> None:
    """``django.setup()`` with ``settings``, once per process (later calls with the same module do nothing).

    Raises ``DjangoSetupError`` naming the problem: Django not installed, the module not importable
    (with the import's own error), or Django refusing the settings (ImproperlyConfigured and the like).
    """
    global _set_up
    with _setup_lock:
        if _set_up == settings:
            return
        if _set_up is not None:
            raise DjangoSetupError(f"this process already set Django up with {_set_up!r}; one process serves one "
                                   f"Django project, so {settings!r} cannot be set up beside it")
        try:
            import django
        except ImportError:
            raise DjangoSetupError("Django is not installed: pip install 'crossroads[django]'") from None
        import importlib

        try:
            importlib.import_module(settings)
        except ImportError as exc:
            raise DjangoSetupError(f"cannot import the settings module {settings!r}: {exc} (is its project folder "
                                   "next to the config file, or on PYTHONPATH?)") from None
        except Exception as exc:
            raise DjangoSetupError(f"importing the settings module {settings!r} raised {type(exc).__name__}: "
                                   f"{exc}") from None
        os.environ["DJANGO_SETTINGS_MODULE"] = settings  # what django.setup() reads, and manage.py after us
        try:
            django.setup()
        except Exception as exc:  # ImproperlyConfigured, an app that fails to import, ...
            raise DjangoSetupError(f"Django refused the settings {settings!r}: {type(exc).__name__}: {exc}") from None
        _set_up = settings
        consumer_started.connect(_close_old_connections)
        consumer_finished.connect(_close_old_connections)


def _close_old_connections(**signal: Any) -> None:
    # Connections belong to threads; an async consumer's signals come on the event loop's thread, which
    # holds none (the ORM refuses to run there), and Django refuses to close one from a running loop.
    try:
        asyncio.get_running_loop()
        return
    except RuntimeError:
        pass
    from django.db import close_old_connections

    close_old_connections()


@contextlib.contextmanager
def connections_kept() -> Iterator[None]:
    """Leave database connections open around consumers, as ``django.test.TestCase`` needs (its transaction
    lives on the connection), the way Django's own test client disconnects ``close_old_connections``."""
    consumer_started.disconnect(_close_old_connections)
    consumer_finished.disconnect(_close_old_connections)
    try:
        yield
    finally:
        if _set_up is not None:
            consumer_started.connect(_close_old_connections)
            consumer_finished.connect(_close_old_connections)


def set_static(value: bool | None) -> None:
    """``[django] static``: serve static files through Django's ``StaticFilesHandler`` (``None``: only with
    ``DEBUG``, as ``runserver`` does). A handler made already is dropped, so the next request uses the choice."""
    global _static, _handler
    from django.conf import settings

    if value and "django.contrib.staticfiles" not in settings.INSTALLED_APPS:
        raise ValueError("static = true serves static files through django.contrib.staticfiles, which is not in "
                         "INSTALLED_APPS: add it, or set static = false")
    with _handler_lock:
        _static, _handler = value, None


def serves_static() -> bool:
    from django.conf import settings

    wanted = settings.DEBUG if _static is None else _static
    return bool(wanted) and "django.contrib.staticfiles" in settings.INSTALLED_APPS


def set_identify(path: str | None) -> None:
    """The ``[django] identify`` hook, ``"module:function"``; imported now (Django must be set up)."""
    global _identify, _identify_path
    _identify = import_object(path) if path else None
    _identify_path = path
    if _identify is not None and not callable(_identify):
        raise TypeError(f"{path} is not callable: identify(protocol, sender, message) returns a user or None")


def system_check_problems() -> tuple[list[str], list[str]]:
    """Django's own system checks (``manage.py check``): (errors, warnings), each a line of text."""
    from django.core import checks

    errors, warnings = [], []
    for message in checks.run_checks():
        (errors if message.is_serious() else warnings).append(str(message))
    return errors, warnings


# -- the request: a PEP 3333 environ from http.request --------------------------------------------------------


def _wsgi_str(text: str) -> str:
    # PEP 3333 strings carry bytes as latin-1 code points; Django re-encodes them (get_bytes_from_wsgi).
    return text.encode("utf-8").decode("latin-1")


def wsgi_environ(message: dict, channel_layer: Any = None) -> dict[str, Any]:
    """The PEP 3333 environ of an ``http.request`` message (docs/spec/http.md); a body streamed on its
    ``body_channel`` is read from ``channel_layer`` as Django reads ``wsgi.input``."""
    server = message.get("server") or ["localhost", None]
    client = message.get("client")
    body = message.get("body") or b""
    streamed = message.get("body_channel") is not None
    environ: dict[str, Any] = {
        "REQUEST_METHOD": message["method"],
        "SCRIPT_NAME": _wsgi_str(message.get("root_path") or ""),
        "PATH_INFO": _wsgi_str(message["path"]),
        "QUERY_STRING": (message.get("query_string") or b"").decode("latin-1"),
        "SERVER_NAME": server[0] if server[1] is not None else "localhost",  # a Unix socket has a path, no name
        "SERVER_PORT": str(server[1] if server[1] is not None else 0),
        "SERVER_PROTOCOL": f"HTTP/{message.get('http_version', '1.1')}",
        # The bridge has de-chunked a whole body: its length is known even when the client sent none. A streamed
        # body always came with a Content-Length, which the headers below set.
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": message.get("scheme", "http"),
        "wsgi.input": RequestBody(_Streamed(message, channel_layer)) if streamed else io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileParts,
    }
    if client:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    for raw_name, raw_value in message.get("headers") or ():
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_LENGTH":
            if streamed:
                environ["CONTENT_LENGTH"] = value
            continue
        key = name if name == "CONTENT_TYPE" else f"HTTP_{name}"
        if key in environ:  # repeated headers are one, comma-separated (RFC 9110); cookies with "; " (RFC 6265)
            value = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + value
        environ[key] = value
    return environ


class _Streamed:
    """What ``RequestBody`` reads: a message's content and the layer its body_channel is on."""

    def __init__(self, content: dict, channel_layer: Any) -> None:
        self.content, self.channel_layer = content, channel_layer


class FileParts:
    """``wsgi.file_wrapper``: a ``FileResponse``'s file read ``PART_SIZE`` at a time (Django asks for 4 KiB)."""

    def __init__(self, filelike: Any, block_size: int = PART_SIZE) -> None:
        self.filelike = filelike

    def __iter__(self) -> Iterator[bytes]:
        while True:
            block = self.filelike.read(PART_SIZE)
            if not block:
                return
            yield block

    def close(self) -> None:
        # Django set the file's close to the response's close: it closes the file and fires request_finished.
        self.filelike.close()


# -- the response: WSGI's status, headers and iterable as reply messages ---------------------------------------


def _parts(iterable: Iterable[bytes]) -> Iterator[bytes]:
    """The body in parts of at most ``PART_SIZE`` bytes, empty chunks skipped."""
    for chunk in iterable:
        for start in range(0, len(chunk), PART_SIZE):
            yield bytes(chunk[start:start + PART_SIZE])


def _send(message: Message, content: dict, immediately: bool) -> None:
    """Send a reply; a full bridge queue is waited out with backoff for up to ``FULL_RETRY`` seconds."""
    deadline = time.monotonic() + FULL_RETRY
    for delay in base.backoff_delays(0.01, 1.0):
        try:
            message.reply_channel.send(content, immediately=immediately)
            return
        except base.ChannelFull:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)


def _handler_for_process() -> Any:
    global _handler
    with _handler_lock:
        if _handler is None:
            from django.apps import apps

            if not apps.ready:
                raise RuntimeError("django_view needs Django set up: add [django] settings = \"yourproject.settings\" "
                                   "to crossroads.toml (docs/django.md), or call crossroads.django.setup_django()")
            from django.core.handlers.wsgi import WSGIHandler

            _handler = WSGIHandler()  # loads the middleware once; it serves every thread
            if serves_static():
                # Development's answer (what runserver does); in production whitenoise or the proxy serves them.
                from django.contrib.staticfiles.handlers import StaticFilesHandler

                _handler = StaticFilesHandler(_handler)
        return _handler


def django_view(message: Message) -> None:
    """The ``http.request`` consumer that serves the Django project: ``route("http.request", django_view)``."""
    handler = _handler_for_process()
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"] = int(status.split(" ", 1)[0])
        # Django writes Set-Cookie values as Morsel.output(header=""), which starts with a space.
        started["headers"] = [[name, value.strip()] for name, value in headers]

    result = handler(wsgi_environ(message.content, message.channel_layer), start_response)
    streamed = False
    try:
        parts = _parts(result)
        first = next(parts, b"")
        following = next(parts, None)
        if following is None:  # the whole body in one message, sent with the consumer's other sends
            _send(message, {"status": started["status"], "headers": started["headers"], "content": first}, False)
            return
        streamed = True
        sync = getattr(message.channel_layer, "sync", message.channel_layer)
        flow = sync.new_channel("crossroads.http.flow?")
        _send(message, {"status": started["status"], "headers": started["headers"], "content": first,
                        "more_content": True, "flow_channel": flow}, True)
        sent, written = len(first), 0
        while following is not None:
            while sent - written > FLOW_WINDOW:  # wait for the client to take some of what went out
                _, report = sync.receive([flow], timeout=FLOW_TIMEOUT)
                if report is None or report.get("gone"):
                    log.info("client of %s %s %s: the view's iteration stops", message["method"], message["path"],
                             "left mid-response" if report else f"took nothing for {FLOW_TIMEOUT:g} s")
                    return
                written = max(written, report.get("written", 0))
            part, following = following, next(parts, None)
            _send(message, {"content": part, "more_content": following is not None}, True)
            sent += len(part)
    except Exception:
        if not streamed:
            # Django turns a view's exception into its own 500 page; this is one it could not (a response
            # that fails to iterate): answer 500 now, not 504 at http_timeout, and let the dispatcher log it.
            message.reply_channel.send({"status": 500, "text": "Internal Server Error\n"})
            raise
        # A streamed body failed half-way. A part carrying a status is a reply the bridge must refuse, and it
        # refuses it by cutting the connection, so the client cannot take the truncated body for the whole one.
        log.exception("the streamed response to %s %s failed half-way; cutting the client off", message["method"],
                      message["path"])
        try:
            message.reply_channel.send({"status": 500, "more_content": False}, immediately=True)
        except (base.ChannelFull, base.LayerUnavailable):
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()  # fires request_finished (close_old_connections) and closes files and iterators


# -- sessions and users in every consumer -----------------------------------------------------------------------


def _sync_only(func: Callable, decorator: str) -> None:
    if inspect.iscoroutinefunction(func):
        raise TypeError(f"@{decorator} needs a synchronous consumer: Django's sessions and the ORM refuse to run "
                        f"on an event loop. Make {func.__qualname__} a plain def, or call the ORM through "
                        "asgiref.sync.sync_to_async")


def _cookie(message: Message, name: str) -> str | None:
    from django.http.cookie import parse_cookie

    values = [value.decode("latin-1") for key, value in message.content.get("headers") or ()
              if key.lower() == b"cookie"]
    return parse_cookie("; ".join(values)).get(name) if values else None


def _session_engine() -> Any:
    from importlib import import_module

    from django.conf import settings

    if settings.SESSION_ENGINE == "django.contrib.sessions.backends.signed_cookies":
        raise ValueError("@http_session cannot use signed-cookie sessions: a consumer has no response to set the "
                         "cookie on. Use a database, cache or file SESSION_ENGINE")
    return import_module(settings.SESSION_ENGINE).SessionStore


def http_session(func: Callable) -> Callable:
    """``message.http_session``: the Django session named by the message's session cookie (an ``http.request``
    or ``websocket.connect``), or None when it has none; saved after the consumer if it changed."""
    _sync_only(func, "http_session")

    @functools.wraps(func)
    def inner(message: Message, *args: Any, **kwargs: Any) -> Any:
        from django.conf import settings

        if getattr(message, "http_session", None) is not None:  # an outer decorator loaded it
            return func(message, *args, **kwargs)
        key = _cookie(message, settings.SESSION_COOKIE_NAME)
        session = message.http_session = _session_engine()(key) if key else None
        try:
            return func(message, *args, **kwargs)
        finally:
            if session is not None and session.modified:
                session.save()
    return inner


class _AuthRequest:
    """What ``django.contrib.auth.get_user`` reads: an object with a ``session``."""

    def __init__(self, session: Any) -> None:
        self.session = session


class _ChannelAuthSession:
    """A channel session as ``get_user`` uses a Django session: its three login keys, and ``flush`` (a password
    changed since the login) forgets them."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __getitem__(self, key: str) -> Any:
        return self._session[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._session[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._session.get(key, default)

    def flush(self) -> None:
        for key in _auth_keys():
            self._session.pop(key, None)

    def cycle_key(self) -> None:
        pass  # a channel session's key is its reply channel: there is no cookie to rotate


def _auth_keys() -> tuple[str, str, str]:
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    return SESSION_KEY, BACKEND_SESSION_KEY, HASH_SESSION_KEY


def _anonymous() -> Any:
    from django.contrib.auth.models import AnonymousUser

    return AnonymousUser()


def identify(message: Message) -> Any:
    """The ``[django] identify`` hook's user for this message (AnonymousUser when it says None, or there is no
    hook), asked once per message."""
    if "_crossroads_identity" in message.__dict__:
        return message.__dict__["_crossroads_identity"]
    user = None
    if _identify is not None:
        user = _identify(message.protocol, message.sender, message)
    message.__dict__["_crossroads_identity"] = user = user if user is not None else _anonymous()
    return user


def http_session_user(func: Callable) -> Callable:
    """``@http_session``, and ``message.user``: the user logged in on that session, or AnonymousUser."""
    _sync_only(func, "http_session_user")

    @functools.wraps(func)
    def with_user(message: Message, *args: Any, **kwargs: Any) -> Any:
        from django.contrib.auth import get_user

        message.user = get_user(_AuthRequest(message.http_session)) if message.http_session is not None \
            else _anonymous()
        return func(message, *args, **kwargs)
    return http_session(with_user)


def channel_session_user(func: Callable) -> Callable:
    """``@channel_session``, and ``message.user``: the user ``@channel_session_user_from_http`` stored in it on
    connect; for a channel session without a login (MQTT, IRC, email, Slack), the ``[django] identify`` hook's
    user; else AnonymousUser."""
    _sync_only(func, "channel_session_user")

    @functools.wraps(func)
    def with_user(message: Message, *args: Any, **kwargs: Any) -> Any:
        from django.contrib.auth import SESSION_KEY, get_user

        if SESSION_KEY in message.channel_session:
            message.user = get_user(_AuthRequest(_ChannelAuthSession(message.channel_session)))
        else:
            message.user = identify(message)
        return func(message, *args, **kwargs)
    return channel_session(with_user)


def channel_session_user_from_http(func: Callable) -> Callable:
    """For a ``websocket.connect`` consumer: ``@http_session_user`` and ``@channel_session``, with the login of
    the HTTP session copied into the channel session (or a stale one removed), so ``@channel_session_user``
    knows the user on every later frame of the connection."""
    _sync_only(func, "channel_session_user_from_http")

    @functools.wraps(func)
    def transfer(message: Message, *args: Any, **kwargs: Any) -> Any:
        for key in _auth_keys():
            if message.user.is_authenticated and key in message.http_session:
                message.channel_session[key] = message.http_session[key]
            else:
                message.channel_session.pop(key, None)
        return func(message, *args, **kwargs)
    return channel_session(http_session_user(transfer))


def with_django_view(router: Router | None) -> Router:
    """``router`` with ``route("http.request", django_view)`` last, as Channels 1.x appended its view consumer:
    an HTTP request no earlier route takes goes to Django's URLconf (which answers 404 for what it lacks)."""
    return Router([*(router.routes if router is not None else []), route("http.request", django_view)])
