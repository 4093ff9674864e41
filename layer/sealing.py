"""Encryption of message bodies for layers that cross untrusted networks (Fernet, with key rotation).

Owns turning a serialized body into a sealed one and back; it knows nothing of
channels or storage. The first key seals; every key opens, so keys rotate by
putting the new key first, waiting until no message sealed with the old one can
still be queued (the layer's ``expiry``), then dropping the old key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from .base import LayerError


class Undecryptable(LayerError):
    """A stored message was not sealed with any of this layer's keys."""


class Sealer:
    """Seals bodies with the first key; opens bodies sealed with any key."""

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        try:
            from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "symmetric_encryption_keys needs the cryptography package: pip install 'crossroads[encryption]'"
            ) from exc
        if isinstance(keys, (str, bytes)) or not keys:
            raise ValueError("symmetric_encryption_keys must be a non-empty list of secret strings")
        # Any string of any length is a key: it is stretched to Fernet's 32 bytes by SHA-256.
        self._fernet = MultiFernet(
            [Fernet(base64.urlsafe_b64encode(hashlib.sha256(_as_bytes(k)).digest())) for k in keys]
        )
        self._invalid = InvalidToken

    def seal(self, body: bytes) -> bytes:
        return self._fernet.encrypt(body)

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._fernet.decrypt(sealed)
        except self._invalid:
            raise Undecryptable("a message could not be decrypted with any of symmetric_encryption_keys") from None


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key
