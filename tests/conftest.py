"""Shared fixtures: real redis-server processes, started once per test session."""

from __future__ import annotations

import pytest
from servers import RedisServer

import layer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_shards(tmp_path_factory):
    servers = [RedisServer(tmp_path_factory.mktemp(f"shard{i}")).start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
def channel_layer(request):
    """A layer of each backend: in-memory, and on the session's real redis-server (flushed around the test)."""
    if request.param == "memory":
        yield layer.from_url("memory://")
        return
    server = request.getfixturevalue("redis_server")
    redis_layer = layer.from_url(server.url, prefix=f"t-{request.node.module.__name__}")
    redis_layer.sync.flush()
    yield redis_layer
    redis_layer.sync.flush()
    redis_layer.sync.close()
