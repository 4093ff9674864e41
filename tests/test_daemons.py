"""The daemons as a user runs them: `crossroads run` all in one, and `crossroads bridge` + `crossroads worker`
as separate processes over Redis, each a real subprocess with a real peer on a TCP socket."""

from __future__ import annotations

import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from servers import MosquittoServer, NgircdServer, free_port, wait_for_port, wait_until
from test_cli import CROSSROADS, ENV, run, write_config

from crossroads import layer

BUNDLED_CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat" / "crossroads.toml"


class Daemon:
    """One `crossroads` process that reports readiness on its own NOTIFY_SOCKET.

    Its output goes to a file, not a pipe: a pipe nobody reads fills up and stalls the daemon. Every failure
    says what the daemon logged: wait_ready() and terminate() put the log in their error, and close() prints it,
    which pytest shows for a test that failed in any other way.
    """

    def __init__(self, tmp_path, name: str, *args: str, env: dict[str, str] | None = None,
                 command_prefix: tuple[str, ...] = ()) -> None:
        # command_prefix goes before the command: ``ip netns exec NAME`` runs it on another (simulated) host.
        path = str(tmp_path / f"{name}.notify")
        self.name = name
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        self.notify.settimeout(30)
        self.log_path = tmp_path / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([*command_prefix, CROSSROADS, *args],
                                            env={**ENV, **(env or {}), "NOTIFY_SOCKET": path}, cwd=tmp_path,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.printed = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> AssertionError:
        self.printed = True
        return AssertionError(f"crossroads {self.name}: {why}; its log:\n{self.log()}")

    def wait_ready(self, deadline: float = 30.0) -> None:
        """Wait for READY=1; fail at once, with the log, if the process exits first."""
        self.notify.settimeout(0.2)
        end = time.monotonic() + deadline
        try:
            while time.monotonic() < end and self.process.poll() is None:
                try:
                    assert self.notify.recv(100) == b"READY=1"
                    return
                except TimeoutError:
                    continue
        finally:
            self.notify.settimeout(30)
        self.process.kill()
        self.process.wait()
        raise self.fail(f"no READY=1 (exit {self.process.poll()})")

    def terminate(self) -> str:
        """SIGTERM, expect STOPPING=1 and a clean exit; return the log."""
        self.process.send_signal(signal.SIGTERM)
        said = b"WATCHDOG=1"
        while said == b"WATCHDOG=1":  # a daemon under a watchdog pings until it stops
            try:
                said = self.notify.recv(100)
            except TimeoutError:
                said = b"nothing within 30 s"
        if said != b"STOPPING=1":
            self.close(quietly=True)
            raise self.fail(f"said {said!r} on SIGTERM, not STOPPING=1")
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:  # say where it hangs: crossroads prints its threads' stacks on SIGUSR1
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(1)  # faulthandler writes at once; the kill after it must not cut that short
            self.process.kill()
            self.process.wait()
            raise self.fail("no exit 30 s after SIGTERM") from None
        if code != 0:
            raise self.fail(f"exit {code} after SIGTERM")
        return self.log()

    def close(self, quietly: bool = False) -> None:
        """Kill it if it still runs; print its log (shown if the test failed) unless an error holds it already."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.notify.close()
        if not (quietly or self.printed):
            self.printed = True
            print(f"----- crossroads {self.name}: its log -----\n{self.log()}")


def bridge_and_worker(tmp_path, daemons: list, bridge: str, config: str,
                      port: int | None = None) -> tuple[Daemon, Daemon]:
    """`crossroads bridge NAME` and `crossroads worker` on ``config``, both ready, and the bridge listening on
    ``port`` if one is given; ``daemons`` (the fixture) kills them at the end and shows their logs on a failure."""
    started = (Daemon(tmp_path, "bridge", "bridge", bridge, "--config", config),
               Daemon(tmp_path, "worker", "worker", "--config", config))
    daemons += started
    for daemon in started:
        daemon.wait_ready()
    if port is not None:
        wait_for_port(port, started[0].process)
    return started


def socket_activated(address: str, fdname: str, *args: str) -> subprocess.Popen:
    """`crossroads ARGS...` under systemd-socket-activate (systemd's own tool), which listens on ``address`` and
    passes the socket named ``fdname``, as a .socket unit with FileDescriptorName= does. Output in ``stdout``."""
    from servers import require_binary

    activate = require_binary("systemd-socket-activate")
    return subprocess.Popen([activate, "--listen", address, "--fdname", fdname,
                             *(f"--setenv={name}={ENV[name]}" for name in ("PYTHONPATH", "PATH")), CROSSROADS, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def talk(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(line.encode() + b"\n")
        reader = sock.makefile("rb")
        return reader.readline().decode().rstrip("\n")


def toy_config(tmp_path, layer_table: str, port: int) -> str:
    return str(write_config(tmp_path, f"""{layer_table}
[routing]
app = "apps.toy_echo:routes"

[bridges.toy]
type = "toy_bridge:ToyBridge"
port = {port}
"""))


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_run_all_in_one(tmp_path, daemons, backend, request):
    port = free_port()
    layer_table = ""
    if backend == "redis":
        layer_table = f'[layer]\nurl = "{request.getfixturevalue("redis_server").url}"\nprefix = "allinone"'
    config = toy_config(tmp_path, layer_table, port)
    daemon = Daemon(tmp_path, "run", "run", "--config", config)
    daemons.append(daemon)
    daemon.wait_ready()
    assert talk(port, "hello, gateway") == "HELLO, GATEWAY"
    log = daemon.terminate()
    assert "serving: toy (toy), a worker" in log


def test_a_daemon_raises_its_open_files_limit_to_the_hard_one(tmp_path, daemons):
    """A user's shell starts with a soft `ulimit -n` of 1,024; a daemon takes what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(512, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # the child inherits this at fork
    try:
        daemon = Daemon(tmp_path, "run", "run", "--config", toy_config(tmp_path, "", free_port()))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    daemons.append(daemon)
    daemon.wait_ready()
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    assert re.search(rf"^Max open files\s+{hard}\s+{hard}\s", limits, re.MULTILINE), limits
    log = daemon.terminate()
    assert f"open files limit: {hard} (raised from {low})" in log


def test_bridge_and_worker_as_separate_daemons_over_redis(tmp_path, redis_server, daemons):
    port = free_port()
    config = toy_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\nprefix = "daemons"', port)
    bridge, worker = bridge_and_worker(tmp_path, daemons, "toy", config, port)
    assert talk(port, "over redis") == "OVER REDIS"
    status = run("status", "--config", config)
    assert status.returncode == 0, status.stderr
    assert "toy: connected" in status.stdout
    bridge.terminate()
    worker.terminate()
    status = run("status", "--config", config)
    assert "toy: stopped" in status.stdout or "toy: not running" in status.stdout


def test_bridge_command_names_what_is_configured(tmp_path, redis_server):
    config = toy_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"', free_port())
    result = run("bridge", "irc", "--config", config)
    assert result.returncode == 2 and "no [bridges.irc] table (configured bridges: toy)" in result.stderr


def test_run_with_no_config_serves_the_bundled_chat(tmp_path, daemons):
    """`make run`'s promise: with no crossroads.toml, the chat example (its sockets, MQTT and IRC too), here on a
    free port and on a broker and an IRC server of the test's own, which the environment names."""
    port = free_port()
    with MosquittoServer(tmp_path / "mosquitto") as mosquitto, NgircdServer(tmp_path / "ngircd") as irc:
        daemon = Daemon(tmp_path, "bundled", "run",  # cwd: the test's, which has no crossroads.toml
                        env={"CROSSROADS_CHAT_PORT": str(port), "CROSSROADS_CHAT_BROKER": mosquitto.url,
                             "CROSSROADS_CHAT_IRC": irc.url, "CROSSROADS_CHAT_SMTP": str(free_port())})
        daemons.append(daemon)
        daemon.wait_ready()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /chat/lobby/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            response = b"".join(iter(lambda: sock.recv(65536), b""))
        assert response.startswith(b"HTTP/1.1 200") and b"Room <span id=\"room\">lobby</span>" in response
        mosquitto.wait_for_log("Sending SUBACK to crossroads-mqtt", 30)
        wait_until(lambda: f"registered on {irc.url}" in daemon.log(), "the IRC bridge to register", 30)
        log = daemon.terminate()
    assert f"serving the bundled chat example ({BUNDLED_CHAT}); open http://127.0.0.1:{port}/" in log
    assert f"a broker at {mosquitto.url} and an IRC server at {irc.url}" in log


def test_the_bundled_chat_names_a_wrong_address(tmp_path):
    env = {**ENV, "CROSSROADS_CHAT_BROKER": "127.0.0.1:1883", "CROSSROADS_CHAT_PORT": str(free_port())}
    result = subprocess.run([CROSSROADS, "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "CROSSROADS_CHAT_BROKER='127.0.0.1:1883': broker: must be mqtt://host:port" in result.stderr, result.stderr


# -- the worker under slow consumers and SIGKILL (issue 14 §5 and §6) --

CAPACITY = 5000  # room for the bursts below; the sender's layer enforces it, so both sides set it


def worker_config(tmp_path, redis_url: str, prefix: str, worker_table: str) -> str:
    return str(write_config(tmp_path, f'[layer]\nurl = "{redis_url}"\nprefix = "{prefix}"\ncapacity = {CAPACITY}\n'
                                      f'[routing]\napp = "apps.slow:routes"\n[worker]\n{worker_table}\n'))


def collect(sync, channel: str, count: int) -> list[dict]:
    got: list[dict] = []
    while len(got) < count:
        batch = sync.receive_many([channel], count - len(got), timeout=30)
        assert batch, f"only {len(got)} of {count} messages arrived on {channel}"
        got += [message for _, message in batch]
    return got


def test_a_worker_process_with_a_slow_pool_answers_fast_requests_while_slow_ones_run(tmp_path, redis_server,
                                                                                     daemons):
    """The 5-slow-requests finding, on a real `crossroads worker`: slow messages fill their pool's threads (and
    more wait for them), a fast one is answered meanwhile; each slow one is reported once, with its stack."""
    config = worker_config(tmp_path, redis_server.url, "slowpool", 'threads = 1\nslow_consumer = 0.2\n'
                           'pools = { slow = { channels = ["test.hold"], threads = 2 } }')
    sync = layer.from_url(redis_server.url, prefix="slowpool", capacity=CAPACITY).sync
    sync.flush()
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    daemons.append(worker)
    worker.wait_ready()
    try:
        reply = sync.new_channel("client?")
        sync.send_many([("test.hold", {"n": n, "reply_channel": reply}) for n in range(5)])
        assert sorted(m["n"] for m in collect(sync, "test.started", 2)) == [0, 1]
        sync.send("test.echo", {"text": "fast", "n": 99, "reply_channel": reply})
        assert collect(sync, reply, 1) == [{"text": "fast", "n": 99}]  # no slow one has been released
        wait_until(lambda: worker.log().count("slow consumer: apps.slow.hold") == 2, "two slow consumer reports")
        sync.send_many([("test.release", {})] * 5)
        assert sorted(m["finished"] for m in collect(sync, reply, 5)) == [0, 1, 2, 3, 4]
        log = worker.terminate()
    finally:
        sync.close()
    assert "worker pool slow listening on test.hold with 2 thread(s)" in log
    assert "worker pool default listening on test.echo" in log
    # Once per message: the three that waited in the layer found their release there and ran quickly.
    assert log.count("slow consumer: apps.slow.hold has been running") == 2
    assert 'apps/slow.py", line' in log and "in hold" in log  # with the stack
    assert "2 slow consumers reported" in log


@pytest.mark.parametrize("prefetch", [1, None])
def test_a_killed_worker_loses_at_most_prefetch_messages_a_thread(tmp_path, redis_server, daemons, prefetch):
    """SIGKILL loses what the worker holds (at-most-once): with prefetch = 1 the message each thread runs, no
    more; with the default a thread that has seen quick consumers holds a batch, and all of it is lost."""
    threads, holds = 2, 300
    prefix = f"killed{prefetch or 'default'}"
    config = worker_config(tmp_path, redis_server.url, prefix,
                           f"threads = {threads}\n" + (f"prefetch = {prefetch}\n" if prefetch else ""))
    sync = layer.from_url(redis_server.url, prefix=prefix, capacity=CAPACITY).sync
    sync.flush()
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    daemons.append(worker)
    worker.wait_ready()
    try:
        reply = sync.new_channel("client?")
        # Quick consumers first, so the threads take as much per receive as prefetch lets them.
        sync.send_many([("test.tick", {"n": n}) for n in range(2000)]
                       + [("test.tick", {"n": n, "reply_channel": reply}) for n in range(threads)])
        collect(sync, reply, threads)
        sync.send_many([("test.hold", {"n": n, "reply_channel": reply}) for n in range(holds)])
        started = collect(sync, "test.started", threads)  # every thread runs one and holds what it took
        worker.process.kill()  # SIGKILL
        worker.process.wait()
        left = sync.stats()["pending"].get("test.hold", 0)
    finally:
        sync.close()
    lost = holds - left
    limit = threads * (prefetch or 64)
    assert len(started) == threads
    assert threads <= lost <= limit, f"{lost} lost of {holds}, prefetch {prefetch or 'default'} promises {limit}"
    if prefetch == 1:
        assert lost == threads  # exactly the messages being run
    else:
        assert lost > threads, "a thread that saw quick consumers should have taken a batch"


def test_run_all_in_one_gives_the_worker_its_pools(tmp_path, daemons):
    port = free_port()
    config = toy_config(tmp_path, "[worker]\nthreads = 1\nprefetch = 1\n"
                                  'pools = { toys = { channels = ["toy.*"], threads = 2 } }', port)
    daemon = Daemon(tmp_path, "run", "run", "--config", config)
    daemons.append(daemon)
    daemon.wait_ready()
    assert talk(port, "pooled") == "POOLED"
    log = daemon.terminate()
    assert re.search(r"worker pool toys listening on toy\.\S+ with 2 thread\(s\)", log), log
