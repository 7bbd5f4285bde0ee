"""Queue depth for people and autoscalers: ``mailworker queue stats``."""

from __future__ import annotations

from typing import Any

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, fail, settings_or_fail
from common.keys import QUEUES, counters_key, dead_index_key, scheduled_key
from settings import Settings, public_url
from worker.broker.keys import dq_name, queue_key, queue_messages_key
from worker.limits import budgets

__all__ = ["queue", "queue_stats"]


def queue_stats(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The broker's message counts, in one round trip.

    Per priority: ``ready`` (waiting to be fetched), ``in_flight`` (fetched, not yet
    acknowledged) and ``delayed`` (short retries and waits not yet due). ``scheduled``
    (jobs with a ``send_at``, long retries and waits, in Redis) and ``dead`` are overall;
    ``dead_trimmed`` counts the dead letters that went to keep
    ``status.max_dead_letters``.
    Counts are broker messages: a bulk message (``enqueue_many``) carries up to 20 jobs.
    """
    with client.pipeline(transaction=False) as pipe:
        for queue in QUEUES.values():
            pipe.llen(queue_key(namespace, queue))
            pipe.hlen(queue_messages_key(namespace, queue))
            pipe.hlen(queue_messages_key(namespace, dq_name(queue)))
        pipe.zcard(scheduled_key(namespace))
        pipe.zcard(dead_index_key(namespace))
        pipe.hget(counters_key(namespace), "dead_letters_trimmed")
        replies = pipe.execute()
    stats: dict[str, Any] = {"queues": {}}
    total = 0
    for index, (priority, queue) in enumerate(QUEUES.items()):
        ready, stored, delayed = replies[3 * index : 3 * index + 3]
        stats["queues"][priority] = {
            "queue": queue,
            "ready": ready,
            "in_flight": max(0, stored - ready),
            "delayed": delayed,
        }
        total += ready
    stats["ready_total"] = total
    stats["scheduled"] = replies[-3]
    stats["dead"] = replies[-2]
    stats["dead_trimmed"] = int(replies[-1] or 0)
    return stats


def budget_use(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """Per service with a sending budget, each budget's use in its window now."""
    return {
        service: {
            name: {"used": used, "limit": limit}
            for name, (used, limit) in budget.usage().items()
        }
        for service, budget in budgets(settings, client).items()
    }


@click.group()
def queue() -> None:
    """Inspect the queues."""


@queue.command("stats")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object (for autoscalers)."
)
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
def queue_stats_command(as_json: bool, broker_url: str | None) -> None:
    """Jobs ready, in flight and delayed per priority, dead letters, and budgets."""
    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    try:
        client = connect_settings(settings, url)
        stats = queue_stats(client, settings.namespace)
        stats["budgets"] = budget_use(settings, client)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    if as_json:
        click.echo(orjson.dumps(stats).decode())
        return
    click.echo(
        f"{'priority':<10}{'queue':<12}{'ready':>8}{'in flight':>11}{'delayed':>9}"
    )
    for priority, row in stats["queues"].items():
        click.echo(
            f"{priority:<10}{row['queue']:<12}{row['ready']:>8}{row['in_flight']:>11}"
            f"{row['delayed']:>9}"
        )
    click.echo(f"scheduled: {stats['scheduled']}")
    trimmed = stats["dead_trimmed"]
    past = f" ({trimmed} trimmed past status.max_dead_letters)" if trimmed else ""
    click.echo(f"dead letters: {stats['dead']}{past}")
    for service, use in stats["budgets"].items():
        spent = ", ".join(
            f"{name} {row['used']}/{row['limit']}" for name, row in use.items()
        )
        click.echo(f"budget {service}: {spent}")
