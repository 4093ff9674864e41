"""Exceptions a consumer raises to steer what happens to its message."""

from __future__ import annotations


class ConsumeLater(Exception):
    """Put the message back on its channel to be consumed again later.

    Retries are bounded (``MAX_CONSUME_LATER`` in ``dispatch.py``); past the
    bound the message is dropped with a log line, never silently.
    """


class DenyConnection(Exception):
    """Refuse a connection: the consumer's reply channel gets ``{"close": True}``.

    Raised from a ``*.connect`` consumer (a WebSocket handshake is then answered 403).
    """


class RouteError(Exception):
    """A routing table is malformed: a bad filter regex, a non-callable consumer, a bad include."""
