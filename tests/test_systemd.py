"""Unit files: what `crossroads systemd` writes, checked by systemd's own `systemd-analyze verify`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from servers import require_binary
from test_cli import run, write_config

from crossroads.systemd import (
    LISTENING_NOFILE,
    credentials_used,
    hidden_by,
    interpreter_of,
    render_units,
    unreadable_by_others,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


def verify(directory: Path, names: list[str]) -> str:
    """systemd-analyze's complaints about the units (it exits 0 on most of them, so read its output)."""
    result = subprocess.run([require_binary("systemd-analyze"), "verify", "--man=no", *names], cwd=directory,
                            capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f" (exit {result.returncode})")


def test_deploy_templates_are_the_rendered_defaults():
    for name, text in render_units().items():
        assert (DEPLOY / name).read_text() == text, f"deploy/systemd/{name} is stale: rerun the render"


def test_credentials_are_found_in_the_config():
    text = 'a = "${credential:redis-password}"\nb = "$${credential:literal}"\nc = "${credential:irc}${X}"\n'
    assert credentials_used(text) == ["irc", "redis-password"]


def test_systemd_command_writes_units_systemd_accepts(tmp_path, redis_server):
    config = write_config(tmp_path, f"""
[layer]
url = "{redis_server.url}"
symmetric_encryption_keys = ["${{credential:layer-key}}"]
[routing]
app = "apps.toy_echo:routes"
[bridges.toy]
type = "toy_bridge:ToyBridge"
[bridges.spare]
type = "toy_bridge:ToyBridge"
enabled = false
""")
    out = tmp_path / "units"
    result = run("systemd", "--config", str(config), "--output", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    target = (out / "crossroads.target").read_text()
    assert ("Wants=crossroads-bridge@toy.service crossroads-worker@1.service crossroads-worker@2.service"
            in target)
    bridge = (out / "crossroads-bridge@.service").read_text()
    assert "Type=notify" in bridge and "Restart=on-failure" in bridge and "DynamicUser=yes" in bridge
    assert f"bridge %i --config {config}" in bridge
    assert "LoadCredential=layer-key:/etc/crossroads/credentials/layer-key" in bridge
    assert "systemctl enable --now crossroads.target crossroads-bridge@toy.service" in result.stdout
    # instances, as systemd will load them, must verify without a single complaint
    for instance, template in [("crossroads-bridge@toy.service", "crossroads-bridge@.service"),
                               ("crossroads-worker@1.service", "crossroads-worker@.service")]:
        (out / instance).write_text((out / template).read_text())
    assert verify(out, ["crossroads-bridge@toy.service", "crossroads-worker@1.service", "crossroads.service",
                        "crossroads.target"]) == ""


def test_a_memory_layer_gets_the_all_in_one_unit(tmp_path):
    config = write_config(tmp_path, '[routing]\napp = "apps.toy_echo:routes"\n')
    result = run("systemd", "--config", str(config), "--output", str(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    assert "Wants=crossroads.service" in (tmp_path / "units" / "crossroads.target").read_text()


def test_listening_bridges_get_more_file_descriptors_and_hidden_paths_are_named(tmp_path):
    (tmp_path / "mqtt-password").write_text("secret")
    config = write_config(tmp_path, """
[layer]
url = "redis://127.0.0.1:6379/0"
[routing]
app = "apps.toy_echo:routes"
[bridges.web]
type = "http"
port = 8000
websocket = "sockets"
[bridges.sockets]
type = "websocket"
[bridges.broker]
type = "mqtt"
broker = "mqtt://127.0.0.1"
password = "${file:mqtt-password}"
ca_file = "/root/ca.pem"
""")
    out = tmp_path / "units"
    result = run("systemd", "--config", str(config), "--output", str(out))
    assert result.returncode == 0, result.stderr
    # the HTTP bridge (and the WebSocket bridge on its port) takes clients; the MQTT bridge is one client itself
    assert (out / "crossroads-bridge@web.service.d" / "limits.conf").read_text() == \
        f"[Service]\nLimitNOFILE={LISTENING_NOFILE}\n"
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["crossroads-bridge@web.service.d"]
    assert f"cp -r {out}/crossroads* /etc/systemd/system/" in result.stdout
    # tmp_path is under /tmp, which PrivateTmp=yes replaces; /root is hidden by ProtectHome=yes
    assert f"--config (and the modules next to it) is {config}, which the units' PrivateTmp=yes hides" in result.stderr
    assert f"${{file:mqtt-password}} is {tmp_path / 'mqtt-password'}, which the units' PrivateTmp=yes" in result.stderr
    assert "[bridges.broker] ca_file is /root/ca.pem, which the units' ProtectHome=yes hides" in result.stderr
    assert "a virtualenv under /opt, or system-wide" in result.stderr
    (out / "crossroads-bridge@web.service").write_text((out / "crossroads-bridge@.service").read_text())
    assert verify(out, ["crossroads-bridge@web.service"]) == ""


def test_an_all_in_one_unit_that_listens_gets_more_file_descriptors(tmp_path):
    config = write_config(tmp_path, '[bridges.web]\ntype = "http"\nport = 8000\n')
    result = run("systemd", "--config", str(config), "--output", str(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    drop_in = tmp_path / "units" / "crossroads.service.d" / "limits.conf"
    assert f"LimitNOFILE={LISTENING_NOFILE}" in drop_in.read_text()


def test_limit_nofile_makes_room_for_max_connections(tmp_path):
    config = write_config(tmp_path, '[layer]\nurl = "redis://127.0.0.1:6379/0"\n[bridges.web]\ntype = "http"\n'
                                    'max_connections = 100000\nwebsocket = "ws"\n[bridges.ws]\ntype = "websocket"\n'
                                    'max_connections = "5000"\n')
    result = run("systemd", "--config", str(config), "--output", str(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    drop_in = tmp_path / "units" / "crossroads-bridge@web.service.d" / "limits.conf"
    assert drop_in.read_text() == "[Service]\nLimitNOFILE=106024\n"  # both bridges' clients, and 1,024 besides


def test_what_the_sandbox_hides_and_what_a_dynamic_user_cannot_read(tmp_path):
    assert hidden_by(Path("/root/crossroads/.venv/bin/crossroads")) == "ProtectHome=yes"
    assert hidden_by(Path("/home/ann/crossroads.toml")) == "ProtectHome=yes"
    assert hidden_by(Path("/tmp/crossroads.toml")) == "PrivateTmp=yes"
    assert hidden_by(Path("/var/tmp/x")) == "PrivateTmp=yes"
    assert hidden_by(Path("/opt/crossroads/bin/crossroads")) is None
    assert hidden_by(Path("/etc/crossroads/crossroads.toml")) is None
    # a path that reaches a hidden folder only through a symlink (/usr/local/bin/crossroads -> /root/...)
    (tmp_path / "in-tmp").symlink_to("/tmp")
    assert hidden_by(Path("/etc") / ".." / tmp_path.relative_to("/") / "in-tmp" / "x") == "PrivateTmp=yes"
    assert unreadable_by_others(Path("/usr/bin/env")) is None
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    assert unreadable_by_others(secret) in [secret, *secret.parents]


def test_the_python_a_console_script_starts_is_checked_too(tmp_path):
    """A virtualenv made from pyenv's Python under /root links to it: the unit could not run it."""
    script = tmp_path / "crossroads"
    script.write_text("#!/root/.pyenv/versions/3.11.7/bin/python3.11\nimport sys\n")
    assert interpreter_of(script) == {"the Python it starts": Path("/root/.pyenv/versions/3.11.7/bin/python3.11")}
    assert hidden_by(interpreter_of(script)["the Python it starts"]) == "ProtectHome=yes"
    (tmp_path / "binary").write_bytes(b"\x7fELF\x02")
    assert interpreter_of(tmp_path / "binary") == {} and interpreter_of(tmp_path / "missing") == {}


def test_every_service_has_a_watchdog_the_daemons_feed():
    """WatchdogSec= makes systemd restart a daemon that stops sending WATCHDOG=1 (tests/test_operations.py shows a
    daemon stops when its loop or its worker threads hang)."""
    for name, text in render_units().items():
        if name.endswith(".service"):
            assert "\nWatchdogSec=30\n" in text and "\nType=notify\n" in text, name


def test_each_instance_gets_a_metrics_port_of_its_own(tmp_path, redis_server):
    """One config for every unit, a port per process: drop-ins set CROSSROADS_METRICS_LISTEN, counted up from
    [metrics] listen (tests/test_operations.py shows a daemon serving where that variable says)."""
    config = write_config(tmp_path, f"""
[layer]
url = "{redis_server.url}"
[routing]
app = "apps.toy_echo:routes"
[metrics]
listen = "127.0.0.1:9464"
[bridges.one]
type = "toy_bridge:ToyBridge"
[bridges.two]
type = "toy_bridge:ToyBridge"
""")
    out = tmp_path / "units"
    result = run("systemd", "--config", str(config), "--output", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr
    expected = {"crossroads-bridge@one.service": 9464, "crossroads-bridge@two.service": 9465,
                "crossroads-worker@1.service": 9466, "crossroads-worker@2.service": 9467}
    for instance, port in expected.items():
        assert (out / f"{instance}.d" / "metrics.conf").read_text() == \
            f"[Service]\nEnvironment=CROSSROADS_METRICS_LISTEN=127.0.0.1:{port}\n"
        assert f"{instance} serves /metrics on http://127.0.0.1:{port}/metrics" in result.stdout
    for instance, template in [("crossroads-bridge@one.service", "crossroads-bridge@.service")]:
        (out / instance).write_text((out / template).read_text())
    assert verify(out, ["crossroads-bridge@one.service"]) == ""
