"""Scheduled sends and long retries wait in Redis, are released exactly once by whichever
worker comes first, can be cancelled until then, and survive a crashed worker."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from dramatiq.message import Message

from common.keys import (
    queue_key,
    queue_messages_key,
    scheduled_key,
    scheduled_messages_key,
)
from producers import JobValidationError, Notification, Producer, parse_job
from settings import Limits
from tests.support.config import write_toml
from tests.support.helpers import wait_for, wire_enqueue
from tests.support.processes import MAILWORKER, clean_env
from worker.broker.schedule import Schedule
from worker.status import StatusStore

MESSAGE_ID = re.compile(rb"Message-ID: <([^@>]+)@")


def _job(**fields):
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Reminder")
    fields.setdefault("text", "Your task is due.")
    return Notification(**fields)


def _producer(client, namespace, **options) -> Producer:
    return Producer(client, namespace=namespace, **options)


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _received(server) -> collections.Counter[str]:
    return collections.Counter(
        m.group(1).decode()
        for r in server.recorder.messages
        if (m := MESSAGE_ID.search(r.data))
    )


def _status(client, namespace) -> StatusStore:
    return StatusStore(client, namespace=namespace, ttl=60)


def test_scheduled_job_waits_in_redis_and_is_sent_at_its_time(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A job with send_at waits in the scheduled set, says `scheduled` with its time,
    and is sent once, not before its time."""
    # Given a worker and a job scheduled two seconds ahead
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    send_at = _in(2)
    job_id = _producer(redis_client, namespace).enqueue(_job(send_at=send_at))
    # Then it waits in Redis, not on its queue, and its record says when it goes
    record = app.status.get(job_id)
    assert record["state"] == "scheduled"
    assert record["send_at"] == send_at.isoformat(timespec="milliseconds")
    assert redis_client.zscore(scheduled_key(namespace), job_id) == pytest.approx(
        send_at.timestamp() * 1000, abs=1
    )
    assert redis_client.llen(queue_key(namespace, "mail")) == 0
    # When its time comes, it is sent exactly once
    wait_for(lambda: _received(server)[job_id] == 1, timeout=20)
    record = wait_for(lambda: (r := app.status.get(job_id))["state"] == "sent" and r)
    assert [h["event"] for h in record["history"]] == ["sent"]
    assert datetime.fromisoformat(record["history"][0]["at"]) >= send_at
    assert redis_client.zcard(scheduled_key(namespace)) == 0
    assert redis_client.hlen(scheduled_messages_key(namespace)) == 0


@pytest.mark.parametrize(
    ("send_at", "words"),
    [
        (lambda: _in(-60), "is in the past"),
        (lambda: _in(31 * 86400), "at most 30.0 days (limits.max_schedule_ahead)"),
    ],
)
def test_send_at_in_the_past_or_too_far_is_refused_naming_it(
    redis_client, namespace, send_at, words
):
    """A send_at in the past or beyond limits.max_schedule_ahead is refused at
    enqueue, naming send_at, and nothing is written."""
    producer = _producer(redis_client, namespace)
    with pytest.raises(JobValidationError) as caught:
        producer.enqueue(_job(send_at=send_at()))
    assert caught.value.field == "send_at"
    assert words in str(caught.value)
    assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []


def test_send_at_needs_a_time_zone_and_a_time():
    """A send_at without an offset, or not a time at all, names send_at; one after
    not_after is refused too."""
    for value in ("2026-12-03T09:00:00", "tomorrow", 12.5e20):
        with pytest.raises(JobValidationError) as caught:
            parse_job(
                {"to": "a@example.org", "subject": "s", "text": "t", "send_at": value}
            )
        assert caught.value.field == "send_at", value
    with pytest.raises(JobValidationError) as caught:
        _job(send_at=_in(60), not_after=_in(30))
    assert caught.value.field == "not_after"


def test_max_schedule_ahead_is_the_producers_limit(redis_client, namespace):
    """limits.max_schedule_ahead bounds send_at: one second over is refused."""
    producer = _producer(
        redis_client, namespace, limits=Limits(max_schedule_ahead=3600)
    )
    assert producer.enqueue(_job(send_at=_in(3500)))
    with pytest.raises(JobValidationError, match=r"1\.0 hours"):
        producer.enqueue(_job(send_at=_in(3700)))


def test_two_workers_racing_release_each_job_exactly_once(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Two workers, each with its releaser, and 300 jobs due in the same second: each
    is sent exactly once."""
    # Given two workers on the same namespace
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    first, second = run_worker(settings, threads=4), run_worker(settings, threads=4)
    # When 300 jobs fall due together
    send_at = _in(1.5)
    ids = _producer(redis_client, namespace).enqueue_many(
        _job(to=[f"user{i}@example.org"], send_at=send_at) for i in range(300)
    )
    # Then every job arrives exactly once
    wait_for(lambda: set(_received(server)) >= set(ids), timeout=60)
    time.sleep(0.5)  # a duplicate would arrive now
    assert set(_received(server).values()) == {1}
    releasers = [m for app in (first, second) for m in app.broker.middleware]
    released = sum(getattr(m, "released", 0) for m in releasers)
    assert released == 300


def test_release_scripts_racing_move_each_entry_once(redis_client, namespace):
    """Eight threads releasing the same 2,000 due entries move each onto its queue
    once: the released counts add up and the queue holds each job once."""
    # Given 2,000 due jobs
    producer = _producer(redis_client, namespace)
    ids = producer.enqueue_many(_job(send_at=_in(0.5)) for _ in range(2000))
    time.sleep(0.6)
    # When eight releasers race for them
    schedules = [Schedule(redis_client, namespace) for _ in range(8)]
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda s=s: counts.append(s.release_due()))
        for s in schedules
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then each job is on its queue once, and nothing is left in the set
    assert sum(counts) == 2000
    rids = redis_client.lrange(queue_key(namespace, "mail"), 0, -1)
    payloads = redis_client.hmget(queue_messages_key(namespace, "mail"), rids)
    on_queue = collections.Counter(json.loads(p)["message_id"] for p in payloads)
    assert on_queue == dict.fromkeys(ids, 1)
    assert redis_client.zcard(scheduled_key(namespace)) == 0
    store = _status(redis_client, namespace)
    assert {store.get(i)["state"] for i in ids[:20]} == {"queued"}


def test_cancel_racing_release_one_wins_per_job(redis_client, namespace):
    """A cancel and a release racing for the same due jobs: each job ends either on
    its queue or cancelled, never both, never neither."""
    # Given 500 due jobs
    producer = _producer(redis_client, namespace)
    ids = producer.enqueue_many(_job(send_at=_in(0.3)) for _ in range(500))
    time.sleep(0.4)
    # When one thread cancels them all while another releases them
    results = {}

    def cancel_all():
        for job_id in ids:
            results[job_id] = producer.cancel_scheduled(job_id)

    canceller = threading.Thread(target=cancel_all)
    canceller.start()
    released = Schedule(redis_client, namespace).release_due()
    canceller.join()
    # Then every job is in exactly one place
    cancelled = {i for i, r in results.items() if r.cancelled}
    rids = redis_client.lrange(queue_key(namespace, "mail"), 0, -1)
    payloads = redis_client.hmget(queue_messages_key(namespace, "mail"), rids)
    queued = [json.loads(p)["message_id"] for p in payloads]
    assert len(queued) == len(set(queued)) == released
    assert cancelled.isdisjoint(queued)
    assert cancelled | set(queued) == set(ids)
    store = _status(redis_client, namespace)
    for job_id in ids:
        state = store.get(job_id)["state"]
        assert state == ("cancelled" if job_id in cancelled else "queued")
    for job_id in set(ids) - cancelled:
        assert results[job_id].state == "queued"  # the cancel found it released


def test_cancelled_job_never_sends(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A cancelled job is not sent when its time passes, says cancelled, and cannot be
    cancelled twice; a job already sent cannot be cancelled."""
    # Given a worker, a job to cancel and one to let go, due together
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    producer = _producer(redis_client, namespace)
    send_at = _in(1.5)
    doomed, kept = producer.enqueue_many(
        [_job(send_at=send_at), _job(send_at=send_at, to=["bob@example.org"])]
    )
    # When one is cancelled before its time
    result = producer.cancel_scheduled(doomed)
    assert (result.cancelled, result.state) == (True, "scheduled")
    # Then only the other is sent
    wait_for(lambda: _received(server)[kept] == 1, timeout=20)
    wait_for(lambda: app.status.get(kept)["state"] == "sent")
    assert doomed not in _received(server)
    record = app.status.get(doomed)
    assert (record["state"], record["reason"]) == ("cancelled", "cancelled")
    assert [h["event"] for h in record["history"]] == ["cancelled"]
    # And the events stream says so, beside the other job's delivery.sent
    events = redis_client.xrange(f"{namespace}:events")
    by_job = {e[b"job_id"].decode(): e[b"type"].decode() for _, e in events}
    assert by_job == {doomed: "delivery.cancelled", kept: "delivery.sent"}
    # And neither can be cancelled now, each saying why
    again = producer.cancel_scheduled(doomed)
    assert (again.cancelled, again.state) == (False, "cancelled")
    late = producer.cancel_scheduled(kept)
    assert (late.cancelled, late.state) == (False, "sent")
    unknown = producer.cancel_scheduled(str(uuid.uuid4()))
    assert (unknown.cancelled, unknown.state) == (False, "")


def test_a_crash_between_look_and_release_loses_nothing(
    smtp_server, make_settings, run_worker, redis_client, redis_url, namespace
):
    """A process killed (SIGKILL) after it looked at the due entries and before it
    released them leaves them in Redis: a worker sends each exactly once."""
    # Given 50 due jobs
    producer = _producer(redis_client, namespace)
    ids = producer.enqueue_many(_job(send_at=_in(0.3)) for _ in range(50))
    time.sleep(0.4)
    # When a process looks at them and dies before it releases them
    code = (
        "import os, signal, time, redis\n"
        "from worker.broker.schedule import Schedule\n"
        f"s = Schedule(redis.Redis.from_url({redis_url!r}), {namespace!r})\n"
        "ids = s.due(int(time.time() * 1000))\n"
        "print(len(ids), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.release(ids, int(time.time() * 1000))\n"
    )
    died = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert died.returncode == -9
    assert died.stdout.strip() == "50"
    assert redis_client.zcard(scheduled_key(namespace)) == 50
    # Then a worker sends every one of them once
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    wait_for(lambda: set(_received(server)) >= set(ids), timeout=30)
    wait_for(lambda: all(app.status.get(i)["state"] == "sent" for i in ids))
    assert set(_received(server).values()) == {1}


def test_long_retry_waits_in_the_scheduled_set_and_is_redelivered(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A broker retry longer than a few seconds goes into the scheduled set with the
    ack (no delayed message in a worker), says `retrying` meanwhile, and is sent."""
    # Given a server that defers the first message and a 6 s backoff
    server = smtp_server()
    server.recorder.data_replies.append("451 4.3.0 try again later")
    settings = make_settings(
        smtp=[server.smtp_section()],
        retry={"min_backoff": "6s", "max_backoff": "6s", "transport_retries": 0},
    )
    app = run_worker(settings)
    # When a job fails its first attempt
    job_id = _producer(redis_client, namespace).enqueue(_job())
    record = wait_for(
        lambda: (r := app.status.get(job_id))["state"] == "retrying" and r, timeout=20
    )
    wait_for(lambda: redis_client.zscore(scheduled_key(namespace), job_id))
    # Then it waits in Redis: its record says when, no worker holds it, nothing is
    # left unacknowledged, and the list shows it
    assert record["next_attempt_at"]
    due = redis_client.zscore(scheduled_key(namespace), job_id) / 1000
    assert due - time.time() > 3
    assert redis_client.hlen(queue_messages_key(namespace, "mail.DQ")) == 0
    assert redis_client.hlen(queue_messages_key(namespace, "mail")) == 0
    [entry] = _producer(redis_client, namespace).list_scheduled().entries
    assert (entry.job_id, entry.state, entry.queue) == (job_id, "retrying", "mail")
    # And it is sent on its second attempt
    wait_for(lambda: _received(server)[job_id] == 1, timeout=30)
    record = wait_for(lambda: (r := app.status.get(job_id))["state"] == "sent" and r)
    assert record["attempts"] == 2
    assert redis_client.zcard(scheduled_key(namespace)) == 0


def test_wire_jobs_with_send_at_wait_for_it(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A wire-format job pushed early with send_at is put in the scheduled set by the
    worker; one written to the set by hand is reported scheduled and released."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    send_at = _in(2)
    job = {"to": ["ann@example.org"], "subject": "s", "text": "t"}
    # Given a job pushed on its queue with a send_at two seconds ahead
    early = wire_enqueue(
        redis_client, namespace, {**job, "send_at": send_at.isoformat()}, wake=True
    )
    # And one written straight into the scheduled set, as the README says
    direct = str(uuid.uuid4())
    payload = json.dumps(
        {
            "queue_name": "mail",
            "actor_name": "deliver",
            "args": [],
            "kwargs": {"job": job},
            "options": {"redis_message_id": str(uuid.uuid4())},
            "message_id": direct,
            "message_timestamp": int(send_at.timestamp() * 1000),
        }
    )
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:scheduled.msgs", direct, payload)
        pipe.zadd(f"{namespace}:scheduled", {direct: int(send_at.timestamp() * 1000)})
        pipe.execute()
    # Then both say scheduled until their time, and both are sent once after it
    record = wait_for(
        lambda: (r := app.status.get(early))["state"] == "scheduled" and r
    )
    assert datetime.fromisoformat(record["send_at"]) == send_at.replace(
        microsecond=send_at.microsecond // 1000 * 1000
    )
    assert app.status.get(direct)["state"] == "scheduled"
    # And one pushed with a send_at beyond limits.max_schedule_ahead is dead, naming it
    far = wire_enqueue(
        redis_client, namespace, {**job, "send_at": _in(40 * 86400).isoformat()}
    )
    dead = wait_for(lambda: (r := app.status.get(far))["state"] == "dead" and r)
    assert (dead["reason"], dead["error"]["field"]) == ("validation", "send_at")
    wait_for(lambda: _received(server).keys() >= {early, direct}, timeout=20)
    assert set(_received(server).values()) == {1}
    sent = wait_for(lambda: (r := app.status.get(early))["state"] == "sent" and r)
    assert datetime.fromisoformat(sent["history"][-1]["at"]) >= send_at


def test_a_scheduled_payload_that_is_no_message_becomes_a_poison_dead_letter(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """An entry of the set whose payload is not a message is released to the normal
    queue and dead-lettered there as poison: nothing is dropped."""
    app = run_worker(make_settings(smtp=[smtp_server().smtp_section()]))
    due = int(time.time() * 1000)
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:scheduled.msgs", "broken-1", b"{not json")
        pipe.zadd(f"{namespace}:scheduled", {"broken-1": due})
        pipe.execute()
    wait_for(lambda: redis_client.zcard(f"{namespace}:dead") == 1, timeout=20)
    assert redis_client.zcard(scheduled_key(namespace)) == 0
    assert app.broker.schedule.due(due + 60_000) == []


def _cli(config, *args):
    return subprocess.run(
        [MAILWORKER, *args],
        env=clean_env(MAILWORKER_CONFIG=str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_schedules_lists_pages_and_cancels(tmp_path, redis_url, namespace):
    """`send --send-at` (ISO or +duration), `scheduled list` in pages, `scheduled
    cancel` and `status`, as a user runs them; a bad --send-at names send_at."""
    config = write_toml(
        tmp_path / "mailworker.toml", {"broker_url": redis_url, "namespace": namespace}
    )
    base = ("send", "--to", "a@example.org", "--subject", "Soon", "--text", "t")
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat(timespec="seconds")
    ids = [
        _cli(config, *base, "--send-at", at).stdout.strip().splitlines()[-1]
        for at in ("+10m", "+1h", later)
    ]
    # The list, a page at a time, soonest first
    first = _cli(config, "scheduled", "list", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert [line.split()[0] for line in first.stdout.splitlines()[1:]] == ids[:2]
    assert "2 of 3 scheduled; next page: --offset 2" in first.stderr
    rest = _cli(config, "scheduled", "list", "--offset", "2", "--json")
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == ids[2:]
    window = _cli(config, "scheduled", "list", "--due-before", "30m", "--json")
    assert [json.loads(line)["id"] for line in window.stdout.splitlines()] == ids[:1]
    stats = json.loads(_cli(config, "queue", "stats", "--json").stdout)
    assert stats["scheduled"] == 3 and stats["queues"]["normal"]["ready"] == 0
    # JSON lines of --bulk carry send_at too
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(
        "".join(
            json.dumps(
                {"to": "b@example.org", "subject": "x", "text": "t", "send_at": t}
            )
            + "\n"
            for t in (later, "2020-01-01T00:00:00Z")
        )
    )
    bulk = _cli(config, "send", "--bulk", str(lines))
    assert bulk.returncode == 1 and "line 2: send_at" in bulk.stdout, bulk.stdout
    stats = json.loads(_cli(config, "queue", "stats", "--json").stdout)
    assert stats["scheduled"] == 4
    # Status and cancel
    shown = _cli(config, "status", ids[0])
    assert "state           scheduled" in shown.stdout
    assert "send_at" in shown.stdout
    cancelled = _cli(config, "scheduled", "cancel", ids[0])
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = _cli(config, "scheduled", "cancel", ids[0])
    assert again.returncode == 1 and "already cancelled" in again.stderr
    missing = _cli(config, "scheduled", "cancel", str(uuid.uuid4()))
    assert missing.returncode == 3
    # Bad times name the field
    for bad in ("yesterday", "+soon", "2020-01-01T00:00:00Z", "2026-12-03T09:00:00"):
        refused = _cli(config, *base, "--send-at", bad)
        assert refused.returncode == 2, bad
        assert "send_at" in refused.stderr, (bad, refused.stderr)


def test_durations_too_long_for_a_date_name_their_option(
    tmp_path, redis_url, namespace
):
    """A duration past any date is a usage error naming its option, no traceback."""
    config = write_toml(
        tmp_path / "mailworker.toml", {"broker_url": redis_url, "namespace": namespace}
    )
    base = ("send", "--to", "a@example.org", "--subject", "Far", "--text", "t")
    cases = [
        ((*base, "--send-at", "+1000000000d"), "send_at"),
        ((*base, "--send-at", "+" + "9" * 400), "send_at"),
        (
            ("scheduled", "list", "--due-before", "99999999999999999999d"),
            "--due-before",
        ),
        (("scheduled", "list", "--due-after", "1000000000d"), "--due-after"),
    ]
    for args, named in cases:
        refused = _cli(config, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert named in refused.stderr and "too" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr


def test_bounded_many_scheduled_jobs_are_all_sent_once(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """2,000 jobs scheduled over two seconds through the bulk JSONL path's producer
    call are each sent exactly once (the 100,000 version is bench.scheduled)."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]), threads=8)
    start = datetime.now(UTC) + timedelta(seconds=1)
    ids = _producer(redis_client, namespace).enqueue_many(
        _job(to=[f"u{i}@example.org"], send_at=start + timedelta(milliseconds=i))
        for i in range(2000)
    )
    wait_for(lambda: len(_received(server)) >= 2000, timeout=120)
    assert set(_received(server)) == set(ids)
    assert set(_received(server).values()) == {1}
    assert redis_client.zcard(scheduled_key(namespace)) == 0
    wait_for(lambda: app.status.get(ids[-1])["state"] == "sent")


def test_producers_import_nothing_of_the_worker_for_scheduling():
    """Scheduling and cancelling stay on the producers' side of the rooms."""
    code = (
        "import sys, producers\n"
        "from producers import cancel_scheduled, list_scheduled\n"
        "print(any(m == 'worker' or m.startswith('worker.') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_redis_errors_while_cancelling_name_the_broker(namespace):
    """A cancel with Redis away is BrokerUnavailableError, not a redis-py error."""
    from settings import BrokerUnavailableError

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    producer = _producer(dead, namespace)
    with pytest.raises(BrokerUnavailableError):
        producer.cancel_scheduled("x")


def test_a_scheduled_job_that_died_can_be_requeued(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A scheduled job dead after its time (its recipient refused) is requeued and
    sent: its send_at, now past, does not refuse the requeue."""
    # Given a scheduled job whose only recipient is refused when its time comes
    server = smtp_server()
    server.recorder.rcpt_replies["ann@example.org"] = "550 5.1.1 no such user"
    settings = make_settings(smtp=[server.smtp_section()])
    app = run_worker(settings)
    job_id = _producer(redis_client, namespace).enqueue(_job(send_at=_in(0.5)))
    wait_for(lambda: app.status.get(job_id)["state"] == "dead", timeout=20)
    # When the mailbox is back and the dead letter is requeued
    server.recorder.rcpt_replies.clear()
    app.broker.dead_letters.requeue(job_id, settings.limits)
    # Then it is sent
    wait_for(lambda: _received(server)[job_id] == 1, timeout=20)
    wait_for(lambda: app.status.get(job_id)["state"] == "sent")


def test_a_bulk_retry_is_never_cancelled_and_its_jobs_are_sent(
    tmp_path, smtp_server, make_settings, run_worker, redis_client, redis_url, namespace
):
    """A bulk message's retry waits in the scheduled set under the message's id:
    `scheduled cancel` refuses it (exit 1, saying what to do instead) and changes
    nothing, `scheduled list` marks it, and its jobs are all sent later."""
    # Given a bulk message of three jobs waiting in the scheduled set as a broker
    # retry puts it there (taken off its queue, added with the retry's script)
    ids = _producer(redis_client, namespace).enqueue_many(
        [_job(to=[f"u{n}@example.org"]) for n in range(3)]
    )
    [redis_id] = redis_client.lrange(queue_key(namespace, "mail"), 0, -1)
    payload = redis_client.hget(queue_messages_key(namespace, "mail"), redis_id)
    redis_client.delete(queue_key(namespace, "mail"))
    redis_client.hdel(queue_messages_key(namespace, "mail"), redis_id)
    message = Message(**json.loads(payload))
    due_ms = int(time.time() * 1000) + 1_000
    Schedule(redis_client, namespace).add([Schedule.entry(message, due_ms)])
    bulk_id = message.message_id
    assert bulk_id not in ids
    # When an operator lists and cancels it
    config = write_toml(
        tmp_path / "mailworker.toml", {"broker_url": redis_url, "namespace": namespace}
    )
    listed = _cli(config, "scheduled", "list")
    assert listed.returncode == 0, listed.stderr
    [row] = listed.stdout.splitlines()[1:]
    assert row.split()[:1] == [bulk_id] and " bulk " in row, row
    assert "cannot be cancelled" in row and "bulk message's retry" in listed.stderr
    [line] = _cli(config, "scheduled", "list", "--json").stdout.splitlines()
    assert json.loads(line)["bulk"] is True and json.loads(line)["jobs"] == 3
    refused = _cli(config, "scheduled", "cancel", bulk_id)
    # Then it is refused, saying why and what to do instead, and nothing changes
    assert refused.returncode == 1, refused.stderr
    assert "bulk message's retry (3 jobs) and cannot be cancelled" in refused.stderr
    assert "suppress add" in refused.stderr
    assert redis_client.zscore(scheduled_key(namespace), bulk_id) == due_ms
    assert redis_client.hexists(scheduled_messages_key(namespace), bulk_id)
    assert not redis_client.exists(f"{namespace}:job:{bulk_id}")
    assert not redis_client.exists(f"{namespace}:events")
    # And every job of it is sent once a worker releases it
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    wait_for(lambda: all(_received(server)[i] == 1 for i in ids), timeout=30)
    for job_id in ids:
        wait_for(lambda j=job_id: app.status.get(j)["state"] == "sent")


def test_cancel_releases_the_idempotency_key_for_a_new_job(redis_client, namespace):
    """After a cancel, enqueueing again with the same idempotency_key schedules a new
    job instead of returning the cancelled one; before it, the key finds the job."""
    # Given a job scheduled with an idempotency key
    producer = _producer(redis_client, namespace)
    job = _job(send_at=_in(3600), idempotency_key="reminder-42")
    first = producer.enqueue(job)
    assert producer.enqueue(job) == first
    # When it is cancelled and the same job is enqueued again
    assert producer.cancel_scheduled(first).cancelled
    second = producer.enqueue(job)
    # Then it is a new job, scheduled, and the key now finds that one
    assert second != first
    status = _status(redis_client, namespace)
    assert status.get(second)["state"] == "scheduled"
    assert status.get(first)["state"] == "cancelled"
    assert redis_client.zscore(scheduled_key(namespace), second) is not None
    assert producer.enqueue(job) == second


def test_a_retry_is_not_scheduled_for_a_message_already_put_back(
    redis_client, namespace
):
    """A long retry is scheduled with its message's ack only while that message is
    still unacknowledged: once a reaper has put it back on its queue, the retry is
    not added (the job would be there twice); otherwise both happen together."""
    schedule = Schedule(redis_client, namespace)
    acks = f"{namespace}:__acks__.broker-1.mail"
    messages = queue_messages_key(namespace, "mail")

    def retry() -> Message:
        return Message(
            queue_name="mail", actor_name="deliver", args=(), kwargs={}, options={}
        )

    # Given a message the reaper has put back: on its queue, not in the ack set
    put_back = retry()
    redis_client.hset(messages, "rid-1", b"{}")
    due = int(time.time() * 1000) + 60_000
    # When its retry is scheduled with its ack, nothing is added
    added = schedule.add(
        [Schedule.entry(put_back, due)], ack=("mail", "broker-1", "rid-1")
    )
    assert added == 0
    assert redis_client.zscore(scheduled_key(namespace), put_back.message_id) is None
    assert redis_client.hexists(messages, "rid-1")
    # And a message still unacknowledged is acked and its retry scheduled together
    held = retry()
    redis_client.hset(messages, "rid-2", b"{}")
    redis_client.sadd(acks, "rid-2")
    added = schedule.add([Schedule.entry(held, due)], ack=("mail", "broker-1", "rid-2"))
    assert added == 1
    assert redis_client.zscore(scheduled_key(namespace), held.message_id) == due
    assert not redis_client.sismember(acks, "rid-2")
    assert not redis_client.hexists(messages, "rid-2")


def test_a_wire_job_scheduled_far_ahead_keeps_its_record_until_after_it(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """The `scheduled` record a worker writes for a wire job pushed a day early is
    kept status.ttl after its send time, as a producer's is, not status.ttl from now."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()], status={"ttl": 600}))
    job = {"to": ["ann@example.org"], "subject": "s", "text": "t"}
    early = wire_enqueue(
        redis_client, namespace, {**job, "send_at": _in(86_400).isoformat()}, wake=True
    )
    wait_for(lambda: app.status.get(early)["state"] == "scheduled")
    kept = redis_client.ttl(f"{namespace}:job:{early}")
    assert 86_400 < kept <= 86_400 + 600 + 2, kept
    assert 86_400 < redis_client.ttl(f"{namespace}:job:{early}:history") <= 87_002
