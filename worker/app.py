"""The composition root.

``build(settings)`` makes the broker, middleware, transports and the actor. Nothing else
constructs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import dramatiq
import redis
from dramatiq import Middleware
from dramatiq.middleware import CurrentMessage
from pydantic import SecretStr

from common.broker import connect_settings
from common.keys import ACTOR_NAME, BATCH_ACTOR_NAME, QUEUES
from settings import Settings, read_secret
from settings.endpoints import parse_broker_url
from worker.actions.keys import ActionKeys
from worker.actors import JobHandler
from worker.broker.broker import MailBroker
from worker.broker.scripts import close_connections
from worker.bulk import BulkHandler, SingleJobs
from worker.deadletter import DeadLetters
from worker.delivery import Deliverer
from worker.inbound.suppression import SuppressionList
from worker.limits import Breaker
from worker.middleware.bulk_slots import BulkSlots
from worker.middleware.dead_letters import DeadLetterCapture
from worker.middleware.draining import Draining
from worker.middleware.heartbeat import Heartbeat
from worker.middleware.log_context import LogContext
from worker.middleware.release import Releaser
from worker.middleware.retries import ReliableRetries
from worker.middleware.tuning import WorkerTuning
from worker.middleware.wake import Waker
from worker.services import build_services
from worker.status import StatusStore
from worker.transports.base import Transport

# build_services: a re-export
__all__ = ["WorkerApp", "build", "build_services", "secrets_of"]


@dataclass
class WorkerApp:
    """Everything a worker process runs with."""

    settings: Settings
    client: redis.Redis
    broker: MailBroker
    status: StatusStore
    deliverer: Deliverer
    actor: dramatiq.Actor[..., None]
    transports: list[Transport] = field(default_factory=list)

    def close(self) -> None:
        """Close pooled connections and the broker."""
        for transport in self.transports:
            transport.close()
        self.broker.close()
        close_connections(self.client)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the configuration holds, for the log redaction filter.

    Raises:
        ConfigError: a secret file cannot be read. It names the ``*_file`` key.
    """
    pairs: list[tuple[SecretStr | None, Path | None, str]] = []
    for conn in settings.smtp:
        pairs.append((conn.password, conn.password_file, f"smtp[{conn.name}].password"))
    for hook in settings.webhook:
        if hook.enabled:
            pairs.append(
                (hook.secret, hook.secret_file, f"webhook[{hook.name}].secret")
            )
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
    for source in settings.inbound:
        pairs.append(
            (source.password, source.password_file, f"inbound[{source.name}].password")
        )
    for hook in settings.webhook:
        pairs.append((hook.secret, hook.secret_file, f"webhook[{hook.name}].secret"))
    bounces = settings.bounces
    pairs.append((bounces.secret, bounces.secret_file, "bounces.secret"))
    values = []
    for inline, path, field_name in pairs:
        # An error names the key the user wrote: `password_file` when a file is given.
        secret = read_secret(inline, path, field_name + ("_file" if path else ""))
        if secret is not None:
            values.append(secret.get_secret_value())
    broker = parse_broker_url(settings.broker_url.get_secret_value())
    broker_password = broker.password or urlsplit(broker.url).password
    return [v for v in [*values, broker_password, broker.sentinel_password] if v]


def build(
    settings: Settings,
    *,
    client: redis.Redis | None = None,
    backoff: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    single_jobs: SingleJobs | None = None,
) -> WorkerApp:
    """Create the worker's broker, middleware, transports and actor.

    Args:
        settings: the configuration.
        client: a Redis client to use instead of one from ``broker_url`` (tests, dev);
            it keeps its own replication policy (``common.broker.require_replicas``).
        backoff: the first in-process retry wait, in seconds.
        sleep: how in-process retries wait.
        single_jobs: how bulk messages wait for single jobs (``worker.bulk``).

    Returns:
        The application. Its broker has the ``deliver`` actor and every priority queue.

    Raises:
        ConfigError: the configuration cannot run a worker.
    """
    # A client given here keeps its own [broker] wait_replicas policy
    # (common.broker.require_replicas); one made here has the configuration's.
    client = client or connect_settings(settings)
    services = build_services(settings, client)
    policy = settings.retry
    status = StatusStore(
        client,
        namespace=settings.namespace,
        ttl=settings.status.ttl,
        events=settings.events,
        max_dead_letters=settings.status.max_dead_letters,
    )
    dead_letters = DeadLetters(
        client, namespace=settings.namespace, ttl=settings.status.ttl, status=status
    )
    draining = Draining()
    waker = Waker(client, settings.namespace)
    webhooks: list[Middleware] = []
    if any(hook.enabled for hook in settings.webhook):
        # Imported only here: requests and the webhook loop cost nothing without one.
        from worker.events.runner import WebhookDelivery, build_deliverers

        webhooks.append(WebhookDelivery(build_deliverers(settings, client)))
    single_jobs = single_jobs or SingleJobs()
    bulk_slots = BulkSlots(single_jobs)
    broker = MailBroker(
        status=status,
        dead_letters=dead_letters,
        waker=waker,
        stopping=draining.event,
        bulk_slots=bulk_slots,
        client=client,
        namespace=settings.namespace,
        # Dramatiq's own, random maintenance waits longer, so our reaper (which counts
        # redeliveries for redelivery_limit) always takes a dead worker's jobs back first.
        heartbeat_timeout=int(policy.redelivery_timeout * 4000),
        middleware=[
            CurrentMessage(),
            LogContext(),
            ReliableRetries(policy),
            DeadLetterCapture(status),
            Heartbeat(timeout=policy.redelivery_timeout, ttl=settings.status.ttl),
            draining,
            WorkerTuning(),
            bulk_slots,
            waker,
            Releaser(),
            *webhooks,
        ],
    )
    breaker = Breaker(
        client,
        settings.namespace,
        failures=settings.breaker.failures,
        cooldown=settings.breaker.cooldown,
    )
    deliverer = Deliverer(
        services, retry=policy, backoff=backoff, sleep=sleep, breaker=breaker
    )
    handler = JobHandler(
        settings,
        status=status,
        deliverer=deliverer,
        broker=broker,
        single_jobs=single_jobs,
        suppression=SuppressionList(client, namespace=settings.namespace),
        actions=ActionKeys(
            client,
            namespace=settings.namespace,
            key_ttl=settings.email_actions.key_ttl,
            keep=settings.status.ttl,
        )
        if settings.email_actions.enabled
        else None,
    )
    bulk = BulkHandler(
        handler,
        status=status,
        deliverer=deliverer,
        draining=draining.event,
        single_jobs=single_jobs,
    )

    def deliver(*args: object, **kwargs: object) -> None:
        handler(*args, **kwargs)

    actor: dramatiq.Actor[..., None] = dramatiq.actor(
        broker=broker, actor_name=ACTOR_NAME, queue_name=QUEUES["normal"]
    )(deliver)

    def deliver_batch(*args: object, **kwargs: object) -> None:
        bulk(*args, **kwargs)

    dramatiq.actor(
        broker=broker,
        actor_name=BATCH_ACTOR_NAME,
        queue_name=QUEUES["bulk"],
        # Within a process, single jobs (high priority ones too) go before bulk messages.
        priority=10,
    )(deliver_batch)
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
