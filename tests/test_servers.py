"""The promise of tests/servers.py that CI relies on: a test whose server is not installed fails, naming the
binary and the command that installs it; it never skips (run as a user would, in a pytest of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_missing_server_binary_fails_the_test_naming_it(tmp_path):
    (tmp_path / "test_needs_redis.py").write_text(
        "from servers import RedisServer\n\n\n"
        "def test_needs_redis(tmp_path):\n"
        "    RedisServer(tmp_path).start()\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "test_needs_redis.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": str(empty), "PYTHONPATH": str(TESTS)})
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert "redis-server is not installed" in result.stdout, result.stdout
    assert "apt-get install -y redis-server" in result.stdout, result.stdout
