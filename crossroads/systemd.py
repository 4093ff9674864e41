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

All are ``Type=notify`` (the daemons send READY=1 once serving), restart on
failure, run as a dynamic user with a hardened sandbox, and get secrets with
``LoadCredential=``: each ``${credential:NAME}`` the config uses is loaded from
``/etc/crossroads/credentials/NAME``.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_EXECUTABLE = "/usr/local/bin/crossroads"
DEFAULT_CONFIG = "/etc/crossroads/crossroads.toml"
CREDENTIALS_DIR = "/etc/crossroads/credentials"
_CREDENTIAL_RE = re.compile(r"(?<!\$)\$\{credential:([^}/]+)\}")

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
Restart=on-failure
RestartSec=2
TimeoutStopSec=60
{loads}{HARDENING}
[Install]
WantedBy=crossroads.target
"""


def render_units(executable: str = DEFAULT_EXECUTABLE, config: str = DEFAULT_CONFIG,
                 credentials: list[str] | None = None, wants: list[str] | None = None) -> dict[str, str]:
    """File name -> text of every unit; ``wants`` lists the instances the target starts."""
    credentials = credentials or []
    target_wants = f"Wants={' '.join(wants)}\n" if wants else ""
    return {
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


def write_units(directory: Path, units: dict[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in units.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
