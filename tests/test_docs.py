"""The docs' configuration examples are complete files that `crossroads check` accepts, so they cannot go stale."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import CROSSROADS, ENV

DOCS = Path(__file__).resolve().parent.parent / "docs"
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)
# Stand-ins shaped like what a bridge checks them against (Slack's tokens name their kind in a prefix).
STAND_INS = {"SLACK_BOT_TOKEN": "xoxb-stand-in", "slack-app-token": "xapp-stand-in"}


def toml_examples(page: str) -> list[pytest.param]:
    text = (DOCS / page).read_text()
    return [pytest.param(match.group(1), id=f"{page}:{text.count(chr(10), 0, match.start()) + 1}")
            for match in TOML_BLOCK.finditer(text)]


def check_example(tmp_path: Path, example: str) -> subprocess.CompletedProcess:
    """`crossroads check` on ``example`` with whatever it refers to from outside the file made to exist."""
    (tmp_path / "crossroads.toml").write_text(example)
    environ = {**ENV, **{name: STAND_INS.get(name, "stand-in")
                         for name in re.findall(r"\$\{([A-Za-z_]\w*)\}", example)}}
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    environ["CREDENTIALS_DIRECTORY"] = str(credentials)
    for name in re.findall(r"\$\{credential:([^}]+)\}", example):
        (credentials / name).write_text(STAND_INS.get(name, "stand-in:stand-in"))  # or a user:password line
    for app in re.findall(r'^app = "([\w.]+):(\w+)"', example, re.MULTILINE):
        # the user's router, in the module the example names, next to the config: it answers the requests
        # peers wait on (a table without them is warned about, rightly)
        module = tmp_path.joinpath(*app[0].split("."))
        for package in [tmp_path.joinpath(*app[0].split(".")[:i]) for i in range(1, app[0].count(".") + 1)]:
            package.mkdir(exist_ok=True)
            (package / "__init__.py").touch()
        module.with_suffix(".py").write_text(
            "from crossroads import route\n\n\ndef answer(message):\n    pass\n\n\n"
            f"{app[1]} = [route(channel, answer) for channel in ('http.request', 'websocket.connect')]\n")
    for settings in re.findall(r'^settings = "([\w.]+)"', example, re.MULTILINE):
        # a [django] table's project: the least settings Django sets up with
        for package in [tmp_path.joinpath(*settings.split(".")[:i]) for i in range(1, settings.count(".") + 1)]:
            package.mkdir(exist_ok=True)
            (package / "__init__.py").touch()
        tmp_path.joinpath(*settings.split(".")).with_suffix(".py").write_text('SECRET_KEY = "stand-in"\n')
    return subprocess.run([CROSSROADS, "check", "--config", str(tmp_path / "crossroads.toml")], capture_output=True,
                          text=True, timeout=60, env=environ, cwd=tmp_path)


PAGES = ["configuration.md", "running.md", "chat.md", "django.md", "spec/http.md", "spec/websocket.md", "spec/mqtt.md",
         "spec/irc.md", "spec/email.md", "spec/slack.md"]


@pytest.mark.parametrize("example", [example for page in PAGES for example in toml_examples(page)])
def test_configuration_examples_pass_check(tmp_path, example):
    result = check_example(tmp_path, example)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr


def test_a_stale_example_fails(tmp_path):
    """The check above can fail: an example naming a bridge type that does not exist is refused."""
    result = check_example(tmp_path, '[bridges.team]\ntype = "xmpp"\npassword = "${XMPP_PASSWORD}"\n')
    assert result.returncode == 2 and "[bridges.team]: unknown bridge type 'xmpp'" in result.stderr


def test_the_consumer_and_its_test_in_consumers_md_work(tmp_path, monkeypatch):
    """docs/consumers.md's first example, tested by its own "Testing consumers" example, as the page shows."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "consumers.md").read_text(), re.DOTALL | re.MULTILINE)
    consumers = next(block for block in blocks if block.startswith("# myapp/consumers.py"))
    test = next(block for block in blocks if "def test_chat" in block)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").touch()
    (tmp_path / "myapp" / "consumers.py").write_text(consumers)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    try:
        exec(compile(test, "docs/consumers.md", "exec"), namespace)
        namespace["test_chat"]()
    finally:
        for name in ("myapp", "myapp.consumers"):
            sys.modules.pop(name, None)
