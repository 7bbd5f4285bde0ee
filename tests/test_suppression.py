"""The suppression list and the signed return path, through a real worker and SMTP server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from producers import Notification, Producer
from settings import load_settings
from tests.support.config import write_toml
from tests.support.env import REDIS_URL
from tests.support.helpers import wait_for
from worker.inbound.returnpath import ReturnPath
from worker.inbound.suppression import SuppressionList

MAILWORKER = Path(sys.executable).parent / "mailworker"


def _job(**fields) -> Notification:
    fields.setdefault("to", ["ann@example.org"])
    fields.setdefault("subject", "Task assigned")
    fields.setdefault("text", "You have a new task.")
    return Notification(**fields)


def test_a_suppressed_recipient_is_left_out_and_the_rest_get_the_message(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """The server sees only the recipient that is not suppressed; the record says why."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    SuppressionList(redis_client, namespace=namespace).add(
        "Gone@Example.org", reason="bounced 5.1.1", job_id="old-job"
    )
    job_id = Producer(redis_client, namespace=namespace).enqueue(
        _job(to=["ann@example.org", "gone@example.org"])
    )
    record = wait_for(
        lambda: (r := app.status.get(job_id)) and r["state"] == "sent" and r
    )
    [message] = server.recorder.messages
    assert message.rcpt_tos == ["ann@example.org"]
    states = {r["address"]: r["state"] for r in record["recipients"]}
    assert states == {"ann@example.org": "accepted", "gone@example.org": "suppressed"}
    [gone] = [r for r in record["recipients"] if r["state"] == "suppressed"]
    assert "bounced 5.1.1" in gone["message"]
    assert record["counts"] == {"accepted": 1, "refused": 1, "deferred": 0}
    assert record["partial"] is True


def test_a_job_whose_every_recipient_is_suppressed_is_dead_with_reason_suppressed(
    smtp_server, make_settings, run_worker, redis_client, namespace
):
    """Nothing is sent; the job is a dead letter with reason ``suppressed``."""
    server = smtp_server()
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    suppressed = SuppressionList(redis_client, namespace=namespace)
    suppressed.add("gone@example.org", reason="bounced 5.1.1")
    job_id = Producer(redis_client, namespace=namespace).enqueue(
        _job(to=["gone@example.org"])
    )
    record = wait_for(
        lambda: (r := app.status.get(job_id)) and r["state"] == "dead" and r
    )
    assert record["reason"] == "suppressed"
    assert record["recipients"][0]["state"] == "suppressed"
    assert server.recorder.messages == []
    # Off the list, the same address gets the next job.
    assert suppressed.remove("GONE@example.org")
    again = Producer(redis_client, namespace=namespace).enqueue(
        _job(to=["gone@example.org"])
    )
    wait_for(lambda: (app.status.get(again) or {}).get("state") == "sent")


def test_smtp_sends_carry_a_signed_per_job_return_path(
    smtp_server, make_settings, run_worker, redis_client, namespace, tmp_path
):
    """MAIL FROM is ``bounces+<signature>=<job id>@domain``; it verifies for that job
    only, and the From header stays the connection's address."""
    secret = tmp_path / "bounce.key"
    secret.write_text("a-long-random-bounce-secret\n")
    server = smtp_server()
    settings = make_settings(
        smtp=[server.smtp_section()],
        bounces={"return_path": "bounces@example.com", "secret_file": str(secret)},
    )
    app = run_worker(settings)
    job_id = Producer(redis_client, namespace=namespace).enqueue(_job())
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    [message] = server.recorder.messages
    signer = ReturnPath.from_settings(settings.bounces)
    assert signer is not None
    token = signer.token_of(message.mail_from)
    assert token is not None and token.job_id == job_id
    assert message.mail_from.startswith("bounces+") and message.mail_from.endswith(
        "@example.com"
    )
    assert signer.verifies(token, job_id)
    assert not signer.verifies(token, "another-job")
    assert b"From: Example Notifications <noreply@example.com>" in message.data
    assert "a-long-random" not in message.mail_from


def test_a_long_job_id_keeps_the_local_part_within_64_octets():
    """A job id too long to carry is left out; the signature alone still verifies."""
    signer = ReturnPath("bounces@example.com", b"k")
    long_id = "j" * 100
    address = signer.address(long_id)
    local = address.partition("@")[0]
    assert len(local) <= 64
    token = signer.token_of(address)
    assert token is not None and token.job_id is None
    assert signer.verifies(token, long_id)
    assert not signer.verifies(token, "j" * 99)
    assert signer.token_of("someone+x@example.com") is None
    assert signer.token_of("bounces+x@elsewhere.example") is None


def _cli(
    tmp_path: Path, namespace: str, *args: str
) -> subprocess.CompletedProcess[str]:
    config = write_toml(
        tmp_path / "mailworker.toml", {"namespace": namespace, "broker_url": REDIS_URL}
    )
    load_settings(config, environ={})
    return subprocess.run(
        [str(MAILWORKER), "suppress", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MAILWORKER_CONFIG": str(config)},
        check=False,
    )


def test_suppress_add_list_remove(tmp_path, namespace):
    """The operator's commands: add, list (text and JSON), remove, and their errors."""
    added = _cli(tmp_path, namespace, "add", "Bob@Example.org", "--reason", "asked")
    assert added.returncode == 0, added.stderr
    again = _cli(tmp_path, namespace, "add", "bob@example.org")
    assert "already" in again.stdout
    listed = _cli(tmp_path, namespace, "list", "--json")
    [entry] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert entry["address"] == "Bob@Example.org"
    assert entry["reason"] == "asked" and entry["job_id"] is None and entry["at"]
    bad = _cli(tmp_path, namespace, "add", "not an address")
    assert bad.returncode == 2 and "ADDR" in bad.stderr
    assert _cli(tmp_path, namespace, "remove", "bob@example.org").returncode == 0
    missing = _cli(tmp_path, namespace, "remove", "bob@example.org")
    assert missing.returncode == 3
    assert "no address is suppressed" in _cli(tmp_path, namespace, "list").stderr
