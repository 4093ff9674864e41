"""The promise of tests/servers.py that CI relies on: a test whose server is not installed fails, naming the
binary and the command that installs it; it never skips (run as a user would, in a pytest of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_without_servers(tmp_path: Path, test: str) -> str:
    """pytest on one test file (``test``, its source) with no server binary reachable; its report."""
    (tmp_path / "test_needs_a_server.py").write_text(test)
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                             "test_needs_a_server.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": str(empty), "PYTHONPATH": str(TESTS)})
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout and "skipped" not in result.stdout, result.stdout
    return result.stdout


def test_a_missing_server_binary_fails_the_test_naming_it(tmp_path):
    report = run_without_servers(tmp_path, "from servers import RedisServer\n\n\n"
                                           "def test_needs_redis(tmp_path):\n"
                                           "    RedisServer(tmp_path).start()\n")
    assert "redis-server is not installed" in report, report
    assert "apt-get install -y redis-server" in report, report


def test_a_missing_postgresql_fails_naming_it(tmp_path):
    """Debian's PostgreSQL programs are found off PATH, in /usr/lib/postgresql/VERSION/bin: with neither there."""
    report = run_without_servers(tmp_path, "from pathlib import Path\n\nimport servers\n\n\n"
                                           "def test_needs_postgres(tmp_path):\n"
                                           "    servers.POSTGRES_LIB = tmp_path / 'none'\n"
                                           "    servers.PostgresServer(tmp_path).start()\n")
    assert "postgres is not installed" in report, report
    assert "apt-get install -y postgresql" in report, report
