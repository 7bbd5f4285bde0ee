"""The broker connection of producers and CLI commands, and what its failures mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from common import sockets
from settings import BrokerAuthenticationError, BrokerUnavailableError

__all__ = ["broker_error", "connect"]


def broker_error(label: str, exc: redis.RedisError) -> BrokerUnavailableError:
    """The error for a failed broker call, in words that say what the broker did.

    Args:
        label: the broker URL with its password masked (``public_url``).
        exc: what redis-py raised.

    Returns:
        A ``BrokerAuthenticationError`` when the broker refused the login or a command
        (its message says which, and how to fix it), else a ``BrokerUnavailableError``.
        Neither message holds a secret.
    """
    parts = urlsplit(label)
    user = f"ACL user {parts.username!r}" if parts.username else "the default user"
    kind = exc.__class__.__name__
    if isinstance(exc, redis.AuthenticationError):
        if parts.password is None and "password=" not in parts.query:
            return BrokerAuthenticationError(
                f"broker {label} requires a password ({kind}): give it in broker_url "
                "or MAILWORKER_BROKER_URL as redis://[user]:password@host:port/db"
            )
        return BrokerAuthenticationError(
            f"broker {label} refused the login ({kind}): the password in broker_url is "
            f"wrong, or {user} is unknown or disabled"
        )
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return BrokerAuthenticationError(
            f"broker {label} refused a command to {user} ({kind}: {exc}): its ACL must "
            "allow mailworker's commands on the namespace's keys and channels"
        )
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return BrokerUnavailableError(
            f"broker {label} is a read-only replica ({kind}): point broker_url at the "
            "primary"
        )
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return BrokerUnavailableError(
            f"broker {label} is still loading its data set ({kind}): try again"
        )
    return BrokerUnavailableError(f"broker {label} unreachable: {kind}")


def connect(url: str, *, ca_bundle: Path | None = None) -> redis.Redis:
    """Return a Redis client for ``url`` (bytes replies, as Dramatiq needs).

    Args:
        url: ``redis://`` or ``rediss://`` URL.
        ca_bundle: extra trust for ``rediss://``.

    Returns:
        A client. It connects lazily.
    """
    options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 10}
    if ca_bundle is not None and url.startswith("rediss://"):
        options["ssl_ca_certs"] = str(ca_bundle)
    if url.startswith("redis://") and sockets.supported():
        # The same 10 s bound, kept by the kernel: no poll before each send and read.
        del options["socket_timeout"]
        options.update(connection_class=sockets.KernelTimeoutConnection, io_timeout=10)
    return redis.Redis.from_url(url, **options)
