"""What ends a bulk message other than its server's replies (its time limit, an error
Dramatiq retries until it gives up) ends each of its jobs once, with its own record."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from dramatiq import Middleware
from dramatiq.middleware import MiddlewareError

from tests.support.helpers import wait_for, wire_enqueue
from tests.support.smtp import Recorder
from worker.deadletter import DeadLetters

pytestmark = pytest.mark.slow


class _SlowRecorder(Recorder):
    """An SMTP server that takes 0.3 s over each message's content."""

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.3)
        return await super().handle_DATA(server, session, envelope)


class _BoomError(MiddlewareError):
    """Raised before the actor runs: Dramatiq handles it as the actor's own error."""


class _Failing(Middleware):
    """Stands in for a bug: every run of the messages carrying ``job_ids`` raises."""

    def __init__(self, *job_ids):
        self.job_ids = set(job_ids)
        self.runs = 0

    def before_process_message(self, broker, message):
        jobs = message.kwargs.get("jobs") or [{"id": message.message_id}]
        if self.job_ids & {j.get("id") for j in jobs if isinstance(j, dict)}:
            self.runs += 1
            raise _BoomError("boom")


def _state(app, job_id):
    return (app.status.get(job_id) or {}).get("state")


def _bulk(count):
    ids = [str(uuid.uuid4()) for _ in range(count)]
    jobs = [
        {
            "id": job_id,
            "job": {"to": [f"u{i}@example.org"], "subject": "s", "text": "t"},
        }
        for i, job_id in enumerate(ids)
    ]
    return ids, {"jobs": jobs}


def test_a_bulk_message_past_its_time_limit_sends_each_job_once(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A bulk message whose ``time_limit`` runs out mid-way is never cut off mid-send:
    the jobs it has not begun go back to the queue, and every job is sent once."""
    server = smtp_server(recorder=_SlowRecorder())
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    ids, kwargs = _bulk(8)
    wire_enqueue(
        redis_client,
        namespace,
        None,
        queue="mail-bulk",
        actor="deliver_batch",
        kwargs=kwargs,
        options={"time_limit": 1000},
    )
    wait_for(lambda: all(_state(app, i) == "sent" for i in ids), timeout=30)
    app.broker.join("mail-bulk", timeout=10_000)
    app.broker.join("mail", timeout=10_000)
    sent = Counter(m.rcpt_tos[0] for m in server.recorder.messages)
    assert len(sent) == 8 and set(sent.values()) == {1}
    assert {app.status.get(i)["attempts"] for i in ids} == {1}


def test_an_unexpected_error_is_tried_max_attempts_times(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A job whose every run raises is run ``retry.max_attempts`` times, then dead as
    ``unhandled`` (the two retry rules agree)."""
    server = smtp_server()
    settings = make_settings(
        smtp=[server.smtp_section()],
        retry={"max_attempts": 3, "min_backoff": "1s", "max_backoff": "1s"},
    )
    app = run_worker(settings)
    job_id = str(uuid.uuid4())
    # Before the enqueue: a worker woken at once must not run the job without it.
    failing = _Failing(job_id)
    app.broker.add_middleware(failing)
    wire_enqueue(
        redis_client,
        namespace,
        {"to": ["a@example.org"], "subject": "s", "text": "t"},
        job_id=job_id,
    )
    wait_for(lambda: _state(app, job_id) == "dead", timeout=30)
    record = app.status.get(job_id)
    assert record["reason"] == "unhandled" and failing.runs == 3
    assert record["attempts"] == 3
    assert "_BoomError: boom" in record["error"]["message"]


def test_a_bulk_message_dramatiq_gives_up_on_leaves_each_job_its_own_dead_letter(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Each job of a bulk message that dies as ``unhandled`` gets its own record and
    dead letter, requeueable on its own; a job already sent stays sent."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()], retry={"max_attempts": 1})
    app = run_worker(settings)
    ids, kwargs = _bulk(3)
    # Given the first job was already sent (a producer sent it alone before)
    app.status.write(ids[0], {"id": ids[0], "state": "sent", "attempts": 1})
    failing = _Failing(*ids)
    app.broker.add_middleware(failing)
    # When the bulk message carrying all three fails for good
    wire_enqueue(
        redis_client,
        namespace,
        None,
        queue="mail-bulk",
        actor="deliver_batch",
        kwargs=kwargs,
    )
    wait_for(lambda: _state(app, ids[2]) == "dead", timeout=30)
    app.broker.join("mail-bulk", timeout=10_000)
    # Then the others are dead as unhandled, each with a dead letter of its own
    dead = DeadLetters(redis_client, namespace=namespace, ttl=60)
    assert app.status.get(ids[0])["state"] == "sent"
    assert dead.show(ids[0]) is None
    for job_id in ids[1:]:
        record = app.status.get(job_id)
        assert (record["state"], record["reason"]) == ("dead", "unhandled")
        letter = dead.show(job_id)
        assert letter is not None and letter["message"]["actor"] == "deliver"
    # And one is requeued and delivered alone
    failing.job_ids.clear()
    dead.requeue(ids[1], settings.limits)
    wait_for(lambda: app.status.get(ids[1])["state"] == "sent")
    assert [m.rcpt_tos for m in server.recorder.messages] == [["u1@example.org"]]


def test_a_sent_job_handed_back_or_given_up_on_stays_sent(redis_client, namespace):
    """Neither a stopping worker's hand-back nor a dead letter turns a sent job back
    into `queued` or `dead`."""
    from worker.broker.envelope import JobRef
    from worker.status import StatusStore

    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    job_id = str(uuid.uuid4())
    status.write(job_id, {"id": job_id, "state": "sent", "attempts": 1})
    status.unbegin([JobRef(job_id, 2, "mail", "r")])
    status.write(job_id, {"state": "dead"}, dead_payload=b"{}")
    record = status.get(job_id)
    assert (record["state"], record["attempts"]) == ("sent", 1)
    assert record["history"] == []
    assert not redis_client.exists(f"{namespace}:dead:{job_id}")
