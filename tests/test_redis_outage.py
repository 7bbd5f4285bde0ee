"""Redis killed (``kill -9``) and restarted under a running worker: what was in the
worker's hands is neither stranded nor sent twice."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from producers import Notification, Producer
from tests.support.helpers import wait_for
from worker.app import build

pytestmark = pytest.mark.slow

NS = "mw"


@pytest.fixture
def outage_worker(private_redis, make_settings, run_worker):
    """``start(smtp_section, **settings)``: the real app on the private Redis, run by a
    real Dramatiq worker in threads; stopped at the end."""
    from common.broker import connect

    def start(section, *, threads=2, **data):
        data.setdefault("breaker", {"failures": 1000})
        settings = make_settings(
            smtp=[section], broker_url=private_redis.url, namespace=NS, **data
        )
        return run_worker(settings, threads=threads, client=connect(private_redis.url))

    return start


def _states(client, job_ids):
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(f"{NS}:job:{job_id}", "state")
        return [s.decode() if s else None for s in pipe.execute()]


def _outage(private_redis, seconds):
    """kill -9 the Redis, keep it away ``seconds``, start it again on its AOF."""
    private_redis.kill()
    time.sleep(seconds)
    private_redis.start()


def test_retries_a_worker_holds_in_its_delay_queue_survive_a_redis_restart(
    private_redis, outage_worker, smtp_server
):
    """Retries the worker had already fetched from its delayed queue when Redis was
    killed are sent once their time comes, by the same, still running process."""
    server = smtp_server()
    server.recorder.data_replies = ["451 4.3.0 try again later"] * 6
    outage_worker(
        server.smtp_section(),
        retry={"min_backoff": "3s", "max_backoff": "3s", "transport_retries": 0},
    )
    client = private_redis.client()
    producer = Producer(client, namespace=NS)
    job_ids = [
        producer.enqueue(Notification(to=[f"u{i}@example.org"], subject="s", text="t"))
        for i in range(6)
    ]
    # Given every job waits for its retry in the worker's in-memory delay queue
    wait_for(lambda: _states(client, job_ids) == ["retrying"] * 6)
    wait_for(lambda: client.llen(f"{NS}:mail.DQ") == 0)
    # When Redis is killed and comes back on its AOF
    _outage(private_redis, 1.0)
    # Then every job is sent, once
    client = private_redis.client()
    wait_for(lambda: _states(client, job_ids) == ["sent"] * 6, timeout=30)
    sent = Counter(m.rcpt_tos[0] for m in server.recorder.messages)
    assert sorted(sent) == sorted(f"u{i}@example.org" for i in range(6))
    assert set(sent.values()) == {1}


def test_a_redis_outage_during_a_bulk_send_sends_no_job_twice(
    private_redis, outage_worker, smtp_server
):
    """Redis dies while a bulk message's pipelined run is at the server: once Redis is
    back every job is recorded sent and none was sent twice (the breaker's bookkeeping
    after the run needs Redis and must not throw the outcomes away)."""
    server = smtp_server()
    release = threading.Event()
    server.recorder.holds["user10@example.org"] = release
    app = outage_worker(server.smtp_section())
    client = private_redis.client()
    producer = Producer(client, namespace=NS)
    job_ids = producer.enqueue_many(
        [
            Notification(to=[f"user{i}@example.org"], subject="s", text="t")
            for i in range(20)
        ]
    )
    # Given a bulk message half sent, held at the server
    wait_for(lambda: "user10@example.org" in server.recorder.held)
    # When Redis is killed, the server then takes the rest, and Redis comes back
    private_redis.kill()
    time.sleep(1.5)  # past the breaker's one-second cache: its next read needs Redis
    release.set()
    wait_for(lambda: len(server.recorder.messages) == 20)
    time.sleep(0.5)
    private_redis.start()
    # Then every job is recorded sent, and was sent once
    client = private_redis.client()
    wait_for(lambda: _states(client, job_ids) == ["sent"] * 20, timeout=30)
    assert app.status.get(job_ids[0])["attempts"] == 1
    sent = Counter(m.rcpt_tos[0] for m in server.recorder.messages)
    assert len(sent) == 20
    assert set(sent.values()) == {1}


def test_after_an_outage_no_live_process_is_robbed(
    make_settings, redis_client, namespace, smtp_server
):
    """A process that could not beat for longer than the timeout (Redis away) does not
    take back the jobs of the others at once: their beats are just as stale, and they are
    alive. Once they had a timeout to beat, a really dead one is reaped again."""
    from common.keys import QUEUES
    from worker.middleware.heartbeat import Heartbeat

    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    a, b = (build(settings, client=redis_client) for _ in range(2))
    beat_a, beat_b = (Heartbeat(timeout=1.0, ttl=60) for _ in range(2))
    Producer(redis_client, namespace=namespace).enqueue(
        Notification(to=["x@example.org"], subject="s", text="t")
    )
    consumer = b.broker.consume(QUEUES["normal"], prefetch=1, timeout=50)
    try:
        assert wait_for(lambda: next(consumer)) is not None  # in b's hands
        beat_a.beat(a.broker)
        beat_b.beat(b.broker)
        time.sleep(1.5)  # neither could beat: as while Redis was away
        assert beat_a.beat(a.broker) == 0  # b's beat is stale, but so was a's own
        beat_b.beat(b.broker)
        # Then b dies (beats no more) while a goes on beating: reaped once a timeout
        # has passed since the outage and since b's last beat.
        moved = []
        for _ in range(10):
            time.sleep(0.4)
            moved.append(beat_a.beat(a.broker))
        assert moved[0] == 0 and sum(moved) == 1
    finally:
        consumer.close()
        a.close()
        b.close()
