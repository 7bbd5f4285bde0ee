"""Bad input, as a hostile or careless producer sends it: each gets a clear outcome, the
worker keeps running, and the messages fetched with the bad one are delivered."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
from dramatiq import Middleware

from producers import JobValidationError, Notification, Producer
from tests.support.helpers import wire_enqueue
from worker.deadletter import DeadLetters


def _push_raw(client, namespace: str, payload: bytes, *, queue: str = "mail") -> str:
    redis_id = str(uuid.uuid4())
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:{queue}.msgs", redis_id, payload)
        pipe.rpush(f"{namespace}:{queue}", redis_id)
        pipe.execute()
    return redis_id


def _good(client, namespace: str) -> str:
    return wire_enqueue(
        client, namespace, {"to": ["ok@example.org"], "subject": "s", "text": "t"}
    )


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _message(job_id: str, redis_id: str, **overrides) -> dict:
    message = {
        "queue_name": "mail",
        "actor_name": "deliver",
        "args": [],
        "kwargs": {"job": {"to": ["ok@example.org"], "subject": "s", "text": "t"}},
        "options": {"redis_message_id": redis_id},
        "message_id": job_id,
        "message_timestamp": int(time.time() * 1000),
    }
    message.update(overrides)
    return message


@pytest.fixture
def worker_and_server(smtp_server, make_settings, run_worker):
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    return app, server


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{not json at all", "cannot decode"),
        (b"\xff\xfe\x00 invalid utf-8 \xc3\x28", "cannot decode"),
        (
            json.dumps(
                {
                    "queue_name": "mail",
                    "actor_name": "deliver",
                    "args": [],
                    "kwargs": {},
                    "options": {},
                    "priority": "high",
                }
            ).encode(),
            "options.redis_message_id is missing",
        ),
        (
            json.dumps(
                _message(str(uuid.uuid4()), str(uuid.uuid4()), priority="high")
            ).encode(),
            "cannot decode",
        ),
        (  # JSON that Python's json module reads but orjson (our decoder) refuses
            b'{"queue_name":"mail","actor_name":"deliver","args":[],'
            b'"kwargs":{"job":{"to":["a@example.org"],"subject":"x","text":"y"}},'
            b'"options":{"n":NaN},"message_id":"m","message_timestamp":1}',
            "cannot decode",
        ),
    ],
    ids=["malformed-json", "invalid-utf8", "wrong-shape", "unknown-field", "nan"],
)
def test_undecodable_message_is_poison_and_its_batch_goes_on(
    payload, error, worker_and_server, redis_client, namespace
):
    """A message Dramatiq cannot decode is dead as `poison`, raw bytes kept; the rest arrive."""
    app, server = worker_and_server
    app.broker.emit_after("process_boot")
    before = _good(redis_client, namespace)
    bad = _push_raw(redis_client, namespace, payload)
    after = _good(redis_client, namespace)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(before)["state"] == "sent"
    assert app.status.get(after)["state"] == "sent"
    assert len(server.recorder.messages) == 2
    letters = DeadLetters(redis_client, namespace=namespace, ttl=60)
    record = letters.show(bad)
    assert record["reason"] == "poison" and error in record["error"]["message"]
    raw = json.loads(redis_client.get(f"{namespace}:dead:{bad}"))
    assert base64.b64decode(raw["raw_base64"]) == payload
    assert redis_client.hlen(f"{namespace}:mail.msgs") == 0  # nothing left behind


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"queue_name": "mail-bulk"}, "does not match the queue"),
        ({"options": {}}, "redis_message_id is missing"),
        ({"message_id": "x" * 129}, "message_id is not 1 to 128 letters"),
        ({"message_id": "<a b>"}, "message_id is not 1 to 128 letters"),
        ({"message_id": ["a"]}, "message_id is not 1 to 128 letters"),
        ({"kwargs": [1]}, "kwargs is not an object"),
        ({"options": "redis_message_id"}, "options is not an object"),
        ({"options": {"redis_message_id": 5}}, "options.redis_message_id is missing"),
        ({"message_timestamp": "soon"}, "message_timestamp is not a whole number"),
        ({"actor_name": None}, "actor_name is not a string"),
        ({"queue_name": 5}, "queue_name is not a string"),
        ({"args": "x"}, "args is not a list"),
        (
            {"options": {"redis_message_id": "r-1", "retries": "x"}},
            "options.retries is not a number",
        ),
        ({"kwargs": {"job": _nested(300)}}, "nests deeper than 254 levels"),
    ],
    ids=[
        "queue-mismatch",
        "no-redis-message-id",
        "long-job-id",
        "job-id-with-space",
        "job-id-a-list",
        "kwargs-a-list",
        "options-a-string",
        "redis-message-id-a-number",
        "timestamp-a-string",
        "actor-name-null",
        "queue-name-a-number",
        "args-a-string",
        "retries-a-string",
        "nested-300-deep",
    ],
)
def test_message_dramatiq_could_not_acknowledge_is_poison(
    overrides, problem, worker_and_server, redis_client, namespace
):
    """A message naming another queue, without a redis message id, or of a shape no actor
    can run (its message id cannot be a job id, kwargs no object, ...), is taken out as
    poison, naming the field; the message fetched after it is sent."""
    app, server = worker_and_server
    redis_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    message = _message(job_id, redis_id, **overrides)
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:mail.msgs", redis_id, json.dumps(message))
        pipe.rpush(f"{namespace}:mail", redis_id)
        pipe.execute()
    good = _good(redis_client, namespace)
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(good)["state"] == "sent"
    assert len(server.recorder.messages) == 1
    record = DeadLetters(redis_client, namespace=namespace, ttl=60).show(redis_id)
    assert record["reason"] == "poison" and problem in record["error"]["message"]
    assert redis_client.hlen(f"{namespace}:mail.msgs") == 0


class _HoldAfterNack(Middleware):
    """Holds a worker thread in Dramatiq's ``after_nack`` signal until released: what a
    worker that dies right after the nack leaves behind becomes visible."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def after_nack(self, broker, message) -> None:
        self.release.wait(10)


def test_options_dramatiq_allows_as_floats_are_accepted(
    worker_and_server, redis_client, namespace
):
    """``eta`` and ``time_limit`` may be floats (Dramatiq adds a float delay to ``eta``):
    such a job is delivered, not taken for poison."""
    app, server = worker_and_server
    redis_id, job_id = str(uuid.uuid4()), str(uuid.uuid4())
    options = {
        "redis_message_id": redis_id,
        "time_limit": 60_000.0,
        "eta": time.time() * 1000 - 1.5,
    }
    message = _message(job_id, redis_id, options=options)
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{namespace}:mail.msgs", redis_id, json.dumps(message))
        pipe.rpush(f"{namespace}:mail", redis_id)
        pipe.execute()
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(job_id)["state"] == "sent"
    assert len(server.recorder.messages) == 1


def test_dead_letter_shows_an_attachment_that_is_not_base64_as_such(
    worker_and_server, redis_client, namespace
):
    """An attachment whose content is not base64 is dead as `validation`; its dead letter
    says so instead of showing an empty file."""
    app, _ = worker_and_server
    job_id = wire_enqueue(
        redis_client,
        namespace,
        {
            "to": ["a@example.org"],
            "subject": "s",
            "text": "t",
            "attachments": [{"filename": "a.txt", "content": "!!"}],
        },
    )
    app.broker.join("mail", timeout=10_000)
    dead = DeadLetters(redis_client, namespace=namespace, ttl=60).show(job_id)
    assert dead is not None and dead["error"]["field"].startswith("attachments[0]")
    [shown] = dead["message"]["job"]["attachments"]
    assert shown == {"filename": "a.txt", "content_type": None, "content": "not base64"}


def test_unknown_actor_is_dead_lettered(worker_and_server, redis_client, namespace):
    """A message for an actor that does not exist is dead as `unknown_actor`, and its
    dead letter is recorded before Dramatiq's nack takes it off the queue."""
    app, _ = worker_and_server
    hold = _HoldAfterNack()
    app.broker.add_middleware(hold)  # last added: its after_nack runs first
    try:
        job_id = wire_enqueue(
            redis_client, namespace, {"to": ["a@example.org"]}, actor="send_mail"
        )
        app.broker.join("mail", timeout=10_000)  # returns once the nack is done
        record = app.status.get(job_id)
        dead = DeadLetters(redis_client, namespace=namespace, ttl=60).show(job_id)
    finally:
        hold.release.set()
    assert record is not None, "no status record when the nack was done"
    assert record["state"] == "dead" and record["reason"] == "unknown_actor"
    assert dead is not None and "ActorNotFound: send_mail" in dead["error"]["message"]
    assert dead["message"]["actor"] == "send_mail"


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (
            {"schema_version": 7, "to": ["a@example.org"], "subject": "s", "text": "t"},
            "schema_version",
        ),
        (
            {
                "to": ["a@example.org"],
                "subject": "Hi\r\nBcc: victim@example.org",
                "text": "t",
            },
            "subject",
        ),
        (
            {"to": ["a@example.org\r\nRCPT TO:<x@y.z>"], "subject": "s", "text": "t"},
            "to[0]",
        ),
        (
            {
                "to": ["Eve\nBcc: v@example.org <a@example.org>"],
                "subject": "s",
                "text": "t",
            },
            "to[0]",
        ),
        (
            {
                "to": ["a@example.org"],
                "subject": "s",
                "text": "t",
                "headers": {"X-Tag": "a\r\nBcc: v@example.org"},
            },
            "headers",
        ),
        (
            {
                "to": ["a@example.org"],
                "subject": "s",
                "text": "t",
                "attachments": [{"filename": "a\r\n.pdf", "content": "aGk="}],
            },
            "attachments[0]",
        ),
        (
            {
                "to": [f"u{i}@example.org" for i in range(10_000)],
                "subject": "s",
                "text": "t",
            },
            "to",
        ),
        (
            {"to": ["a@example.org"], "subject": "s", "text": "t", "sender": "nosuch"},
            "sender",
        ),
        ("not an object", "job"),
        ([1, 2], "job"),
        (
            {"to": ["a@example.org"], "subject": "s", "text": "t", "attachments": [7]},
            "attachments[0]",
        ),
    ],
    ids=[
        "schema-version",
        "subject-crlf",
        "address-crlf",
        "display-name-lf",
        "header-crlf",
        "attachment-name",
        "10000-recipients",
        "unknown-sender",
        "not-an-object",
        "a-list",
        "attachment-not-an-object",
    ],
)
def test_invalid_job_on_the_wire_is_dead_with_the_field_named(
    job, field, worker_and_server, redis_client, namespace
):
    """A job no producer could enqueue is dead at once as `validation`, naming the field,
    and its dead letter shows the job as it came."""
    app, server = worker_and_server
    job_id = wire_enqueue(redis_client, namespace, job)
    good = _good(redis_client, namespace)
    app.broker.join("mail", timeout=30_000)
    record = app.status.get(job_id)
    assert record["state"] == "dead" and record["reason"] == "validation"
    assert record["attempts"] == 1
    assert record["error"]["field"].startswith(field)
    assert app.status.get(good)["state"] == "sent"
    assert [m.rcpt_tos for m in server.recorder.messages] == [["ok@example.org"]]
    dead = DeadLetters(redis_client, namespace=namespace, ttl=60).show(job_id)
    assert dead is not None and dead["message"]["actor"] == "deliver"
    if not isinstance(job, dict):
        assert dead["message"]["job"] == job


def test_control_characters_on_the_wire_are_dead_naming_the_field(
    worker_and_server, redis_client, namespace
):
    """Jobs written past the producer with a control character other than CR, LF and NUL
    (VT, FF, ESC, DEL) in a header field are dead as `validation` naming the field, and
    nothing of them reaches the SMTP server; the good job beside them is delivered."""
    app, server = worker_and_server
    base = {"to": ["a@example.org"], "subject": "s", "text": "t"}
    cases = {
        "subject": {**base, "subject": "Hi\x0bthere"},
        "to[0]": {**base, "to": ["Eve\x0cExample <a@example.org>"]},
        "headers.X-Tag": {**base, "headers": {"X-Tag": "\x1b[31mred"}},
        "attachments[0].filename": {
            **base,
            "attachments": [{"filename": "a\x7f.pdf", "content": "aGk="}],
        },
    }
    ids = {
        field: wire_enqueue(redis_client, namespace, job)
        for field, job in cases.items()
    }
    good = _good(redis_client, namespace)
    app.broker.join("mail", timeout=30_000)
    for field, job_id in ids.items():
        record = app.status.get(job_id)
        assert record["state"] == "dead" and record["reason"] == "validation", field
        assert record["error"]["field"] == field
        assert "control character" in record["error"]["message"]
    assert app.status.get(good)["state"] == "sent"
    assert [m.rcpt_tos for m in server.recorder.messages] == [["ok@example.org"]]


def test_fifty_megabyte_attachment_is_refused_at_enqueue_and_in_the_worker(
    worker_and_server, redis_client, namespace
):
    """A 50 MB attachment is refused by the producer naming `attachments`, and dead if sent raw."""
    app, server = worker_and_server
    big = b"\0" * (50 * 1024 * 1024)
    producer = Producer(redis_client, namespace=namespace)
    with pytest.raises(JobValidationError) as caught:
        producer.enqueue(
            Notification(
                to=["a@example.org"],
                subject="s",
                text="t",
                attachments=[{"filename": "big.bin", "content": big}],
            )
        )
    assert caught.value.field == "attachments"
    job = {
        "to": ["a@example.org"],
        "subject": "s",
        "text": "t",
        "attachments": [
            {"filename": "big.bin", "content": base64.b64encode(big).decode()}
        ],
    }
    job_id = wire_enqueue(redis_client, namespace, job)
    good = _good(redis_client, namespace)
    app.broker.join("mail", timeout=60_000)
    record = app.status.get(job_id)
    assert (
        record["reason"] == "validation" and record["error"]["field"] == "attachments"
    )
    assert app.status.get(good)["state"] == "sent"
    assert len(server.recorder.messages) == 1


def test_ten_thousand_recipients_are_refused_at_enqueue(redis_client, namespace):
    """More than limits.max_recipients is refused before anything reaches the queue."""
    producer = Producer(redis_client, namespace=namespace)
    with pytest.raises(JobValidationError) as caught:
        producer.enqueue(
            Notification(
                to=[f"u{i}@example.org" for i in range(10_000)], subject="s", text="t"
            )
        )
    assert caught.value.field == "to" and "500" in str(caught.value)
    assert redis_client.llen(f"{namespace}:mail") == 0
