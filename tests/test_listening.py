"""bridges/listening.py: the one way HTTP and WebSocket bridges (and every later listening bridge) listen.

Listening itself is tested through the bridges, with real clients: TCP, Unix
sockets, TLS and systemd socket activation in tests/test_http_bridge.py and
tests/test_websocket_bridge.py. Here: that both declare the same options and
fail with the same errors, from ``crossroads check`` as well as at start.
"""

from __future__ import annotations

import pytest
from test_cli import run as run_cli
from test_cli import write_config

from crossroads import layer
from crossroads.bridges.base import OptionError
from crossroads.bridges.http.bridge import HttpBridge
from crossroads.bridges.listening import FD_RESERVE, ListeningBridge, connection_cap, listen_options
from crossroads.bridges.websocket.bridge import WebsocketBridge

LISTENING = [HttpBridge, WebsocketBridge]
LISTEN_KEYS = set(listen_options(0))


def test_the_listening_options():
    assert LISTEN_KEYS == {"host", "port", "unix_socket", "systemd_socket", "tls_cert", "tls_key", "backlog",
                           "max_connections"}


def test_max_connections_is_lowered_to_what_the_open_files_limit_leaves_room_for():
    assert connection_cap({"max_connections": 10_000}, soft=65536) == (10_000, None)
    cap, why = connection_cap({"max_connections": 10_000}, soft=1024)
    assert cap == 1024 - FD_RESERVE
    assert "open-files limit (1024)" in why and "LimitNOFILE" in why and "max_connections" in why


@pytest.mark.parametrize("bridge", LISTENING)
def test_every_listening_bridge_declares_the_same_options(bridge):
    assert issubclass(bridge, ListeningBridge)
    default_port = bridge.OPTIONS["port"].default
    assert {key: bridge.OPTIONS[key] for key in LISTEN_KEYS} == listen_options(default_port)


def test_the_default_ports_stay_as_they_were():
    assert (HttpBridge.OPTIONS["port"].default, WebsocketBridge.OPTIONS["port"].default) == (8000, 8001)


@pytest.mark.parametrize("bridge", LISTENING)
@pytest.mark.parametrize("given, missing", [({"tls_cert": "/etc/cert.pem"}, "tls_key"),
                                            ({"tls_key": "/etc/key.pem"}, "tls_cert")])
def test_one_tls_file_without_the_other_is_refused_naming_the_missing_one(bridge, given, missing):
    with pytest.raises(OptionError) as raised:
        bridge.validate_options(given)
    assert raised.value.key == missing
    assert raised.value.problem == "tls_cert and tls_key go together: set both to serve TLS, or neither"
    with pytest.raises(OptionError, match=f"^{missing}: tls_cert and tls_key go together"):
        bridge("b", given, layer.from_url("memory://"))


@pytest.mark.parametrize("bridge", LISTENING)
@pytest.mark.parametrize("options, key, problem", [
    ({"port": 65536}, "port", "must be a TCP port number from 0 to 65535"),
    ({"port": "eighty"}, "port", "must be a whole number"),
    ({"backlog": 0}, "backlog", "must be more than 0"),
    ({"unix_socket": 5}, "unix_socket", "must be a string"),
    ({"systemd_socket": ["web"]}, "systemd_socket", "must be a string"),
])
def test_each_listening_option_is_checked_alike(bridge, options, key, problem):
    with pytest.raises(OptionError, match=f"^{key}: {problem}"):
        bridge.validate_options(options)


def test_the_defaults_listen_on_loopback_with_a_deep_queue():
    options = WebsocketBridge.validate_options({})
    assert {key: options[key] for key in LISTEN_KEYS} == {
        "host": "127.0.0.1", "port": 8001, "unix_socket": "", "systemd_socket": "", "tls_cert": "", "tls_key": "",
        "backlog": 1024, "max_connections": 10_000}
    assert WebsocketBridge.validate_options({"backlog": "64", "port": "0"})["backlog"] == 64  # "${...}" values


def test_crossroads_check_names_a_half_tls_pair_in_either_bridge(tmp_path):
    config = write_config(tmp_path, """[layer]
url = "memory://"

[bridges.web]
type = "http"
tls_key = "/etc/key.pem"

[bridges.sockets]
type = "websocket"
unix_socket = "/run/crossroads/ws.sock"
tls_cert = "/etc/cert.pem"
""")
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 2, result.stdout
    assert "[bridges.web] tls_cert: tls_cert and tls_key go together" in result.stderr
    assert "[bridges.sockets] tls_key: tls_cert and tls_key go together" in result.stderr
    assert "Traceback" not in result.stderr
