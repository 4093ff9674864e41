"""Unit files: what `crossroads systemd` writes, checked by systemd's own `systemd-analyze verify`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from servers import require_binary
from test_cli import run, write_config

from crossroads.systemd import credentials_used, render_units

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
