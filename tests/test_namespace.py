"""One namespace: everything of ours imports as ``crossroads.*``, so a user's project with its own
``consumers.py``, ``layer.py`` and ``bridges.py`` (the Channels convention; many Django projects have all
three) runs under ``crossroads run`` and ``crossroads worker``, and a built wheel installs ``crossroads``
alone at the top level."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request
import zipfile
from pathlib import Path

import pytest
from servers import free_port, wait_for_port
from test_cli import ENV
from test_daemons import Daemon
from test_layering import package_copy

# A user's project: its consumers import its own layer.py and bridges.py by their bare names, as a
# Django project's would. Had crossroads imported bare ``layer`` or ``consumers`` anywhere, it would
# have found these (no from_url, no Router) and failed, or the user's import would have found ours.
USER_LAYER = 'GREETING = "hello from the user\'s own layer.py"\n'
USER_BRIDGES = 'def shout(text):\n    return text.upper() + " (the user\'s own bridges.py)"\n'
USER_CONSUMERS = '''\
from bridges import shout
from layer import GREETING

from crossroads import route


def hello(message):
    message.reply_channel.send({"status": 200, "text": GREETING})


def loud(message):
    message.reply_channel.send({"text": shout(message.content["text"])})


routes = [route("http.request", hello), route("user.loud", loud)]
'''
USER_TEST = '''\
from consumers import routes

from crossroads.testing import Client


def test_the_users_consumers_under_the_test_client():
    client = Client(routes)
    client.send_and_consume("http.request", {"path": "/", "method": "GET"})
    assert client.receive()["text"] == "hello from the user's own layer.py"
    client.send_and_consume("user.loud", {"text": "hi"})
    assert client.receive()["text"] == "HI (the user's own bridges.py)"
'''


def user_project(folder: Path, layer_table: str, port: int) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "consumers.py").write_text(USER_CONSUMERS)
    (folder / "layer.py").write_text(USER_LAYER)
    (folder / "bridges.py").write_text(USER_BRIDGES)
    config = folder / "crossroads.toml"
    config.write_text(f'{layer_table}\n[routing]\napp = "consumers:routes"\n\n'
                      f'[bridges.web]\ntype = "http"\nhost = "127.0.0.1"\nport = {port}\n')
    return config


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
        return response.read().decode()


def test_crossroads_run_serves_a_project_with_its_own_consumers_layer_and_bridges_modules(tmp_path, daemons):
    port = free_port()
    config = user_project(tmp_path / "mysite", "", port)
    daemon = Daemon(tmp_path / "mysite", "run", "run", "--config", str(config))
    daemons.append(daemon)
    daemon.wait_ready()
    wait_for_port(port, daemon.process)
    assert get(port) == "hello from the user's own layer.py"
    daemon.terminate()


def test_crossroads_worker_runs_the_projects_consumers_over_redis(tmp_path, redis_server, daemons):
    port = free_port()
    config = user_project(tmp_path / "mysite", f'[layer]\nurl = "{redis_server.url}"\nprefix = "namespace"', port)
    bridge = Daemon(tmp_path / "mysite", "bridge", "bridge", "web", "--config", str(config))
    worker = Daemon(tmp_path / "mysite", "worker", "worker", "--config", str(config))
    daemons += [bridge, worker]
    bridge.wait_ready()
    worker.wait_ready()
    wait_for_port(port, bridge.process)
    assert get(port) == "hello from the user's own layer.py"
    bridge.terminate()
    worker.terminate()


def test_the_projects_consumers_pass_their_own_tests_with_the_test_client(tmp_path):
    project = tmp_path / "mysite"
    user_project(project, "", free_port())
    (project / "test_consumers.py").write_text(USER_TEST)
    (project / "pytest.ini").write_text("[pytest]\n")
    # The user's folder alone on the path, as in their own project: none of our tests/ helpers.
    env = {name: value for name, value in ENV.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_consumers.py"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this tree, as `pip wheel .` builds it for a user (build isolation and all).

    Built from a copy of the package's files: setuptools reuses a build/ folder it finds, which in a working
    tree may still hold modules since deleted."""
    source = package_copy(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (found,) = out.glob("crossroads-*.whl")
    return found


def test_a_built_wheel_holds_crossroads_alone_at_the_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"crossroads", f"{wheel.name.split('-py3')[0]}.dist-info"}
    for module in ("crossroads/layer/redis.py", "crossroads/consumers/worker.py", "crossroads/bridges/base.py",
                   "crossroads/bridges/http/messages.py", "crossroads/bridges/mqtt/packets.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "http = crossroads.bridges.http.bridge:HttpBridge" in entry_points


def test_the_wheel_installed_into_a_fresh_virtualenv_imports_only_as_crossroads(wheel, tmp_path):
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Not editable, and no dependencies fetched: the test's own environment lends them (its site-packages on
    # PYTHONPATH, where its editable install's finder is not loaded, since .pth files work only in site dirs).
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lent = next(Path(path) for path in sys.path if path.endswith("site-packages"))
    script = textwrap.dedent("""
        import importlib.util, sys, sysconfig
        from pathlib import Path
        import crossroads.layer, crossroads.consumers, crossroads.bridges.http.bridge
        from crossroads import Group, route
        site = Path(sysconfig.get_paths()["purelib"])
        assert Path(crossroads.layer.__file__).is_relative_to(site), crossroads.layer.__file__
        tops = sorted(p.name for p in site.iterdir() if p.name.startswith(("crossroads", "layer", "consumers",
                                                                            "bridges")))
        print(tops)
        print([name for name in ("layer", "consumers", "bridges") if importlib.util.find_spec(name)])
    """)
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**ENV, "PYTHONPATH": str(lent)})
    assert result.returncode == 0, result.stderr
    tops, bare = result.stdout.splitlines()
    assert tops == "['crossroads', 'crossroads-0.1.0.dist-info']"
    assert bare == "[]"


def test_the_public_names_come_from_crossroads_and_a_bridge_process_does_not_load_the_consumer_runtime():
    script = textwrap.dedent("""
        import sys
        from crossroads import layer
        import crossroads.bridges.http.bridge
        print("crossroads.consumers" in sys.modules)
        names = {}
        exec("from crossroads import *", names)
        import crossroads.consumers
        print(sorted(name for name in names if not name.startswith("_")) == sorted(crossroads.consumers.__all__))
        from crossroads import Group, route
        print(Group is crossroads.consumers.Group and route is crossroads.consumers.route)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]
