"""The root of mailworker's error tree, shared by every room.

Only the two errors that the lowest rooms raise live here; ``worker.errors`` builds
the rest of the tree on top of them (settings ← producers ← worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "ConfigError",
    "JobValidationError",
    "MailworkerError",
]


class MailworkerError(Exception):
    """Base class of every error mailworker raises on purpose."""


class ConfigError(MailworkerError, ValueError):
    """The configuration is invalid; ``field`` names the key at fault. Never retried.

    One error may carry several problems (``problems``: (field, message) pairs, the
    first one being ``field``'s); its text is then one line per problem.
    """

    def __init__(
        self, field: str, message: str, *, more: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.field = field
        self.reason = message
        self.problems: list[tuple[str, str]] = [(field, message), *more]
        super().__init__("\n".join(f"{f}: {m}" if f else m for f, m in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (e.g. by a process pool) with the arguments it is built from.
        return _rebuild_config_error, (type(self), self.problems)


def _rebuild_config_error(
    cls: type[ConfigError], problems: list[tuple[str, str]]
) -> ConfigError:
    (field, message), *more = problems
    return cls(field, message, more=more)


class JobValidationError(MailworkerError, ValueError):
    """A notification is invalid; ``field`` names the part at fault, ``reason`` says why.

    Raised however a job is built (``Notification(...)``, ``model_validate``, JSON,
    ``parse_job``), never pydantic's own ``ValidationError``; it is a ``ValueError``.
    Never retried.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[type[JobValidationError], tuple[str, str]]:
        # Pickled (e.g. by a process pool) with the two arguments it is built from.
        return type(self), (self.field, self.reason)


class BrokerUnavailableError(MailworkerError):
    """The broker (Redis) cannot be reached or used; nothing was enqueued (CLI exit 4)."""


class BrokerAuthenticationError(BrokerUnavailableError):
    """The broker refused the login of ``broker_url`` (password or ACL user), or the ACL
    user may not run a command mailworker needs; nothing was enqueued (CLI exit 4)."""
