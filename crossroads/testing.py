"""``from crossroads.testing import Client``: the consumer test client (see ``consumers.testing``)."""

from consumers.testing import Client

__all__ = ["Client"]
