"""The ceiling of ``bench/web.py``: a bare ASGI application uvicorn serves, ``_web_bare:application``.

Runs in the uvicorn virtualenv (``.bench-venvs/uvicorn``) with bench/ on ``PYTHONPATH``. No framework, no
channel layer: the same hello-world bytes as ``_web_channels.py`` and ``_web_crossroads.py``, and a WebSocket
echo, written straight against ASGI. What one core does with nothing but uvicorn, uvloop and httptools is the
most any of the measured servers could reach.
"""

from __future__ import annotations

from typing import Any

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
BODY = {"type": "http.response.body", "body": b"Hello, world!"}


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        while (await receive()).get("more_body"):  # the request body, if any, is read and ignored
            pass
        await send(START)
        await send(BODY)
    elif scope["type"] == "websocket":
        while True:
            event = await receive()
            if event["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
            elif event["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": event.get("text"), "bytes": event.get("bytes")})
            else:  # websocket.disconnect
                return
