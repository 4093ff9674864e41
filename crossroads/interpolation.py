"""``${...}`` references in config values: their syntax, and the text that replaces each.

This module owns the forms ``${ENV_VAR}``, ``${file:path}`` and ``${credential:NAME}``, the escape
``$${`` for a literal ``${``, and the stand-in for a value whose reference failed. Reading a
reference's value (and what to do when it cannot be read) belongs to ``secret.py``; where in the
file a value sits, to the caller, which gets the problems back as plain messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import secret

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")  # an escape, a reference, or an unclosed "${"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FORMS = "use ${ENV_VAR}, ${file:path} or ${credential:NAME}, and $${ for a literal ${"


class _Unresolved:
    """Stands in for a value whose interpolation failed: reported already, so not checked again."""

    def __repr__(self) -> str:
        return "<unresolved>"


UNRESOLVED: Any = _Unresolved()


def contains_unresolved(value: Any) -> bool:
    if isinstance(value, dict):
        return any(contains_unresolved(item) for item in value.values())
    if isinstance(value, list):
        return any(contains_unresolved(item) for item in value)
    return value is UNRESOLVED


class Interpolator:
    """Expands the references of one config file: its environment, and its directory for relative paths."""

    def __init__(self, environ: Mapping[str, str], directory: Path) -> None:
        self.environ = environ
        self.directory = directory

    def expand(self, text: str) -> tuple[Any, bool, list[str]]:
        """(the text with every reference replaced, whether it held one, the problems); UNRESOLVED if one failed."""
        out, used, problems, start = [], False, [], 0
        for found in _REFERENCE.finditer(text):
            out.append(text[start:found.start()])
            start = found.end()
            if found.group(0) == "$${":
                out.append("${")
                continue
            used = True
            if found.group(1) is None:
                problems.append(f'"${{" is never closed by "}}": {FORMS}')
                continue
            # A resolved value is inserted as it is, never interpolated again: a secret may hold "${".
            try:
                out.append(self.resolve(found.group(1)))
            except (ValueError, secret.SecretUnavailable) as exc:  # a malformed reference, or an unreadable value
                problems.append(str(exc))
        out.append(text[start:])
        return (UNRESOLVED if problems else "".join(out)), used, problems

    def resolve(self, reference: str) -> str:
        """The value of the reference inside ``${...}``; ValueError if it is not one of the forms."""
        source, colon, argument = reference.partition(":")
        if not colon:
            if not _ENV_NAME.fullmatch(reference):
                raise ValueError(f"${{{reference}}} is not a valid reference: {FORMS}")
            return secret.from_environment(self.environ, reference)
        if source == "file":
            return secret.from_file(self.directory, argument)
        if source == "credential":
            return secret.from_credential(self.environ, argument)
        raise ValueError(f"${{{reference}}}: unknown source {source!r}: {FORMS}")
