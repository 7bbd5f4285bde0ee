"""Outcome events on ``{namespace}:events``: written with their record, read by groups."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from common.keys import events_key
from producers import Notification, Producer
from settings import ConfigError, load_settings
from tests.support.config import write_toml
from tests.support.env import REDIS_URL
from tests.support.helpers import wait_for, wire_enqueue
from worker.status import StatusStore

MAILWORKER = Path(sys.executable).parent / "mailworker"


def _events(redis_client, namespace):
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in redis_client.xrange(events_key(namespace))
    ]


def _notification(**fields) -> Notification:
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Task assigned")
    fields.setdefault("text", "You have a new task.")
    return Notification(**fields)


def test_a_sent_job_writes_one_delivery_sent_event_with_its_record(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A delivered job leaves exactly one ``delivery.sent`` event, naming the job, the
    service, its recipients and the producer's metadata."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    app = run_worker(settings)
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(_notification(metadata={"task": "t-9"}))
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    [event] = _events(redis_client, namespace)
    assert event["type"] == "delivery.sent"
    assert event["job_id"] == job_id
    assert len(event["id"]) == 32 and event["at"]
    data = orjson.loads(event["data"])
    assert data["service"] == "primary"
    assert data["metadata"] == {"task": "t-9"}
    assert [r["address"] for r in data["recipients"]] == ["ann@example.org"]
    assert data["counts"]["accepted"] == 1


def test_a_dead_job_writes_a_delivery_dead_event_with_its_reason(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """An invalid job ends as a dead letter and a ``delivery.dead`` event with its reason."""
    settings = make_settings(smtp=[smtp_server().smtp_section()])
    app = run_worker(settings)
    job_id = wire_enqueue(redis_client, namespace, {"to": ["not an address"]})
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "dead")
    [event] = _events(redis_client, namespace)
    assert (event["type"], event["job_id"]) == ("delivery.dead", job_id)
    data = orjson.loads(event["data"])
    assert data["reason"] == "validation"
    assert data["error"]["type"] == "validation"


def test_each_job_of_a_bulk_message_has_its_own_event(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """A bulk message of three jobs leaves three ``delivery.sent`` events, one a job."""
    settings = make_settings(smtp=[smtp_server().smtp_section()])
    app = run_worker(settings)
    producer = Producer(redis_client, namespace=namespace)
    ids = producer.enqueue_many([_notification(subject=f"s{i}") for i in range(3)])
    wait_for(lambda: all(app.status.get(i)["state"] == "sent" for i in ids))
    events = _events(redis_client, namespace)
    assert sorted(e["job_id"] for e in events) == sorted(ids)
    assert {e["type"] for e in events} == {"delivery.sent"}


def test_an_outcome_that_is_not_written_has_no_event(redis_client, namespace):
    """A dead write for a job already sent changes nothing, and adds no event either."""
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    job_id = str(uuid.uuid4())
    status.write(
        job_id,
        {"id": job_id, "state": "sent", "attempts": 1},
        outcome=("delivery.sent", {"service": "a"}),
    )
    status.write(
        job_id,
        {"state": "dead"},
        dead_payload=b"{}",
        outcome=("delivery.dead", {"reason": "unhandled"}),
    )
    assert [e["type"] for e in _events(redis_client, namespace)] == ["delivery.sent"]
    assert status.get(job_id)["state"] == "sent"


def test_events_types_narrows_what_goes_on_the_stream(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """With ``[events] types = ["delivery.dead"]`` a sent job writes no event."""
    settings = make_settings(
        smtp=[smtp_server().smtp_section()], events={"types": ["delivery.dead"]}
    )
    app = run_worker(settings)
    sent = Producer(redis_client, namespace=namespace).enqueue(_notification())
    dead = wire_enqueue(redis_client, namespace, {"to": []})
    wait_for(lambda: (app.status.get(dead) or {}).get("state") == "dead")
    wait_for(lambda: (app.status.get(sent) or {}).get("state") == "sent")
    assert [e["job_id"] for e in _events(redis_client, namespace)] == [dead]


def test_read_events_gives_each_event_to_a_group_once_until_acknowledged(
    redis_client, namespace
):
    """A consumer group reads every event once; unacknowledged ones stay pending for
    their consumer, and ``ack_events`` clears them."""
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    for n in range(3):
        status.write(
            f"job-{n}",
            {"id": f"job-{n}", "state": "sent"},
            outcome=("delivery.sent", {"n": n}),
        )
    producer = Producer(redis_client, namespace=namespace)
    first = producer.read_events("engine", "c1", count=2)
    assert [e["job_id"] for e in first] == ["job-0", "job-1"]
    assert first[0]["data"] == {"n": 0} and first[0]["type"] == "delivery.sent"
    rest = producer.read_events("engine", "c1")
    assert [e["job_id"] for e in rest] == ["job-2"]
    assert producer.read_events("engine", "c1") == []
    # Another group reads the whole stream on its own.
    assert len(producer.read_events("audit", "a1")) == 3
    pending = producer.read_events("engine", "c1", pending=True)
    assert [e["job_id"] for e in pending] == ["job-0", "job-1", "job-2"]
    assert producer.ack_events("engine", [e["stream_id"] for e in pending]) == 3
    assert producer.read_events("engine", "c1", pending=True) == []


def _cli_env(tmp_path, namespace):
    config = write_toml(
        tmp_path / "mailworker.toml", {"broker_url": REDIS_URL, "namespace": namespace}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["MAILWORKER_CONFIG"] = str(config)
    return env


def test_events_tail_prints_the_last_events_and_follows_new_ones(
    redis_client, namespace, tmp_path
):
    """``events tail --json`` prints the stream's last events; ``--follow`` then prints
    an event written after it started."""
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    status.write("job-a", {"state": "sent"}, outcome=("delivery.sent", {"n": 1}))
    status.write("job-b", {"state": "dead"}, outcome=("delivery.dead", {"n": 2}))
    env = _cli_env(tmp_path, namespace)
    done = subprocess.run(
        [str(MAILWORKER), "events", "tail", "--json", "--type", "delivery.dead"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [line] = done.stdout.splitlines()
    assert orjson.loads(line)["job_id"] == "job-b"
    with subprocess.Popen(
        [str(MAILWORKER), "events", "tail", "--json", "--follow", "--count", "1"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as follow:
        try:
            assert follow.stdout is not None
            assert orjson.loads(follow.stdout.readline())["job_id"] == "job-b"
            status.write("job-c", {"state": "sent"}, outcome=("delivery.sent", {}))
            assert orjson.loads(follow.stdout.readline())["job_id"] == "job-c"
        finally:
            follow.terminate()
            follow.wait(timeout=10)


def test_a_bad_events_section_names_each_key_at_fault(tmp_path):
    """An unknown event type, a too short stream and an unknown key are each named."""
    path = write_toml(
        tmp_path / "bad.toml",
        {"events": {"types": ["delivery.snt"], "max_len": 5, "extra": 1}},
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    fields = {field for field, _ in caught.value.problems}
    assert fields == {"events.types[0]", "events.max_len", "events.extra"}
