"""The exit codes of every ``mailworker`` command, and how a command fails."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from settings import ConfigError, Settings, load_settings

__all__ = [
    "EXIT_BROKER",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_USAGE",
    "fail",
    "settings_or_fail",
]

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_BROKER = 1, 2, 3, 4


def fail(code: int, message: str) -> NoReturn:
    """Print the cause on stderr, one line per problem, and exit with ``code``.

    A ``ConfigError`` with several problems is one line each: the lines after the first
    get its ``configuration:`` label too, so every line stands alone.
    """
    first, *rest = message.splitlines() or [""]
    label = "configuration: " if first.startswith("configuration: ") else ""
    for line in [first, *(label + more for more in rest)]:
        click.echo(f"mailworker: {line}", err=True)
    sys.exit(code)


def settings_or_fail() -> Settings:
    """The configuration.

    A command exits 2, naming each problem, when it is invalid.
    """
    try:
        return load_settings()
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
