"""Names that come from users and end up in folder names, DVC stage names and registry queries.

One pattern per kind, checked where a name enters (params, the command line, the registry), so a
quote, a slash or an ``OR`` never reaches a path or an MLflow filter string.
"""

from __future__ import annotations

import re

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # applications and datasets
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # registry aliases (champion, challenger, ...)


def check_name(name: str, what: str = "application") -> str:
    """``name`` when it matches :data:`NAME`, else ``ValueError`` saying what is allowed."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"invalid {what} name {name!r}: lower-case letters, digits, '-' and '_', "
                         "starting with a letter or digit, at most 64 characters")
    return name


def check_alias(alias: str) -> str:
    """``alias`` when it matches :data:`ALIAS`, else ``ValueError``."""
    if not isinstance(alias, str) or not ALIAS.match(alias):
        raise ValueError(f"invalid alias {alias!r}: letters, digits, '-' and '_', at most 64 characters")
    return alias
