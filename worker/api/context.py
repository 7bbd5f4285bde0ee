"""What the API's handlers share: the configuration and the stores on one Redis client."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from producers import Producer
from settings import Settings, public_url
from worker.api.enqueuer import Enqueuer
from worker.api.keys import ApiKeys
from worker.api.ratelimit import RateLimiter
from worker.deadletter import DeadLetters
from worker.status import StatusStore

__all__ = ["ApiContext"]


@dataclass(frozen=True)
class ApiContext:
    """The configuration and the stores, built once per API process."""

    settings: Settings
    client: redis.Redis
    producer: Producer
    status: StatusStore
    dead: DeadLetters
    keys: ApiKeys
    limiter: RateLimiter
    enqueuer: Enqueuer
    body_cap: int

    @classmethod
    def build(cls, settings: Settings, client: redis.Redis) -> ApiContext:
        """The stores for ``settings`` on ``client`` (the broker's)."""
        ns = settings.namespace
        status = StatusStore(client, namespace=ns, ttl=settings.status.ttl)
        producer = Producer(
            client,
            namespace=ns,
            limits=settings.limits,
            status_ttl=settings.status.ttl,
            idempotency_ttl=settings.status.idempotency_ttl,
            broker_label=public_url(settings.broker_url.get_secret_value()),
            email_actions=settings.email_actions.enabled,
        )
        return cls(
            settings=settings,
            client=client,
            producer=producer,
            status=status,
            dead=DeadLetters(
                client, namespace=ns, ttl=settings.status.ttl, status=status
            ),
            keys=ApiKeys(client, ns),
            limiter=RateLimiter(client, ns, settings.api.rate_limit),
            enqueuer=Enqueuer(producer),
            body_cap=settings.api.body_cap(settings.limits),
        )
