"""Several hosts, simulated (issue 16 §4): the chat example deployed as crossroads is meant to run, the bridges on
one machine, the worker on another and Redis on a third, each machine a network namespace of its own.

The three namespaces share one LAN, 10.77.0.0/24: a Linux bridge in the Redis host's namespace, with a veth link
to each of the two other hosts, and tc netem delaying every packet put on a link by 20 ms (20 ms each way between
a host and Redis; on a kernel without netem, tests/delay_relay.py in front of Redis delays what crosses to and
from it by as much, the only traffic between the hosts). Redis (servers.RedisServer) serves TLS only, with a
password, on 10.77.0.1:6379; the bridge host (10.77.0.2) runs `crossroads bridge web` (HTTP and its WebSocket
bridge on port 8000) and `crossroads bridge mqtt` beside a mosquitto on its loopback; the worker host (10.77.0.3)
runs `crossroads worker`. Every daemon reads the Redis password from a credential, as under systemd, and serves
/metrics on its host's loopback.
The test's clients (two WebSocket users, an MQTT publisher and subscriber) sit on the bridge host.

Then the worker host's link goes down for 5 s and comes back. Asserted: every MQTT QoS 1 message the broker
acknowledged reaches the subscriber once; the WebSocket users stay connected and hear what was said during and
after the cut; the worker process resumes by itself; each process's /metrics shows what the cut did to it. The
time from the link coming back to the first line delivered end to end is printed.

It needs root (CAP_NET_ADMIN to make namespaces and links, CAP_SYS_ADMIN to enter them) and iproute2 (`ip`, `tc`).
Run by a user without root (`make test` as yourself), it is skipped with the reason in pytest's summary, saying
what it needs; with root and without iproute2 it fails, naming it, as a test does for a missing server.
Namespaces are named for the run (parallel runs do not meet) and removed, and every process killed, in any case.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import MosquittoServer, RedisServer, ServerError, require_binary, wait_until, write_test_certificates
from test_chat_example import CHAT, chat_config
from test_cli import ENV
from test_daemons import Daemon
from test_operations import sample, scrape

NEEDS = ("it builds network namespaces and veth links, so it needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and "
         "iproute2 (`ip`, `tc`: apt-get install -y iproute2); run it as root, as .ci/run does: "
         "sudo .venv/bin/python -m pytest tests/test_several_hosts.py")
RELAY = Path(__file__).with_name("delay_relay.py")
ADDRESSES = {"redis": "10.77.0.1", "bridge": "10.77.0.2", "worker": "10.77.0.3"}
DELAY_MS = 20
CUT = 5.0  # seconds the worker host is off the LAN
# MQTT lines said before the cut, and in all: the 250 said during the cut are more than mqtt.receive holds (capacity
# 100, plus what the worker's last pop on the dead link may take), so the bridge has to refuse some and retry.
BEFORE, ALL = 20, 270
WEB, METRICS = 8000, {"web": 9465, "mqtt": 9466, "worker": 9464}  # the ports of docs/running.md, one host each

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}; {NEEDS}")


class Lan:
    """The three hosts: a network namespace each (``names``), one LAN between them, 20 ms on every link.

    ``inside(role)`` puts the calling thread on that host: a socket it opens, or a process it starts, is there.
    ``exec(role)`` is the prefix that runs a command there (``ip netns exec NAME``). ``stop()`` calls what was
    given to ``keep()`` (last first: the servers, clients and processes on the hosts), then removes the namespaces
    and with them every link.
    """

    def __init__(self) -> None:
        self.ip, self.tc = require_binary("ip"), require_binary("tc")
        tag = f"cr{os.getpid()}-{secrets.token_hex(3)}"
        self.names = {role: f"{tag}-{role}" for role in ADDRESSES}
        self.made: list[str] = []
        self.kept: list[Callable[[], object]] = []  # what stops the servers and clients before the namespaces go
        self.netem = True  # False on a kernel without the netem qdisc: the test then relays Redis with a delay

    def run(self, *command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise AssertionError(f"{' '.join(command)} failed: {done.stderr.strip()}; {NEEDS}")

    def start(self) -> Lan:
        for name in self.names.values():
            self.run(self.ip, "netns", "add", name)
            self.made.append(name)
            self.run(self.ip, "-n", name, "link", "set", "lo", "up")
        switch = self.names["redis"]
        self.run(self.ip, "-n", switch, "link", "add", "lan", "type", "bridge")
        self.run(self.ip, "-n", switch, "addr", "add", f"{ADDRESSES['redis']}/24", "dev", "lan")
        self.run(self.ip, "-n", switch, "link", "set", "lan", "up")
        for role in ("bridge", "worker"):
            name, port = self.names[role], f"to-{role}"
            self.run(self.ip, "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            self.run(self.ip, "-n", switch, "link", "set", port, "master", "lan", "up")
            self.run(self.ip, "-n", name, "addr", "add", f"{ADDRESSES[role]}/24", "dev", "eth0")
            self.run(self.ip, "-n", name, "link", "set", "eth0", "up")
            self.delay(name, "eth0")  # what the host sends
            self.delay(switch, port)  # what it receives
        return self

    def delay(self, namespace: str, device: str) -> None:
        if not self.netem:
            return
        command = (self.tc, "-n", namespace, "qdisc", "add", "dev", device, "root", "netem", "delay", f"{DELAY_MS}ms")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode and "unknown" in done.stderr.lower():  # no CONFIG_NET_SCH_NETEM, no sch_netem module
            self.netem = False
        elif done.returncode:
            raise AssertionError(f"{' '.join(command)} failed: {done.stderr.strip()}; {NEEDS}")

    @contextmanager
    def inside(self, role: str) -> Iterator[None]:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.names[role]}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(there)
            os.close(home)

    def exec(self, role: str) -> tuple[str, ...]:
        return (self.ip, "netns", "exec", self.names[role])

    def link(self, role: str, state: str) -> None:
        """The host's link ``up`` or ``down`` (ip link set eth0 down: the cable pulled)."""
        self.run(self.ip, "-n", self.names[role], "link", "set", "eth0", state)

    def keep(self, stop: Callable[[], object]) -> None:
        self.kept.append(stop)

    def stop(self) -> None:
        for stop in reversed(self.kept):
            stop()
        for name in self.made:
            subprocess.run([self.ip, "netns", "delete", name], capture_output=True)


@pytest.fixture
def lan():
    if os.geteuid() != 0:  # not silent: pytest's summary (-ra) prints the reason
        pytest.skip(f"tests/test_several_hosts.py runs as root only: {NEEDS}")
    try:
        hosts = Lan()
    except ServerError as exc:
        pytest.fail(f"{exc}; {NEEDS}")
    try:
        yield hosts.start()
    finally:
        hosts.stop()


class Heard:
    """What one client receives, each line with the time it came, read in a thread so every wait has a deadline."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.ended: BaseException | None = None  # why the stream ended, if it did
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()

    def _read(self, lines: Iterator[str]) -> None:
        try:
            for line in lines:
                with self._changed:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                    self._changed.notify_all()
        except BaseException as exc:  # a WebSocket closed on us: the test says so
            self.ended = exc
        else:
            self.ended = EOFError("the stream ended")

    def texts(self) -> list[str]:
        with self._changed:
            return [line for _, line in self.lines]

    def wait_for(self, condition: Callable[[list[str]], bool], what: str, timeout: float = 60) -> None:
        with self._changed:  # a Condition's lock is reentrant: texts() may take it again
            if not self._changed.wait_for(lambda: condition(self.texts()), timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; heard {len(self.lines)} lines, "
                                     f"the last {self.lines[-3:]}, ended: {self.ended!r}")


MQTT_LINE = re.compile(r"^\[mqtt\] chat/lobby: m(\d+)$")


def numbers(lines: list[str]) -> list[int]:
    return [int(found[1]) for found in map(MQTT_LINE.match, lines) if found]


def counters(lan: Lan) -> dict[str, dict]:
    """Every process's /metrics, scraped on its own host."""
    scraped = {}
    for process, port in METRICS.items():
        with lan.inside("worker" if process == "worker" else "bridge"):
            scraped[process] = scrape(port)
    return scraped


@pytest.mark.timeout(300)
def test_the_chat_across_three_hosts_survives_the_worker_host_cut_off_for_5_s(tmp_path, lan, daemons, capsys):
    import paho.mqtt.client as mqtt
    from websockets.sync.client import connect

    (tmp_path / "tls").mkdir()
    certs = write_test_certificates(tmp_path / "tls", ADDRESSES["redis"])
    password = secrets.token_hex(16)
    redis = RedisServer(tmp_path / "redis", port=6379, tls=certs, password=password, host=ADDRESSES["redis"])
    mosquitto = MosquittoServer(tmp_path / "mosquitto")
    mosquitto.port = 1883
    for server, role in ((redis, "redis"), (mosquitto, "bridge")):
        server.command_prefix = lan.exec(role)
        lan.keep(server.stop)
        with lan.inside(role):  # its port is waited on from its own host
            server.start()

    redis_port = 6379
    if not lan.netem:  # the latency in front of Redis instead of on the links: all that crosses between the hosts
        relay = subprocess.Popen([*lan.exec("redis"), sys.executable, str(RELAY), ADDRESSES["redis"], "6380",
                                  ADDRESSES["redis"], "6379", str(DELAY_MS)], stdout=subprocess.PIPE, text=True)
        lan.keep(relay.kill)
        assert relay.stdout.readline().strip() == "ready", "tests/delay_relay.py did not start"
        redis_port = 6380
    # The bundled chat config, only its addresses changed: Redis over TLS with the password from a credential.
    url = (f"rediss://:${{credential:redis-password}}@{ADDRESSES['redis']}:{redis_port}/0"
           f"?ssl_ca_certs={certs['ca']}")
    config = chat_config(tmp_path, url, WEB, mosquitto, SimpleNamespace(url="irc://127.0.0.1:6667"),
                         (('host = "127.0.0.1"\nport = 8000', f'host = "{ADDRESSES["bridge"]}"\nport = {WEB}'),))
    started = {}
    for process, role, command in (("web", "bridge", ("bridge", "web")), ("mqtt", "bridge", ("bridge", "mqtt")),
                                   ("worker", "worker", ("worker",))):
        credentials = tmp_path / f"credentials-{process}"  # each host has its own copy, as systemd hands it over
        credentials.mkdir()
        (credentials / "redis-password").write_text(password)
        env = {"CREDENTIALS_DIRECTORY": str(credentials), "PYTHONPATH": os.pathsep.join([str(CHAT), ENV["PYTHONPATH"]])}
        started[process] = Daemon(tmp_path, process, *command, "--config", config, "--metrics-listen",
                                  f"127.0.0.1:{METRICS[process]}", env=env, command_prefix=lan.exec(role))
        daemons.append(started[process])
    for daemon in started.values():
        daemon.wait_ready(90)  # three Python processes importing at once on a shared machine
    worker_pid = started["worker"].process.pid
    mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 20)

    listener = subprocess.Popen([*lan.exec("bridge"), require_binary("mosquitto_sub"), "-p", "1883", "-q", "1",
                                 "-i", "dave-sub", "-t", "chat/lobby/out"], stdout=subprocess.PIPE, text=True)
    lan.keep(listener.kill)
    dave = Heard(listener.stdout)
    mosquitto.wait_for_log("Sending SUBACK to dave-sub", 20)
    users = {}
    with lan.inside("bridge"):  # the sockets are opened on the bridge host, then used from this thread or any
        for name in ("alice", "bob"):
            users[name] = connect(f"ws://{ADDRESSES['bridge']}:{WEB}/chat/lobby/?name={name}", open_timeout=30)
            lan.keep(users[name].close)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="erin-pub")
        publisher.connect("127.0.0.1", 1883)
    publisher.loop_start()
    lan.keep(publisher.loop_stop)
    heard = {name: Heard(user) for name, user in users.items()}

    def publish(numbers_: range) -> None:
        """QoS 1, each acknowledged by the broker before the test goes on: what the broker took must arrive."""
        sent = [publisher.publish("chat/lobby", f"m{n}", qos=1) for n in numbers_]
        for info in sent:
            info.wait_for_publish(30)
            assert info.is_published()

    publish(range(BEFORE))
    dave.wait_for(lambda lines: len(numbers(lines)) == BEFORE, "the first lines at the MQTT subscriber")
    for name in users:
        heard[name].wait_for(lambda lines: len(numbers(lines)) == BEFORE, f"the first lines at {name}'s browser")
    before = counters(lan)

    lan.link("worker", "down")
    down = time.monotonic()
    publish(range(BEFORE, ALL))  # the bridge stores them until the channel is full, then refuses and tries again
    users["alice"].send("said during the cut")

    def mqtt_refused() -> float:
        with lan.inside("bridge"):  # each /metrics is on its host's loopback, which the cut leaves alone
            return sample(scrape(METRICS["mqtt"]), "crossroads_bridge_refused_total", bridge="mqtt", type="mqtt") or 0

    refused_before = sample(before["mqtt"], "crossroads_bridge_refused_total", bridge="mqtt", type="mqtt") or 0
    wait_until(lambda: mqtt_refused() > refused_before, "the MQTT bridge to refuse, its channel full, during the cut",
               down + CUT - time.monotonic())
    during = counters(lan)
    assert len(numbers(dave.texts())) == BEFORE  # nothing got through the cut
    time.sleep(max(0.0, down + CUT - time.monotonic()))  # the cut's length is the scenario, not a wait for an event
    lan.link("worker", "up")
    up = time.monotonic()

    dave.wait_for(lambda lines: set(numbers(lines)) == set(range(ALL)), "every acknowledged line after the cut", 90)
    recovered = min(at for at, line in dave.lines if (numbers([line]) or [0])[0] >= BEFORE) - up
    users["alice"].send("back after the cut")
    for name in users:
        heard[name].wait_for(lambda lines: "[websocket] alice: back after the cut" in lines,
                             f"{name} hearing what alice said after the cut")
    with capsys.disabled():
        print(f"\nseveral hosts: the first line delivered end to end {recovered:.2f} s after the worker host's link "
              f"came back ({CUT:g} s cut; {DELAY_MS} ms each way between a host and Redis, "
              f"{'by netem on the links' if lan.netem else 'by tests/delay_relay.py: this kernel has no netem'})")

    assert sorted(numbers(dave.texts())) == list(range(ALL))  # none lost, none twice: no reconnect to the broker
    for name in users:
        texts = heard[name].texts()
        assert heard[name].ended is None, f"{name}'s WebSocket was closed: {heard[name].ended!r}"
        assert sorted(numbers(texts)) == list(range(ALL))
        assert texts.index("[websocket] alice: said during the cut") < texts.index("[websocket] alice: back after "
                                                                                   "the cut")
    assert started["worker"].process.poll() is None and started["worker"].process.pid == worker_pid
    after = counters(lan)

    def grew(since: dict, until: dict, process: str, name: str, **labels: str) -> float:
        return (sample(until[process], name, **labels) or 0) - (sample(since[process], name, **labels) or 0)

    # The worker, cut off, ran nothing meanwhile; after, it ran everything said during the cut, without a restart.
    # A 5 s cut is shorter than its blocking pop's read timeout (5 s + 5 s): TCP carried its connection through it,
    # so its layer met no error (no reconnect, nothing to count: the outage shows as the gap).
    assert grew(before, during, "worker", "crossroads_worker_consumed_total") == 0
    assert grew(during, after, "worker", "crossroads_worker_consumed_total") >= ALL - BEFORE + 2
    assert grew(before, after, "worker", "crossroads_worker_consumer_errors_total") == 0
    # The MQTT bridge's channel filled while no worker took from it (waited for above): it refused, holding the
    # broker's acks, and retried until the worker was back; every line went into the layer once.
    assert grew(before, after, "mqtt", "crossroads_bridge_sent_total", bridge="mqtt", type="mqtt") == ALL - BEFORE
    # The web bridge kept Redis all along: nothing refused, both sockets still registered for replies.
    assert grew(before, after, "web", "crossroads_bridge_refused_total", bridge="sockets", type="websocket") == 0
    assert sample(after["web"], "crossroads_bridge_peers", bridge="sockets", type="websocket") == 2
    for daemon in started.values():
        daemon.terminate()
