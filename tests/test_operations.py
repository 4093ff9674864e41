"""Running crossroads in production (issue 16): each daemon's /metrics, /healthz and /readyz, scraped over real
HTTP and parsed with prometheus_client's own parser, and the systemd watchdog fed over a real NOTIFY_SOCKET."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import MosquittoServer, free_port, wait_for_port, wait_until
from test_cli import run, write_config
from test_daemons import Daemon, talk

from crossroads import layer


def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path with a real HTTP client: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def health(port: int, path: str) -> tuple[int, dict]:
    status, body = get(port, path)
    return status, json.loads(body)


def toy_run_config(tmp_path, metrics_port: int, port: int, extra: str = "") -> str:
    return str(write_config(tmp_path, f"""[routing]
app = "apps.toy_echo:routes"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[bridges.toy]
type = "toy_bridge:ToyBridge"
port = {port}
{extra}"""))


def test_run_serves_every_counter_state_and_health_of_its_bridges_worker_and_layer(tmp_path, daemons):
    metrics, port = free_port(), free_port()
    daemon = Daemon(tmp_path, "run", "run", "--config", toy_run_config(tmp_path, metrics, port))
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for_port(metrics, daemon.process)
    assert talk(port, "hello") == "HELLO"
    bridge = {"bridge": "toy", "type": "toy"}
    wait_until(lambda: sample(scrape(metrics), "crossroads_worker_consumed_total") == 1, "the worker's count")
    samples = scrape(metrics)
    assert sample(samples, "crossroads_bridge_received_total", **bridge) == 1
    assert sample(samples, "crossroads_bridge_sent_total", **bridge) == 1
    assert sample(samples, "crossroads_bridge_replies_total", **bridge) == 1
    assert sample(samples, "crossroads_bridge_refused_total", **bridge) == 0
    assert sample(samples, "crossroads_bridge_state", state="connected", **bridge) == 1
    assert sample(samples, "crossroads_bridge_state", state="degraded", **bridge) == 0
    assert sample(samples, "crossroads_worker_consumer_errors_total") == 0
    assert sample(samples, "crossroads_worker_threads", pool="default") == 4
    shout = {"channel": "toy.receive", "consumer": "apps.toy_echo.shout"}
    assert sample(samples, "crossroads_worker_messages_total", **shout) == 1
    assert sample(samples, "crossroads_worker_consumer_duration_seconds_count", **shout) == 1
    assert sample(samples, "crossroads_worker_consumer_duration_seconds_bucket", le="+Inf", **shout) == 1
    assert sample(samples, "crossroads_worker_consumer_duration_seconds_sum", **shout) > 0
    assert sample(samples, "crossroads_layer_sent_total") == 2  # the line in, the reply out
    assert sample(samples, "crossroads_layer_received_total") == 2
    assert sample(samples, "crossroads_info", command="run", version=__import__("crossroads").__version__) == 1
    assert sample(samples, "process_open_fds") > 0
    assert health(metrics, "/healthz") == (200, {"alive": True})
    status, ready = health(metrics, "/readyz")
    assert status == 200 and ready["ready"] is True
    assert ready["bridges"]["toy"]["state"] == "connected" and ready["worker"]["serving"] is True
    assert get(metrics, "/nothing")[0] == 404
    shown = run("status", "--config", str(tmp_path / "crossroads.toml"))  # memory://: read over HTTP
    assert shown.returncode == 0, shown.stderr
    assert "toy: connected: running" in shown.stdout and "ready" in shown.stdout.split("\n")[0]
    as_json = run("status", "--json", "--config", str(tmp_path / "crossroads.toml"))
    assert json.loads(as_json.stdout)["bridges"]["toy"]["state"] == "connected"
    daemon.terminate()


def test_clients_leaving_before_their_answer_neither_fill_http_disconnect_nor_degrade_the_bridge(tmp_path, daemons):
    """A table routing http.request and not http.disconnect: the worker still takes the disconnects off their
    channel (crossroads.cli.unheeded). Unconsumed, the 6th would find the channel full (capacity 5 here) and the
    bridge, refused, would call the layer its problem: degraded, /readyz failing, for clients merely leaving."""
    metrics, port = free_port(), free_port()
    config = write_config(tmp_path, f"""[layer]
url = "memory://"
capacity = 5

[routing]
app = "apps.http_unanswered:routes"

[metrics]
listen = "127.0.0.1:{metrics}"

[bridges.web]
type = "http"
host = "127.0.0.1"
port = {port}
""")
    daemon = Daemon(tmp_path, "run", "run", "--config", str(config))
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for_port(metrics, daemon.process)
    requests = {"channel": "http.request", "consumer": "apps.http_unanswered.unanswered"}
    for n in range(1, 21):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            wait_until(lambda n=n: sample(scrape(metrics), "crossroads_worker_messages_total", **requests) == n,
                       f"request {n} at its consumer")
        # closed before any answer: the bridge sends http.disconnect
    gone = {"channel": "http.disconnect", "consumer": "crossroads.cli.unheeded"}
    wait_until(lambda: sample(scrape(metrics), "crossroads_worker_messages_total", **gone) == 20,
               "every disconnect taken off its channel")
    samples = scrape(metrics)
    web = {"bridge": "web", "type": "http"}
    assert sample(samples, "crossroads_bridge_refused_total", **web) == 0
    assert sample(samples, "crossroads_bridge_state", state="connected", **web) == 1
    assert health(metrics, "/readyz")[0] == 200
    daemon.terminate()


def test_readyz_says_which_bridge_is_not_connected_until_its_broker_is_there(tmp_path, daemons):
    broker = MosquittoServer(tmp_path / "mosquitto")  # its port chosen, the broker not started yet
    metrics = free_port()
    config = write_config(tmp_path, f"""[bridges.mq]
type = "mqtt"
broker = "{broker.url}"
subscribe = [{{ topic = "chat/#", qos = 1 }}]
reconnect_max = 0.5
""")
    # no [metrics] table: the variable the systemd drop-ins set gives the address
    daemon = Daemon(tmp_path, "run", "run", "--config", str(config),
                    env={"CROSSROADS_METRICS_LISTEN": f"127.0.0.1:{metrics}"})
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for_port(metrics, daemon.process)
    mq = {"bridge": "mq", "type": "mqtt"}
    wait_until(lambda: (sample(scrape(metrics), "crossroads_bridge_connect_failures_total", **mq) or 0) >= 1,
               "a failed connect counted")
    status, ready = health(metrics, "/readyz")
    assert status == 503 and ready["ready"] is False
    assert ready["reason"].startswith("mq is ") and broker.url.split("//")[1] in ready["reason"]
    assert health(metrics, "/healthz")[0] == 200  # not ready, but alive: no restart for a broker away
    with broker:
        wait_until(lambda: health(metrics, "/readyz")[0] == 200, "ready once the broker is there", timeout=30)
        samples = scrape(metrics)
        assert sample(samples, "crossroads_bridge_state", state="connected", **mq) == 1
        assert sample(samples, "crossroads_bridge_connects_total", **mq) >= 1
        daemon.terminate()


def test_a_worker_process_serves_its_counters_and_the_metrics_flag_picks_its_port(tmp_path, redis_server, daemons):
    metrics = free_port()
    config = write_config(tmp_path, f"""[layer]
url = "{redis_server.url}"
prefix = "opsworker"

[routing]
app = "apps.slow:routes"

[worker]
threads = 2

[metrics]
listen = "127.0.0.1:1"
""")
    daemon = Daemon(tmp_path, "worker", "worker", "--config", str(config), "--metrics-listen", f"127.0.0.1:{metrics}")
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for_port(metrics, daemon.process)
    sync = layer.from_url(redis_server.url, prefix="opsworker").sync
    try:
        reply = "test.reply"
        sync.send_many([("test.echo", {"text": f"m{n}", "n": n, "reply_channel": reply}) for n in range(5)])
        for _ in range(5):
            assert sync.receive([reply], timeout=30)[0] == reply
    finally:
        sync.close()
    wait_until(lambda: sample(scrape(metrics), "crossroads_worker_consumed_total") == 5, "five consumed")
    samples = scrape(metrics)
    assert sample(samples, "crossroads_worker_threads", pool="default") == 2
    assert sample(samples, "crossroads_layer_received_total") >= 5
    assert sample(samples, "crossroads_info", command="worker", version=__import__("crossroads").__version__) == 1
    status, ready = health(metrics, "/readyz")
    assert status == 200 and ready == {"bridges": {}, "ready": True, "worker": {"serving": True, "threads": 2}}
    daemon.terminate()


@pytest.mark.parametrize(("table", "says"), [
    ('[metrics]\nlisten = "9464"', "[metrics] listen"),
    ('[metrics]\nlisten = "127.0.0.1:99999"', "is not host:port"),
    ('[metrics]\nport = 9464', "port"),
    ('[worker]\nstuck_after = "soon"', "[worker] stuck_after"),
])
def test_check_names_a_bad_metrics_or_stuck_after_setting(tmp_path, table, says):
    checked = run("check", "--config", str(write_config(tmp_path, table)))
    assert checked.returncode == 2
    assert says in checked.stderr


def test_a_daemon_names_a_metrics_address_it_cannot_listen_on(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = run("run", "--config", toy_run_config(tmp_path, port, free_port()))
    assert started.returncode == 2
    assert f"[metrics] listen = '127.0.0.1:{port}': cannot listen there" in started.stderr


# -- the systemd watchdog --


def pings(daemon: Daemon, count: int) -> None:
    """Wait for ``count`` WATCHDOG=1 from the daemon (30 s each at most)."""
    for _ in range(count):
        assert daemon.notify.recv(100) == b"WATCHDOG=1"


def drain(daemon: Daemon) -> list[bytes]:
    """What the daemon has said on its notify socket and not been read yet."""
    said = []
    daemon.notify.setblocking(False)
    try:
        while True:
            said.append(daemon.notify.recv(100))
    except BlockingIOError:
        return said
    finally:
        daemon.notify.settimeout(30)


def silent_for(daemon: Daemon, intervals: int, interval: float) -> bool:
    """True when the daemon says nothing for ``intervals`` of its watchdog pings."""
    daemon.notify.settimeout(intervals * interval)
    try:
        said = daemon.notify.recv(100)
    except TimeoutError:
        return True
    finally:
        daemon.notify.settimeout(30)
    raise AssertionError(f"the daemon said {said!r} while it should be silent")


WATCHDOG_USEC = 100_000  # WatchdogSec=0.1s: a ping every 0.05 s
INTERVAL = WATCHDOG_USEC / 2e6


def test_run_pings_the_watchdog_while_its_loop_turns_and_stops_when_the_loop_is_blocked(tmp_path, daemons):
    port = free_port()
    config = write_config(tmp_path, f"""[routing]
app = "apps.toy_echo:routes"

[bridges.toy]
type = "freezing_bridge:FreezingBridge"
port = {port}
folder = "{tmp_path}"
""")
    daemon = Daemon(tmp_path, "run", "run", "--config", str(config), env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    daemons.append(daemon)
    daemon.wait_ready()
    pings(daemon, 3)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"freeze\n")
        wait_until(lambda: (tmp_path / "frozen").exists(), "the loop blocked", timeout=30)
        # The pings come from the loop itself: none can be sent after it blocked, only before.
        assert set(drain(daemon)) <= {b"WATCHDOG=1"}
        assert silent_for(daemon, 20, INTERVAL)
        (tmp_path / "thaw").write_text("")
        pings(daemon, 2)
        assert client.makefile("rb").readline() == b"FREEZE\n"
    daemon.terminate()


def test_a_worker_stops_the_pings_while_every_thread_is_stuck_and_its_healthz_says_why(tmp_path, redis_server,
                                                                                       daemons):
    metrics = free_port()
    config = write_config(tmp_path, f"""[layer]
url = "{redis_server.url}"
prefix = "opsstuck"

[routing]
app = "apps.slow:routes"

[worker]
threads = 1
stuck_after = 0.2

[metrics]
listen = "127.0.0.1:{metrics}"
""")
    daemon = Daemon(tmp_path, "worker", "worker", "--config", str(config), env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    daemons.append(daemon)
    daemon.wait_ready()
    pings(daemon, 3)
    sync = layer.from_url(redis_server.url, prefix="opsstuck").sync
    try:
        reply = "test.reply"
        sync.send("test.hold", {"n": 1, "reply_channel": reply})
        assert sync.receive(["test.started"], timeout=30)[0] == "test.started"
        wait_until(lambda: "watchdog: not pinging systemd" in daemon.log(), "the watchdog held", timeout=30)
        status, alive = health(metrics, "/healthz")
        assert status == 503 and "have been on one message for more than 0.2 s" in alive["reason"]
        assert set(drain(daemon)) <= {b"WATCHDOG=1"}
        assert silent_for(daemon, 20, INTERVAL)
        sync.send("test.release", {})
        pings(daemon, 2)
        assert sync.receive([reply], timeout=30)[1]["released"] is True
        assert health(metrics, "/healthz") == (200, {"alive": True})
    finally:
        sync.close()
    daemon.terminate()


# -- reload (SIGHUP) --


def toy_tables(metrics: int, bridges: dict[str, int], extra: str = "") -> str:
    tables = "".join(f'\n[bridges.{name}]\ntype = "toy_bridge:ToyBridge"\nport = {port}\n'
                     for name, port in bridges.items())
    return f'[routing]\napp = "apps.toy_echo:routes"\n\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n{tables}{extra}'


def reload(daemon: Daemon) -> None:
    """SIGHUP, and the RELOADING=1 then READY=1 systemd expects of a reload."""
    daemon.process.send_signal(signal.SIGHUP)
    said = daemon.notify.recv(200)
    assert said.startswith(b"RELOADING=1\nMONOTONIC_USEC="), said
    assert daemon.notify.recv(200) == b"READY=1"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=30).close()
    except ConnectionRefusedError:
        return True
    return False


def test_reload_keeps_unchanged_bridges_connected_and_stops_starts_and_restarts_the_others(tmp_path, daemons):
    metrics = free_port()
    a, b, c, d, d2 = (free_port() for _ in range(5))
    path = write_config(tmp_path, toy_tables(metrics, {"a": a, "b": b, "d": d}))
    daemon = Daemon(tmp_path, "run", "run", "--config", str(path))
    daemons.append(daemon)
    daemon.wait_ready()
    with socket.create_connection(("127.0.0.1", a), timeout=30) as client:
        lines = client.makefile("rb")
        client.sendall(b"before\n")
        assert lines.readline() == b"BEFORE\n"
        path.write_text(toy_tables(metrics, {"a": a, "c": c, "d": d2}))
        reload(daemon)
        client.sendall(b"after\n")  # the same connection, still served
        assert lines.readline() == b"AFTER\n"
        assert talk(c, "new") == "NEW" and talk(d2, "moved") == "MOVED"
        assert refused(b) and refused(d)
        assert "reloaded: kept a; stopped b; restarted d; started c" in daemon.log()
        status, ready = health(metrics, "/readyz")
        assert status == 200 and sorted(ready["bridges"]) == ["a", "c", "d"]
        assert sample(scrape(metrics), "crossroads_bridge_received_total", bridge="a", type="toy") == 2

        path.write_text(toy_tables(metrics, {"a": a}, extra="colour = 1\n"))  # a mistake: refused, all stays
        checked = run("check", "--config", str(path))
        assert checked.returncode == 2
        reload(daemon)
        log = daemon.log()
        problems = [line.removeprefix("crossroads check: ") for line in checked.stderr.splitlines()
                    if line.strip() and not line.startswith("warning:")]
        assert problems and all(f"reload refused, the running config stays: {line}" in log for line in problems)
        client.sendall(b"still\n")
        assert lines.readline() == b"STILL\n"
        assert talk(c, "kept") == "KEPT"
    daemon.terminate()


def test_a_worker_rechecks_its_config_on_sighup_and_keeps_running(tmp_path, redis_server, daemons):
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\nprefix = "opshup"\n\n'
                                    '[routing]\napp = "apps.slow:routes"\n')
    daemon = Daemon(tmp_path, "worker", "worker", "--config", str(config))
    daemons.append(daemon)
    daemon.wait_ready()
    reload(daemon)
    wait_until(lambda: "a worker applies a new config when it restarts" in daemon.log(), "the reload logged")
    config.write_text(config.read_text() + "[worker]\nthreads = 0\n")
    reload(daemon)
    wait_until(lambda: "reload refused, the running config stays" in daemon.log(), "the refusal logged")
    daemon.terminate()
