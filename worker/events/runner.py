"""Runs the enabled webhooks' deliverers in each worker process, and stops them with it."""

from __future__ import annotations

import redis
from dramatiq import Broker, Middleware, Worker

from settings import Settings
from worker.events.deliverer import WebhookDeliverer
from worker.events.sender import WebhookSender
from worker.events.signing import signer_for
from worker.events.store import DeliveryStore

__all__ = ["WebhookDelivery", "build_deliverers"]


def build_deliverers(
    settings: Settings, client: redis.Redis, *, poll: float = 1.0
) -> list[WebhookDeliverer]:
    """A deliverer for each enabled ``[[webhook]]``, its secret read now.

    Args:
        settings: the configuration.
        client: the worker's Redis client.
        poll: seconds between looks at due retries and stale claims.

    Raises:
        ConfigError: a secret file cannot be read, or a secret is not a key.
    """
    deliverers = []
    for webhook in settings.webhook:
        if not webhook.enabled:
            continue
        store = DeliveryStore(
            client,
            namespace=settings.namespace,
            webhook=webhook.name,
            ttl=settings.status.ttl,
            max_dead_letters=settings.status.max_dead_letters,
        )
        deliverers.append(
            WebhookDeliverer(
                webhook,
                store=store,
                sender=WebhookSender(webhook, signer_for(webhook)),
                retry=settings.retry,
                poll=poll,
            )
        )
    return deliverers


class WebhookDelivery(Middleware):
    """Starts each webhook's deliverer when the worker boots, stops it when it stops.

    The deliverers stop being fed as the worker begins to shut down, and are waited for
    (the POST in flight, bounded by its timeout) after the worker's jobs are done.

    Args:
        deliverers: one per enabled webhook (``build_deliverers``).
    """

    def __init__(self, deliverers: list[WebhookDeliverer]) -> None:
        self.deliverers = deliverers

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        for deliverer in self.deliverers:
            deliverer.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        for deliverer in self.deliverers:
            deliverer.stop()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        for deliverer in self.deliverers:
            deliverer.join(timeout=deliverer.poll + 2 * deliverer.sender.timeout + 1)
