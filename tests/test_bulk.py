"""The bulk path: many jobs per broker message, each keeping its own id, status record,
delivery marker, retries and dead letter."""

from __future__ import annotations

import json
import threading
import time
import uuid
from email import message_from_bytes, policy

import pytest
from dramatiq.broker import MessageProxy

from producers import JobValidationError, Notification, Producer
from tests.support.helpers import wait_for
from worker.bulk import SingleJobs
from worker.deadletter import DeadLetters


def _single_job_sent(producer, app):
    """Send one single job and wait until it is sent (single jobs now come in)."""
    job_id = producer.enqueue(
        Notification(to=["first@example.org"], subject="Hi", text="t")
    )
    wait_for(lambda: app.status.get(job_id)["state"] == "sent")


def _next(consumer):
    """The consumer's next message; a connection Redis closed while it was away is
    replaced, as Dramatiq's consumer thread does, by trying again."""
    from dramatiq.errors import ConnectionClosed

    for _ in range(20):
        try:
            return next(consumer)
        except ConnectionClosed:
            time.sleep(0.1)
    raise AssertionError("no connection to Redis")


def _one_stuck_one_kept_back(producer, server, app):
    """Two bulk messages: the first stuck at its server (which holds user0 at RCPT), the
    second fetched and begun behind it. Returns their job ids."""
    first = producer.enqueue_many(_jobs(20))
    wait_for(lambda: "user0@example.org" in server.recorder.held)
    second = producer.enqueue_many(_jobs(20))
    wait_for(lambda: app.status.get(second[0])["state"] == "sending")  # fetched
    return first, second


def _jobs(count, **fields):
    fields.setdefault("subject", "Digest")
    fields.setdefault("text", "Your daily digest.")
    return [Notification(to=[f"user{i}@example.org"], **fields) for i in range(count)]


def test_bulk_jobs_each_get_their_own_message_and_record(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """120 notifications travel in 6 broker messages; each arrives with its own Message-ID
    and has its own `sent` record."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    ids = Producer(redis_client, namespace=namespace).enqueue_many(_jobs(120))
    assert redis_client.llen(f"{namespace}:mail") == 120 // 20
    app = run_worker(settings)
    app.broker.join("mail", timeout=30_000)
    received = {
        message_from_bytes(m.data, policy=policy.default)["Message-ID"]: m.rcpt_tos
        for m in server.recorder.messages
    }
    assert set(received) == {f"<{i}@example.com>" for i in ids}
    assert received[f"<{ids[7]}@example.com>"] == ["user7@example.org"]
    assert all(app.status.get(i)["state"] == "sent" for i in ids)


def test_a_deferred_job_in_a_bulk_message_is_retried_alone(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A job whose recipient is deferred is put back as a single job; the others are sent
    once; its retries and dead letter are its own, and requeue sends it alone."""
    server = smtp_server()
    server.recorder.rcpt_replies["user3@example.org"] = "451 4.3.0 Mailbox busy"
    settings = make_settings(
        smtp=[server.smtp_section()],
        retry={"max_attempts": 2, "min_backoff": "0.2s", "max_backoff": "0.5s"},
    )
    app = run_worker(settings)
    ids = Producer(redis_client, namespace=namespace).enqueue_many(_jobs(10))
    app.broker.join("mail", timeout=20_000)
    assert sorted(m.rcpt_tos[0] for m in server.recorder.messages) == sorted(
        f"user{i}@example.org" for i in range(10) if i != 3
    )
    assert server.recorder.commands.count("RCPT user3@example.org") == 2
    record = app.status.get(ids[3])
    assert record["state"] == "dead" and record["reason"] == "retries_exhausted"
    assert record["attempts"] == 2
    assert [h["event"] for h in record["history"]] == ["retrying", "dead"]
    # The operator fixes the mailbox and requeues the one job
    server.recorder.rcpt_replies.clear()
    DeadLetters(redis_client, namespace=namespace, ttl=60).requeue(
        ids[3], settings.limits
    )
    app.broker.join("mail", timeout=20_000)
    assert app.status.get(ids[3])["state"] == "sent"
    assert len(server.recorder.messages) == 10


def _wire_bulk(client, namespace: str, jobs) -> str:
    """Push a ``deliver_batch`` message as a non-Python producer would; its message id."""
    message_id, redis_id = str(uuid.uuid4()), str(uuid.uuid4())
    payload = {
        "queue_name": "mail",
        "actor_name": "deliver_batch",
        "args": [],
        "kwargs": {"jobs": jobs},
        "options": {"redis_message_id": redis_id},
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:mail.msgs", redis_id, json.dumps(payload))
        pipe.rpush(f"{namespace}:mail", redis_id)
        pipe.execute()
    return message_id


def test_an_invalid_job_in_a_bulk_message_dies_alone(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A wire-format bulk message with one invalid job: that job is dead as `validation`,
    the others are delivered."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    _wire_bulk(
        redis_client,
        namespace,
        [
            {
                "id": good,
                "job": {"to": ["ok@example.org"], "subject": "s", "text": "t"},
            },
            {
                "id": bad,
                "job": {"to": ["ok@example.org"], "subject": "s\r\nBcc: x@y.z"},
            },
        ],
    )
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(good)["state"] == "sent"
    bad_record = app.status.get(bad)
    assert (
        bad_record["reason"] == "validation"
        and bad_record["error"]["field"] == "subject"
    )
    assert len(server.recorder.messages) == 1


def test_bulk_jobs_without_a_usable_id_are_kept_and_the_others_go_on(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Jobs of a bulk message that can have no record of their own (not an object, no
    id, an id that cannot be one, an id twice) keep the bulk message as a dead letter
    naming the first of them; every other job is sent once, nothing is retried."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    good = str(uuid.uuid4())
    job = {"to": ["ok@example.org"], "subject": "s", "text": "t"}
    jobs = [
        5,
        {"job": job},
        {"id": "x" * 200, "job": job},
        {"id": ["x"], "job": job},
        {"id": {}, "job": job},
        *[{"id": good, "job": job}] * 2,
    ]
    message_id = _wire_bulk(redis_client, namespace, jobs)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(good)["state"] == "sent"
    assert len(server.recorder.messages) == 1
    dead = DeadLetters(redis_client, namespace=namespace, ttl=60).show(message_id)
    assert dead is not None and dead["reason"] == "validation"
    assert dead["error"]["field"] == "jobs[0].id"
    assert "6 of 7 jobs without a usable id" in dead["error"]["message"]
    assert len(dead["message"]["jobs"]) == 7  # kept whole, for an operator to mend
    assert app.status.get("x" * 200) is None  # no record under an id that is none
    assert redis_client.zcard(f"{namespace}:mail.DQ") == 0  # not retried


def test_a_malformed_bulk_message_is_dead_letters_as_a_whole(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A bulk message whose `jobs` is not a list is dead as `validation` naming `jobs`."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    message_id = _wire_bulk(redis_client, namespace, "everyone")
    app.broker.join("mail", timeout=10_000)
    record = app.status.get(message_id)
    assert record["reason"] == "validation" and record["error"]["field"] == "jobs"
    assert server.recorder.messages == []


def test_idempotency_keys_hold_inside_and_across_bulk_messages(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A key repeated with the same payload is one job; reused with another payload it is
    an error naming the index, and nothing of that bulk message is enqueued."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    producer = Producer(redis_client, namespace=namespace)
    twice = _jobs(1, idempotency_key="k-1") * 2
    first = producer.enqueue_many([*twice, *_jobs(2)])
    assert first[0] == first[1] and len(set(first)) == 3
    app.broker.join("mail", timeout=10_000)
    assert len(server.recorder.messages) == 3
    again = producer.enqueue_many(_jobs(1, idempotency_key="k-1") + _jobs(1))
    assert again[0] == first[0]
    with pytest.raises(JobValidationError) as caught:
        producer.enqueue_many(
            [*_jobs(1), *_jobs(1, idempotency_key="k-1", subject="Other")]
        )
    assert caught.value.field == "[1].idempotency_key"
    app.broker.join("mail", timeout=10_000)
    assert len(server.recorder.messages) == 4


def test_send_bulk_enqueues_every_valid_line_and_summarises(
    smtp_server, make_settings, run_worker, redis_client, namespace, tmp_path, redis_url
):
    """`send --bulk FILE.jsonl` enqueues the valid lines, refuses the rest with their line
    numbers and reasons, writes the job ids to a file, and exits 1 when any was refused."""
    import subprocess

    from tests.support.config import write_toml
    from tests.support.processes import MAILWORKER, clean_env

    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    lines = [
        json.dumps({"to": [f"u{i}@example.org"], "subject": f"n{i}", "text": "t"})
        for i in range(120)
    ]
    lines[10] = "{broken"
    lines[20] = json.dumps({"to": ["nobody"], "subject": "s", "text": "t"})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    config = write_toml(
        tmp_path / "c.toml", {"broker_url": redis_url, "namespace": namespace}
    )
    out = subprocess.run(
        [MAILWORKER, "send", "--bulk", str(jobs)],
        capture_output=True,
        text=True,
        env=clean_env(MAILWORKER_CONFIG=str(config)),
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "enqueued 118" in out.stdout and "refused 2" in out.stdout
    assert "line 11: not valid JSON" in out.stdout
    assert "line 21: to[0].address" in out.stdout
    ids = (tmp_path / "jobs.jsonl.ids").read_text().split()
    assert len(ids) == 118
    app.broker.join("mail", timeout=30_000)
    assert len(server.recorder.messages) == 118
    assert all(app.status.get(i)["state"] == "sent" for i in ids)


def test_a_worker_holds_few_delayed_messages_in_memory(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Messages waiting for their time stay in Redis: a long delay waits in the
    scheduled set, held by no worker; of short ones (Dramatiq's delayed messages) a
    worker process prefetches at most 25 per thread (Dramatiq's default is 1,000)."""
    from tests.support.helpers import wait_for
    from worker.broker.schedule import SCHEDULE_AFTER_MS
    from worker.middleware.tuning import DELAY_PREFETCH

    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]), threads=1)
    job = {"to": ["user@example.org"], "subject": "Later", "text": "Not yet."}
    for _ in range(200):
        app.actor.send_with_options(kwargs={"job": job}, delay=600_000)
    for _ in range(200):
        app.actor.send_with_options(kwargs={"job": job}, delay=SCHEDULE_AFTER_MS)
    held = f"{namespace}:__acks__.{app.broker.broker_id}.mail.DQ"
    wait_for(lambda: redis_client.scard(held) >= DELAY_PREFETCH, timeout=10)
    time.sleep(0.5)  # time for the consumer to fetch more, were it allowed to
    assert redis_client.scard(held) == DELAY_PREFETCH
    assert redis_client.zcard(f"{namespace}:scheduled") == 200


def test_a_bulk_message_waits_while_a_single_job_of_its_process_runs(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Single jobs go first inside a process, also once running: while one is in flight
    (its server holds it at RCPT), a bulk message taken by another thread sends nothing;
    once it is done, the bulk message goes out."""
    bulk, slow = smtp_server(), smtp_server()
    release = threading.Event()
    slow.recorder.holds["urgent@example.org"] = release
    settings = make_settings(
        smtp=[bulk.smtp_section("primary"), slow.smtp_section("slow")]
    )
    app = run_worker(settings, threads=2, single_jobs=SingleJobs(limit=30))
    producer = Producer(redis_client, namespace=namespace)
    try:
        urgent = producer.enqueue(
            Notification(
                to=["urgent@example.org"], subject="Now", text="t", sender="slow"
            )
        )
        wait_for(lambda: "urgent@example.org" in slow.recorder.held)
        ids = producer.enqueue_many(_jobs(20))
        # the other thread takes the bulk message and opens its SMTP session ...
        wait_for(lambda: bulk.recorder.ehlos >= 1)
        time.sleep(0.5)
        # ... but sends nothing on it while the single job runs
        assert bulk.recorder.messages == []
        assert not [c for c in bulk.recorder.commands if c.startswith("MAIL")]
    finally:
        release.set()
    wait_for(lambda: len(bulk.recorder.messages) == 20)
    wait_for(lambda: all(app.status.get(i)["state"] == "sent" for i in [urgent, *ids]))


def test_the_wait_for_single_jobs_is_bounded_and_ends_with_them():
    express = SingleJobs(limit=30)
    assert express.wait(10) == 0.0  # no single job runs: no wait at all
    started, finish = threading.Event(), threading.Event()

    def single_job() -> None:
        with express.running():
            started.set()
            finish.wait(30)

    job = threading.Thread(target=single_job)
    job.start()
    started.wait(5)
    assert express.wait(0.05) >= 0.05  # bounded: it returns while the job still runs
    assert job.is_alive()
    threading.Timer(0.1, finish.set).start()
    assert express.wait(30) < 30  # and it ends when the job does
    job.join(5)
    assert not job.is_alive()


def test_a_thread_stays_free_for_single_jobs_while_bulk_messages_wait(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """While single jobs come in, of two threads at most one takes a bulk message: while
    one bulk message is stuck (its server holds it at RCPT) and another waits behind it
    on the same queue, a single job enqueued after both is delivered on the free thread."""
    server = smtp_server()
    release = threading.Event()
    server.recorder.holds["user0@example.org"] = release
    app = run_worker(make_settings(smtp=[server.smtp_section()]), threads=2)
    producer = Producer(redis_client, namespace=namespace)
    _single_job_sent(producer, app)
    try:
        first, second = _one_stuck_one_kept_back(producer, server, app)
        urgent = producer.enqueue(
            Notification(to=["urgent@example.org"], subject="Now", text="t")
        )
        wait_for(lambda: app.status.get(urgent)["state"] == "sent")
        # the second bulk message was kept back, not stuck on the other thread
        assert [m.rcpt_tos for m in server.recorder.messages] == [
            ["first@example.org"],
            ["urgent@example.org"],
        ]
        assert app.status.get(second[0])["state"] in ("queued", "sending")
    finally:
        release.set()
    wait_for(lambda: len(server.recorder.messages) == 42)
    wait_for(
        lambda: all(app.status.get(i)["state"] == "sent" for i in [*first, *second])
    )


def test_bulk_messages_kept_back_go_back_to_the_queue_when_the_worker_stops(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A bulk message the consumer kept back for want of a free thread is put back on
    its queue, its jobs `queued` again, when the worker stops; a new worker sends it."""
    from dramatiq import Worker

    from common.keys import QUEUES, queue_key
    from worker.app import build

    server = smtp_server()
    release = threading.Event()
    server.recorder.holds["user0@example.org"] = release
    settings = make_settings(smtp=[server.smtp_section()])
    app = build(settings, client=redis_client, backoff=0.01)
    app.broker.emit_after("process_boot")
    worker = Worker(app.broker, worker_timeout=50, worker_threads=2)
    worker.start()
    producer = Producer(redis_client, namespace=namespace)
    _single_job_sent(producer, app)
    try:
        first, second = _one_stuck_one_kept_back(producer, server, app)
        assert redis_client.llen(queue_key(namespace, QUEUES["normal"])) == 0
        threading.Timer(0.5, release.set).start()
        worker.stop(timeout=10_000)
        assert redis_client.llen(queue_key(namespace, QUEUES["normal"])) >= 1
        assert {app.status.get(i)["state"] for i in second} == {"queued"}
    finally:
        release.set()
        app.close()
    again = run_worker(settings)
    wait_for(
        lambda: all(again.status.get(i)["state"] == "sent" for i in [*first, *second])
    )
    assert len(server.recorder.messages) == 41


def test_a_thread_is_kept_free_only_while_single_jobs_come_in():
    from dramatiq import Message, Worker
    from dramatiq.brokers.stub import StubBroker

    from common.keys import BATCH_ACTOR_NAME
    from worker.middleware.bulk_slots import BulkSlots

    def bulk_message(n):
        message = Message(
            queue_name="mail-bulk",
            actor_name=BATCH_ACTOR_NAME,
            args=(),
            kwargs={"jobs": []},
            options={"redis_message_id": f"r{n}"},
        )
        return MessageProxy(message)

    express = SingleJobs()
    slots = BulkSlots(express, keep_free_for=30)
    broker = StubBroker()
    slots.before_worker_boot(broker, Worker(broker, worker_threads=3))
    first, second, third = (bulk_message(n) for n in range(3))
    # a bulk send alone: every thread
    assert slots.take(first) and slots.take(second) and slots.take(third)
    assert not slots.take(bulk_message(3))
    woken = threading.Event()
    slots.on_free(woken.set)
    slots.after_process_message(broker, first)
    assert woken.is_set()
    # a single job started: one thread is kept free for the next
    with express.running():
        pass
    assert not slots.room()  # two held of three threads
    slots.after_skip_message(broker, second)
    assert slots.take(bulk_message(4))
    assert not slots.take(bulk_message(5))
    slots.after_process_message(broker, third, exception=RuntimeError("boom"))
    assert slots.take(bulk_message(5))
    # a single job is never held back, and frees nothing it did not take
    single = MessageProxy(Message("mail", "deliver", (), {}, {}))
    assert slots.take(single)
    slots.after_process_message(broker, single)
    assert not slots.room()
    # nor is a message Dramatiq will hold until its eta (no thread takes it)
    later = bulk_message(6)
    later.options["eta"] = 0
    assert slots.take(later)
    assert not slots.room()
    # a closed consumer is no longer woken
    woken.clear()
    slots.off_free(woken.set)
    slots.after_process_message(broker, bulk_message(5))
    assert not woken.is_set()


def test_bulk_messages_kept_back_survive_a_lost_redis_in_the_process(
    private_redis, make_settings, smtp_server
):
    """A consumer closed by a connection error cannot put its kept-back bulk messages
    back on the queue: the queue's next consumer in the process hands them over."""
    from dramatiq import Worker

    from common.keys import QUEUES
    from worker.app import build

    server = smtp_server()
    settings = make_settings(
        smtp=[server.smtp_section()], broker_url=private_redis.url, namespace="mw"
    )
    app = build(settings)
    broker = app.broker
    assert broker.bulk_slots is not None
    broker.bulk_slots.before_worker_boot(broker, Worker(broker, worker_threads=1))
    producer = Producer(private_redis.client(), namespace="mw")
    producer.enqueue_many(_jobs(20))
    producer.enqueue_many(_jobs(20))
    try:
        consumer = broker.consume(QUEUES["normal"], prefetch=4, timeout=50)
        first = wait_for(lambda: next(consumer))
        assert next(consumer) is None  # the second is fetched and kept back
        kept = consumer._parked[0]
        private_redis.stop()
        consumer.close()  # Redis is away: nothing can be put back
        private_redis.start()
        again = broker.consume(QUEUES["normal"], prefetch=4, timeout=50)
        assert _next(again) is None  # the one slot is still first's
        broker.bulk_slots.after_process_message(broker, first)
        handed = _next(again)
        assert handed is not None
        assert handed.message_id == kept.message_id
        assert handed.options["redis_message_id"] == kept.options["redis_message_id"]
        again.close()
    finally:
        app.close()
