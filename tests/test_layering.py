"""The layering contracts (setup.cfg's [importlinter] sections) hold for the tree, and each one breaks
when a module crosses it: tests/lint_imports.py, which `make test` runs, is run on a copy of the
package with one forbidden import added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = REPO / "tests" / "lint_imports.py"


def package_copy(tmp_path: Path) -> Path:
    """What setup.cfg needs to lay the package out: its metadata and the four package folders."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, copy / name)
    for folder in ("crossroads", "layer", "consumers", "bridges"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def lint(repository: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LINT), str(repository)], capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract(tmp_path):
    result = lint(package_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract", "shown"), [
    ("layer/memory.py", "from crossroads.consumers import channel", "Layers:",
     "crossroads.layer.memory -> crossroads.consumers.channel"),
    ("layer/base.py", "from crossroads import config", "Layers:",
     "crossroads.layer.base -> crossroads.config"),
    ("bridges/http/bridge.py", "from crossroads.consumers import routing", "Layers:",
     "crossroads.bridges.http.bridge -> crossroads.consumers.routing"),
    ("consumers/worker.py", "from crossroads.bridges import base", "Layers:",
     "crossroads.consumers.worker -> crossroads.bridges.base"),
    ("bridges/irc/messages.py", "import twisted.internet", "Pure protocol code:",
     "crossroads.bridges.irc.messages -> twisted"),
    ("bridges/websocket/messages.py", "from crossroads.layer import base", "Pure protocol code:",
     "crossroads.bridges.websocket.messages -> crossroads.layer.base"),
])
def test_a_forbidden_import_breaks_its_contract_with_import_linters_message(tmp_path, module, line, contract, shown):
    copy = package_copy(tmp_path)
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # the forbidden import\n")
    result = lint(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [text for text in result.stdout.splitlines() if text.endswith(" BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), result.stdout
    assert shown in result.stdout
