"""HTTP and WebSocket consumers together, for a WebSocket bridge on the HTTP bridge's port."""

from apps import http_app, ws_echo

routes = [*http_app.routes, *ws_echo.routes]
