"""Shared fixtures: real redis-server processes (once per session), a layer of each backend, the reactor."""

from __future__ import annotations

import asyncio
import sys

import pytest
from servers import RedisServer, write_test_certificates

from crossroads import layer
from crossroads.daemon import raise_open_files_limit

# As every crossroads process does at start: a user's shell has a soft `ulimit -n` of 1,024, and the
# 1,000-client WebSocket test needs about 2,200 descriptors. Tests that need more than even the hard
# limit allows say so (test_websocket_bridge.py).
raise_open_files_limit()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_shards(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("shard0")) as one, RedisServer(tmp_path_factory.mktemp("shard1")) as two:
        yield [one, two]


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


@pytest.fixture
def daemons():
    """The test's `crossroads` processes (test_daemons.Daemon), killed at its end if still running."""
    started: list = []
    yield started
    for daemon in started:
        daemon.close()


@pytest.fixture(scope="module")
def reactor():
    """Twisted's asyncio reactor on a loop of its own, for one test module; uninstalled afterwards."""
    from crossroads.bridges.reactor import ReactorError, install_reactor

    installed_here = "twisted.internet.reactor" not in sys.modules
    try:
        reactor = install_reactor(asyncio.new_event_loop() if installed_here else None)
    except ReactorError as exc:
        pytest.fail(f"{exc} (did a test module import twisted.internet.reactor at import time?)")
    yield reactor
    if installed_here:  # leave the process as we found it: no reactor installed
        import twisted.internet

        for reader in list(reactor._internalReaders):
            reactor._removeInternalReader(reader)
            reader.connectionLost(None)
        del sys.modules["twisted.internet.reactor"]
        del twisted.internet.reactor
        reactor._asyncioEventloop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def run(reactor):
    """``run(coroutine)`` runs it on the reactor's loop with a deadline; afterwards nothing may be left running."""
    loop = reactor._asyncioEventloop

    def run(coroutine, timeout: float = 30.0):
        return loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    yield run
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    calls = reactor.getDelayedCalls()
    for call in calls:
        call.cancel()
    selectables = [s for s in reactor.removeAll() if s not in reactor._internalReaders]
    assert not (tasks or calls or selectables), f"left on the loop: {tasks=} {calls=} {selectables=}"


@pytest.fixture(scope="session")
def ngircd_server(tmp_path_factory):
    """One real ngircd for the session (tests that kill it or change its config start their own NgircdServer)."""
    from servers import NgircdServer

    with NgircdServer(tmp_path_factory.mktemp("ngircd")) as server:
        yield server


@pytest.fixture(scope="session")
def mqtt_tls(tmp_path_factory):
    """A test CA and a broker certificate for 127.0.0.1 (trustme): {"cert", "key", "ca"} PEM paths."""
    return write_test_certificates(tmp_path_factory.mktemp("mqtt-tls"))


@pytest.fixture
def mosquitto_server(tmp_path, mqtt_tls):
    """A mosquitto broker of this test's own, on free ports: plain on ``port``, TLS (mqtt_tls) on ``tls_port``."""
    from servers import MosquittoServer

    with MosquittoServer(tmp_path / "mosquitto", tls=mqtt_tls) as server:
        yield server
