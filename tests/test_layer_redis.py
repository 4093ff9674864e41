"""What the Redis backend promises beyond the conformance suite: storage shape, sharding,
no polling, TLS, and behaviour while Redis is down (each against real redis-server processes)."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest
import redis
import trustme
from servers import RedisServer, wait_until

from crossroads import layer
from crossroads.layer.redis import HashRing


def blocked_clients(server: RedisServer) -> int:
    return int(server.command("INFO", "clients")["blocked_clients"])


def command_calls(server: RedisServer) -> dict[str, int]:
    stats = server.command("INFO", "commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which the test may kill and restart."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_one_key_per_channel_and_nothing_else(redis_server):
    """Messages live inside their channel's list: no body keys that could leak."""
    L = layer.from_url(redis_server.url, prefix="shape")
    L.sync.flush()
    for i in range(50):
        L.sync.send(f"shape.c{i % 5}", {"i": i})
        L.sync.send(f"shape.local!{i}", {"i": i})
    keys = sorted(k.decode() for k in redis_server.command("KEYS", "shape:*"))
    assert keys == sorted([f"shape:q:shape.c{i}" for i in range(5)] + ["shape:q:shape.local!"])
    ttl = redis_server.command("TTL", "shape:q:shape.c0")
    assert 0 < ttl <= 61  # an unread queue disappears on its own after the message expiry
    L.sync.flush()
    L.sync.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_waiting_receive_sends_one_command(redis_server, face):
    """A receive that waits is one BLMPOP held open by Redis, not a loop of polls."""
    L = layer.from_url(redis_server.url, prefix="nopoll")
    redis_server.command("CONFIG", "RESETSTAT")
    if face == "sync":
        got = L.sync.receive(["nopoll.a", "nopoll.b"], timeout=1.0)
    else:
        async def receive():
            try:
                return await L.receive(["nopoll.a", "nopoll.b"], timeout=1.0)
            finally:
                await L.close()
        got = asyncio.run(receive())
    assert got == (None, None)
    handshake_and_ours = ("info", "config", "client", "hello")  # connection set-up and this test's checks
    calls = {name: n for name, n in command_calls(redis_server).items()
             if name.split("|")[0] not in handshake_and_ours}
    assert calls == {"blmpop": 1}
    L.sync.close()


def test_shards_share_the_channels(redis_shards):
    urls = [server.url for server in redis_shards]
    L = layer.from_url(urls[0], hosts=urls, prefix="spread")
    L.sync.flush()
    channels = [f"spread.c{i}" for i in range(200)]
    L.sync.send_many([(channel, {"c": channel}) for channel in channels])
    counts = [len(server.command("KEYS", "spread:q:*")) for server in redis_shards]
    assert sum(counts) == 200
    assert min(counts) > 40, f"channels split {counts} over two shards"
    # each channel sits on the shard the ring names, and comes back from there
    for channel in channels[:20]:
        shard = L.ring.shard(channel)
        assert redis_shards[shard].command("EXISTS", f"spread:q:{channel}") == 1
    got = {}
    while len(got) < 200:
        batch = L.sync.receive_many(channels, 50, timeout=5)
        assert batch, "messages went missing across shards"
        got.update(batch)
    assert got == {channel: {"c": channel} for channel in channels}
    L.sync.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_receive_across_shards_wakes_and_loses_nothing(redis_shards, face):
    """A receive blocked on two shards wakes for either; what the other popped is kept, not lost."""
    urls = [server.url for server in redis_shards]
    L = layer.from_url(urls[0], hosts=urls, prefix="wake")
    L.sync.flush()
    by_shard = {0: [], 1: []}
    for i in range(100):
        by_shard[L.ring.shard(f"wake.c{i}")].append(f"wake.c{i}")
    a, b = by_shard[0][0], by_shard[1][0]
    sender = layer.from_url(urls[0], hosts=urls, prefix="wake").sync
    expected = [(a if i % 2 else b, {"i": i}) for i in range(40)]

    def send_all():
        wait_until(lambda: sum(blocked_clients(server) for server in redis_shards) >= 2, what="receive to block")
        for channel, message in expected:
            sender.send(channel, message)

    thread = threading.Thread(target=send_all)
    thread.start()
    if face == "sync":
        got = [L.sync.receive([a, b], timeout=10) for _ in expected]
    else:
        async def receive_all():
            try:
                return [await L.receive([a, b], timeout=10) for _ in expected]
            finally:
                await L.close()
        got = asyncio.run(receive_all())
    thread.join()
    assert sorted(got, key=lambda item: item[1]["i"]) == expected
    assert [m for c, m in got if c == a] == [m for c, m in expected if c == a], "order within a channel"
    leftovers = [k for server in redis_shards for k in server.command("KEYS", "wake:*")]
    assert leftovers == [], "wake keys or messages were left behind"
    L.sync.close()
    sender.close()


def test_hash_ring_moves_few_channels_when_a_shard_is_added():
    names = ["redis://a:6379/0", "redis://b:6379/0"]
    before, after = HashRing(names), HashRing(names + ["redis://c:6379/0"])
    channels = [f"chan.{i}" for i in range(3000)]
    moved = sum(before.shard(c) != after.shard(c) for c in channels)
    # ideal is a third; a hash of the name per shard would move about two thirds
    assert 0.2 < moved / len(channels) < 0.45
    assert all(after.shard(c) == 2 for c in channels if before.shard(c) != after.shard(c))


@pytest.mark.parametrize("face", ["sync", "async"])
def test_send_while_redis_is_down_raises_layer_unavailable(own_redis, face):
    L = layer.from_url(own_redis.url, prefix="down")
    L.sync.send("down.a", {"value": 1})
    own_redis.stop()
    if face == "sync":
        with pytest.raises(layer.LayerUnavailable, match="unreachable"):
            L.sync.send("down.a", {"value": 2})
    else:
        async def send():
            try:
                await L.send("down.a", {"value": 2})
            finally:
                await L.close()
        with pytest.raises(layer.LayerUnavailable, match="unreachable"):
            asyncio.run(send())
    L.sync.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_before_a_command(own_redis):
    L = layer.from_url(own_redis.url, prefix="idle")
    L.sync.send("idle.a", {"n": 1})
    (link,) = L.sync._idle[0]
    own_redis.command("CLIENT", "KILL", "TYPE", "normal")  # the server ends the layer's connection (not its own)
    L.sync.send("idle.a", {"n": 2})  # noticed before the command was written on it: another carried it
    assert link not in L.sync._links and len(L.sync._links) == 1
    assert [message["n"] for _, message in L.sync.receive_many(["idle.a"], 10, timeout=0)] == [1, 2]
    L.sync.close()


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password="s3cret-Pw").start()
    yield server
    server.stop()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_wrong_password_says_so_and_never_shows_it(redis_with_password, face, caplog):
    L = layer.from_url(f"redis://:wrong-Pw@127.0.0.1:{redis_with_password.port}/0", prefix="auth")
    if face == "sync":
        with pytest.raises(layer.AuthenticationFailed) as caught:
            L.sync.send("auth.a", {})
        assert L.sync.receive(["auth.a"], timeout=0.2) == (None, None)  # a receive retries, and logs why
    else:
        async def send_and_receive():
            try:
                with pytest.raises(layer.AuthenticationFailed) as caught:
                    await L.send("auth.a", {})
                assert await L.receive(["auth.a"], timeout=0.2) == (None, None)
                return caught
            finally:
                await L.close()
        caught = asyncio.run(send_and_receive())
    message = str(caught.value)
    assert "wrong password / authentication failed" in message and "REDIS_PASSWORD" in message
    assert "is redis-server running?" not in message and isinstance(caught.value, layer.LayerUnavailable)
    assert "wrong password / authentication failed" in caplog.text
    assert "wrong-Pw" not in message + caplog.text
    L.sync.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_an_error_reply_inside_a_block_does_not_spoil_the_connection(own_redis, face):
    """A refused kv_set (Redis out of memory) leaves replies unread; the next call must not read them."""
    L = layer.from_url(own_redis.url, prefix="spoil")
    L.sync.kv_set("kept", {"x": 1}, 60)

    async def refused_then_read(kv_set, kv_get):
        await kv_get("kept")  # the connection the refused block will use is set up before it
        own_redis.command("CONFIG", "SET", "maxmemory", "1")
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                await kv_set("refused", {"x": 2}, 60)
        finally:
            own_redis.command("CONFIG", "SET", "maxmemory", "0")
        return await kv_get("kept")

    if face == "sync":
        async def call(method, *args):
            return method(*args)
        got = asyncio.run(refused_then_read(functools.partial(call, L.sync.kv_set),
                                            functools.partial(call, L.sync.kv_get)))
    else:
        async def go():
            try:
                return await refused_then_read(L.kv_set, L.kv_get)
            finally:
                await L.close()
        got = asyncio.run(go())
    assert got == {"x": 1}
    L.sync.close()


def test_a_session_load_and_save_are_one_command_each(redis_server):
    """Sessions are on the hot path: a load is one HGETALL, a save one MULTI block written at once."""
    from crossroads.consumers.sessions import session_store

    L = layer.from_url(redis_server.url, prefix="sesscost")
    store = session_store(L)
    store.load("sesscost.warmup!x")  # the connection's set-up, out of the count
    redis_server.command("CONFIG", "RESETSTAT")
    session = store.load("sesscost.ws!abc")
    session["nick"] = "ada"
    store.save(session)
    calls = {name: n for name, n in command_calls(redis_server).items()
             if name.split("|")[0] not in ("info", "config", "client", "hello")}  # set-up, our checks
    assert calls == {"hgetall": 1, "multi": 1, "del": 1, "hset": 1, "pexpire": 1, "exec": 1}
    assert store.load("sesscost.ws!abc") == {"nick": "ada"}
    ttl = redis_server.command("TTL", "sesscost:kv:session:sesscost.ws!abc")
    assert 86000 < ttl <= 86400  # a session outlives its last save by a day
    L.sync.flush()
    L.sync.close()


@pytest.mark.parametrize("face", ["sync", "async"])
def test_blocked_receive_survives_a_redis_restart(own_redis, face, caplog):
    L = layer.from_url(own_redis.url, prefix="restart")
    result: list = []

    def receive():
        if face == "sync":
            result.append(L.sync.receive(["restart.a"], timeout=60))
        else:
            async def go():
                try:
                    return await L.receive(["restart.a"], timeout=60)
                finally:
                    await L.close()
            result.append(asyncio.run(go()))

    thread = threading.Thread(target=receive)
    thread.start()
    wait_until(lambda: blocked_clients(own_redis) == 1, what="receive to block")
    own_redis.stop()
    wait_until(lambda: "retrying with backoff" in caplog.text, what="the receiver to notice the outage")
    own_redis.start()
    sender = layer.from_url(own_redis.url, prefix="restart")
    sender.sync.send("restart.a", {"value": "after restart"})
    thread.join(30)
    assert result == [("restart.a", {"value": "after restart"})]
    assert "receive resumed" in caplog.text
    assert sender.sync.receive(["restart.a"], timeout=0) == (None, None), "delivered twice"
    sender.sync.close()
    L.sync.close()


def test_tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    server = RedisServer(tmp_path / "redis", tls={k: str(v) for k, v in paths.items()}).start()
    try:
        assert server.url.startswith("rediss://")
        L = layer.from_url(server.url, prefix="tls")
        L.sync.send("tls.a", {"secret": b"\x00\x01"})
        assert L.sync.receive(["tls.a"], timeout=5) == ("tls.a", {"secret": b"\x00\x01"})

        async def async_face():
            await L.send("tls.b", {"value": "async"})
            try:
                return await L.receive(["tls.b"], timeout=5)
            finally:
                await L.close()

        assert asyncio.run(async_face()) == ("tls.b", {"value": "async"})
        # a client that does not trust the CA is refused rather than talking in clear
        untrusted = layer.from_url(f"rediss://127.0.0.1:{server.port}/0", prefix="tls")
        with pytest.raises(layer.LayerUnavailable):
            untrusted.sync.send("tls.a", {})
        L.sync.close()
    finally:
        server.stop()


def test_encrypted_bodies_round_trip_and_rotate(redis_server):
    old = layer.from_url(redis_server.url, prefix="seal", symmetric_encryption_keys=["old-secret"])
    rotated = layer.from_url(redis_server.url, prefix="seal", symmetric_encryption_keys=["new-secret", "old-secret"])
    old.sync.flush()
    old.sync.send("seal.a", {"text": "plaintext-marker", "raw": b"\x00"})
    stored = redis_server.command("LRANGE", "seal:q:seal.a", 0, -1)
    assert len(stored) == 1 and b"plaintext-marker" not in stored[0]
    # a process that already has the new key first still opens messages sealed with the old one
    assert rotated.sync.receive(["seal.a"], timeout=5) == ("seal.a", {"text": "plaintext-marker", "raw": b"\x00"})
    rotated.sync.group_add("seal.g", "seal.b")
    assert rotated.sync.group_send("seal.g", {"text": "to the group"}).delivered == 1
    assert rotated.sync.receive(["seal.b"], timeout=5) == ("seal.b", {"text": "to the group"})
    # one that lacks the key drops the message, says so and counts it, and keeps receiving
    rotated.sync.send("seal.c", {"text": "new key only"})
    old.sync.send("seal.c", {"text": "old key"})
    assert old.sync.receive(["seal.c"], timeout=5) == ("seal.c", {"text": "old key"})
    assert old.sync.stats()["undecryptable"] == 1
    with pytest.raises(ValueError, match="symmetric_encryption_keys"):
        layer.from_url(redis_server.url, symmetric_encryption_keys="not-a-list")
    old.sync.close()
    rotated.sync.close()


def test_concurrent_async_sends_share_round_trips(redis_server):
    """Sends made in one loop tick go as one script call; a full queue refuses only the late senders."""
    L = layer.from_url(redis_server.url, prefix="batch", capacity=150)
    L.sync.flush()

    async def scenario():
        redis_server.command("CONFIG", "RESETSTAT")
        results = await asyncio.gather(*(L.send("batch.a", {"i": i}) for i in range(200)), return_exceptions=True)
        calls = command_calls(redis_server).get("evalsha", 0)
        got = await L.receive_many(["batch.a"], 200, timeout=1)
        await L.close()
        return results, calls, got

    results, calls, got = asyncio.run(scenario())
    assert calls < 10, f"{calls} script calls for 200 concurrent sends"
    assert results[:150] == [None] * 150
    assert all(isinstance(r, layer.ChannelFull) for r in results[150:])
    assert [m["i"] for _, m in got] == list(range(150)), "the queue keeps the earliest sends, in order"
    stats = L.sync.stats()
    assert (stats["sent"], stats["refused"]) == (150, 50)
    L.sync.close()
