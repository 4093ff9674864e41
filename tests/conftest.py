"""Shared fixtures: real redis-server processes, started once per test session."""

from __future__ import annotations

import pytest
from servers import RedisServer


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
