"""The channel layer: one contract, several backends.

``from_url`` picks the backend from the URL scheme:

- ``memory://``: in-process (``layer.memory``), the all-in-one default;
- ``redis://[:password@]host:port/db``, ``rediss://`` for TLS, or several
  shards with ``hosts=[url, ...]`` (``layer.redis``).

Every layer has an async face (its own methods, for bridges on the event loop)
and a blocking face at ``.sync`` (for worker threads). docs/spec/layer.md is
the contract; ``layer.conformance`` is its test suite.
"""

from __future__ import annotations

from typing import Any

from .base import (
    AuthenticationFailed,
    ChannelFull,
    GroupSendResult,
    InvalidChannelName,
    LayerError,
    LayerUnavailable,
    MessageTooLarge,
    mask_url,
)

__all__ = [
    "AuthenticationFailed",
    "ChannelFull",
    "GroupSendResult",
    "InvalidChannelName",
    "LayerError",
    "LayerUnavailable",
    "MessageTooLarge",
    "from_url",
    "mask_url",
]


def from_url(url: str = "memory://", **options: Any):
    """Return a channel layer for ``url``; see docs/spec/layer.md for the options."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryLayer

        return MemoryLayer(**options)
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        from .redis import RedisLayer

        hosts = options.pop("hosts", None) or [url]
        return RedisLayer(hosts, **options)
    raise ValueError(
        f"unknown layer URL {mask_url(url)!r}: use memory://, redis://host:port/db, rediss://host:port/db "
        "or unix:///path/to/redis.sock"
    )
