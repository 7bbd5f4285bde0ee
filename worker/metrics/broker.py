"""Gauges read from Redis at scrape time: queues, the oldest job, breakers, budgets.

What every worker shares lives in Redis, so it is read there once per scrape by the
process serving ``/metrics``, never kept by each worker: two round trips, and one per
service with a sending budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from common.keys import QUEUES, dead_index_key
from settings import Settings
from worker.broker.keys import dq_name, heartbeats_key, queue_key, queue_messages_key
from worker.limits import budgets

__all__ = ["BrokerCollector"]

log = structlog.get_logger("mailworker.metrics")


class BrokerCollector(Collector):
    """The shared state, read from Redis at each scrape.

    Args:
        settings: the configuration (namespace, services and their budgets).
        client: Redis.
    """

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self._settings = settings
        self._client = client
        self._ns = settings.namespace
        self._budgets = budgets(settings, client)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "mailworker_broker_up", "1 when this scrape could read the broker."
        )
        try:
            families = self._read()
        except redis.RedisError as exc:
            log.warning("metrics_broker_unreadable", error_type=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        ns, now = self._ns, time.time()
        with self._client.pipeline(transaction=False) as pipe:
            for queue in QUEUES.values():
                pipe.llen(queue_key(ns, queue))
                pipe.hlen(queue_messages_key(ns, queue))
                pipe.hlen(queue_messages_key(ns, dq_name(queue)))
                pipe.lindex(queue_key(ns, queue), 0)
            pipe.zcard(dead_index_key(ns))
            timeout = self._settings.retry.redelivery_timeout
            pipe.zcount(heartbeats_key(ns), int((now - timeout) * 1000), "+inf")
            for service in self._settings.delivery_order:
                pipe.hmget(f"{ns}:breaker:{service}", "failures", "open_until")
            replies = pipe.execute()
        queues = self._queues(replies[: 4 * len(QUEUES)], now)
        rest = replies[4 * len(QUEUES) :]
        dead = GaugeMetricFamily(
            "mailworker_dead_letters_stored", "Dead letters kept, all reasons."
        )
        dead.add_metric([], rest[0])
        processes = GaugeMetricFamily(
            "mailworker_worker_processes",
            "Worker processes whose heartbeat is recent, on every host.",
        )
        processes.add_metric([], rest[1])
        services = self._settings.delivery_order
        breakers = self._breakers(services, rest[2 : 2 + len(services)], now)
        return [*queues, dead, processes, *breakers, *self._budget_use()]

    def _queues(self, replies: list[Any], now: float) -> list[Metric]:
        depth = GaugeMetricFamily(
            "mailworker_queue_messages",
            "Broker messages per queue: ready, in_flight (fetched, not acknowledged), "
            "delayed (retries and waits not yet due). A bulk message carries up to 20 jobs.",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "mailworker_queue_oldest_age_seconds",
            "How long the next ready message of a queue has waited (0 when empty).",
            labels=["queue"],
        )
        heads: list[tuple[str, bytes]] = []
        for index, queue in enumerate(QUEUES.values()):
            ready, stored, delayed, head = replies[4 * index : 4 * index + 4]
            depth.add_metric([queue, "ready"], ready)
            depth.add_metric([queue, "in_flight"], max(0, stored - ready))
            depth.add_metric([queue, "delayed"], delayed)
            if head is not None:
                heads.append((queue, head))
        ages = dict.fromkeys(QUEUES.values(), 0.0)
        if heads:
            with self._client.pipeline(transaction=False) as pipe:
                for queue, head in heads:
                    pipe.hget(queue_messages_key(self._ns, queue), head)
                for (queue, _), raw in zip(heads, pipe.execute(), strict=True):
                    ages[queue] = _waited(raw, now)
        for queue, age in ages.items():
            oldest.add_metric([queue], age)
        return [depth, oldest]

    def _breakers(
        self, services: list[str], replies: list[Any], now: float
    ) -> list[Metric]:
        state = GaugeMetricFamily(
            "mailworker_breaker_open",
            "1 while a service's circuit breaker is open (skipped until its cooldown ends).",
            labels=["service"],
        )
        failures = GaugeMetricFamily(
            "mailworker_breaker_failures",
            "Consecutive failed deliveries a service's breaker has counted.",
            labels=["service"],
        )
        for service, (count, until) in zip(services, replies, strict=True):
            state.add_metric([service], 1 if until and float(until) > now else 0)
            failures.add_metric([service], int(count or 0))
        return [state, failures]

    def _budget_use(self) -> list[Metric]:
        """Each sending budget that is set (Office 365 mailboxes, SMTP connections)."""
        used = GaugeMetricFamily(
            "mailworker_budget_used",
            "Sending budget spent in its sliding window: messages (minute, hour), "
            "recipients (day).",
            labels=["service", "window"],
        )
        limit = GaugeMetricFamily(
            "mailworker_budget_limit",
            "The configured budget of the window.",
            labels=["service", "window"],
        )
        for service, budget in self._budgets.items():
            for setting, (count, cap) in budget.usage().items():
                window = _WINDOW[setting]
                used.add_metric([service, window], count)
                limit.add_metric([service, window], cap)
        return [used, limit]


# A budget's setting → the window label.
_WINDOW = {
    "messages_per_minute": "minute",
    "messages_per_hour": "hour",
    "recipients_per_day": "day",
}


def _waited(raw: bytes | None, now: float) -> float:
    """Seconds since a message became ready: its enqueue, or its due time (a retry)."""
    if raw is None:
        return 0.0
    try:
        message = orjson.loads(raw)
        since = float(message.get("message_timestamp", 0)) / 1000
        eta = (message.get("options") or {}).get("eta")
        if isinstance(eta, int | float):
            since = max(since, eta / 1000)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0.0
    return max(0.0, now - since) if since else 0.0
