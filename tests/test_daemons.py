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
from servers import free_port, wait_for_port
from test_cli import CROSSROADS, ENV, run, write_config


class Daemon:
    """One `crossroads` process that reports readiness on its own NOTIFY_SOCKET."""

    def __init__(self, tmp_path, name: str, *args: str) -> None:
        path = str(tmp_path / f"{name}.notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(path)
        self.notify.settimeout(30)
        self.process = subprocess.Popen([CROSSROADS, *args], env={**ENV, "NOTIFY_SOCKET": path}, cwd=tmp_path,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

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
        raise AssertionError(f"no READY=1 (exit {self.process.poll()}); stderr: {self.process.communicate()[1]}")

    def terminate(self) -> str:
        """SIGTERM, expect STOPPING=1 and a clean exit; return the log."""
        self.process.send_signal(signal.SIGTERM)
        assert self.notify.recv(100) == b"STOPPING=1"
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:  # say where it hangs: crossroads prints its threads' stacks on SIGUSR1
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(1)  # faulthandler writes at once; the kill after it must not cut that short
            self.process.kill()
            raise AssertionError(f"no exit 30 s after SIGTERM; stderr:\n{self.process.communicate()[1]}") from None
        stderr = self.process.communicate()[1]
        assert code == 0, stderr
        return stderr

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        self.notify.close()


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
    bridge = Daemon(tmp_path, "bridge", "bridge", "toy", "--config", config)
    worker = Daemon(tmp_path, "worker", "worker", "--config", config)
    daemons += [bridge, worker]
    bridge.wait_ready()
    worker.wait_ready()
    wait_for_port(port, bridge.process)
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
    """`make run`'s promise: with no crossroads.toml, the chat example on 127.0.0.1:8000 (its sockets too)."""
    daemon = Daemon(tmp_path, "bundled", "run")  # cwd: the test's, which has no crossroads.toml
    daemons.append(daemon)
    daemon.wait_ready()
    with socket.create_connection(("127.0.0.1", 8000), timeout=30) as sock:
        sock.sendall(b"GET /chat/lobby/ HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nConnection: close\r\n\r\n")
        response = b"".join(iter(lambda: sock.recv(65536), b""))
    assert response.startswith(b"HTTP/1.1 200") and b"Room <span id=\"room\">lobby</span>" in response
    log = daemon.terminate()
    assert "serving the bundled chat example" in log
