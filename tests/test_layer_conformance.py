"""The conformance suite against every backend: memory, one Redis, two Redis shards."""

from __future__ import annotations

import pytest

from crossroads import layer
from crossroads.layer.conformance import LayerConformance


class TestMemoryLayer(LayerConformance):
    def make_layer(self, **options):
        return layer.from_url("memory://", **options)


class TestRedisLayer(LayerConformance):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server):
        self.url = redis_server.url

    def make_layer(self, **options):
        return layer.from_url(self.url, prefix="conf1", **options)


class TestShardedRedisLayer(LayerConformance):
    @pytest.fixture(autouse=True)
    def _servers(self, redis_shards):
        self.urls = [server.url for server in redis_shards]

    def make_layer(self, **options):
        return layer.from_url(self.urls[0], hosts=self.urls, prefix="conf2", **options)
