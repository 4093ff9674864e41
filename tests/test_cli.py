"""The `crossroads` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from servers import RedisServer, free_port

from crossroads import layer

CROSSROADS = shutil.which("crossroads", path=str(Path(sys.executable).parent)) or "crossroads"
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS)}  # crossroads itself comes from the installed package


def run(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CROSSROADS, *args], capture_output=True, text=True, timeout=60, env=ENV, cwd=cwd,
                          input=stdin)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crossroads.toml"
    path.write_text(text)
    return path


def test_help_names_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for word in ("run", "check", "worker", "send", "status", "layer"):
        assert word in result.stdout
    result = run("run", "--help")  # what a bare `crossroads run` does, said before it is run
    assert result.returncode == 0 and "serves the bundled chat example" in result.stdout


def test_layer_check_against_memory_and_redis(redis_server):
    result = run("layer", "check")
    assert result.returncode == 0 and "memory://: ok" in result.stdout
    result = run("layer", "check", "--layer", redis_server.url)
    assert result.returncode == 0 and "ok, a message went there and back" in result.stdout
    result = run("layer", "check", redis_server.url)  # the URL as a plain argument, too
    assert result.returncode == 0 and "ok, a message went there and back" in result.stdout, result.stderr
    result = run("layer", "check", redis_server.url, "--layer", "memory://")
    assert result.returncode == 2 and "two layer URLs given" in result.stderr


def test_layer_check_says_what_to_do_when_redis_is_down():
    result = run("layer", "check", "--layer", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "is redis-server running?" in result.stderr
    assert "Traceback" not in result.stderr


SECRET = "s3cret-Pw"


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password=SECRET).start()
    yield server
    server.stop()


def test_layer_check_never_prints_the_password(redis_with_password):
    result = run("layer", "check", "--layer", redis_with_password.url)
    assert result.returncode == 0, result.stderr
    assert f"layer redis://:****@127.0.0.1:{redis_with_password.port}/0: ok" in result.stdout
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("auth", [":wrong-Pw@", ""], ids=["wrong password", "no password"])
def test_layer_check_says_the_password_is_wrong_and_what_to_fix(redis_with_password, auth):
    result = run("layer", "check", "--layer", f"redis://{auth}127.0.0.1:{redis_with_password.port}/0")
    assert result.returncode == 1
    assert "wrong password / authentication failed" in result.stderr
    assert "check [layer] url's password" in result.stderr and "REDIS_PASSWORD" in result.stderr
    assert "is redis-server running?" not in result.stderr and "Traceback" not in result.stderr
    assert "wrong-Pw" not in result.stderr + result.stdout


def test_check_and_status_never_print_the_password(tmp_path, redis_with_password):
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_with_password.url}"\nprefix = "cliauth"\n')
    for command in ("check", "status"):
        result = run(command, "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
    assert f"layer redis://:****@127.0.0.1:{redis_with_password.port}/0" in result.stdout


def test_status_names_the_password_when_redis_refuses_it(tmp_path, redis_with_password):
    url = f"redis://:wrong-Pw@127.0.0.1:{redis_with_password.port}/0"
    config = write_config(tmp_path, f'[layer]\nurl = "{url}"\n')
    result = run("status", "--config", str(config))
    assert result.returncode == 1
    assert "wrong password / authentication failed" in result.stderr and "wrong-Pw" not in result.stderr


def test_unknown_scheme_is_a_one_line_error():
    result = run("layer", "check", "--layer", "amqp://x")
    assert result.returncode == 2
    assert "unknown layer URL" in result.stderr and "Traceback" not in result.stderr


def test_check_reports_what_it_found(tmp_path, redis_server):
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\n[routing]\napp = "apps.chat:routes"\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"{config}: ok" in result.stdout
    assert "websocket.connect" in result.stdout and "bridges: none enabled" in result.stdout


def test_check_warns_when_no_route_answers_a_listening_bridge(tmp_path):
    (tmp_path / "mqtt_only.py").write_text("from crossroads import route\nroutes = [route('mqtt.receive', print)]\n")
    config = write_config(tmp_path, '[routing]\napp = "mqtt_only:routes"\n[bridges.web]\ntype = "http"\n'
                                    '[bridges.sockets]\ntype = "websocket"\nhandshake_timeout = 5\n'
                                    '[bridges.off]\ntype = "http"\nenabled = false\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 0, result.stderr  # a warning, not an error: the config is valid
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {config}: [bridges.web] (http) sends http.request, which no route in [routing] app "
        "mqtt_only:routes takes: every peer waits http_timeout (60 s) for a 504; add route(\"http.request\", ...)",
        f"warning: {config}: [bridges.sockets] (websocket) sends websocket.connect, which no route in [routing] app "
        "mqtt_only:routes takes: every peer waits handshake_timeout (5 s) for a 504; add "
        "route(\"websocket.connect\", ...)"]
    routed = write_config(tmp_path, '[routing]\napp = "apps.chat:routes"\n[bridges.sockets]\ntype = "websocket"\n')
    assert "warning" not in run("check", "--config", str(routed)).stderr


def test_check_names_file_table_and_key_of_every_mistake(tmp_path):
    config = write_config(tmp_path, '[layer]\ncapacity = 0\n[worker]\nthreads = "many"\n[routing]\napp = "x"\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert "crossroads.toml: [layer] capacity:" in result.stderr
    assert "crossroads.toml: [worker] threads:" in result.stderr
    assert "crossroads.toml: [routing] app:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_quotes_a_bad_broker_url_once(tmp_path):
    config = write_config(tmp_path, '[bridges.m]\ntype = "mqtt"\nbroker = "tcp://localhost:1883"\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert "[bridges.m] broker: must be mqtt://host:port or mqtts://host:port" in result.stderr
    assert result.stderr.count("tcp://localhost:1883") == 1, result.stderr


def test_check_imports_modules_next_to_the_config(tmp_path):
    (tmp_path / "my_routes.py").write_text("from crossroads import route\nroutes = [route('my.channel', print)]\n")
    config = write_config(tmp_path, '[routing]\napp = "my_routes:routes"\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "my_routes:routes consumes my.channel" in result.stdout


def test_check_reports_a_routing_module_that_fails_to_import(tmp_path):
    (tmp_path / "broken_routes.py").write_text("import no_such_dependency\nroutes = []\n")
    config = write_config(tmp_path, '[routing]\napp = "broken_routes:routes"\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert "[routing] app: cannot import module 'broken_routes'" in result.stderr
    assert "no_such_dependency" in result.stderr and "Traceback" not in result.stderr


def test_commands_that_need_other_processes_refuse_memory(tmp_path):
    config = write_config(tmp_path, '[routing]\napp = "apps.slow:routes"\n')
    result = run("worker", "--config", str(config))
    assert result.returncode == 2 and "memory://" in result.stderr and "redis://" in result.stderr


def test_send_and_status(tmp_path, redis_server):
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\nprefix = "clisend"\n')
    result = run("send", "--config", str(config), "cli.test", '{"text": "hello", "raw": [1, 2]}')
    assert result.returncode == 0, result.stderr
    result = run("status", "--config", str(config))
    assert result.returncode == 0 and "cli.test" in result.stdout
    sync = layer.from_url(redis_server.url, prefix="clisend").sync
    assert sync.receive(["cli.test"], timeout=5) == ("cli.test", {"text": "hello", "raw": [1, 2]})
    result = run("send", "--config", str(config), "cli.test", "{not json")
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    result = run("send", "--config", str(config), "bad name", "{}")
    assert result.returncode == 2 and "invalid channel name" in result.stderr
    sync.close()


def test_send_takes_a_large_message_from_stdin_or_a_file(tmp_path, redis_server):
    """300 KiB is more than one command-line argument may hold (128 KiB on Linux): `-` and `@file` carry it."""
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\nprefix = "clilarge"\n')
    message = {"text": "x" * (300 * 1024), "n": 1}
    (tmp_path / "message.json").write_text(json.dumps(message))
    sync = layer.from_url(redis_server.url, prefix="clilarge").sync
    try:
        result = run("send", "--config", str(config), "cli.large", "-", stdin=json.dumps(message))
        assert result.returncode == 0, result.stderr
        assert sync.receive(["cli.large"], timeout=5) == ("cli.large", message)
        result = run("send", "--config", str(config), "cli.large", f"@{tmp_path / 'message.json'}")
        assert result.returncode == 0, result.stderr
        assert sync.receive(["cli.large"], timeout=5) == ("cli.large", message)
    finally:
        sync.close()
    result = run("send", "--config", str(config), "cli.large", f"@{tmp_path / 'missing.json'}")
    assert result.returncode == 2 and "cannot read the message from" in result.stderr
    too_large = json.dumps({"text": "x" * (2 * 1024 * 1024)})
    result = run("send", "--config", str(config), "cli.large", "-", stdin=too_large)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield path, sock
    sock.close()


def test_worker_daemon_serves_notifies_and_drains_on_sigterm(tmp_path, redis_server, notify_socket):
    """The real `crossroads worker`: READY=1 once serving, SIGTERM mid-message finishes that message."""
    path, sock = notify_socket
    config = write_config(tmp_path, f'[layer]\nurl = "{redis_server.url}"\nprefix = "cliworker"\n'
                                    '[routing]\napp = "apps.slow:routes"\n[worker]\nthreads = 2\n')
    sync = layer.from_url(redis_server.url, prefix="cliworker").sync
    sync.flush()
    process = subprocess.Popen([CROSSROADS, "worker", "--config", str(config)], env={**ENV, "NOTIFY_SOCKET": path},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sock.recv(100) == b"READY=1"
        reply = sync.new_channel("cli?")
        sync.send("test.echo", {"text": "ping", "n": 1, "reply_channel": reply})
        assert sync.receive([reply], timeout=30) == (reply, {"text": "ping", "n": 1})
        sync.send("test.hold", {"n": 2, "reply_channel": reply})
        assert sync.receive(["test.started"], timeout=30) == ("test.started", {"n": 2})
        process.send_signal(signal.SIGTERM)
        assert sock.recv(100) == b"STOPPING=1"
        sync.send("test.release", {})
        # the answer only comes if the worker finished the message it held when SIGTERM came
        assert sync.receive([reply], timeout=30) == (reply, {"finished": 2, "released": True})
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.communicate()[1]
        sync.close()
    assert "worker received SIGTERM: finishing the messages in hand" in stderr
    assert "worker stopped: 2 consumed" in stderr
    json.dumps(stderr)  # the log is plain text lines


def test_check_shows_the_worker_pools_and_names_a_channel_two_pools_take(tmp_path):
    config = write_config(tmp_path, '[routing]\napp = "apps.slow:routes"\n[worker]\nthreads = 2\n'
                                    'pools = { slow = { channels = ["test.hold*"], threads = 3 }, '
                                    'mqtt = { channels = ["mqtt.*"], threads = 1 } }\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "worker pool slow: test.hold, test.hold_async (3 thread(s))" in result.stdout
    assert "worker pool mqtt: none of its channels is routed (no threads)" in result.stdout
    assert "worker pool default: test.echo, test.shout, test.tick (2 thread(s))" in result.stdout
    # Patterns that differ as text but match one channel: only the routing table can tell.
    config = write_config(tmp_path, '[routing]\napp = "apps.slow:routes"\n[worker]\n'
                                    'pools = { a = { channels = ["test.*"], threads = 1 }, '
                                    'b = { channels = ["test.hold"], threads = 1 } }\n')
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert "[worker] pools: the channel test.hold is in pools a and b" in result.stderr
    result = run("check", "--config", str(write_config(tmp_path, '[worker]\nprefetch = 0\n')))
    assert result.returncode == 2 and "[worker] prefetch: must be an integer of at least 1, got 0" in result.stderr
