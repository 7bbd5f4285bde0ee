"""The producer side: import isolation, the wire format, idempotency, a broker that is down."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import redis

import producers
from common.keys import BATCH_SIZE
from common.sockets import free_port
from producers import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    JobValidationError,
    Notification,
    Producer,
)
from settings import ConfigError, Settings
from tests.support.helpers import wait_for, wire_enqueue
from worker.status import StatusStore


def test_importing_producers_imports_no_transport_and_no_worker():
    """`import producers` pulls in neither aiosmtplib, msal, httpx nor the worker."""
    code = (
        "import sys, producers, producers.cli\n"
        "bad = [m for m in ('aiosmtplib', 'msal', 'httpx', 'worker', 'smtplib', 'dramatiq')"
        " if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def _notification(**fields) -> Notification:
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Task assigned")
    fields.setdefault("text", "You have a new task.")
    return Notification(**fields)


def test_enqueue_writes_the_queued_record_and_the_documented_message(
    redis_client, namespace
):
    """enqueue() leaves a `queued` status record and a Dramatiq message on the `mail` queue."""
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(_notification(metadata={"task": "t-1"}))
    record = StatusStore(redis_client, namespace=namespace, ttl=60).get(job_id)
    assert record["state"] == "queued"
    assert record["attempts"] == 0
    assert record["metadata"] == {"task": "t-1"}
    assert redis_client.llen(f"{namespace}:mail") == 1
    [payload] = redis_client.hvals(f"{namespace}:mail.msgs")
    message = json.loads(payload)
    assert message["message_id"] == job_id
    assert message["actor_name"] == "deliver"
    assert message["queue_name"] == "mail"
    assert message["kwargs"]["job"]["schema_version"] == 1
    assert (
        message["options"]["redis_message_id"]
        == redis_client.lindex(f"{namespace}:mail", 0).decode()
    )
    assert redis_client.ttl(f"{namespace}:job:{job_id}") > 0


def test_wire_format_job_is_delivered(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A job written with plain Redis commands, as the README documents, is delivered."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    job = {
        "schema_version": 1,
        "to": ["ops@example.org"],
        "subject": "From a shell script",
        "text": "hi",
        "attachments": [
            {"filename": "a.txt", "content_type": "text/plain", "content": "aGVsbG8="}
        ],
    }
    job_id = wire_enqueue(redis_client, namespace, job, wake=True)
    app.broker.join("mail", timeout=10_000)
    [received] = server.recorder.messages
    assert received.rcpt_tos == ["ops@example.org"]
    assert f"<{job_id}@example.com>".encode() in received.data
    assert app.status.get(job_id)["state"] == "sent"


def test_job_on_the_queue_without_a_record_is_reported_queued(redis_client, namespace):
    """A wire-format job not yet processed has no record but its status is `queued`."""
    job_id = wire_enqueue(
        redis_client, namespace, {"to": ["a@example.org"], "subject": "s", "text": "t"}
    )
    record = StatusStore(redis_client, namespace=namespace, ttl=60).get(job_id)
    assert record["state"] == "queued" and record["id"] == job_id
    assert (
        StatusStore(redis_client, namespace=namespace, ttl=60).get("no-such-id") is None
    )


def test_same_idempotency_key_and_payload_is_one_job(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """The same key and payload return the same job id and produce one message."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    producer = Producer(redis_client, namespace=namespace)
    first = producer.enqueue(_notification(idempotency_key="task-42-assigned"))
    second = producer.enqueue(_notification(idempotency_key="task-42-assigned"))
    assert first == second
    app.broker.join("mail", timeout=10_000)
    assert len(server.recorder.messages) == 1


def test_same_idempotency_key_with_another_payload_is_refused(redis_client, namespace):
    """Reusing a key for a different payload is an error naming idempotency_key."""
    producer = Producer(redis_client, namespace=namespace)
    producer.enqueue(_notification(idempotency_key="k"))
    with pytest.raises(JobValidationError) as caught:
        producer.enqueue(_notification(idempotency_key="k", subject="Other"))
    assert caught.value.field == "idempotency_key"
    assert redis_client.llen(f"{namespace}:mail") == 1


def test_enqueue_many_returns_ids_in_order_and_validates_all_first(
    redis_client, namespace
):
    """enqueue_many enqueues in order; one job over the limits stops all, naming its index."""
    producer = Producer(redis_client, namespace=namespace)
    ids = producer.enqueue_many(_notification(subject=f"n{i}") for i in range(1200))
    assert len(ids) == len(set(ids)) == 1200
    assert redis_client.llen(f"{namespace}:mail") == 1200 // BATCH_SIZE  # bulk messages
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    assert all(status.get(i)["state"] == "queued" for i in ids[::97])
    from settings import Limits

    strict = Producer(
        redis_client, namespace=namespace, limits=Limits(max_recipients=1)
    )
    with pytest.raises(JobValidationError) as caught:
        strict.enqueue_many(
            [_notification(), _notification(to=["a@example.org", "b@example.org"])]
        )
    assert caught.value.field == "[1].to"
    assert (
        str(caught.value) == "[1].to: 2 recipients; at most 1 (limits.max_recipients)"
    )
    assert redis_client.llen(f"{namespace}:mail") == 1200 // BATCH_SIZE


def test_broker_down_is_a_clear_error_not_a_silent_drop():
    """With nothing listening on the broker port, enqueue raises BrokerUnavailableError."""
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    producer = Producer(client, broker_label="redis://127.0.0.1")
    with pytest.raises(BrokerUnavailableError, match="unreachable"):
        producer.enqueue(_notification())


def test_module_enqueue_many_takes_bulk_as_the_readme_writes_it(
    redis_client, namespace
):
    """producers.enqueue_many(..., bulk=False) enqueues one broker message per job."""
    producer = Producer(redis_client, namespace=namespace)
    jobs = [_notification(subject=f"n{i}") for i in range(3)]
    ids = producers.enqueue_many(jobs, bulk=False, producer=producer)
    assert len(set(ids)) == 3
    queued = redis_client.lrange(f"{namespace}:mail", 0, -1)
    assert len(queued) == 3
    messages = [json.loads(p) for p in redis_client.hvals(f"{namespace}:mail.msgs")]
    assert {m["actor_name"] for m in messages} == {"deliver"}
    assert sorted(m["message_id"] for m in messages) == sorted(ids)


BROKER_PASSWORD = "broker-pw-5150"


@pytest.fixture
def locked_redis(private_redis):
    """The test's own redis-server with a password, and an ACL user that may only PING."""
    admin = private_redis.client()
    admin.config_set("requirepass", BROKER_PASSWORD)
    admin = redis.Redis(port=private_redis.port, password=BROKER_PASSWORD)
    admin.execute_command("ACL", "SETUSER", "pinger", "on", ">pinger-pw", "~*", "+ping")
    return private_redis


@pytest.mark.parametrize(
    ("credentials", "shown", "words"),
    [
        (":wrong-pw-1", ":***@", "refused the login"),
        (
            "nobody:wrong-pw-1",
            "nobody:***@",
            "ACL user 'nobody' is unknown or disabled",
        ),
        ("", "", "requires a password"),
        ("pinger:pinger-pw", "pinger:***@", "refused a command to ACL user 'pinger'"),
    ],
    ids=["wrong-password", "unknown-user", "no-password", "acl-forbids-command"],
)
def test_broker_refusing_the_login_is_reported_as_such(
    locked_redis, credentials, shown, words
):
    """A broker that refuses the password, the ACL user or a command raises
    BrokerAuthenticationError (a BrokerUnavailableError) saying so, never
    "unreachable", with the broker named and its password masked."""
    at = "@" if credentials else ""
    url = f"redis://{credentials}{at}127.0.0.1:{locked_redis.port}/0"
    producer = Producer.from_settings(Settings(), broker_url=url)
    with pytest.raises(BrokerAuthenticationError) as caught:
        producer.enqueue(_notification())
    message = str(caught.value)
    assert isinstance(caught.value, BrokerUnavailableError)
    assert f"redis://{shown}127.0.0.1:{locked_redis.port}/0" in message
    assert words in message
    assert "unreachable" not in message
    assert "wrong-pw-1" not in message and "pinger-pw" not in message


def _python(code: str, cwd, env: dict[str, str] | None = None):
    """Run ``code`` in a fresh interpreter in ``cwd`` with only the given MAILWORKER_*."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


# Builds the default producer twice, as enqueue() does; connecting is lazy, so nothing
# is written to any Redis.
DEFAULT_TWICE = (
    "import producers\nproducers.default_producer()\nproducers.default_producer()\n"
)


def test_default_configuration_warns_once_naming_the_broker(tmp_path):
    """Without MAILWORKER_CONFIG, ./mailworker.toml and MAILWORKER_BROKER_URL the default
    producer warns once, on stderr, that it uses the default broker, and how to choose."""
    out = _python(DEFAULT_TWICE, tmp_path)
    assert out.stderr.count("DefaultConfigurationWarning") == 1, out.stderr
    assert "<string>:2:" in out.stderr  # points at the caller's line
    assert "redis://127.0.0.1:6379/0" in out.stderr
    assert "Producer.from_url" in out.stderr and str(tmp_path) in out.stderr


@pytest.mark.parametrize("given", ["file", "config-variable", "broker-variable"])
def test_default_producer_does_not_warn_when_configured(tmp_path, given):
    """A mailworker.toml, MAILWORKER_CONFIG or MAILWORKER_BROKER_URL: no warning."""
    config = tmp_path / "conf" / "mailworker.toml"
    config.parent.mkdir()
    config.write_text('namespace = "elsewhere"\n')
    cwd, env = tmp_path, {}
    if given == "file":
        cwd = config.parent
    elif given == "config-variable":
        env = {"MAILWORKER_CONFIG": str(config)}
    else:
        env = {"MAILWORKER_BROKER_URL": "redis://127.0.0.1:6390/0"}
    out = _python(DEFAULT_TWICE, cwd, env)
    assert out.stderr == ""


def test_producer_from_url_enqueues_on_that_broker_and_namespace(
    redis_url, redis_client, namespace
):
    """Producer.from_url reads no configuration: the job lands on the given broker."""
    producer = Producer.from_url(redis_url, namespace=namespace)
    job_id = producers.enqueue(_notification(), producer=producer)
    [payload] = redis_client.hvals(f"{namespace}:mail.msgs")
    assert json.loads(payload)["message_id"] == job_id


def test_producer_from_url_refuses_a_bad_namespace():
    """A namespace the workers could not have is a ConfigError naming it."""
    with pytest.raises(ConfigError) as caught:
        Producer.from_url("redis://127.0.0.1:6379/0", namespace="has space")
    assert caught.value.field == "namespace"


def test_wire_recipes_publish_and_claim_what_the_producer_does(redis_client, namespace):
    """The README's wire recipe publishes on the channel, with the message, that the
    Python producer uses; its idempotency claim is the one the Python producer honours."""
    # Given a subscriber on the documented channel
    pubsub = redis_client.pubsub()
    pubsub.subscribe(f"{namespace}:wake")
    try:
        assert wait_for(lambda: pubsub.get_message(timeout=0.1))["type"] in (
            "subscribe",
            b"subscribe",
        )
        # When the Python producer enqueues, then the recipe does
        Producer(redis_client, namespace=namespace).enqueue(_notification())
        by_producer = wait_for(lambda: pubsub.get_message(timeout=0.1))
        wire_enqueue(redis_client, namespace, {"to": ["a@example.org"]}, wake=True)
        by_recipe = wait_for(lambda: pubsub.get_message(timeout=0.1))
    finally:
        pubsub.close()
    # Then both published the same message on the same channel
    assert (by_recipe["channel"], by_recipe["data"]) == (
        by_producer["channel"],
        by_producer["data"],
    )
    assert by_recipe["data"] == b"mail"
    # And a key claimed as documented is taken for the Python producer
    digest = hashlib.sha256(b"wf-7/task-42").hexdigest()
    claim = f"{namespace}:idem:{digest}"
    assert redis_client.set(claim, "job-from-java some-digest", nx=True, ex=60)
    with pytest.raises(JobValidationError) as caught:
        Producer(redis_client, namespace=namespace).enqueue(
            _notification(idempotency_key="wf-7/task-42")
        )
    assert caught.value.field == "idempotency_key"
    assert "job-from-java" in caught.value.reason
