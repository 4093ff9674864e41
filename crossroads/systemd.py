"""systemd unit files for a crossroads deployment.

Owns the text of the units; ``crossroads systemd`` writes them for a config, and
``deploy/systemd/`` holds the same templates rendered with the default paths
(a test keeps the two in step). Layout:

- ``crossroads-bridge@.service``: one bridge instance per unit, the instance
  being the bridge's table name (``crossroads-bridge@web.service``);
- ``crossroads-worker@.service``: worker processes, numbered (``@1``, ``@2``);
- ``crossroads.service``: the all-in-one ``crossroads run``, for a memory://
  layer, which cannot be shared between processes;
- ``crossroads.target``: starts and stops the set together.

All are ``Type=notify`` (the daemons send READY=1 once serving, and WATCHDOG=1
while alive: ``WatchdogSec=``), restart on failure, run as a dynamic user with a hardened sandbox, and get secrets with
``LoadCredential=``: each ``${credential:NAME}`` the config uses is loaded from
``/etc/crossroads/credentials/NAME``.

A bridge that listens for clients (one with a ``port`` option) gets a drop-in,
``crossroads-bridge@NAME.service.d/limits.conf``, raising ``LimitNOFILE``: every
client is a file descriptor. ``sandbox_problems`` names the paths a unit needs
that its own sandbox would hide (``ProtectHome=``, ``PrivateTmp=``) or that its
dynamic user cannot read, so ``crossroads systemd`` can warn before a unit fails.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

DEFAULT_EXECUTABLE = "/usr/local/bin/crossroads"
DEFAULT_CONFIG = "/etc/crossroads/crossroads.toml"
CREDENTIALS_DIR = "/etc/crossroads/credentials"
_CREDENTIAL_RE = re.compile(r"(?<!\$)\$\{credential:([^}/]+)\}")
_FILE_RE = re.compile(r"(?<!\$)\$\{file:([^}]+)\}")

# One client, one file descriptor: systemd's default soft limit (1024) caps a listening bridge at about a
# thousand connections. 65536 is what nginx and most servers' units ask for.
LISTENING_NOFILE = 65536
WATCHDOG_SEC = 30  # how long a hung daemon may go unpinged before systemd restarts it
NOFILE_RESERVE = 1024  # descriptors besides the clients': the layer's connections, logs, the bridges' own clients


def nofile_for(connections: int) -> int:
    """``LimitNOFILE`` for a process whose listeners may hold ``connections`` clients at once."""
    return max(LISTENING_NOFILE, connections + NOFILE_RESERVE)

# The folders HARDENING hides from the service: the service sees them empty (or its own private copy).
HIDDEN_BY = {
    "/home": "ProtectHome=yes",
    "/root": "ProtectHome=yes",
    "/run/user": "ProtectHome=yes",
    "/tmp": "PrivateTmp=yes",
    "/var/tmp": "PrivateTmp=yes",
}

HARDENING = """\
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
CapabilityBoundingSet=
# A bridge that listens on a port below 1024 needs, in a drop-in:
#   CapabilityBoundingSet=CAP_NET_BIND_SERVICE
#   AmbientCapabilities=CAP_NET_BIND_SERVICE
"""


def credentials_used(config_text: str) -> list[str]:
    """The credential names a config refers to as ``${credential:NAME}``."""
    return sorted(set(_CREDENTIAL_RE.findall(config_text)))


def files_used(config_text: str) -> list[str]:
    """The paths a config reads as ``${file:PATH}``, as written (a relative one is relative to the config)."""
    return sorted(set(_FILE_RE.findall(config_text)))


def hidden_by(path: Path) -> str | None:
    """The setting of HARDENING that hides ``path`` from the service (its symlinks followed), or None."""
    for candidate in (path.absolute(), path.resolve()):
        for folder, setting in HIDDEN_BY.items():
            if candidate == Path(folder) or Path(folder) in candidate.parents:
                return setting
    return None


def unreadable_by_others(path: Path) -> Path | None:
    """The first of ``path`` and its folders that a user other than its owner cannot read (or enter), if any.

    ``DynamicUser=yes`` runs the service as a user made up at start, which owns none of the files.
    """
    path = path.resolve()
    for folder in reversed(path.parents):
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None if os.stat(path).st_mode & stat.S_IROTH else path


def interpreter_of(script: Path) -> dict[str, Path]:
    """The Python a console script starts, from its ``#!`` line (a virtualenv's, usually), if it has one."""
    try:
        with script.open("rb") as file:
            first = file.readline(4096)
    except OSError:
        return {}
    if not first.startswith(b"#!/"):
        return {}
    return {"the Python it starts": Path(first[2:].split()[0].decode(errors="replace"))}


def sandbox_problems(needed: dict[str, Path]) -> list[str]:
    """What stops the units from reading each path in ``needed`` (what it is for -> the path), one line each."""
    problems = []
    for purpose, path in needed.items():
        setting = hidden_by(path)
        if setting is not None:
            shown = path if path.resolve() == path.absolute() else f"{path} (a link to {path.resolve()})"
            problems.append(f"{purpose} is {shown}, which the units' {setting} hides from the service")
        elif path.exists() and (closed := unreadable_by_others(path)) is not None:
            problems.append(f"{purpose} is {path}, which the units' DynamicUser=yes cannot read ({closed} is "
                            f"mode {stat.S_IMODE(os.stat(closed).st_mode):o})")
    return problems


def _service(description: str, command: str, executable: str, config: str, credentials: list[str]) -> str:
    loads = "".join(f"LoadCredential={name}:{CREDENTIALS_DIR}/{name}\n" for name in credentials)
    return f"""\
[Unit]
Description={description}
After=network-online.target redis-server.service
Wants=network-online.target
PartOf=crossroads.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={executable} {command} --config {config}
# SIGHUP re-reads the config: bridges whose tables did not change keep their connections (docs/running.md).
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
TimeoutStopSec=60
# The daemon sends WATCHDOG=1 every WatchdogSec/2 while its event loop turns and its worker threads are not all
# stuck ([worker] stuck_after); a hung process is killed (SIGABRT) and restarted.
WatchdogSec={WATCHDOG_SEC}
{loads}{HARDENING}
[Install]
WantedBy=crossroads.target
"""


def render_units(executable: str = DEFAULT_EXECUTABLE, config: str = DEFAULT_CONFIG,
                 credentials: list[str] | None = None, wants: list[str] | None = None,
                 listening: dict[str, int] | None = None, metrics: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> text of every unit; ``wants`` lists the instances the target starts.

    ``listening`` maps the instances that take clients to the connections their bridges may hold together
    (``max_connections``); each gets a drop-in raising ``LimitNOFILE`` to make room for them. ``metrics`` maps
    instances to the ``host:port`` of their /metrics: one config, a port per process, through a drop-in
    setting ``CROSSROADS_METRICS_LISTEN`` (which ``--metrics-listen`` defaults to).
    """
    credentials = credentials or []
    target_wants = f"Wants={' '.join(wants)}\n" if wants else ""
    units = {
        "crossroads-bridge@.service": _service("crossroads bridge %i", "bridge %i", executable, config, credentials),
        "crossroads-worker@.service": _service("crossroads worker %i", "worker", executable, config, credentials),
        "crossroads.service": _service("crossroads gateway, all in one process", "run", executable, config,
                                       credentials),
        "crossroads.target": f"""\
[Unit]
Description=crossroads gateway: its bridges and workers
{target_wants}
[Install]
WantedBy=multi-user.target
""",
    }
    for instance, connections in (listening or {}).items():
        units[f"{instance}.d/limits.conf"] = f"[Service]\nLimitNOFILE={nofile_for(connections)}\n"
    for instance, address in (metrics or {}).items():
        units[f"{instance}.d/metrics.conf"] = f"[Service]\nEnvironment=CROSSROADS_METRICS_LISTEN={address}\n"
    return units


def metrics_ports(listen: str, instances: list[str]) -> dict[str, str]:
    """Each instance's ``host:port`` for /metrics: ``[metrics] listen``'s port for the first, the next for each
    one after it, in the order given."""
    host, _, port = listen.rpartition(":")
    return {instance: f"{host}:{int(port) + index}" for index, instance in enumerate(instances)}


def write_units(directory: Path, units: dict[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        path = directory / name
        path.parent.mkdir(exist_ok=True)  # a drop-in's UNIT.d folder
        path.write_text(text)
        written.append(path)
    return written
