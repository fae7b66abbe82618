"""Layering: the outbound side, the tables, the state stores and the base modules never import
the SMTP server (``mailforward.smtpd``) or the command line (``mailforward.cli``).

Read with ``ast``, not by importing, so an import inside a function or under
``TYPE_CHECKING`` counts too, and relative imports are resolved against the
module's own package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import mailforward

PACKAGE = Path(mailforward.__file__).parent
FORBIDDEN = ("mailforward.smtpd", "mailforward.cli")
PACKAGES = ("delivery", "auth", "tables", "state")
BASE_MODULES = ("reply.py", "dns.py", "addresses.py", "hostport.py", "config.py",
                "from_field.py", "headerfields.py", "errors.py")


def lower_layers() -> list[Path]:
    files = [path for name in PACKAGES for path in sorted((PACKAGE / name).glob("*.py"))]
    return files + [PACKAGE / name for name in BASE_MODULES]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, ``from x import y`` as x.y too."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield node.lineno, source
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}"


def reaches(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


def test_the_modules_checked_exist() -> None:
    missing = [str(path) for path in lower_layers() if not path.is_file()]
    assert not missing
    assert len(lower_layers()) > len(BASE_MODULES) + len(PACKAGES)


def test_relative_imports_are_resolved_against_the_package() -> None:
    names = {name for _, name in imported(PACKAGE / "delivery" / "spool.py")}
    assert {"mailforward.errors", "mailforward.delivery.base"} <= names


@pytest.mark.parametrize("path", lower_layers(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lower_layers_never_import_the_server_or_the_cli(path: Path) -> None:
    offending = [f"{path.relative_to(PACKAGE)}:{line}: {name}" for line, name in imported(path)
                 if any(reaches(name, forbidden) for forbidden in FORBIDDEN)]
    assert offending == []
