"""Secrets in the config: where their values come from, and what a secret written into the file looks like.

This module owns the three sources a ``${...}`` reference reads (the environment, a file, a systemd
credential under ``$CREDENTIALS_DIRECTORY``), with the advice each failure gives, and the warning
about a secret written literally into the file, which is often readable by more people than the
secret. It knows no table and no bridge: a key is secret by its name alone. It is not the
``${...}`` syntax (``interpolation.py``) and not the masking of passwords in printed URLs, which
is ``crossroads.layer.mask_url`` because the layer masks its own log lines too.

Named ``secret``, not ``secrets``: whenever this folder is on ``sys.path`` (a file in it run as a
script), a ``secrets.py`` here would stand in for the standard library's, which the layer uses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from crossroads.layer.base import URL_PASSWORD


class SecretUnavailable(Exception):
    """A reference whose value cannot be read; ``str()`` says why and what to do."""


def from_environment(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if value is None:
        raise SecretUnavailable(f"environment variable {name} is not set: set it in the environment "
                                "(under systemd, in the unit's Environment= or EnvironmentFile=), or read the "
                                "value from a file with ${file:path} or ${credential:NAME}")
    return value


def from_file(directory: Path, argument: str) -> str:
    """``${file:argument}``; a relative path is relative to ``directory``, the config file's."""
    if not argument:
        raise SecretUnavailable("${file:} names no file: write ${file:path/to/file}")
    file = Path(argument)
    file = file if file.is_absolute() else directory / file
    return _read_text(file, f"${{file:{argument}}}", "create it, or fix the path (a relative path is relative to "
                                                     "the config file's directory)")


def from_credential(environ: Mapping[str, str], name: str) -> str:
    """``${credential:name}``: the file systemd's ``LoadCredential=`` puts in ``$CREDENTIALS_DIRECTORY``."""
    if not name or "/" in name or name in (".", ".."):
        raise SecretUnavailable(f"${{credential:{name}}}: a credential name is a plain file name, like "
                                "${credential:irc-password}")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise SecretUnavailable(f"${{credential:{name}}}: $CREDENTIALS_DIRECTORY is not set, so there are no "
                                f"systemd credentials: add LoadCredential={name}:/path/to/secret to the unit "
                                f"(or, outside systemd, set CREDENTIALS_DIRECTORY to a directory holding a file "
                                f"{name})")
    return _read_text(Path(directory) / name, f"${{credential:{name}}}",
                      f"add LoadCredential={name}:/path/to/secret to the unit")


def _read_text(file: Path, reference: str, advice: str) -> str:
    try:
        return _strip_newline(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SecretUnavailable(f"{reference}: no such file {file}; {advice}") from None
    except OSError as exc:
        raise SecretUnavailable(f"{reference}: cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretUnavailable(f"{reference}: {file} is not UTF-8 text") from None


def _strip_newline(text: str) -> str:
    # One line ending, as `echo secret > file` and systemd-creds write it; anything else is the secret's own.
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


# -- secrets written into the file --

_SECRET_WORDS = {"password", "passwd", "passphrase", "token", "secret", "secrets", "credentials"}
# Whole key names: "key" is an IRC channel's key (tls_key and key_file name files, and are not secrets).
_SECRET_KEYS = {"symmetric_encryption_keys", "api_key", "apikey", "private_key", "key"}
# password_file names where a secret is; it is not one.
_NOT_SECRET_SUFFIXES = {"file", "path", "dir", "directory", "env", "command", "url"}


def looks_secret(key: str) -> bool:
    key = key.lower()
    words = re.split(r"[_.-]", key)
    return key in _SECRET_KEYS or (bool(_SECRET_WORDS & set(words)) and words[-1] not in _NOT_SECRET_SUFFIXES)


def env_name(table: str | None, key: str, item: str = "") -> str:
    """A name to suggest for a secret's variable: [bridges.irc] password -> IRC_PASSWORD.

    ``item`` names the list entry the key sits in (the ``name`` beside an IRC channel's ``key``):
    {name = "#ops", key = ...} in [bridges.irc] -> IRC_OPS_KEY.
    """
    stem = (table or "").removeprefix("bridges.").strip('"')
    parts = [part for part in (stem, item, key) if part]
    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join(parts)).strip("_").upper()


def literal_secret_warning(table: str | None, key: str, raw: str, interpolated: bool, item: str = "") -> str | None:
    """The warning for the value ``raw`` of ``key`` as written in the file, or None if it holds no secret."""
    name = env_name(table, key, item)
    suggestion = (f'"${{{name}}}" (environment) or '
                  f'"${{credential:{name.lower().replace("_", "-")}}}" (systemd LoadCredential=)')
    if looks_secret(key) and raw and not interpolated:
        return f"a secret written into the config file: keep it out of the file, use {suggestion}"
    found = URL_PASSWORD.search(raw)
    if found and "${" not in (found.group(1) or found.group(2)):
        return ("a URL with a password written into the config file: take the password (or the whole URL) from the "
                f"environment or a credential, e.g. {suggestion}")
    return None
