"""The test project's crossroads routing: its consumers, then every other HTTP request to its Django views."""

from crossroads import route
from crossroads.django import django_view

from .consumers import async_orm, db_state, http_whoami, mqtt_receive, note, pg_backend, ws_connect, ws_receive

routes = [
    route("websocket.connect", ws_connect),
    route("websocket.receive", ws_receive),
    route("mqtt.receive", mqtt_receive),
    route("test.db", db_state),
    route("test.async", async_orm),
    route("test.note", note),
    route("test.pg", pg_backend),
    route("http.request", http_whoami, path=r"^/crossroads/whoami/$"),
    route("http.request", django_view),
]
