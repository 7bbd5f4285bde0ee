"""Send limits of [[smtp]] connections: messages a minute and an hour, recipients a day,
shared by every worker through Redis, with failover or a wait that is not an attempt."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import orjson
import pytest
import redis

from common.keys import scheduled_messages_key
from producers import Notification, Producer
from settings import ConfigError
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, WorkerProcess, clean_env
from worker.limits import Budget


def _send(redis_client, settings, count, *, bulk=False, **fields) -> list[str]:
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Invoice ready")
    fields.setdefault("text", "Your invoice is ready.")
    producer = Producer(
        redis_client, namespace=settings.namespace, limits=settings.limits
    )
    return producer.enqueue_many(
        (Notification(**fields) for _ in range(count)), bulk=bulk
    )


def _budget_skips(record: dict[str, Any]) -> list[str]:
    return [s["message"] for s in record["skipped"] if s["reason"] == "budget"]


# ---------------------------------------------------------------- the budget itself


def test_messages_are_spent_in_order_while_every_window_has_room(
    redis_client, namespace
):
    """A batch is spent from its first message until a window is full; the reply names
    that window and when it has room."""
    minute = Budget(redis_client, f"{namespace}:b1", per_minute=3, per_hour=5)
    spent = minute.spend_many([1, 1, 1, 1])
    assert (spent.count, spent.limit) == (3, "messages_per_minute")
    assert 0 < spent.wait <= 60
    hour = Budget(redis_client, f"{namespace}:b2", per_minute=10, per_hour=2)
    spent = hour.spend_many([1, 1, 1])
    assert (spent.count, spent.limit) == (2, "messages_per_hour")
    assert 60 < spent.wait <= 3600
    assert hour.usage() == {"messages_per_minute": (2, 10), "messages_per_hour": (2, 2)}


def test_recipients_per_day_counts_recipients_and_a_message_over_it_never_fits(
    redis_client, namespace
):
    """recipients_per_day counts each recipient; a message with more recipients than the
    whole budget is told it never fits, and a smaller one still fits after it."""
    day = Budget(redis_client, f"{namespace}:b3", recipients_per_day=5)
    spent = day.spend_many([2, 2, 2])
    assert (spent.count, spent.limit) == (2, "recipients_per_day")
    assert 3600 < spent.wait <= 86400
    assert math.isinf(day.spend(6))
    assert day.spend(1) == 0.0
    assert day.usage() == {"recipients_per_day": (5, 5)}


def test_a_budget_is_shared_by_every_client_of_the_same_key(redis_url, namespace):
    """Two workers' clients spend one budget: what one spent the other cannot."""
    first = Budget(redis.Redis.from_url(redis_url), f"{namespace}:b4", per_minute=2)
    second = Budget(redis.Redis.from_url(redis_url), f"{namespace}:b4", per_minute=2)
    assert first.spend(1) == 0.0
    assert second.spend_many([1, 1]).count == 1


def test_limits_default_to_none_and_refuse_negative_values(make_settings, tmp_path):
    """Limits are off unless set; a negative one is a configuration error naming it."""
    settings = make_settings(
        smtp=[{"name": "relay", "from_address": "a@example.org", "server": "127.0.0.1"}]
    )
    conn = settings.smtp[0]
    assert (conn.messages_per_minute, conn.messages_per_hour) == (0, 0)
    assert (conn.recipients_per_day, conn.overflow) == (0, "failover")
    with pytest.raises(ConfigError, match="messages_per_hour"):
        make_settings(
            smtp=[
                {
                    "name": "relay",
                    "from_address": "a@example.org",
                    "server": "127.0.0.1",
                    "messages_per_hour": -1,
                }
            ]
        )


# ---------------------------------------------------------------- one worker process


def test_a_spent_connection_fails_over_and_says_which_limit(
    make_settings, smtp_server, run_worker, redis_client, tmp_path
):
    """With messages_per_minute = 5, five jobs go through the limited connection and the
    rest through the next one, each skip naming the limit."""
    limited, spare = smtp_server(), smtp_server()
    settings = make_settings(
        smtp=[
            limited.smtp_section("limited", messages_per_minute=5),
            spare.smtp_section("spare"),
        ]
    )
    app = run_worker(settings, threads=4)
    ids = _send(redis_client, settings, 12)
    app.broker.join("mail", timeout=20_000)
    assert len(limited.recorder.messages) == 5
    assert len(spare.recorder.messages) == 7
    records = [app.status.get(i) for i in ids]
    assert all(r["state"] == "sent" for r in records)
    skipped = [m for r in records for m in _budget_skips(r)]
    assert len(skipped) == 7
    assert all(
        m.startswith("messages_per_minute of [[smtp]] limited spent") for m in skipped
    )
    # and `queue stats` shows the budget spent
    stats = subprocess.run(
        [MAILWORKER, "queue", "stats", "--json"],
        env=clean_env(MAILWORKER_CONFIG=str(tmp_path / "mailworker.toml")),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(stats.stdout)["budgets"] == {
        "limited": {"messages_per_minute": {"used": 5, "limit": 5}}
    }


def test_overflow_wait_puts_the_job_back_without_counting_an_attempt(
    make_settings, smtp_server, run_worker, redis_client, namespace
):
    """With overflow = "wait" a spent messages_per_hour puts jobs back, `retrying` for
    `budget`, their attempt not counted."""
    held = smtp_server()
    settings = make_settings(
        smtp=[held.smtp_section("held", messages_per_hour=2, overflow="wait")]
    )
    app = run_worker(settings)
    ids = _send(redis_client, settings, 4)
    wait_for(
        lambda: (
            sum(
                1
                for i in ids
                if (app.status.get(i) or {}).get("state") in ("sent", "retrying")
            )
            == 4
        )
    )
    records = [app.status.get(i) for i in ids]
    waiting = [r for r in records if r["state"] == "retrying"]
    assert len(held.recorder.messages) == 2 and len(waiting) == 2
    for record in waiting:
        assert record["reason"] == "budget" and record["attempts"] == 1
        assert [h["event"] for h in record["history"]] == ["waiting"]
        assert _budget_skips(record)[0].startswith("messages_per_hour of [[smtp]] held")
    # The copies put back (in the scheduled set: the wait is long) carry no counted
    # attempt (Dramatiq's `retries` stays 0).
    wait_for(lambda: redis_client.hlen(scheduled_messages_key(namespace)) == 2)
    delayed = redis_client.hvals(scheduled_messages_key(namespace))
    assert {orjson.loads(m)["options"]["retries"] for m in delayed} == {0}


def test_a_job_with_more_recipients_than_a_whole_budget_dies_at_once(
    make_settings, smtp_server, run_worker, redis_client
):
    """Three recipients never fit a recipients_per_day of 2: with nothing to fail over
    to the job is dead at once (`permanent`), the error naming the budget."""
    held = smtp_server()
    settings = make_settings(
        smtp=[held.smtp_section("held", recipients_per_day=2, overflow="wait")]
    )
    app = run_worker(settings)
    [job_id] = _send(
        redis_client,
        settings,
        1,
        to=["a@example.org", "b@example.org", "c@example.org"],
    )
    app.broker.join("mail", timeout=10_000)
    record = app.status.get(job_id)
    assert (record["state"], record["reason"]) == ("dead", "permanent")
    assert record["error"]["message"] == (
        "the message alone is over recipients_per_day of [[smtp]] held"
    )
    assert held.recorder.messages == []


def test_bulk_messages_respect_the_recipient_budget(
    make_settings, smtp_server, run_worker, redis_client
):
    """A pipelined bulk run spends the budget: recipients_per_day = 9 lets four jobs of
    two recipients through; the rest fail over."""
    by_rcpt, spare = smtp_server(), smtp_server()
    settings = make_settings(
        smtp=[
            by_rcpt.smtp_section("by-rcpt", recipients_per_day=9),
            spare.smtp_section("spare"),
        ]
    )
    app = run_worker(settings)
    ids = _send(
        redis_client, settings, 20, bulk=True, to=["a@example.org", "b@example.org"]
    )
    app.broker.join("mail", timeout=20_000)
    assert len(by_rcpt.recorder.messages) == 4
    assert len(spare.recorder.messages) == 16
    skipped = [m for i in ids for m in _budget_skips(app.status.get(i))]
    assert len(skipped) == 16
    assert all("recipients_per_day of [[smtp]] by-rcpt" in m for m in skipped)


def test_bulk_messages_respect_the_message_budget(
    make_settings, smtp_server, run_worker, redis_client
):
    """messages_per_minute = 5 lets five jobs of a bulk run through; the rest fail over,
    refused without a round trip each."""
    by_count, spare = smtp_server(), smtp_server()
    settings = make_settings(
        smtp=[
            by_count.smtp_section("by-count", messages_per_minute=5),
            spare.smtp_section("spare"),
        ]
    )
    app = run_worker(settings)
    ids = _send(redis_client, settings, 20, bulk=True)
    app.broker.join("mail", timeout=20_000)
    assert len(by_count.recorder.messages) == 5
    assert len(spare.recorder.messages) == 15
    assert all(app.status.get(i)["state"] == "sent" for i in ids)
    skipped = [m for i in ids for m in _budget_skips(app.status.get(i))]
    assert len(skipped) == 15


def test_bulk_jobs_past_the_budget_wait_as_single_jobs_with_no_attempt_counted(
    make_settings, smtp_server, run_worker, redis_client, namespace
):
    """A bulk run over a `wait` connection sends what the budget allows; the rest go
    back as single jobs, `retrying` for `budget`, their attempt not counted."""
    held = smtp_server()
    settings = make_settings(
        smtp=[held.smtp_section("held", messages_per_minute=2, overflow="wait")]
    )
    app = run_worker(settings)
    ids = _send(redis_client, settings, 6, bulk=True)
    wait_for(
        lambda: (
            sorted((app.status.get(i) or {}).get("state", "") for i in ids)
            == ["retrying"] * 4 + ["sent"] * 2
        )
    )
    records = [app.status.get(i) for i in ids]
    assert len(held.recorder.messages) == 2
    assert sorted(r["state"] for r in records) == ["retrying"] * 4 + ["sent"] * 2
    for record in (r for r in records if r["state"] == "retrying"):
        assert record["reason"] == "budget" and record["attempts"] == 1
    # (the copies put back are enqueued with the ack, just after the records)
    wait_for(lambda: redis_client.hlen(scheduled_messages_key(namespace)) == 4)
    delayed = [
        orjson.loads(m) for m in redis_client.hvals(scheduled_messages_key(namespace))
    ]
    assert sorted(m["message_id"] for m in delayed) == sorted(
        r["id"] for r in records if r["state"] == "retrying"
    )
    assert {m["actor_name"] for m in delayed} == {"deliver"}
    assert {m["options"]["retries"] for m in delayed} == {0}


# ---------------------------------------------------------------- four processes


@pytest.mark.slow
def test_four_worker_processes_hold_a_connection_to_its_budget(
    smtp_server, private_redis, namespace, tmp_path
):
    """Four `mailworker worker` processes share messages_per_minute = 6 of one
    connection: no sliding minute of its arrivals holds more than 6; the rest fail over
    (skips naming the limit), and jobs pinned to a `wait` connection wait for `budget`
    with no attempt counted."""
    # Given a limited connection, a spare one, and one that waits, on a Redis of the
    # test's own (a stall of the shared one would hold four processes up)
    redis_url, redis_client = private_redis.url, private_redis.client()
    limited, spare, held = smtp_server(), smtp_server(), smtp_server()
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [
                limited.smtp_section("limited", messages_per_minute=6),
                spare.smtp_section("spare"),
                held.smtp_section("held", messages_per_minute=3, overflow="wait"),
            ],
        },
    )
    from settings import load_settings

    settings = load_settings(config, environ={})
    workers = [
        WorkerProcess(config, tmp_path / f"worker{n}.log", "-p", "1", "-t", "4")
        for n in range(4)
    ]
    try:
        # When 40 jobs come in, and 8 more pinned to the waiting connection
        ids = _send(redis_client, settings, 40)
        pinned = _send(redis_client, settings, 8, sender="held")
        status = _store(redis_client, settings)
        wait_for(lambda: _count(status, ids, "sent") == 40, timeout=60)
        wait_for(
            lambda: (
                _count(status, pinned, "sent") == 3
                and _count(status, pinned, "retrying") == 5
            ),
            timeout=60,
        )
    finally:
        for worker in workers:
            worker.stop()
    # Then the limited connection was held to its budget by the four of them
    arrivals = sorted(m.at for m in limited.recorder.messages)
    assert arrivals, "the limited connection sent nothing"
    assert max(_in_a_minute(arrivals)) <= 6
    if arrivals[-1] - arrivals[0] < 60:  # the whole run fell inside one minute
        assert len(arrivals) == 6
    assert len(arrivals) + len(spare.recorder.messages) == 40
    records = [status.get(i) for i in ids]
    skipped = [m for r in records for m in _budget_skips(r)]
    assert len(skipped) == len(spare.recorder.messages)
    assert all(m.startswith("messages_per_minute of [[smtp]] limited") for m in skipped)
    # and the pinned jobs beyond its budget wait, not counted as an attempt
    assert len(held.recorder.messages) == 3
    for record in (status.get(i) for i in pinned):
        if record["state"] == "retrying":
            assert record["reason"] == "budget" and record["attempts"] == 1
            assert record["history"][-1]["event"] == "waiting"
    pids = {w.process.pid for w in workers}
    assert len(pids) == 4


def _store(redis_client, settings):
    from worker.status import StatusStore

    return StatusStore(redis_client, namespace=settings.namespace, ttl=60)


def _count(status, ids, state) -> int:
    return sum(1 for i in ids if (status.get(i) or {}).get("state") == state)


def _in_a_minute(arrivals: list[float]) -> list[int]:
    """For each arrival, how many arrived in the 60 s that end with it."""
    return [
        sum(1 for earlier in arrivals[: n + 1] if at - earlier < 60)
        for n, at in enumerate(arrivals)
    ]
