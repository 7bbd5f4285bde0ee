"""The composition root: ``build(settings)`` makes the broker, middleware, transports
and the actor, and nothing else constructs them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Retries, TimeLimit
from pydantic import SecretStr

from producers.enqueue import connect
from producers.job import Mailbox
from producers.keys import ACTOR_NAME, QUEUES
from settings import ConfigError, Settings, SmtpConnection, read_secret
from worker.actors import DeadLetterError, JobHandler
from worker.delivery import Deliverer, Service
from worker.middleware import LogContext
from worker.status import StatusStore
from worker.transports.base import Transport
from worker.transports.smtp import SmtpTransport

__all__ = ["WorkerApp", "build", "build_services", "secrets_of"]

TIME_LIMIT_MS = 10 * 60 * 1000


@dataclass
class WorkerApp:
    """Everything a worker process runs with."""

    settings: Settings
    client: redis.Redis
    broker: RedisBroker
    status: StatusStore
    deliverer: Deliverer
    actor: dramatiq.Actor[..., None]
    transports: list[Transport] = field(default_factory=list)

    def close(self) -> None:
        """Close pooled connections and the broker."""
        for transport in self.transports:
            transport.close()
        self.broker.close()


def _password_reader(conn: SmtpConnection) -> Callable[[], str | None]:
    field_name = f"smtp[{conn.name}].password_file"
    first = read_secret(conn.password, conn.password_file, field_name)  # fail at start

    def current() -> str | None:
        if conn.password_file is None:
            return first.get_secret_value() if first is not None else None
        secret = read_secret(
            None, conn.password_file, field_name
        )  # re-read: may be rotated
        return secret.get_secret_value() if secret is not None else None

    return current


def build_services(settings: Settings) -> list[Service]:
    """Enabled services in delivery order (DESIGN §5), secrets read now.

    Raises:
        ConfigError: a secret file is unreadable, or no service is enabled.
    """
    if any(oa.enabled for oa in settings.openauth):
        raise ConfigError(
            "openauth", "OpenAuth delivery is not available in this version"
        )
    services = []
    for conn in settings.smtp:
        if not conn.enabled:
            continue
        transport = SmtpTransport(conn, password=_password_reader(conn))
        services.append(
            Service(
                transport,
                Mailbox(address=conn.from_address, name=conn.from_display_name),
            )
        )
    if not services:
        raise ConfigError(
            "smtp", "no enabled service: configure an [[smtp]] connection"
        )
    return services


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the configuration holds, for the log redaction filter.

    Raises:
        ConfigError: a secret file cannot be read; names the ``*_file`` key.
    """
    pairs: list[tuple[SecretStr | None, Path | None, str]] = []
    for conn in settings.smtp:
        pairs.append((conn.password, conn.password_file, f"smtp[{conn.name}].password"))
    for name, svc in settings.integrated_services.items():
        prefix = f"integrated_services.{name}"
        pairs.append(
            (svc.client_secret, svc.client_secret_file, f"{prefix}.client_secret")
        )
        pairs.append(
            (
                svc.private_key_passphrase,
                svc.private_key_passphrase_file,
                f"{prefix}.private_key_passphrase",
            )
        )
    values = []
    for inline, path, field_name in pairs:
        # An error names the key the user wrote: `password_file` when a file is given.
        secret = read_secret(inline, path, field_name + ("_file" if path else ""))
        if secret is not None:
            values.append(secret.get_secret_value())
    broker_password = urlsplit(settings.broker_url.get_secret_value()).password
    return [v for v in [*values, broker_password] if v]


def build(
    settings: Settings,
    *,
    client: redis.Redis | None = None,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> WorkerApp:
    """Create the worker's broker, middleware, transports and actor.

    Args:
        settings: the configuration.
        client: a Redis client to use instead of one from ``broker_url`` (tests, dev).
        backoff: the first in-process retry wait, in seconds.
        sleep: how in-process retries wait.

    Returns:
        The application; its broker has the ``deliver`` actor and every priority queue.

    Raises:
        ConfigError: the configuration cannot run a worker.
    """
    services = build_services(settings)
    client = client or connect(
        settings.broker_url.get_secret_value(), ca_bundle=settings.broker_ca_bundle
    )
    policy = settings.retry
    broker = RedisBroker(  # type: ignore[no-untyped-call]  # dramatiq leaves it unannotated
        client=client,
        namespace=settings.namespace,
        middleware=[
            TimeLimit(time_limit=TIME_LIMIT_MS),
            CurrentMessage(),
            LogContext(),
            Retries(
                max_retries=policy.max_attempts,
                min_backoff=int(policy.min_backoff * 1000),
            ),
        ],
    )
    status = StatusStore(client, namespace=settings.namespace, ttl=settings.status.ttl)
    deliverer = Deliverer(services, retry=policy, backoff=backoff, sleep=sleep)
    handler = JobHandler(settings, status=status, deliverer=deliverer)

    def deliver(*args: object, **kwargs: object) -> None:
        handler(*args, **kwargs)

    actor: dramatiq.Actor[..., None] = dramatiq.actor(
        broker=broker,
        actor_name=ACTOR_NAME,
        queue_name=QUEUES["normal"],
        throws=(DeadLetterError,),
    )(deliver)
    for queue in QUEUES.values():
        broker.declare_queue(queue)
    return WorkerApp(
        settings=settings,
        client=client,
        broker=broker,
        status=status,
        deliverer=deliverer,
        actor=actor,
        transports=[s.transport for s in services],
    )
