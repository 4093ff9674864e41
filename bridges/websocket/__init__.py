"""The WebSocket bridge (type ``websocket``): ASGI 1.0 ``websocket.*`` messages over Autobahn on Twisted.

``messages.py`` is the pure translation (no sockets, no reactor); ``bridge.py``
is the Autobahn glue. docs/spec/websocket.md documents every key and option.
"""
