"""The Redis layer over Sentinel (issue 16 §3): redis+sentinel:// finds the primary through real sentinels
(redis-server --sentinel), and after the primary is killed and a replica promoted, the same layer object sends
and receives on the new primary, a receive blocked across the failover included, without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import pytest
from servers import SentinelGroup, wait_until
from test_cli import run, write_config

from crossroads import layer
from crossroads.layer.redis import parse_sentinel_url, public_url


@pytest.fixture
def sentinels(tmp_path):
    with SentinelGroup(tmp_path / "sentinel") as group:
        yield group


def test_a_sentinel_url_names_the_sentinels_service_db_and_secrets():
    parsed = parse_sentinel_url("rediss+sentinel://:pw%40x@h1:26380,h2,[::1]:26381/mymaster/3"
                                "?sentinel_password=sp&ssl_ca_certs=/ca.pem")
    assert parsed.sentinels == [("h1", 26380), ("h2", 26379), ("::1", 26381)]
    assert (parsed.service, parsed.db, parsed.password) == ("mymaster", 3, "pw@x")
    assert parsed.query == {"sentinel_password": "sp", "ssl_ca_certs": "/ca.pem"}
    assert parse_sentinel_url("redis+sentinel://h1/mymaster").db == 0
    assert public_url("redis+sentinel://:pw@h1:1,h2:2/m/0?sentinel_password=sp") == "redis+sentinel://h1:1,h2:2/m/0"
    for bad, says in [("redis+sentinel://h1:26379", "names no service"),
                      ("redis+sentinel://h1:x/m/0", "not a sentinel's host:port"),
                      ("redis+sentinel://h1/m/zero", "database number")]:
        with pytest.raises(ValueError, match=says):
            parse_sentinel_url(bad)


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://127.0.0.1:26379", "names no service"),
    ("redis+sentinel://:secret@127.0.0.1:99999/m/0", "not a sentinel's host:port"),
])
def test_check_names_a_bad_sentinel_url_without_its_password(tmp_path, url, says):
    checked = run("check", "--config", str(write_config(tmp_path, f'[layer]\nurl = "{url}"\n')))
    assert checked.returncode == 2
    assert says in checked.stderr and "secret" not in checked.stderr


def test_check_accepts_sentinel_urls_and_shards_over_sentinel_groups(tmp_path):
    checked = run("check", "--config", str(write_config(tmp_path, """[layer]
url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/one/0"
hosts = ["redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/one/0", "redis+sentinel://127.0.0.1:26381/two/0"]
""")))
    assert checked.returncode == 0, checked.stderr


def test_the_layer_follows_a_failover_to_the_promoted_replica_without_a_restart(sentinels):
    channel_layer = layer.from_url(sentinels.url, prefix="failover")
    sync = channel_layer.sync
    try:
        sync.send_many([("before", {"n": n}) for n in range(100)])
        # Replication is asynchronous: WAIT makes these 100 acknowledged by the replica, the bound the spec offers.
        assert sentinels.primary.command("WAIT", 1, 5000) == 1
        got: list = []
        blocked = threading.Thread(target=lambda: got.append(sync.receive(["after"], timeout=60)), daemon=True)
        blocked.start()
        old = sentinels.primary.port
        sentinels.primary.stop()
        wait_until(lambda: sentinels.primary_port() == sentinels.replica.port, "the sentinels to promote the replica",
                   timeout=60)
        assert sentinels.primary_port() != old
        received = []
        while len(received) < 100:
            received += [message["n"] for _, message in sync.receive_many(["before"], 100, timeout=30)]
        assert received == list(range(100))  # acknowledged by the replica: none lost, none twice, in order
        # The receive blocked on the dead primary resumes on the new one (the layer waits an outage out).
        wait_until(lambda: _send_or_retry(sync, "after", {"text": "on the new primary"}), "a send to the new primary",
                   timeout=30)
        blocked.join(60)
        assert got == [("after", {"text": "on the new primary"})]
        assert sentinels.replica.command("INFO", "replication")["role"] == "master"

        async def round_trip() -> tuple:  # the async face, which the bridges use, finds the new primary too
            await channel_layer.send("async", {"text": "bridged"})
            return await channel_layer.receive(["async"], timeout=30)

        assert asyncio.run(round_trip()) == ("async", {"text": "bridged"})
    finally:
        sync.close()


def _send_or_retry(sync, channel: str, message: dict) -> bool:
    try:
        sync.send(channel, message)
    except layer.LayerUnavailable:
        return False
    return True


def test_mqtt_qos1_through_a_bridge_and_a_worker_survives_the_primary_killed(tmp_path, sentinels, mosquitto_server,
                                                                             daemons):
    """The spec's failover: what the replica had is kept (WAIT made the first half safe), what arrives during the
    switch is refused and not acknowledged, so it comes later, and bridge and worker resume by themselves."""
    from servers import free_port, require_binary
    from test_daemons import Daemon
    from test_mqtt_bridge import echo_daemon_config
    from test_operations import sample, scrape

    pub, sub = require_binary("mosquitto_pub"), require_binary("mosquitto_sub")
    metrics = free_port()
    config = echo_daemon_config(tmp_path, sentinels.url, "mqttfailover", mosquitto_server.url)
    bridge = Daemon(tmp_path, "bridge", "bridge", "mq", "--config", config, "--metrics-listen", f"127.0.0.1:{metrics}")
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    daemons += [bridge, worker]
    bridge.wait_ready()
    worker.wait_ready()
    port = str(mosquitto_server.port)
    listener = subprocess.Popen([sub, "-p", port, "-i", "failover-sub", "-q", "1", "-t", "echo/+/reply", "-v"],
                                stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(listener.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        mosquitto_server.wait_for_log("Sending SUBACK to failover-sub")
        mosquitto_server.wait_for_log("Sending SUBACK to crossroads-mq")

        def publish(numbers: range) -> None:
            for n in numbers:  # mosquitto_pub returns once the broker acknowledged (QoS 1)
                subprocess.run([pub, "-p", port, "-q", "1", "-t", f"echo/m{n}", "-m", f"m{n}"], check=True,
                               timeout=30)

        publish(range(50))
        wait_until(lambda: len(set(lines)) == 50, "the first 50 answers", timeout=60)
        assert sentinels.primary.command("WAIT", 1, 5000) == 1  # the replica has everything so far
        sentinels.primary.stop()  # SIGKILL: the primary is lost
        publish(range(50, 100))  # during the switch: the bridge is refused and acknowledges nothing
        wait_until(lambda: len(set(lines)) == 100, "every answer after the failover", timeout=90)
        assert sentinels.primary_port() == sentinels.replica.port
    finally:
        listener.kill()
        reader.join(10)
    answers = [line.rstrip("\n") for line in lines]
    assert sorted(set(answers)) == sorted(f"echo/m{n}/reply m{n}" for n in range(100))  # none lost
    assert len(answers) == 100  # none repeated: nothing was popped within the replica's lag
    samples = scrape(metrics)
    assert sample(samples, "crossroads_bridge_refused_total", bridge="mq", type="mqtt") >= 1  # refused, then sent
    assert sample(samples, "crossroads_bridge_received_total", bridge="mq", type="mqtt") == 100
    assert sample(samples, "crossroads_bridge_sent_total", bridge="mq", type="mqtt") >= 100  # and its mqtt.connect
    bridge.terminate()
    worker.terminate()
