"""crossroads.toml: defaults, interpolation, every validation problem, secret warnings, the bridge hook."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from crossroads import layer
from crossroads.config import (
    DEFAULT_THREADS,
    BridgeConfig,
    Config,
    ConfigError,
    LayerConfig,
    Problem,
    WorkerConfig,
    load_config,
)


def write(directory: Path, text: str, name: str = "crossroads.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, text: str, environ: dict | None = None, **kwargs) -> Config:
    return load_config(write(directory, text), environ=environ or {}, **kwargs)


def problems(directory: Path, text: str, environ: dict | None = None, **kwargs) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load(directory, text, environ, **kwargs)
    assert str(caught.value) == "\n".join(str(problem) for problem in caught.value.problems)
    return caught.value.problems


def only_problem(directory: Path, text: str, environ: dict | None = None, **kwargs) -> Problem:
    found = problems(directory, text, environ, **kwargs)
    assert len(found) == 1, found
    return found[0]


# -- defaults and the file itself --


def test_no_file_in_the_working_directory_gives_the_defaults_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.path is None
    assert config.layer == LayerConfig("memory://", {})
    assert config.routing_app is None
    assert config.worker == WorkerConfig(threads=DEFAULT_THREADS, only_channels=None, exclude_channels=())
    assert config.bridges == {} and config.enabled_bridges() == []
    [warning] = config.warnings
    assert "crossroads.toml" in warning and "not found" in warning and "defaults" in warning


def test_the_file_in_the_working_directory_is_read_when_no_path_is_given(tmp_path, monkeypatch):
    write(tmp_path, '[routing]\napp = "chat.routing:router"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.path == Path("crossroads.toml")
    assert config.routing_app == "chat.routing:router"
    assert config.warnings == []


def test_an_explicit_path_that_does_not_exist_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "etc" / "gateway.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, environ={})
    [problem] = caught.value.problems
    assert problem.file == str(missing)
    assert "no such file" in problem.message and "create it" in problem.message
    assert "docs/configuration.md" in problem.message


def test_an_empty_file_gives_the_defaults_without_warnings(tmp_path):
    path = write(tmp_path, "")
    config = load_config(path, environ={})
    assert config == Config(path=path)
    assert config.warnings == []


def test_a_full_file(tmp_path):
    config = load(tmp_path, """
        [layer]
        url = "redis://127.0.0.1:6379/0"
        capacity = 200
        channel_capacity = { "http.response!*" = 50, "chat.*" = 1000 }
        expiry = 30
        group_expiry = 3600.5
        prefix = "gateway-1"

        [routing]
        app = "myproject.routing:router"

        [worker]
        threads = 8
        only_channels = ["chat.*", "http.request"]
        exclude_channels = ["chat.debug"]

        [bridges.web]
        type = "http"
        port = 8000

        [bridges.freenode]
        type = "irc"
        enabled = false
        server = "irc.example.org"
        channels = ["#chat"]

        [bridges.sensors]
        type = "acme_bridges.modbus"
        poll = { seconds = 5 }
    """)
    assert config.layer.url == "redis://127.0.0.1:6379/0"
    assert config.layer.options == {
        "capacity": 200,
        "channel_capacity": {"http.response!*": 50, "chat.*": 1000},
        "expiry": 30,
        "group_expiry": 3600.5,
        "prefix": "gateway-1",
    }
    assert config.routing_app == "myproject.routing:router"
    assert config.worker == WorkerConfig(8, ("chat.*", "http.request"), ("chat.debug",))
    assert list(config.bridges) == ["web", "freenode", "sensors"]
    assert config.bridges["web"] == BridgeConfig("web", "http", True, {"port": 8000})
    assert config.bridges["freenode"].options == {"server": "irc.example.org", "channels": ["#chat"]}
    assert config.bridges["sensors"].type == "acme_bridges.modbus"  # a third party's type is accepted as given
    assert [bridge.name for bridge in config.enabled_bridges()] == ["web", "sensors"]
    assert config.warnings == []


def test_worker_pools_prefetch_and_slow_consumer(tmp_path):
    config = load(tmp_path, """
        [worker]
        threads = 2
        prefetch = 1
        slow_consumer = 2.5
        pools = { slow = { channels = ["http.request"], threads = 4 }, mail = { channels = ["email.*"], threads = 1 } }
    """)
    assert config.worker.pools == {"slow": (("http.request",), 4), "mail": (("email.*",), 1)}
    assert (config.worker.threads, config.worker.prefetch, config.worker.slow_consumer) == (2, 1, 2.5)
    assert load(tmp_path, "[worker]\nslow_consumer = 0\n").worker.slow_consumer is None  # 0: never report
    defaults = load(tmp_path, "").worker
    assert (defaults.pools, defaults.prefetch, defaults.slow_consumer) == ({}, 64, 10.0)


def test_layer_options_hold_only_the_keys_given_so_the_layer_keeps_its_own_defaults(tmp_path):
    config = load(tmp_path, "[layer]\ncapacity = 5\n")
    assert config.layer == LayerConfig("memory://", {"capacity": 5})


@pytest.mark.parametrize("url, extra", [
    ("memory://", ""),
    ("redis://a:6379/0", 'hosts = ["redis://a:6379/0", "rediss://b:6380/1"]\nsymmetric_encryption_keys = ["${KEY}"]'),
])
def test_the_layer_options_are_what_layer_from_url_takes(tmp_path, url, extra):
    config = load(tmp_path, f"""
        [layer]
        url = "{url}"
        capacity = 10
        channel_capacity = {{ "http.response!*" = 5 }}
        expiry = 2.5
        group_expiry = 600
        prefix = "test"
        {extra}
    """, {"KEY": "k"})
    channel_layer = layer.from_url(config.layer.url, **config.layer.options)  # constructing it connects nowhere
    assert channel_layer.options.capacity_for("http.response!abc") == 5
    assert channel_layer.options.expiry == 2.5


def test_hosts_without_url_make_the_first_host_the_url(tmp_path):
    config = load(tmp_path, '[layer]\nhosts = ["redis://a:6379/0", "redis://b:6379/0"]\n')
    assert config.layer.url == "redis://a:6379/0"
    assert config.layer.options == {"hosts": ["redis://a:6379/0", "redis://b:6379/0"]}


def test_encryption_keys_pass_through_for_redis(tmp_path):
    config = load(tmp_path, """
        [layer]
        url = "rediss://cache.example:6380/1"
        symmetric_encryption_keys = ["${NEW_KEY}", "${OLD_KEY}"]
    """, {"NEW_KEY": "new", "OLD_KEY": "old"})
    assert config.layer.options == {"symmetric_encryption_keys": ["new", "old"]}


def test_a_unix_socket_layer_url_is_accepted(tmp_path):
    assert load(tmp_path, '[layer]\nurl = "unix:///run/redis/redis.sock?db=2"\n').layer.url.startswith("unix://")


def test_repr_hides_passwords_and_bridge_options(tmp_path):
    config = load(tmp_path, """
        [layer]
        url = "redis://:${PW}@localhost:6379/0"
        [bridges.irc]
        type = "irc"
        password = "${PW}"
    """, {"PW": "hunter2"})
    assert config.layer.url == "redis://:hunter2@localhost:6379/0"
    assert config.bridges["irc"].options == {"password": "hunter2"}
    assert "hunter2" not in repr(config)


# -- interpolation --


def test_environment_variables_anywhere_in_the_file(tmp_path):
    config = load(tmp_path, """
        [layer]
        url = "redis://:${REDIS_PASSWORD}@${REDIS_HOST}:6379/0"
        [bridges.irc]
        type = "${IRC_TYPE}"
        channels = ["#${ROOM}", "#ops"]
        nickserv = { password = "${IRC_PASSWORD}" }
    """, {"REDIS_PASSWORD": "pw", "REDIS_HOST": "cache", "IRC_TYPE": "irc", "ROOM": "chat", "IRC_PASSWORD": "x"})
    assert config.layer.url == "redis://:pw@cache:6379/0"
    assert config.bridges["irc"].type == "irc"
    assert config.bridges["irc"].options == {"channels": ["#chat", "#ops"], "nickserv": {"password": "x"}}
    assert config.warnings == []


def test_an_empty_environment_variable_is_a_value(tmp_path):
    config = load(tmp_path, '[bridges.irc]\ntype = "irc"\nsuffix = "${EMPTY}"\n', {"EMPTY": ""})
    assert config.bridges["irc"].options == {"suffix": ""}


def test_the_environment_defaults_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSROADS_TEST_APP", "chat.routing:router")
    config = load_config(write(tmp_path, '[routing]\napp = "${CROSSROADS_TEST_APP}"\n'))
    assert config.routing_app == "chat.routing:router"


def test_escapes_and_lone_dollars_stay_literal(tmp_path):
    config = load(tmp_path, """
        [bridges.irc]
        type = "irc"
        greeting = "costs $5, see $${HOME} and $${X}${NAME}"
        dollars = "$$ and $"
    """, {"NAME": "bob", "HOME": "/root"})
    assert config.bridges["irc"].options == {"greeting": "costs $5, see ${HOME} and ${X}bob", "dollars": "$$ and $"}


def test_file_contents_relative_to_the_config_file_with_one_trailing_newline_stripped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's directory
    config_dir = tmp_path / "etc" / "crossroads"
    (config_dir / "secrets").mkdir(parents=True)
    (config_dir / "secrets" / "token").write_text("xoxb-1\n")
    (tmp_path / "absolute.txt").write_text("two lines\n\n")
    (tmp_path / "crlf.txt").write_bytes(b"windows\r\n")
    path = write(config_dir, f"""
        [bridges.slack]
        type = "slack"
        bot_token = "${{file:secrets/token}}"
        banner = "${{file:{tmp_path / 'absolute.txt'}}}"
        footer = "${{file:{tmp_path / 'crlf.txt'}}}"
    """)
    config = load_config(path, environ={})
    assert config.bridges["slack"].options == {"bot_token": "xoxb-1", "banner": "two lines\n", "footer": "windows"}


def test_systemd_credentials_are_read_from_the_credentials_directory(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "irc-password").write_text("s3cret\n")
    config = load(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "${credential:irc-password}"\n',
                  {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.bridges["irc"].options == {"password": "s3cret"}
    assert config.warnings == []


def test_a_resolved_value_is_not_interpolated_again(tmp_path):
    (tmp_path / "secret").write_text("ab${HOME}cd")
    config = load(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "${file:secret}"\nother = "${RAW}"\n',
                  {"RAW": "${HOME}", "HOME": "/root"})
    assert config.bridges["irc"].options == {"password": "ab${HOME}cd", "other": "${HOME}"}


def test_a_missing_environment_variable_names_file_table_key_variable_and_remedy(tmp_path):
    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "${IRC_PASSWORD}"\n')
    assert (problem.file, problem.table, problem.key) == (str(tmp_path / "crossroads.toml"), "bridges.irc", "password")
    assert "IRC_PASSWORD is not set" in problem.message
    assert "Environment=" in problem.message and "${credential:NAME}" in problem.message
    assert str(problem).startswith(f"{tmp_path / 'crossroads.toml'}: [bridges.irc] password: environment variable")


def test_a_missing_file_names_the_path_it_looked_for(tmp_path):
    problem = only_problem(tmp_path, '[layer]\nurl = "${file:layer-url.txt}"\n')
    assert (problem.table, problem.key) == ("layer", "url")
    assert str(tmp_path / "layer-url.txt") in problem.message and "no such file" in problem.message


def test_a_missing_credential_says_to_add_load_credential(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "${credential:irc-password}"\n',
                           {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert (problem.table, problem.key) == ("bridges.irc", "password")
    assert str(credentials) in problem.message
    assert "LoadCredential=irc-password:" in problem.message


def test_a_credential_without_a_credentials_directory_says_how_to_get_one(tmp_path):
    problem = only_problem(tmp_path, '[layer]\nurl = "redis://:${credential:redis}@h:6379/0"\n')
    assert (problem.table, problem.key) == ("layer", "url")
    assert "CREDENTIALS_DIRECTORY is not set" in problem.message
    assert "LoadCredential=redis:" in problem.message


@pytest.mark.parametrize("value, expected", [
    ("${}", "not a valid reference"),
    ("${NOT A NAME}", "not a valid reference"),
    ("${vault:db}", "unknown source 'vault'"),
    ("${UNCLOSED", "never closed"),
    ("${file:}", "names no file"),
    ("${credential:../etc/passwd}", "plain file name"),
])
def test_bad_references_are_problems(tmp_path, value, expected):
    problem = only_problem(tmp_path, f'[bridges.irc]\ntype = "irc"\nnick = "{value}"\n', {"CREDENTIALS_DIRECTORY": "/"})
    assert (problem.table, problem.key) == ("bridges.irc", "nick")
    assert expected in problem.message


def test_interpolated_numbers_and_booleans_are_converted_for_the_generic_keys(tmp_path):
    config = load(tmp_path, """
        [layer]
        capacity = "${CAPACITY}"
        expiry = "${EXPIRY}"
        [worker]
        threads = "${THREADS}"
        [bridges.irc]
        type = "irc"
        enabled = "${IRC_ENABLED}"
        port = "${IRC_PORT}"
    """, {"CAPACITY": "500", "EXPIRY": "2.5", "THREADS": " 16 ", "IRC_ENABLED": "no", "IRC_PORT": "6667"})
    assert config.layer.options == {"capacity": 500, "expiry": 2.5}
    assert config.worker.threads == 16
    assert config.bridges["irc"].enabled is False
    assert config.bridges["irc"].options == {"port": "6667"}  # a bridge's own keys are its validator's business


def test_a_quoted_literal_number_is_an_error_that_names_the_quotes(tmp_path):
    problem = only_problem(tmp_path, '[worker]\nthreads = "4"\n')
    assert problem.message == 'must be an integer of at least 1, got "4" (write it without quotes)'


def test_unresolved_hosts_do_not_make_the_layer_look_like_memory(tmp_path):
    text = '[layer]\nhosts = ["${REDIS_A}"]\nsymmetric_encryption_keys = ["${KEY}"]\n'
    found = problems(tmp_path, text, {"KEY": "k"})
    assert [(problem.key, "REDIS_A is not set" in problem.message) for problem in found] == [("hosts[0]", True)]


def test_a_failed_interpolation_is_reported_once(tmp_path):
    # The unresolved value is not checked again as "must be an integer, got ''".
    problem = only_problem(tmp_path, '[worker]\nthreads = "${THREADS}"\n')
    assert "THREADS is not set" in problem.message


# -- validation: every problem named with file, table and key --


@pytest.mark.parametrize("text, table, key, expected", [
    ('[layer]\nurl = "amqp://localhost"', "layer", "url", "must be memory://, redis://"),
    ('[layer]\nurl = 6379', "layer", "url", "must be a string, got 6379"),
    ('[layer]\nurl = "redis://localhost:99999/0"', "layer", "url", "bad port"),
    ('[layer]\nurl = "redis://localhost:6379/zero"', "layer", "url", "database number"),
    ('[layer]\nurl = "unix://"', "layer", "url", "socket's path"),
    ('[layer]\ncapacity = 0', "layer", "capacity", "must be an integer of at least 1, got 0"),
    ('[layer]\ncapacity = 1.5', "layer", "capacity", "must be an integer of at least 1, got 1.5"),
    ('[layer]\ncapacity = true', "layer", "capacity", "must be an integer of at least 1, got true"),
    ('[layer]\nchannel_capacity = 5', "layer", "channel_capacity", "must be a table of channel pattern"),
    ('[layer]\nchannel_capacity = { "chat.*" = 0 }', "layer", 'channel_capacity."chat.*"', "at least 1, got 0"),
    ('[layer]\nchannel_capacity = { "chat room" = 5 }', "layer", 'channel_capacity."chat room"', "the wildcard"),
    ('[layer]\nexpiry = 0', "layer", "expiry", "must be a number of seconds greater than 0, got 0"),
    ('[layer]\ngroup_expiry = -1.5', "layer", "group_expiry", "greater than 0, got -1.5"),
    ('[layer]\nexpiry = inf', "layer", "expiry", "greater than 0, got inf"),
    ('[layer]\nprefix = "my app"', "layer", "prefix", "may hold only letters"),
    ('[layer]\nprefix = 3', "layer", "prefix", "must be a string"),
    ('[layer]\nhosts = []', "layer", "hosts", "must be a non-empty list of Redis URLs, got []"),
    ('[layer]\nhosts = "redis://a"', "layer", "hosts", 'got "redis://a"'),
    ('[layer]\nhosts = ["redis://a", 5]', "layer", "hosts[1]", "must be a non-empty string, got 5"),
    ('[layer]\nhosts = ["memory://"]', "layer", "hosts[0]", "must be a Redis URL"),
    ('[layer]\nurl = "memory://"\nhosts = ["redis://a"]', "layer", "hosts", "shards a Redis layer"),
    ('[layer]\nsymmetric_encryption_keys = ["${K}"]', "layer", "symmetric_encryption_keys", "never leave"),
    ('[layer]\nurl = "redis://a"\nsymmetric_encryption_keys = []', "layer", "symmetric_encryption_keys",
     "non-empty list of secret strings"),
    ('[routing]\napp = "myproject.routing"', "routing", "app", 'must be "module:attribute"'),
    ('[routing]\napp = "my-project:router"', "routing", "app", 'must be "module:attribute"'),
    ('[routing]\napp = "myproject.class:router"', "routing", "app", 'must be "module:attribute"'),
    ('[routing]\napp = ["a:b"]', "routing", "app", "got a list"),
    ('[worker]\nthreads = 0', "worker", "threads", "at least 1, got 0"),
    ('[worker]\nonly_channels = []', "worker", "only_channels", "leave it out to serve every channel"),
    ('[worker]\nonly_channels = ["chat room"]', "worker", "only_channels[0]", "the wildcard"),
    ('[worker]\nexclude_channels = "chat.*"', "worker", "exclude_channels", "must be a list of channel patterns"),
    ('[worker]\nprefetch = 0', "worker", "prefetch", "at least 1, got 0"),
    ('[worker]\nslow_consumer = -1', "worker", "slow_consumer", "0 never reports a slow consumer"),
    ('[worker]\nslow_consumer = "10"', "worker", "slow_consumer", "(write it without quotes)"),
    ('[worker]\npools = ["http.request"]', "worker", "pools", "must be a table of pool name"),
    ('[worker]\npools = { slow = 4 }', "worker", "pools.slow", "must be a table { channels"),
    ('[worker]\npools = { slow = { channels = ["http.request"] } }', "worker", "pools.slow.threads",
     "missing: every pool needs channels and threads"),
    ('[worker]\npools = { slow = { channels = [], threads = 2 } }', "worker", "pools.slow.channels",
     "must be a non-empty list of channel patterns, got []"),
    ('[worker]\npools = { slow = { channels = ["http request"], threads = 2 } }', "worker",
     "pools.slow.channels[0]", "the wildcard"),
    ('[worker]\npools = { slow = { channels = ["http.request"], threads = 0 } }', "worker", "pools.slow.threads",
     "at least 1, got 0"),
    ('[worker]\npools = { slow = { channels = ["http.request"], thread = 2 } }', "worker", "pools.slow.thread",
     'unknown key; did you mean "threads"?'),
    ('[worker]\npools = { default = { channels = ["http.request"], threads = 2 } }', "worker", "pools.default",
     'may not be named "default"'),
    ('[worker]\npools = { Slow = { channels = ["http.request"], threads = 2 } }', "worker", "pools.Slow",
     "a pool's name may hold only lowercase letters"),
    ('[worker]\npools = { a = { channels = ["http.request"], threads = 2 }, b = { channels = ["chat.*", '
     '"http.request"], threads = 1 } }', "worker", "pools.b.channels[1]",
     '"http.request" is in pool a too: a channel is served by one pool'),
    ('[layer]\ncapasity = 5', "layer", "capasity", 'unknown key; did you mean "capacity"?'),
    ('[worker]\ncapacity = 5', "worker", "capacity", "unknown key; it belongs in [layer]."),
    ('[routing]\nzzz = 5', "routing", "zzz", "unknown key. The keys of [routing] are: app"),
    ('[layers]\nurl = "memory://"', "layers", None, "unknown table; did you mean [layer]?"),
    ('[mqtt]\nport = 1883', "mqtt", None, 'did you mean [bridges.mqtt] (with type = "mqtt")?'),
    ('threads = 4', None, "threads", "not in any table: it belongs in [worker]"),
    ('debug = true', None, "debug", "unknown key outside any table"),
    ('layer = "memory://"', None, "layer", "must be a table"),
    ('bridges = ["irc"]', None, "bridges", "must be a table"),
    ('[bridges]\nirc = "irc"', "bridges", "irc", "must be a table: write [bridges.irc]"),
    ('[bridges.irc]\nport = 6667', "bridges.irc", "type", 'missing: every bridge needs a type: "http"'),
    ('[bridges.irc]\ntype = ""', "bridges.irc", "type", 'got ""'),
    ('[bridges.irc]\ntype = 1', "bridges.irc", "type", "got 1"),
    ('[bridges.irc]\ntype = "irc"\nenabled = "yes"', "bridges.irc", "enabled",
     'must be true or false, got "yes" (write true or false, without quotes)'),
    ('[bridges."IRC Main"]\ntype = "irc"', 'bridges."IRC Main"', None, "like [bridges.irc-main]"),
    ('[bridges.irc.v2]\ntype = "irc"', "bridges.irc", "type", "name it [bridges.irc-v2]"),
])
def test_each_mistake_is_named_with_its_table_and_key(tmp_path, text, table, key, expected):
    problem = only_problem(tmp_path, text + "\n", {"K": "k"})
    assert (problem.file, problem.table, problem.key) == (str(tmp_path / "crossroads.toml"), table, key)
    assert expected in problem.message, problem.message


def test_a_missing_type_in_a_table_named_for_a_built_in_type_suggests_it(tmp_path):
    problem = only_problem(tmp_path, "[bridges.irc]\nserver = 'irc.example.org'\n")
    assert problem.message.endswith('add type = "irc"')


def test_problem_strings_read_file_table_key_message(tmp_path):
    path = str(tmp_path / "crossroads.toml")
    assert str(Problem(path, "bridges.irc", "port", "bad")) == f"{path}: [bridges.irc] port: bad"
    assert str(Problem(path, "layers", None, "unknown table")) == f"{path}: [layers]: unknown table"
    assert str(Problem(path, None, "threads", "not in any table")) == f"{path}: threads: not in any table"
    syntax = Problem(path, None, None, "invalid TOML: x", line=3, column=8)
    assert str(syntax) == f"{path}: line 3, column 8: invalid TOML: x"


def test_every_problem_is_collected_in_the_file_order(tmp_path):
    found = problems(tmp_path, """
        debug = true
        [layer]
        capacity = 0
        prefix = "a b"
        [worker]
        threads = "${THREADS}"
        [bridges.irc]
        port = 6667
        [bridges.Bad]
        type = "irc"
        enabled = 1
    """)
    assert [(problem.table, problem.key) for problem in found] == [
        (None, "debug"),
        ("layer", "capacity"),
        ("layer", "prefix"),
        ("worker", "threads"),
        ("bridges.irc", "type"),
        ("bridges.Bad", None),
        ("bridges.Bad", "enabled"),
    ]


def test_a_toml_syntax_error_gives_its_line_and_column(tmp_path):
    problem = only_problem(tmp_path, '[layer]\nurl = "memory://"\ncapacity = = 5\n')
    assert (problem.line, problem.column) == (3, 12)
    assert problem.table is None and problem.key is None
    assert problem.message.startswith("invalid TOML: Invalid value")
    assert str(problem) == f"{tmp_path / 'crossroads.toml'}: line 3, column 12: {problem.message}"


def test_a_duplicate_table_is_a_syntax_error(tmp_path):
    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\n[bridges.irc]\ntype = "irc"\n')
    assert problem.line == 3 and "invalid TOML" in problem.message


def test_a_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "crossroads.toml"
    path.write_bytes(b'[routing]\napp = "caf\xe9:x"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, environ={})


# -- secrets written into the file --


@pytest.mark.parametrize("text, key", [
    ('[bridges.irc]\ntype = "irc"\npassword = "hunter2"', "password"),
    ('[bridges.slack]\ntype = "slack"\nbot_token = "xoxb-123"', "bot_token"),
    ('[bridges.slack]\ntype = "slack"\nsigning_secret = "abc"', "signing_secret"),
    ('[bridges.irc]\ntype = "irc"\nnickserv = { password = "hunter2" }', "nickserv.password"),
    ('[layer]\nurl = "redis://a"\nsymmetric_encryption_keys = ["hunter2", "${OLD}"]', "symmetric_encryption_keys[0]"),
])
def test_a_literal_secret_is_a_warning_naming_the_key(tmp_path, text, key):
    config = load(tmp_path, text + "\n", {"OLD": "old"})
    [warning] = config.warnings
    assert f"] {key}: a secret written into the config file" in warning
    assert "${" in warning and "${credential:" in warning and "LoadCredential=" in warning
    assert "hunter2" not in warning


def test_the_warning_suggests_names_built_from_the_bridge_and_key(tmp_path):
    [warning] = load(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "hunter2"\n').warnings
    assert '"${IRC_PASSWORD}"' in warning and '"${credential:irc-password}"' in warning


def test_a_bridge_error_quoting_a_url_does_not_show_its_password(tmp_path):
    from crossroads.cli import bridge_validator  # the MQTT bridge's own check, which quotes the URL it refuses

    problem = only_problem(tmp_path, '[bridges.mqtt]\ntype = "mqtt"\nbroker = "ftp://bob:${BROKER_PW}@host"\n',
                           {"BROKER_PW": "hunter2"}, bridge_validator=bridge_validator)
    assert "[bridges.mqtt] broker:" in str(problem) and "ftp://bob:****@host" in problem.message
    assert "hunter2" not in str(problem)


def test_a_literal_irc_channel_key_is_a_warning_naming_the_channel(tmp_path):
    [warning] = load(tmp_path, '[bridges.irc]\ntype = "irc"\nchannels = ["#chat", {name = "#ops", key = "hunter2"}]\n'
                     ).warnings
    assert "[bridges.irc] channels[1].key: a secret written into the config file" in warning
    assert '"${IRC_OPS_KEY}"' in warning and '"${credential:irc-ops-key}"' in warning
    assert "hunter2" not in warning


@pytest.mark.parametrize("url", [
    "redis://:hunter2@localhost:6379/0",
    "rediss://user:hunter2@cache.example:6380/0",
    "unix:///run/redis.sock?db=0&password=hunter2",
])
def test_a_redis_url_with_a_literal_password_is_a_warning(tmp_path, url):
    [warning] = load(tmp_path, f'[layer]\nurl = "{url}"\n').warnings
    assert "[layer] url: a URL with a password" in warning
    assert "hunter2" not in warning


def test_a_url_password_in_hosts_is_a_warning_too(tmp_path):
    [warning] = load(tmp_path, '[layer]\nhosts = ["redis://a:6379/0", "redis://:pw@b:6379/0"]\n').warnings
    assert "[layer] hosts[1]: a URL with a password" in warning


@pytest.mark.parametrize("text", [
    '[bridges.irc]\ntype = "irc"\npassword = "${IRC_PASSWORD}"',
    '[bridges.irc]\ntype = "irc"\npassword = "${file:pw}"',
    '[bridges.irc]\ntype = "irc"\npassword = ""',
    '[bridges.irc]\ntype = "irc"\npassword_file = "/etc/irc/password"',
    '[bridges.irc]\ntype = "irc"\nmax_tokens = 5',
    '[bridges.irc]\ntype = "irc"\nchannels = [{name = "#ops", key = "${OPS_KEY}"}]',
    '[bridges.web]\ntype = "http"\ntls_cert = "/etc/ssl/cert.pem"\ntls_key = "/etc/ssl/key.pem"',
    '[layer]\nurl = "redis://:${REDIS_PASSWORD}@localhost:6379/0"',
    '[layer]\nurl = "redis://localhost:6379/0"',
])
def test_no_warning_for_interpolated_secrets_or_keys_that_only_look_alike(tmp_path, text):
    (tmp_path / "pw").write_text("x")
    assert load(tmp_path, text + "\n", {"IRC_PASSWORD": "x", "REDIS_PASSWORD": "x", "OPS_KEY": "x"}).warnings == []


def test_warnings_travel_with_the_error_when_there_are_problems_too(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[worker]\nthreads = 0\n[bridges.irc]\ntype = "irc"\npassword = "hunter2"\n')
    assert len(caught.value.problems) == 1
    assert len(caught.value.warnings) == 1 and "password" in caught.value.warnings[0]


def test_a_type_close_to_a_built_in_one_is_a_warning_not_an_error(tmp_path):
    config = load(tmp_path, '[bridges.ws]\ntype = "webscoket"\n')
    assert config.bridges["ws"].type == "webscoket"
    [warning] = config.warnings
    assert '[bridges.ws] type: "webscoket" is not a built-in bridge type; did you mean "websocket"?' in warning


# -- the bridge_validator hook --


class OptionError(ValueError):
    """Shaped like bridges.base.OptionError: a message and the key it is about."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def irc_validator(type_name: str, options: dict) -> dict:
    if type_name != "irc":
        return options
    port = options.get("port", 6667)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise OptionError("port", f"must be an integer between 1 and 65535, got {port!r}".replace("'", '"'))
    return {"port": port, **{key: value for key, value in options.items() if key != "port"}}


def test_the_validator_gets_each_bridge_type_and_own_keys_and_its_result_is_kept(tmp_path):
    calls = []

    def validator(type_name, options):
        calls.append((type_name, options))
        return {**options, "checked": True}

    config = load(tmp_path, """
        [bridges.irc]
        type = "irc"
        enabled = false
        server = "irc.example.org"
        [bridges.web]
        type = "http"
    """, bridge_validator=validator)
    # Disabled bridges are validated too, so a file that passes stays valid when one is switched on.
    assert calls == [("irc", {"server": "irc.example.org"}), ("http", {})]
    assert config.bridges["irc"].options == {"server": "irc.example.org", "checked": True}
    assert config.bridges["web"].options == {"checked": True}


def test_the_validator_fills_defaults(tmp_path):
    config = load(tmp_path, '[bridges.irc]\ntype = "irc"\n', bridge_validator=irc_validator)
    assert config.bridges["irc"].options == {"port": 6667}


def test_an_option_error_becomes_a_problem_of_that_table_and_key(tmp_path):
    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\nport = "66000"\n', bridge_validator=irc_validator)
    assert (problem.table, problem.key) == ("bridges.irc", "port")
    assert str(problem) == (f'{tmp_path / "crossroads.toml"}: [bridges.irc] port: '
                            'must be an integer between 1 and 65535, got "66000"')


def test_a_message_that_repeats_its_key_is_not_doubled(tmp_path):
    def validator(type_name, options):
        raise OptionError("port", "port: must be a number")

    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\nport = "x"\n', bridge_validator=validator)
    assert problem.message == "must be a number"


def test_an_error_with_a_bare_problem_attribute_uses_it(tmp_path):
    class KeyedError(ValueError):  # the shape of bridges.base.OptionError: str() is "key: problem"
        def __init__(self, key, problem):
            super().__init__(f"{key}: {problem}")
            self.key, self.problem = key, problem

    def validator(type_name, options):
        raise KeyedError("nick", "must be a string")

    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\nnick = 5\n', bridge_validator=validator)
    assert str(problem).endswith("[bridges.irc] nick: must be a string")


def test_an_exception_group_of_option_errors_gives_one_problem_each(tmp_path):
    def validator(type_name, options):
        raise ExceptionGroup("bad options", [OptionError("server", "is required"), OptionError("nick", "too long")])

    found = problems(tmp_path, '[bridges.irc]\ntype = "irc"\nnick = "x"\n[worker]\nthreads = 0\n',
                     bridge_validator=validator)
    assert sorted((problem.table, problem.key, problem.message) for problem in found) == [
        ("bridges.irc", "nick", "too long"),
        ("bridges.irc", "server", "is required"),
        ("worker", "threads", "must be an integer of at least 1, got 0"),
    ]


def test_an_error_without_a_key_is_a_problem_of_the_table(tmp_path):
    def validator(type_name, options):
        raise LookupError(f"no bridge type {type_name!r} is installed")

    problem = only_problem(tmp_path, '[bridges.modbus]\ntype = "acme.modbus"\n', bridge_validator=validator)
    assert (problem.table, problem.key) == ("bridges.modbus", None)
    assert problem.message == "no bridge type 'acme.modbus' is installed"


def test_a_validator_bug_is_not_disguised_as_a_config_problem(tmp_path):
    def validator(type_name, options):
        return options.nonexistent

    with pytest.raises(AttributeError):
        load(tmp_path, '[bridges.irc]\ntype = "irc"\n', bridge_validator=validator)


def test_the_validator_is_not_called_for_a_bridge_whose_values_did_not_interpolate(tmp_path):
    calls = []
    problem = only_problem(tmp_path, '[bridges.irc]\ntype = "irc"\npassword = "${IRC_PASSWORD}"\n',
                           bridge_validator=lambda type_name, options: calls.append(options) or options)
    assert calls == [] and "IRC_PASSWORD" in problem.message


def test_without_a_validator_bridge_keys_are_left_as_given(tmp_path):
    config = load(tmp_path, '[bridges.irc]\ntype = "irc"\nport = "66000"\nwhatever = [1, 2]\n')
    assert config.bridges["irc"].options == {"port": "66000", "whatever": [1, 2]}


def test_enabled_bridges_keeps_the_file_order(tmp_path):
    config = load(tmp_path, """
        [bridges.b]
        type = "mqtt"
        [bridges.a]
        type = "irc"
        enabled = false
        [bridges.c]
        type = "email"
        enabled = true
    """)
    assert [(bridge.name, bridge.type) for bridge in config.enabled_bridges()] == [("b", "mqtt"), ("c", "email")]
    assert config.bridges["a"].enabled is False


def test_the_example_in_the_documentation_loads(tmp_path):
    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    example = docs.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("libera-password", "mqtt-password"):
        (credentials / name).write_text("x\n")
    config = load(tmp_path, example, {"REDIS_PASSWORD": "x", "MQTT_USER": "x",
                                      "CREDENTIALS_DIRECTORY": str(credentials)})
    assert [bridge.name for bridge in config.enabled_bridges()] == ["web", "libera"]
    assert config.warnings == []
