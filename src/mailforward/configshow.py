"""``mailforward config show``: the effective settings as TOML, like ``postconf -n``.

Only what differs from the default is shown unless ``show_all``; secrets are
redacted (the database password; secret *files* are shown by path only, their
contents never read here).  A key left unset that takes another key's value
(``client_limit_exceptions``, Postfix's ``$mynetworks``) is shown by ``--all``
as a comment with the value it has now: pasted back, it still follows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .config import FOLLOWS, Settings

REDACTED = "********"


def redact_url(url: str) -> str:
    """A database URL with its password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


@dataclass(frozen=True)
class Follows:
    """An unset key that has the value of ``source`` (TOML has no way to say so)."""

    source: str
    value: Any


def effective_settings(settings: Settings, show_all: bool = False) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the settings in force, defaults left out unless ``show_all``."""
    shown: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        defaults = type(values)()
        keys = {}
        for field in dataclasses.fields(values):
            value = getattr(values, field.name)
            if not show_all and value == getattr(defaults, field.name):
                continue
            if value is None and FOLLOWS in field.metadata:
                source = field.metadata[FOLLOWS]
                value = Follows(source, _shown(section.name, source, getattr(values, source)))
            keys[field.name] = _shown(section.name, field.name, value)
        if keys:
            shown[section.name] = keys
    return shown


SECRET_URLS = {("database", "url"), ("limits", "redis_url")}


def _shown(section: str, key: str, value: Any) -> Any:
    if (section, key) in SECRET_URLS:
        return redact_url(value)
    return list(value) if isinstance(value, tuple) else value


def as_toml(shown: dict[str, dict[str, Any]]) -> str:
    """TOML an operator can paste back into mailforward.toml (JSON values are valid TOML
    for strings, numbers, booleans and lists of strings)."""
    lines: list[str] = []
    for section, keys in shown.items():
        lines.append(f"[{section}]")
        lines += [_toml_line(key, value) for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_line(key: str, value: Any) -> str:
    if isinstance(value, Follows):
        return f"# {key} = {_toml_value(value.value)}  (unset: follows {value.source})"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)
