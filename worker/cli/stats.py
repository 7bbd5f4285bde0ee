"""Queue depth for people and autoscalers: ``mailworker queue stats``."""

from __future__ import annotations

from typing import Any

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, fail, settings_or_fail
from common.keys import QUEUES, dead_index_key, scheduled_key
from settings import public_url
from worker.broker.keys import dq_name, queue_key, queue_messages_key

__all__ = ["queue", "queue_stats"]


def queue_stats(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The broker's message counts, in one round trip.

    Per priority: ``ready`` (waiting to be fetched), ``in_flight`` (fetched, not yet
    acknowledged) and ``delayed`` (short retries and waits not yet due). ``scheduled``
    (jobs with a ``send_at``, long retries and waits, in Redis) and ``dead`` are overall.
    Counts are broker messages: a bulk message (``enqueue_many``) carries up to 20 jobs.
    """
    with client.pipeline(transaction=False) as pipe:
        for queue in QUEUES.values():
            pipe.llen(queue_key(namespace, queue))
            pipe.hlen(queue_messages_key(namespace, queue))
            pipe.hlen(queue_messages_key(namespace, dq_name(queue)))
        pipe.zcard(scheduled_key(namespace))
        pipe.zcard(dead_index_key(namespace))
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
    stats["scheduled"] = replies[-2]
    stats["dead"] = replies[-1]
    return stats


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
    """Jobs ready, in flight and delayed per priority, and dead letters."""
    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    try:
        stats = queue_stats(connect_settings(settings, url), settings.namespace)
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
    click.echo(f"dead letters: {stats['dead']}")
