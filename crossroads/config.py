"""The config file, ``crossroads.toml``: reading it and checking its tables.

This module owns the file's format: the generic tables ``[layer]``, ``[routing]`` and ``[worker]``,
and the generic keys of every ``[bridges.NAME]`` table (``type``, ``enabled``). ``${...}``
interpolation is ``interpolation.py``'s, and where secrets come from and which values look like one
is ``secret.py``'s; this module only places their problems and warnings at a table and key. It
must not import the user's router, open a layer or know any bridge's own keys: those are checked by
the ``bridge_validator`` its caller passes. docs/configuration.md is the user's reference for
everything here.

Theory of operation: parse with tomllib, interpolate every string value, then check every table,
collecting every problem before raising one ``ConfigError``, so that ``crossroads check`` shows all
of them at once. A value whose interpolation failed is reported once and not checked further.
"""

from __future__ import annotations

import difflib
import json
import keyword
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crossroads.layer.base import GROUP_NAME_RE, MAX_NAME_LENGTH, mask_url

from . import secret
from .interpolation import UNRESOLVED, Interpolator, contains_unresolved

DEFAULT_PATH = "crossroads.toml"
DEFAULT_LAYER_URL = "memory://"
DEFAULT_THREADS = 4
BUILTIN_BRIDGE_TYPES = ("http", "websocket", "mqtt", "irc")  # email and slack join when their bridges land
DOCS = "docs/configuration.md"

LAYER_KEYS = ("url", "capacity", "process_capacity", "channel_capacity", "expiry", "group_expiry", "prefix",
              "hosts", "symmetric_encryption_keys")
ROUTING_KEYS = ("app",)
WORKER_KEYS = ("threads", "only_channels", "exclude_channels", "pools", "prefetch", "slow_consumer", "stuck_after")
METRICS_KEYS = ("listen",)
POOL_KEYS = ("channels", "threads")
DEFAULT_PREFETCH = 64  # consumers.worker.PREFETCH (this module does not import the worker)
DEFAULT_SLOW_CONSUMER = 10.0  # consumers.worker.SLOW_CONSUMER
# Seconds every worker thread may spend on one message before the systemd watchdog stops being fed.
DEFAULT_STUCK_AFTER = 300.0
DJANGO_KEYS = ("settings", "identify", "static", "view")
BRIDGE_KEYS = ("type", "enabled")
TABLES = {"layer": LAYER_KEYS, "routing": ROUTING_KEYS, "worker": WORKER_KEYS, "metrics": METRICS_KEYS,
          "django": DJANGO_KEYS}
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")  # layer.redis.SENTINEL_SCHEMES
REDIS_SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)

BridgeValidator = Callable[[str, dict], dict]


@dataclass(frozen=True)
class Problem:
    """One mistake in a config file, located by table and key (``None`` where they do not apply)."""

    file: str
    table: str | None
    key: str | None
    message: str
    line: int | None = None  # only for TOML syntax errors, where there is no table or key yet
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f": line {self.line}, column {self.column}"
        if self.table:
            where += f": [{self.table}]"
        if self.key:
            where += f" {self.key}" if self.table else f": {self.key}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a config file; ``str()`` lists them one per line."""

    def __init__(self, problems: list[Problem], warnings: list[str] | None = None) -> None:
        self.problems = list(problems)
        self.warnings = list(warnings or [])  # so that `crossroads check` can show them too
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class LayerConfig:
    """``layer.from_url(url, **options)``; options holds only the keys the file set, so the layer's defaults apply."""

    url: str = DEFAULT_LAYER_URL
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # a config gets logged; its secrets must not be
        return f"LayerConfig(url={mask_url(self.url)!r}, options=<{', '.join(self.options)}>)"


@dataclass(frozen=True)
class WorkerConfig:
    threads: int = DEFAULT_THREADS
    only_channels: tuple[str, ...] | None = None  # None: every channel the router knows
    exclude_channels: tuple[str, ...] = ()
    # name -> (channel patterns, threads): threads of their own for those channels; the rest get `threads`.
    pools: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    prefetch: int = DEFAULT_PREFETCH
    slow_consumer: float | None = DEFAULT_SLOW_CONSUMER  # None: never report (the file said 0)
    stuck_after: float | None = DEFAULT_STUCK_AFTER  # None: never judged stuck (the file said 0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # host:port of /metrics, /healthz and /readyz; None: not served


@dataclass(frozen=True)
class DjangoConfig:
    """``[django]``: the project to set up; ``settings`` None means ``$DJANGO_SETTINGS_MODULE``."""

    settings: str | None = None
    identify: str | None = None  # "module:function": who a message without cookies (MQTT, IRC, ...) is from
    static: bool | None = None  # serve STATIC_URL through Django's StaticFilesHandler; None: when DEBUG is on
    view: bool = True  # end the routing table with route("http.request", django_view)


@dataclass(frozen=True)
class BridgeConfig:
    name: str
    type: str
    enabled: bool = True
    # The bridge's own keys, as its validator returned them; out of repr because they hold its secrets.
    options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Config:
    path: Path | None = None  # None: no file was read, these are the defaults
    layer: LayerConfig = field(default_factory=LayerConfig)
    routing_app: str | None = None
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    django: DjangoConfig | None = None  # None: no [django] table, crossroads does not set Django up
    bridges: dict[str, BridgeConfig] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def enabled_bridges(self) -> list[BridgeConfig]:
        """The bridges to start, in the file's order."""
        return [bridge for bridge in self.bridges.values() if bridge.enabled]


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    bridge_validator: BridgeValidator | None = None,
) -> Config:
    """Read, interpolate and check a config file; raise ``ConfigError`` listing every problem.

    ``path=None`` reads ``./crossroads.toml`` and, if there is none, returns the defaults with a
    warning. ``environ`` (default ``os.environ``) supplies ``${VAR}`` and ``$CREDENTIALS_DIRECTORY``.
    ``bridge_validator(type, options)`` checks and returns a bridge's own keys; an exception it
    raises (with a ``.key``, or an ExceptionGroup of them) becomes a problem of that bridge's table.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        file = Path(DEFAULT_PATH)
        if not file.exists():
            return Config(warnings=[
                f"{DEFAULT_PATH}: not found in {Path.cwd()}; using the defaults (layer memory://, no bridges). "
                f"To configure crossroads, create it: see {DOCS}"
            ])
    else:
        file = Path(path)
    name = str(file)
    try:
        with file.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError([Problem(name, None, None, (
            f"no such file ({file.absolute()}); create it ({DOCS} has an example to start from) "
            "or give the path of an existing one"))]) from None
    except OSError as exc:
        raise ConfigError([Problem(name, None, None, f"cannot read it: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(name, None, None, f"not UTF-8 text (byte {exc.start}); save it as UTF-8")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(name, exc)]) from None
    return _Loader(name, file.absolute().parent, environ, document).load(file, bridge_validator)


def _syntax_problem(name: str, exc: tomllib.TOMLDecodeError) -> Problem:
    # tomllib puts the location at the end of its message: "Invalid value (at line 3, column 8)".
    text = str(exc)
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if found:
        return Problem(name, None, None, f"invalid TOML: {text[:found.start()]}",
                       line=int(found.group(1)), column=int(found.group(2)))
    return Problem(name, None, None, f"invalid TOML: {text.replace('(at end of document)', 'at the end of the file')}")


def _parse_bool(text: str) -> bool:
    # The spellings systemd accepts in its own boolean settings.
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


# -- names and values in messages --


def _show(value: Any, secret: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string" if secret else json.dumps(mask_url(value), ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table" if value else "{}"
    if isinstance(value, list):
        return "a list" if value else "[]"
    return f"a {type(value).__name__}"  # TOML dates and times


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _key_text(parts: tuple) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + _toml_key(str(part))
    return text


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


# Layer capacity patterns and worker channel globs: channel-name characters, with `*` as the one wildcard.
_PATTERN = re.compile(r"[A-Za-z0-9\-_.?!*]+")
_PATTERN_RULE = "may hold only letters, digits, '-', '_', '.', '?', '!' and the wildcard '*'"
_BRIDGE_NAME = re.compile(r"[a-z0-9_-]+")
_DOTTED = r"[^\W\d]\w*(?:\.[^\W\d]\w*)*"
_APP = re.compile(rf"({_DOTTED}):({_DOTTED})")


class _Loader:
    """One load of one file: the document, the environment, and the problems and warnings found so far."""

    def __init__(self, name: str, directory: Path, environ: Mapping[str, str], document: dict) -> None:
        self.name = name
        self.interpolator = Interpolator(environ, directory)
        self.document = document
        self.found: list[tuple[tuple, Problem]] = []  # (path, problem): sorted into the file's order at the end
        self.warnings: list[str] = []
        self.interpolated: set[tuple] = set()  # paths of strings that held a ${...}

    # -- reporting --

    def where(self, path: tuple) -> tuple[str | None, str | None]:
        """(table, key) of a value's path: ("bridges", "irc", "port") -> ("bridges.irc", "port")."""
        if len(path) >= 2 and path[0] == "bridges" and isinstance(self.document.get("bridges"), dict) \
                and isinstance(self.document["bridges"].get(path[1]), dict):
            return f"bridges.{_toml_key(path[1])}", _key_text(path[2:]) or None
        if len(path) >= 2 and isinstance(self.document.get(path[0]), dict):
            return _toml_key(path[0]), _key_text(path[1:])
        return None, _key_text(path) or None

    def problem(self, path: tuple, message: str, *, table: str | None = None) -> None:
        where = (table, None) if table else self.where(path)
        # A bridge's validator may quote the URL it refused, password and all: `crossroads check` must not.
        self.found.append((path, Problem(self.name, *where, mask_url(message))))

    def position(self, path: tuple) -> tuple[int, ...]:
        """Where a path sits in the file, to list problems top to bottom (a missing key sorts last in its table)."""
        node, position = self.document, []
        for part in path:
            keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
            if part not in keys:
                position.append(len(keys))
                break
            position.append(keys.index(part))
            node = node[part]
        return tuple(position)

    def warn(self, path: tuple, message: str) -> None:
        self.warnings.append(str(Problem(self.name, *self.where(path), message)))

    # -- interpolation --

    def interpolate(self, value: Any, path: tuple) -> Any:
        if isinstance(value, str):
            result, used, problems = self.interpolator.expand(value)
            for message in problems:
                self.problem(path, message)
            if used:
                self.interpolated.add(path)
            self.check_secret(path, value, used)
            return result
        if isinstance(value, dict):
            return {key: self.interpolate(item, path + (key,)) for key, item in value.items()}
        if isinstance(value, list):
            return [self.interpolate(item, path + (index,)) for index, item in enumerate(value)]
        return value

    def check_secret(self, path: tuple, raw: str, used: bool) -> None:
        """Warn about a secret written into the file, naming a variable to take it from."""
        key = next((part for part in reversed(path) if isinstance(part, str)), "")
        table, _ = self.where(path)
        item = ""
        if len(path) >= 2 and isinstance(path[-2], int):  # in a list entry ({name = "#ops", key = ...}): its name
            entry = self.document
            for part in path[:-1]:
                entry = entry[part]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                item = entry["name"]
        warning = secret.literal_secret_warning(table, key, raw, used, item)
        if warning:
            self.warn(path, warning)

    # -- typed values; each returns None after reporting a problem --

    def text(self, path: tuple, value: Any, what: str = "a string") -> str | None:
        if isinstance(value, str):
            return value
        self.problem(path, f"must be {what}, got {_show(value)}")
        return None

    def scalar(self, path: tuple, value: Any, parse: Callable[[str], Any]) -> tuple[Any, str]:
        """Interpolated values are strings (an environment holds nothing else), so a number or a boolean may
        come as one; a quoted literal would parse too, but then the quotes are the mistake, and we say so."""
        if not isinstance(value, str):
            return value, ""
        try:
            parsed = parse(value.strip())
        except ValueError:
            return value, ""
        return (parsed, "") if path in self.interpolated else (value, " (write it without quotes)")

    def integer(self, path: tuple, value: Any, minimum: int) -> int | None:
        value, hint = self.scalar(path, value, int)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        self.problem(path, f"must be an integer of at least {minimum}, got {_show(value)}{hint}")
        return None

    def seconds(self, path: tuple, value: Any) -> float | None:
        value, hint = self.scalar(path, value, lambda text: int(text) if text.isdigit() else float(text))
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf"):
            return value
        self.problem(path, f"must be a number of seconds greater than 0, got {_show(value)}{hint}")
        return None

    def boolean(self, path: tuple, value: Any) -> bool | None:
        value, hint = self.scalar(path, value, _parse_bool)
        hint = hint and " (write true or false, without quotes)"
        if isinstance(value, bool):
            return value
        self.problem(path, f"must be true or false, got {_show(value)}{hint}")
        return None

    def string_list(self, path: tuple, value: Any, what: str, secret: bool = False,
                    empty: bool = False) -> list[str] | None:
        if not isinstance(value, list) or not (value or empty):
            self.problem(path, f"must be a {'' if empty else 'non-empty '}list of {what}, got {_show(value, secret)}")
            return None
        good = True
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.problem(path + (index,), f"must be a non-empty string, got {_show(item, secret)}")
                good = False
        return list(value) if good else None

    def patterns(self, path: tuple, value: Any, only: bool, what: str = "") -> tuple[str, ...] | None:
        what = what or ("channel patterns (leave it out to serve every channel)" if only else "channel patterns")
        patterns = self.string_list(path, value, what, empty=not only)
        if patterns is None:
            return None
        good = True
        for index, pattern in enumerate(patterns):
            if not _PATTERN.fullmatch(pattern):
                self.problem(path + (index,), f"{_PATTERN_RULE}, got {_show(pattern)}")
                good = False
        return tuple(patterns) if good else None

    def unknown_keys(self, table: str, values: dict, known: tuple[str, ...]) -> None:
        for key in values:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1)
            elsewhere = [name for name, keys in TABLES.items() if name != table and key in keys]
            hint = "."
            if close:
                hint = f'; did you mean "{close[0]}"?'
            elif elsewhere:
                hint = f"; it belongs in [{elsewhere[0]}]."
            self.problem((table, key), f"unknown key{hint} The keys of [{table}] are: {', '.join(known)}")

    # -- the tables --

    def load(self, file: Path, bridge_validator: BridgeValidator | None) -> Config:
        document = self.interpolate(self.document, ())
        for key, value in document.items():
            if key in TABLES or key == "bridges":
                if not isinstance(value, dict):
                    self.problem((key,), f"must be a table: write [{key}] on a line of its own, then its keys")
            elif isinstance(self.document[key], dict):
                self.problem((key,), self.unknown_table_message(key), table=_toml_key(key))
            else:
                self.problem((key,), self.unknown_top_level_message(key))

        def table(name: str) -> dict:
            value = document.get(name, {})
            return value if isinstance(value, dict) else {}

        layer = self.check_layer(table("layer"))
        routing_app = self.check_routing(table("routing"))
        worker = self.check_worker(table("worker"))
        metrics = self.check_metrics(table("metrics"))
        django = self.check_django(table("django")) if isinstance(document.get("django"), dict) else None
        bridges = self.check_bridges(table("bridges"), bridge_validator)
        if self.found:
            self.found.sort(key=lambda found: self.position(found[0]))  # stable: one key's problems keep their order
            raise ConfigError([problem for _, problem in self.found], self.warnings)
        return Config(path=file, layer=layer, routing_app=routing_app, worker=worker, metrics=metrics,
                      django=django, bridges=bridges, warnings=self.warnings)

    def unknown_table_message(self, key: str) -> str:
        tables = "The tables are [layer], [routing], [worker], [metrics], [django] and [bridges.NAME]"
        if key in BUILTIN_BRIDGE_TYPES:
            return f'unknown table; did you mean [bridges.{key}] (with type = "{key}")? {tables}'
        close = difflib.get_close_matches(key, [*TABLES, "bridges"], n=1)
        return f"unknown table;{f' did you mean [{close[0]}]?' if close else ''} {tables}"

    def unknown_top_level_message(self, key: str) -> str:
        owners = [name for name, keys in TABLES.items() if key in keys]
        if owners:
            return f"not in any table: it belongs in [{owners[0]}]"
        return ("unknown key outside any table: every key belongs in [layer], [routing], [worker], [metrics], "
                "[django] or [bridges.NAME]")

    def check_layer(self, values: dict) -> LayerConfig:
        self.unknown_keys("layer", values, LAYER_KEYS)
        options: dict[str, Any] = {}
        url = DEFAULT_LAYER_URL
        hosts = None
        if "hosts" in values and not contains_unresolved(values["hosts"]):
            hosts = self.string_list(("layer", "hosts"), values["hosts"], "Redis URLs")
            for index, host in enumerate(hosts or []):
                scheme = self.layer_url(("layer", "hosts", index), host)
                if scheme not in REDIS_SCHEMES:
                    if scheme is not None:
                        self.problem(("layer", "hosts", index), "must be a Redis URL (redis://, rediss:// or "
                                                                f"unix://), got {_show(host)}")
                    hosts = None
                    break
            if hosts:
                options["hosts"] = hosts
        # Cross-checks against a url (or hosts) that is wrong already would only repeat its problem.
        url_ok = "hosts" not in values or hosts is not None
        if "url" in values:
            url_ok = values["url"] is not UNRESOLVED and self.text(("layer", "url"), values["url"]) is not None \
                and self.layer_url(("layer", "url"), values["url"]) is not None and url_ok
            if url_ok:
                url = values["url"]
        elif hosts:
            url = hosts[0]  # from_url picks the backend by the URL's scheme; with hosts the URL is otherwise unused
        is_redis = _scheme(url) in REDIS_SCHEMES
        if hosts and url_ok and not is_redis:
            self.problem(("layer", "hosts"), f"shards a Redis layer, but url is {_show(url)}: set url to one of "
                                             "the Redis URLs, or remove url")

        checks = {
            "capacity": lambda path, value: self.integer(path, value, 1),
            "process_capacity": lambda path, value: self.integer(path, value, 1),
            "expiry": self.seconds,
            "group_expiry": self.seconds,
            "prefix": self.prefix,
            "channel_capacity": self.channel_capacity,
            "symmetric_encryption_keys": lambda path, value: self.string_list(path, value, "secret strings",
                                                                              secret=True),
        }
        for key, check in checks.items():
            if key in values and not contains_unresolved(values[key]):
                value = check(("layer", key), values[key])
                if value is not None:
                    options[key] = value
        if "symmetric_encryption_keys" in values and url_ok and not is_redis:
            self.problem(("layer", "symmetric_encryption_keys"),
                         f"seals messages stored in Redis, but url is {_show(url)}, whose messages never leave the "
                         "process: remove it, or use a Redis layer")
        return LayerConfig(url=url, options=options)

    def layer_url(self, path: tuple, url: str) -> str | None:
        """Check a layer URL's shape and return its scheme (None if it is not a URL crossroads knows)."""
        scheme = _scheme(url)
        if scheme not in ("memory",) + REDIS_SCHEMES:
            self.problem(path, "must be memory://, redis://[:password@]host:port/db, rediss://... (TLS), "
                               "unix:///path/to/redis.sock or redis+sentinel://host:26379,host2:26379/SERVICE/db, "
                               f"got {_show(url)}")
            return None
        if scheme in SENTINEL_SCHEMES:
            from crossroads.layer.redis import parse_sentinel_url

            try:
                parse_sentinel_url(url)
            except ValueError as exc:
                self.problem(path, f"{exc}, got {_show(url)}")
                return None
            return scheme
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked
        except ValueError:
            self.problem(path, f"has a bad port (a number from 1 to 65535): {_show(url)}")
            return None
        if scheme in ("redis", "rediss") and not re.fullmatch(r"/?\d*", parts.path):
            self.problem(path, f"the path of a Redis URL is the database number, like /0, got {_show(url)}")
            return None
        if scheme == "unix" and not parts.path:
            self.problem(path, f"needs the socket's path, like unix:///run/redis/redis.sock?db=0, got {_show(url)}")
            return None
        return scheme

    def prefix(self, path: tuple, value: Any) -> str | None:
        if self.text(path, value) is None:
            return None
        if not GROUP_NAME_RE.match(value) or len(value) >= MAX_NAME_LENGTH:
            self.problem(path, f"may hold only letters, digits, '-', '_' and '.' (fewer than {MAX_NAME_LENGTH}), "
                               f"got {_show(value)}")
            return None
        return value

    def channel_capacity(self, path: tuple, value: Any) -> dict[str, int] | None:
        if not isinstance(value, dict):
            self.problem(path, 'must be a table of channel pattern -> capacity, like { "http.response!*" = 50 }, '
                               f"got {_show(value)}")
            return None
        good = True
        for pattern, capacity in value.items():
            if not _PATTERN.fullmatch(pattern):
                self.problem(path + (pattern,), f"the pattern {_PATTERN_RULE}")
                good = False
            good = self.integer(path + (pattern,), capacity, 1) is not None and good
        return dict(value) if good else None

    def check_routing(self, values: dict) -> str | None:
        self.unknown_keys("routing", values, ROUTING_KEYS)
        value = values.get("app")
        if value is None or value is UNRESOLVED:
            return None
        shape = _APP.fullmatch(value) if isinstance(value, str) else None
        if not shape or any(keyword.iskeyword(part) for part in re.split(r"[.:]", value)):
            self.problem(("routing", "app"), 'must be "module:attribute", the import path of your router, like '
                                             f'"myproject.routing:router", got {_show(value)}')
            return None
        return value

    def check_django(self, values: dict) -> DjangoConfig:
        """The shape of ``settings`` only: importing it and setting Django up is the caller's (crossroads.django)."""
        self.unknown_keys("django", values, DJANGO_KEYS)
        chosen: dict[str, str] = {}
        value = values.get("settings")
        if value is not None and value is not UNRESOLVED:
            if not isinstance(value, str) or not re.fullmatch(_DOTTED, value) \
                    or any(keyword.iskeyword(part) for part in value.split(".")):
                self.problem(("django", "settings"), 'must be the import path of your settings module, like '
                                                     f'"mysite.settings", got {_show(value)}')
            else:
                chosen["settings"] = value
        value = values.get("identify")
        if value is not None and value is not UNRESOLVED:
            shape = _APP.fullmatch(value) if isinstance(value, str) else None
            if not shape or any(keyword.iskeyword(part) for part in re.split(r"[.:]", value)):
                self.problem(("django", "identify"), 'must be "module:function", the import path of your identity '
                                                     f'hook, like "myapp.identity:identify", got {_show(value)}')
            else:
                chosen["identify"] = value
        static = None
        if "static" in values and values["static"] is not UNRESOLVED:
            static = self.boolean(("django", "static"), values["static"])
        view = True
        if "view" in values and values["view"] is not UNRESOLVED:
            view = self.boolean(("django", "view"), values["view"])
        return DjangoConfig(**chosen, static=static, view=True if view is None else view)

    def check_worker(self, values: dict) -> WorkerConfig:
        self.unknown_keys("worker", values, WORKER_KEYS)
        settings: dict[str, Any] = {}
        if "threads" in values and values["threads"] is not UNRESOLVED:
            settings["threads"] = self.integer(("worker", "threads"), values["threads"], 1)
        for key in ("only_channels", "exclude_channels"):
            if key in values and not contains_unresolved(values[key]):
                settings[key] = self.patterns(("worker", key), values[key], key == "only_channels")
        if "prefetch" in values and values["prefetch"] is not UNRESOLVED:
            settings["prefetch"] = self.integer(("worker", "prefetch"), values["prefetch"], 1)
        if "slow_consumer" in values and values["slow_consumer"] is not UNRESOLVED:
            settings["slow_consumer"] = self.slow_consumer(("worker", "slow_consumer"), values["slow_consumer"])
        if "stuck_after" in values and values["stuck_after"] is not UNRESOLVED:
            settings["stuck_after"] = self.stuck_after(("worker", "stuck_after"), values["stuck_after"])
        if "pools" in values and not contains_unresolved(values["pools"]):
            settings["pools"] = self.pools(("worker", "pools"), values["pools"])
        chosen = {key: value for key, value in settings.items() if value is not None}
        for key in ("slow_consumer", "stuck_after"):
            if chosen.get(key) == 0:
                chosen[key] = None
        return WorkerConfig(**chosen)

    def stuck_after(self, path: tuple, value: Any) -> float | None:
        value, hint = self.scalar(path, value, lambda text: int(text) if text.isdigit() else float(text))
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf"):
            return value
        self.problem(path, f"must be a number of seconds (0: never judge the worker stuck), got {_show(value)}{hint}")
        return None

    def check_metrics(self, values: dict) -> MetricsConfig:
        self.unknown_keys("metrics", values, METRICS_KEYS)
        listen = values.get("listen")
        if listen is None or listen is UNRESOLVED:
            return MetricsConfig()
        if self.text(("metrics", "listen"), listen) is None:
            return MetricsConfig()
        try:
            parse_listen(listen)
        except ValueError as exc:
            self.problem(("metrics", "listen"), str(exc))
            return MetricsConfig()
        return MetricsConfig(listen=listen)

    def slow_consumer(self, path: tuple, value: Any) -> float | None:
        value, hint = self.scalar(path, value, lambda text: int(text) if text.isdigit() else float(text))
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf"):
            return value
        self.problem(path, f"must be a number of seconds (0 never reports a slow consumer), got {_show(value)}{hint}")
        return None

    def pools(self, path: tuple, value: Any) -> dict[str, tuple[tuple[str, ...], int]] | None:
        """``{ NAME = { channels = [...], threads = N }, ... }``: every pattern in one pool only."""
        example = 'like { slow = { channels = ["http.request"], threads = 4 } }'
        if not isinstance(value, dict):
            self.problem(path, f"must be a table of pool name -> {{ channels, threads }}, {example}, "
                               f"got {_show(value)}")
            return None
        pools: dict[str, tuple[tuple[str, ...], int]] = {}
        owner: dict[str, str] = {}  # pattern -> the pool that named it first
        good = True
        for name, pool in value.items():
            where = path + (name,)
            if name == "default":
                self.problem(where, 'a pool may not be named "default": the default pool is the channels no pool '
                                    "names, served by [worker] threads")
                good = False
                continue
            if not _BRIDGE_NAME.fullmatch(name):
                self.problem(where, "a pool's name may hold only lowercase letters, digits, '_' and '-' (it names "
                                    "its threads in logs)")
                good = False
            if not isinstance(pool, dict):
                self.problem(where, f"must be a table {{ channels = [...], threads = N }}, {example}, "
                                    f"got {_show(pool)}")
                good = False
                continue
            suggested = set()  # a misspelt key is named once, as unknown, not again as missing
            for key in pool:
                if key not in POOL_KEYS:
                    close = difflib.get_close_matches(key, POOL_KEYS, n=1)
                    suggested.update(close)
                    hint = f'; did you mean "{close[0]}"?' if close else "."
                    self.problem(where + (key,), f"unknown key{hint} A pool's keys are: {', '.join(POOL_KEYS)}")
                    good = False
            for key in POOL_KEYS:
                if key not in pool and key not in suggested:
                    self.problem(where + (key,), f"missing: every pool needs channels and threads, {example}")
                    good = False
            channels = self.patterns(where + ("channels",), pool["channels"], True,
                                     "channel patterns") if "channels" in pool else None
            threads = self.integer(where + ("threads",), pool["threads"], 1) if "threads" in pool else None
            for index, pattern in enumerate(channels or ()):
                if owner.get(pattern, name) != name:
                    self.problem(where + ("channels", index), f"{_show(pattern)} is in pool {owner[pattern]} too: a "
                                                              "channel is served by one pool")
                    good = False
                owner.setdefault(pattern, name)
            if channels is None or threads is None:
                good = False
            else:
                pools[name] = (channels, threads)
        return pools if good else None

    def check_bridges(self, values: dict, bridge_validator: BridgeValidator | None) -> dict[str, BridgeConfig]:
        bridges = {}
        for name, settings in values.items():
            if not isinstance(settings, dict):
                self.problem(("bridges", name), f"must be a table: write [bridges.{_toml_key(name)}] on a line of "
                                                "its own, then its keys")
                continue
            table = f"bridges.{_toml_key(name)}"
            if not _BRIDGE_NAME.fullmatch(name):
                suggestion = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "irc"
                self.problem(("bridges", name), "a bridge's name may hold only lowercase letters, digits, '_' and "
                             f"'-' (it is used in channel names and logs), like [bridges.{suggestion}]", table=table)
            bridge_type = self.bridge_type(name, settings)
            enabled = True
            if "enabled" in settings and settings["enabled"] is not UNRESOLVED:
                enabled = self.boolean(("bridges", name, "enabled"), settings["enabled"])
            options = {key: value for key, value in settings.items() if key not in BRIDGE_KEYS}
            # A bridge whose values did not interpolate is not validated: its missing values are reported already.
            if bridge_validator and bridge_type and not contains_unresolved(options):
                options = self.validate_bridge(bridge_validator, name, bridge_type, options)
            if bridge_type is not None and enabled is not None:
                bridges[name] = BridgeConfig(name=name, type=bridge_type, enabled=enabled, options=options)
        return bridges

    def bridge_type(self, name: str, settings: dict) -> str | None:
        path = ("bridges", name, "type")
        types = ", ".join(f'"{known}"' for known in BUILTIN_BRIDGE_TYPES)
        if "type" not in settings:
            hint = f'; add type = "{name}"' if name in BUILTIN_BRIDGE_TYPES else ""
            nested = [key for key, value in settings.items() if isinstance(value, dict) and "type" in value]
            if nested:  # [bridges.irc.v2] is a table v2 inside [bridges.irc], not a bridge named "irc.v2"
                outer, inner = _toml_key(name), _toml_key(nested[0])
                hint = (f"; a bridge's name has no dots: [bridges.{outer}.{inner}] is a table inside "
                        f"[bridges.{outer}], name it [bridges.{outer}-{inner}]")
            self.problem(path, f"missing: every bridge needs a type: {types} or a third-party bridge's type{hint}")
            return None
        value = settings["type"]
        if value is UNRESOLVED:
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(path, f"must be {types} or a third-party bridge's type, got {_show(value)}")
            return None
        close = difflib.get_close_matches(value, BUILTIN_BRIDGE_TYPES, n=1, cutoff=0.75)
        if value not in BUILTIN_BRIDGE_TYPES and close:
            # Only a warning: a third-party type may be named like a built-in one ("mqtt5").
            self.warn(path, f'"{value}" is not a built-in bridge type; did you mean "{close[0]}"? '
                            "(fine if it is a third-party bridge)")
        return value

    def validate_bridge(self, validator: BridgeValidator, name: str, bridge_type: str, options: dict) -> dict:
        try:
            checked = validator(bridge_type, dict(options))
        except Exception as exc:
            errors = list(_leaves(exc))
            # A validator's own bug is not a config mistake: let it surface with its traceback.
            if not all(hasattr(error, "key") or isinstance(error, ValueError | LookupError) for error in errors):
                raise
            for error in errors:
                key = getattr(error, "key", None)
                key_parts = tuple(key) if isinstance(key, tuple | list) else (key,) if key else ()
                message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
                if isinstance(getattr(error, "problem", None), str):  # bridges.base.OptionError: the bare reason
                    message = error.problem
                elif isinstance(key, str):  # "port: must be..." would read "port: port: must be..."
                    message = message.removeprefix(f"{key}: ")
                self.problem(("bridges", name, *key_parts), message or type(error).__name__)
            return options
        return options if checked is None else dict(checked)


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. \"127.0.0.1:9464\", or \"[::1]:9464\" for IPv6)")
    return host.strip("[]"), int(port)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""
