"""``from crossroads.testing import Client``: the consumer test client (see ``crossroads.consumers.testing``)."""

from crossroads.consumers.testing import Client

__all__ = ["Client"]
