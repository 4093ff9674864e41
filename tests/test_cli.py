"""The `crossroads` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from servers import free_port

CROSSROADS = shutil.which("crossroads", path=str(Path(sys.executable).parent)) or "crossroads"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CROSSROADS, *args], capture_output=True, text=True, timeout=60)


def test_help_names_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for word in ("run", "layer", "--layer"[2:], "CROSSROADS_LAYER"):
        assert word in result.stdout


def test_layer_check_against_memory_and_redis(redis_server):
    result = run("layer", "check")
    assert result.returncode == 0 and "memory://: ok" in result.stdout
    result = run("layer", "check", "--layer", redis_server.url)
    assert result.returncode == 0 and "ok, a message went there and back" in result.stdout


def test_layer_check_says_what_to_do_when_redis_is_down():
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run("layer", "check", "--layer", url)
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "is redis-server running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_scheme_is_a_one_line_error():
    result = run("layer", "check", "--layer", "amqp://x")
    assert result.returncode != 0
    assert "unknown layer URL" in result.stderr and "Traceback" not in result.stderr


def test_layer_stats_is_json(redis_server):
    import json

    result = run("layer", "stats", "--layer", redis_server.url)
    assert result.returncode == 0
    assert {"pending", "sent", "received", "dropped"} <= set(json.loads(result.stdout))
