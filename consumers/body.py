"""``RequestBody``: an ``http.request``'s body as a file, whole in the message or streamed on its ``body_channel``.

A request body over the HTTP bridge's ``max_body`` (up to its ``max_upload``) does not travel in the
message: the bridge sends the ``http.request`` as soon as the head has arrived, with ``body_channel``
naming a single-reader channel, and then the body on it in parts of about 256 KiB
(``{"content": bytes, "more_content": bool}``; ``{"closed": true}`` when the client left). This module
reads them on demand, with the blocking receive of a worker thread, so a consumer holds one part at
a time however large the upload (docs/spec/http.md, "Large request bodies"). It must not know the
bridge: only those messages.
"""

from __future__ import annotations

import io
from typing import Any

BODY_TIMEOUT = 60.0  # seconds to wait for the next part: the bridge gives a client header_timeout per 10 KiB


class BodyUnavailable(OSError):
    """The rest of a streamed body will not come: the client left, or no part came within the timeout.

    An ``OSError``, as a WSGI server's input raises one, so Django answers it as an unreadable request."""


class RequestBody(io.RawIOBase):
    """``read``/``readline`` over the body of ``message`` (an ``http.request`` ``Message``)."""

    def __init__(self, message: Any, timeout: float = BODY_TIMEOUT) -> None:
        super().__init__()
        content = message.content if hasattr(message, "content") else message
        self._buffer = bytearray(content.get("body") or b"")
        self._channel = content.get("body_channel")
        self._done = self._channel is None
        layer = getattr(message, "channel_layer", None)
        self._sync = getattr(layer, "sync", layer)
        if self._channel is not None and self._sync is None:
            raise ValueError("a streamed body is read from the layer: pass the Message, not its content")
        self.timeout = timeout
        self.parts = 0  # parts taken from body_channel so far

    @property
    def streamed(self) -> bool:
        return self._channel is not None

    def readable(self) -> bool:
        return True

    def _pull(self) -> None:
        got, part = self._sync.receive([self._channel], timeout=self.timeout)
        if got is None:
            self._done = True
            raise BodyUnavailable(f"no part of the request body came within {self.timeout:g} s")
        if part.get("closed"):
            self._done = True
            raise BodyUnavailable("the client left before sending the whole request body")
        self.parts += 1
        self._buffer += part.get("content") or b""
        self._done = not part.get("more_content", False)

    def read(self, size: int | None = -1) -> bytes:
        wanted = -1 if size is None else size
        while not self._done and (wanted < 0 or len(self._buffer) < wanted):
            self._pull()
        count = len(self._buffer) if wanted < 0 else min(wanted, len(self._buffer))
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken

    def readinto(self, target: Any) -> int:
        data = self.read(len(target))
        target[:len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        wanted = -1 if size is None else size
        while not self._done and b"\n" not in self._buffer and (wanted < 0 or len(self._buffer) < wanted):
            self._pull()
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        if wanted >= 0:
            end = min(end, wanted)
        return self.read(end)
