"""`mailworker queue stats`: what autoscalers and people read."""

from __future__ import annotations

import json
import subprocess

from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.helpers import wire_enqueue
from tests.support.processes import MAILWORKER, clean_env
from worker.cli.stats import queue_stats


def test_stats_count_ready_delayed_and_dead_per_priority(
    redis_client, namespace, tmp_path, redis_url
):
    """Ready jobs per priority, delayed ones and dead letters are counted, also by the CLI."""
    producer = Producer(redis_client, namespace=namespace)
    for _ in range(3):
        producer.enqueue(Notification(to=["a@example.org"], subject="s", text="t"))
    for _ in range(2):
        producer.enqueue(
            Notification(to=["a@example.org"], subject="s", text="t", priority="high")
        )
    wire_enqueue(
        redis_client, namespace, {"to": ["a@example.org"]}, queue="mail-bulk.DQ"
    )
    redis_client.zadd(f"{namespace}:dead", {"x": 1})
    stats = queue_stats(redis_client, namespace)
    assert stats["queues"]["normal"] == {
        "queue": "mail",
        "ready": 3,
        "in_flight": 0,
        "delayed": 0,
    }
    assert stats["queues"]["high"]["ready"] == 2
    assert stats["queues"]["bulk"]["delayed"] == 1
    assert stats["ready_total"] == 5 and stats["dead"] == 1
    config = write_toml(
        tmp_path / "c.toml", {"broker_url": redis_url, "namespace": namespace}
    )
    out = subprocess.run(
        [MAILWORKER, "queue", "stats", "--json"],
        capture_output=True,
        text=True,
        env=clean_env(MAILWORKER_CONFIG=str(config)),
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == {**stats, "budgets": {}}
    human = subprocess.run(
        [MAILWORKER, "queue", "stats"],
        capture_output=True,
        text=True,
        env=clean_env(MAILWORKER_CONFIG=str(config)),
        timeout=60,
        check=True,
    )
    assert "mail-high" in human.stdout and "dead letters: 1" in human.stdout
