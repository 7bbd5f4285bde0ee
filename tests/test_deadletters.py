"""Dead letters an operator can work with: list, show, requeue and purge, from the shell."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.keys import wake_channel
from common.sockets import free_port
from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.helpers import wire_enqueue

MAILWORKER = str(Path(sys.executable).parent / "mailworker")


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["MAILWORKER_CONFIG"] = str(config)
    return subprocess.run(
        [MAILWORKER, *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def scenario(
    smtp_server, make_settings, run_worker, redis_client, namespace, tmp_path, redis_url
):
    """A worker whose only connection first refuses one recipient and defers another, with a
    config file for the CLI pointing at the same namespace."""
    server = smtp_server()
    server.recorder.rcpt_replies["busy@example.org"] = "451 4.3.0 Mailbox busy"
    retry = {"max_attempts": 1, "min_backoff": "1s", "max_backoff": "2s"}
    section = server.smtp_section(
        password="smtp-pw-never-shown", username="mailer", auth="none"
    )
    section.pop("password")
    section.pop("username")
    settings = make_settings(smtp=[section], retry=retry)
    app = run_worker(settings)
    config = write_toml(
        tmp_path / "cli.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [section],
            "retry": retry,
        },
    )
    return app, server, config


def _dead_job(app, redis_client, namespace):
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(
        Notification(
            to=["ok@example.org", "busy@example.org"],
            subject="Quarterly report",
            text="Attached.",
            attachments=[
                {
                    "filename": "q3.pdf",
                    "content_type": "application/pdf",
                    "content": b"%PDF-1.7 secret numbers",
                }
            ],
        )
    )
    invalid = wire_enqueue(
        redis_client, namespace, {"to": ["nope"], "subject": "s", "text": "t"}
    )
    app.broker.join("mail", timeout=10_000)
    return job_id, invalid


def test_list_show_filter_and_json(scenario, redis_client, namespace):
    """`dead list` shows each dead letter with its reason; filters and --json work."""
    app, _, config = scenario
    job_id, invalid = _dead_job(app, redis_client, namespace)
    out = _cli(config, "dead", "list")
    assert out.returncode == 0, out.stderr
    assert job_id in out.stdout and "retries_exhausted" in out.stdout
    assert invalid in out.stdout and "validation" in out.stdout
    lines = [
        json.loads(line)
        for line in _cli(config, "dead", "list", "--json").stdout.splitlines()
    ]
    assert {line["id"]: line["reason"] for line in lines} == {
        job_id: "retries_exhausted",
        invalid: "validation",
    }
    # One recipient got it: a partial delivery, not a job nobody received
    partial = {line["id"]: line["partial"] for line in lines}
    assert partial == {job_id: True, invalid: False}
    [row] = [line for line in out.stdout.splitlines() if job_id in line]
    assert " 1/2 " in row
    only = _cli(
        config, "dead", "list", "--reason", "validation", "--json"
    ).stdout.splitlines()
    assert [json.loads(line)["id"] for line in only] == [invalid]
    by_service = _cli(
        config, "dead", "list", "--service", "primary", "--json"
    ).stdout.splitlines()
    assert [json.loads(line)["id"] for line in by_service] == [job_id]
    assert (
        _cli(config, "dead", "list", "--since", "1h", "--json").stdout.count("\n") == 2
    )
    assert (
        _cli(config, "dead", "list", "--since", "2999-01-01T00:00:00", "--json").stdout
        == ""
    )


def test_show_elides_attachment_bodies(scenario, redis_client, namespace):
    """`dead show` gives attempts, errors and recipients, and attachments only by name and hash."""
    app, _, config = scenario
    job_id, _ = _dead_job(app, redis_client, namespace)
    out = _cli(config, "dead", "show", job_id, "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["reason"] == "retries_exhausted" and record["attempts"] == 1
    assert {r["address"]: r["state"] for r in record["recipients"]} == {
        "ok@example.org": "accepted",
        "busy@example.org": "deferred",
    }
    [attachment] = record["message"]["job"]["attachments"]
    assert attachment["filename"] == "q3.pdf" and attachment["size"] == 23
    assert len(attachment["sha256"]) == 64
    assert "content" not in attachment and "secret numbers" not in out.stdout
    human = _cli(config, "dead", "show", job_id)
    assert human.returncode == 0 and "retries_exhausted" in human.stdout
    assert _cli(config, "dead", "show", "no-such-id").returncode == 3


def test_requeue_sends_only_to_those_not_yet_accepted(
    scenario, redis_client, namespace
):
    """`dead requeue ID` keeps the job id, and the marker stops a resend to accepted recipients."""
    app, server, config = scenario
    job_id, _ = _dead_job(app, redis_client, namespace)
    assert [m.rcpt_tos for m in server.recorder.messages] == [["ok@example.org"]]
    server.recorder.rcpt_replies.clear()  # the busy mailbox is back
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(wake_channel(namespace))
    out = _cli(config, "dead", "requeue", job_id)
    assert out.returncode == 0, out.stderr
    woken, deadline = [], time.monotonic() + 2
    while time.monotonic() < deadline:
        got = pubsub.get_message(timeout=0.1)
        woken += [got["data"]] if got else []
    pubsub.close()
    assert b"mail" in woken  # idle workers are woken
    app.broker.join("mail", timeout=10_000)
    assert [m.rcpt_tos for m in server.recorder.messages] == [
        ["ok@example.org"],
        ["busy@example.org"],
    ]
    record = app.status.get(job_id)
    assert record["state"] == "sent"
    assert {r["state"] for r in record["recipients"]} == {"accepted"}
    assert "requeued" in [h["event"] for h in record["history"]]
    assert job_id not in _cli(config, "dead", "list").stdout


def test_requeue_refuses_an_invalid_job_and_all_honours_filters(
    scenario, redis_client, namespace
):
    """An invalid dead letter is refused (exit 1); `--all --reason` requeues only its kind."""
    app, server, config = scenario
    job_id, invalid = _dead_job(app, redis_client, namespace)
    refused = _cli(config, "dead", "requeue", invalid)
    assert (
        refused.returncode == 1
        and "invalid" in refused.stderr
        and "to[0]" in refused.stderr
    )
    server.recorder.rcpt_replies.clear()
    out = _cli(config, "dead", "requeue", "--all", "--reason", "retries_exhausted")
    assert out.returncode == 0 and job_id in out.stdout and invalid not in out.stdout
    app.broker.join("mail", timeout=10_000)
    assert app.status.get(job_id)["state"] == "sent"
    assert _cli(config, "dead", "requeue", "no-such-id").returncode in (1, 3)


def test_list_names_the_service_that_refused_every_recipient(
    scenario, redis_client, namespace
):
    """A job dead because the service refused every recipient names that service and
    the code: `dead list --service primary` finds it, and the table has a header row."""
    app, server, config = scenario
    server.recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 No such user"
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(
        Notification(to=["gone@example.org"], subject="Hello", text="Hi")
    )
    app.broker.join("mail", timeout=10_000)
    [line] = [
        json.loads(line)
        for line in _cli(
            config, "dead", "list", "--service", "primary", "--json"
        ).stdout.splitlines()
    ]
    assert (line["id"], line["reason"], line["service"]) == (
        job_id,
        "permanent",
        "primary",
    )
    assert line["error"]["code"] == 550 and "No such user" in line["error"]["message"]
    table = _cli(config, "dead", "list").stdout.splitlines()
    assert table[0].split() == [
        "ID",
        "DEAD",
        "AT",
        "REASON",
        "SERVICE",
        "ACCEPTED",
        "ERROR",
    ]
    assert table[1].split()[:3][0] == job_id and "primary" in table[1]


def test_list_refuses_an_unknown_reason(scenario):
    """`--reason bogus` is a usage error (exit 2) that names the valid reasons."""
    _, _, config = scenario
    out = _cli(config, "dead", "list", "--reason", "bogus")
    assert out.returncode == 2
    assert "bogus" in out.stderr
    assert "retries_exhausted" in out.stderr and "validation" in out.stderr


def test_an_oversized_job_is_kept_without_its_content(
    smtp_server, make_settings, run_worker, redis_client, namespace, tmp_path, redis_url
):
    """A job refused as larger than limits.max_message_bytes keeps, as a dead letter,
    its envelope and fields and each attachment's name, type, size and sha256, but not
    the content, and says so; `dead requeue` refuses it rather than send it truncated."""
    # Given a worker whose messages may be at most 100,000 bytes
    server = smtp_server()
    section = server.smtp_section()
    limits = {"max_message_bytes": 100_000}
    app = run_worker(make_settings(smtp=[section], limits=limits))
    config = write_toml(
        tmp_path / "cli.toml",
        {"broker_url": redis_url, "namespace": namespace, "limits": limits},
    )
    # When a job 4 times larger is enqueued in the wire format (no producer check)
    content = bytes(range(256)) * 1600  # 400 KiB
    job = {
        "to": ["ann@example.org"],
        "subject": "Too large",
        "text": "See the attachment.",
        "attachments": [
            {
                "filename": "big.bin",
                "content_type": "application/octet-stream",
                "content": base64.b64encode(content).decode(),
            }
        ],
    }
    job_id = wire_enqueue(redis_client, namespace, job)
    app.broker.join("mail", timeout=10_000)
    # Then it is dead, and its dead letter is small
    assert app.status.get(job_id)["reason"] == "validation"
    assert redis_client.strlen(f"{namespace}:dead:{job_id}") < 5_000
    shown = json.loads(_cli(config, "dead", "show", job_id, "--json").stdout)
    message = shown["message"]
    assert "max_message_bytes (100000)" in message["content_dropped"]
    assert message["job"]["subject"] == "Too large"
    [attachment] = message["job"]["attachments"]
    assert attachment == {
        "filename": "big.bin",
        "content_type": "application/octet-stream",
        "content": "dropped",
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    # And requeue refuses it with the reason, leaving it dead
    out = _cli(config, "dead", "requeue", job_id)
    assert out.returncode == 1
    assert "without its content" in out.stderr and "anew" in out.stderr
    assert app.status.get(job_id)["state"] == "dead"
    assert server.recorder.messages == []


def test_purge_one_and_all_with_confirmation(scenario, redis_client, namespace):
    """`dead purge ID` removes one; `--all` needs `--yes`."""
    app, _, config = scenario
    job_id, _ = _dead_job(app, redis_client, namespace)
    assert _cli(config, "dead", "purge", job_id).returncode == 0
    assert job_id not in _cli(config, "dead", "list").stdout
    assert _cli(config, "dead", "purge", "--all").returncode == 2
    out = _cli(config, "dead", "purge", "--all", "--yes")
    assert out.returncode == 0 and "purged 1" in out.stdout
    assert _cli(config, "dead", "list", "--json").stdout == ""
    assert _cli(config, "dead", "purge", job_id).returncode == 3


def test_dead_letters_expire_with_status_ttl_by_our_own_sweep(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Dead letters are dropped after status.ttl by our sweep, not Dramatiq's maintenance."""
    from worker.deadletter import DeadLetters, Filters

    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()], status={"ttl": "1s"}))
    wire_enqueue(redis_client, namespace, {"to": ["bad"], "subject": "s", "text": "t"})
    app.broker.join("mail", timeout=10_000)
    letters = DeadLetters(redis_client, namespace=namespace, ttl=1)
    assert len(letters.entries(Filters())) == 1
    time.sleep(1.5)
    assert letters.entries(Filters()) == []
    assert redis_client.zcard(f"{namespace}:dead") == 0


def test_dead_commands_report_an_unreachable_broker(tmp_path):
    """`dead list` exits 4 when the broker does not answer."""
    config = write_toml(
        tmp_path / "c.toml", {"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    out = _cli(config, "dead", "list")
    assert out.returncode == 4 and "unreachable" in out.stderr
