"""Wake-ups: producers publish a queue's name when they enqueue; an idle consumer waiting
on its long poll is woken and fetches the job at once."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from common.keys import wake_channel
from producers import Notification, Producer
from tests.support.helpers import wait_for
from worker.app import build
from worker.middleware.wake import CLIENT_NAME

LONG_POLL_MS = 120_000  # no test waits this long: only a wake-up ends the wait


def _note(**fields):
    fields.setdefault("to", ["someone@example.org"])
    fields.setdefault("subject", "Approval needed")
    fields.setdefault("text", "Task 17 waits for you.")
    return Notification(**fields)


def _subscribe(client: redis.Redis, namespace: str):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(wake_channel(namespace))
    return pubsub


def _published(pubsub, seconds: float = 1.0) -> list[bytes]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "message":
            out.append(message["data"])
    return out


def test_enqueue_publishes_the_queue_name_once_per_burst(redis_client, namespace):
    """One wake-up per queue that got work; a burst in one round trip is one or a few
    wake-ups (the 5 ms gate), not one per job."""
    pubsub = _subscribe(redis_client, namespace)
    try:
        producer = Producer(redis_client, namespace=namespace)
        producer.enqueue(_note(priority="high"))
        assert _published(pubsub) == [b"mail-high"]
        producer.enqueue_many([_note() for _ in range(40)], bulk=True)  # 2 messages
        producer.enqueue_many([_note(priority="bulk") for _ in range(20)], bulk=False)
        woken = _published(pubsub)
        assert set(woken) == {b"mail", b"mail-bulk"}
        assert len(woken) < 20  # not one per job of the 20 sent in one pipeline
    finally:
        pubsub.close()


def test_a_repeated_idempotency_key_enqueues_nothing_and_wakes_nobody(
    redis_client, namespace
):
    producer = Producer(redis_client, namespace=namespace)
    first = producer.enqueue(_note(idempotency_key="task-17"))
    time.sleep(0.05)  # past the wake gate of the first enqueue
    pubsub = _subscribe(redis_client, namespace)
    try:
        assert producer.enqueue(_note(idempotency_key="task-17")) == first
        assert _published(pubsub, 0.5) == []
    finally:
        pubsub.close()


@pytest.fixture
def idle_consumer(make_settings, redis_client, smtp_server):
    """A worker's consumer of `mail-high` with its listener running, whose next empty
    fetch would sleep a minute or more."""
    settings = make_settings(smtp=[smtp_server().smtp_section()])
    app = build(settings, client=redis_client)
    waker = app.broker.waker
    assert waker is not None
    app.clients_before = {c["id"] for c in redis_client.client_list()}
    waker.after_worker_boot(app.broker, None)
    consumer = app.broker.consume("mail-high", prefetch=4, timeout=LONG_POLL_MS)
    consumer.misses = 30  # Dramatiq's backoff: 60 to 120 s from now on
    yield app, consumer
    waker.before_worker_shutdown(app.broker, None)
    consumer.close()
    app.close()


def _next_in_thread(consumer):
    got: list = []
    thread = threading.Thread(target=lambda: got.append(next(consumer)), daemon=True)
    thread.start()
    return thread, got


def test_an_idle_consumer_is_woken_by_an_enqueue(
    idle_consumer, redis_client, namespace
):
    app, consumer = idle_consumer
    waker = app.broker.waker
    wait_for(lambda: redis_client.pubsub_numsub(wake_channel(namespace))[0][1] >= 1)
    thread, got = _next_in_thread(consumer)
    time.sleep(0.3)  # the consumer has fetched nothing and waits on its poll
    job_id = Producer(redis_client, namespace=namespace).enqueue(_note(priority="high"))
    thread.join(timeout=15)
    assert not thread.is_alive(), "the enqueue did not wake the consumer"
    message = got[0] or next(consumer)  # woken empty-handed, it fetches at once
    assert message is not None and message.message_id == job_id
    assert waker.wakeups >= 1


def test_the_listener_comes_back_after_its_connection_is_killed(
    idle_consumer, redis_client, namespace
):
    if "Fake" in type(redis_client).__name__:
        pytest.skip("needs a real Redis to kill the listener's connection")
    app, consumer = idle_consumer
    channel = wake_channel(namespace)
    wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1)
    ours = [  # the listener: the named connection this test opened
        c["id"]
        for c in redis_client.client_list()
        if c.get("name") == CLIENT_NAME and c["id"] not in app.clients_before
    ]
    assert len(ours) == 1
    redis_client.client_kill_filter(_id=ours[0])
    wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] == 0, timeout=5)
    wait_for(lambda: redis_client.pubsub_numsub(channel)[0][1] >= 1, timeout=10)
    thread, got = _next_in_thread(consumer)
    time.sleep(0.3)
    job_id = Producer(redis_client, namespace=namespace).enqueue(_note(priority="high"))
    thread.join(timeout=15)
    assert not thread.is_alive(), "the listener did not come back"
    message = got[0] or next(consumer)
    assert message is not None and message.message_id == job_id
