"""The SMTP/LMTP receiver (Mail Forwarding) and bounces, driven by smtplib and raw sockets."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from common.keys import events_key, history_key
from common.sockets import free_port
from producers import Notification, Producer
from settings import Settings
from tests.support.config import write_toml
from tests.support.env import HOST, REDIS_URL
from tests.support.helpers import wait_for
from tests.support.mail import dsn, reply
from worker.inbound.receiver import SmtpReceiver
from worker.inbound.runner import build_inbound
from worker.inbound.suppression import SuppressionList

MAILWORKER = Path(sys.executable).parent / "mailworker"
REPLY_TO = "actions@workflow.example.com"


def _source(port: int, **overrides: Any) -> dict[str, Any]:
    section = {
        "name": "forwarded",
        "kind": "smtp",
        "listen": f"{HOST}:{port}",
        "accept": [REPLY_TO, "bounces@example.com"],
        "max_message_bytes": 65_536,
    }
    section.update(overrides)
    return section


@pytest.fixture
def receiver(
    make_settings: Callable[..., Settings], smtp_server: Callable[..., Any]
) -> Iterator[Callable[..., tuple[Settings, int]]]:
    """Start the real receiver (in-process) on a free port with the test's settings."""
    started: list[SmtpReceiver] = []

    def start(client: redis.Redis | None = None, **data: Any) -> tuple[Settings, int]:
        port = free_port()
        inbound = data.pop("inbound", {})
        data.setdefault("smtp", [smtp_server().smtp_section()])
        settings = make_settings(inbound=[_source(port, **inbound)], **data)
        handler = build_inbound(settings, client or redis.Redis.from_url(REDIS_URL))
        rx = SmtpReceiver(settings.inbound[0], sink=handler)
        rx.start()
        started.append(rx)
        return settings, port

    yield start
    for rx in started:
        rx.stop()


def _send_job(run_worker, settings, redis_client, namespace, to):
    """Deliver one job through the worker; its id, once it is recorded ``sent``."""
    app = run_worker(settings)
    job_id = Producer(redis_client, namespace=namespace).enqueue(
        Notification(to=to, subject="Task assigned", text="You have a new task.")
    )
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "sent")
    return app, job_id


def _deliver(port: int, raw: bytes, *, to: str = REPLY_TO, sender: str = "") -> Any:
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        return client.sendmail(sender, [to], raw)


def test_a_dsn_marks_the_recipient_bounced_suppresses_it_and_emits_an_event(
    receiver, run_worker, redis_client, namespace
):
    """The whole bounce path: 250 only after the record; the recipient is ``bounced``
    with the DSN's code and diagnostic, the job's history says so, a
    ``delivery.bounced`` event names the address, and the address is suppressed."""
    settings, port = receiver()
    app, job_id = _send_job(
        run_worker,
        settings,
        redis_client,
        namespace,
        ["gone@example.org", "ann@example.org"],
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="gone@example.org",
    )
    assert _deliver(port, message) == {}  # 250 for every recipient
    record = app.status.get(job_id)
    assert record is not None and record["state"] == "sent"
    by_address = {r["address"]: r for r in record["recipients"]}
    gone = by_address["gone@example.org"]
    assert (gone["state"], gone["code"]) == ("bounced", "5.1.1")
    assert "User unknown" in gone["message"]
    assert by_address["ann@example.org"]["state"] == "accepted"
    assert record["history"][-1]["event"] == "bounced"
    assert record["history"][-1]["address"] == "gone@example.org"
    events = [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in redis_client.xrange(events_key(namespace))
    ]
    bounced = [e for e in events if e["type"] == "delivery.bounced"]
    assert len(bounced) == 1 and bounced[0]["job_id"] == job_id
    data = orjson.loads(bounced[0]["data"])
    assert (data["address"], data["code"]) == ("gone@example.org", "5.1.1")
    entry = SuppressionList(redis_client, namespace=namespace).check(
        ["GONE@example.org"]
    )
    assert entry["GONE@example.org"]["job_id"] == job_id


def test_the_same_bounce_twice_is_handled_once(
    receiver, run_worker, redis_client, namespace
):
    """A sender that retries (or forwards twice) gets 250 again; nothing is done twice."""
    settings, port = receiver()
    _, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["gone@example.org"]
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="gone@example.org",
    )
    _deliver(port, message)
    _deliver(port, message)
    history = [
        orjson.loads(h)
        for h in redis_client.lrange(history_key(namespace, job_id), 0, -1)
    ]
    assert [h["event"] for h in history].count("bounced") == 1
    events = redis_client.xrange(events_key(namespace))
    assert [f[b"type"] for _, f in events].count(b"delivery.bounced") == 1


def test_a_delayed_dsn_only_adds_a_history_entry(
    receiver, run_worker, redis_client, namespace
):
    """``Action: delayed`` is a warning: the recipient stays accepted, nothing suppressed."""
    settings, port = receiver()
    app, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["slow@example.org"]
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="slow@example.org",
        action="delayed",
        status="4.4.7",
        diagnostic="smtp; 451 4.4.7 delivery time expired",
    )
    _deliver(port, message)
    record = app.status.get(job_id)
    assert record is not None
    assert record["recipients"][0]["state"] == "accepted"
    assert record["history"][-1]["event"] == "delayed"
    assert record["history"][-1]["code"] == "4.4.7"
    assert SuppressionList(redis_client, namespace=namespace).size() == 0


def test_a_temporary_failure_bounces_but_does_not_suppress(
    receiver, run_worker, redis_client, namespace
):
    """Only 5.x.x failures suppress: a 4.4.7 failure (expired in a queue) does not."""
    settings, port = receiver()
    app, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["q@example.org"]
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="q@example.org",
        status="4.4.7",
        diagnostic="smtp; 451 4.4.7 message expired in queue",
    )
    _deliver(port, message)
    record = app.status.get(job_id)
    assert record is not None and record["recipients"][0]["state"] == "bounced"
    assert SuppressionList(redis_client, namespace=namespace).size() == 0


def test_recipients_are_only_the_configured_addresses_and_their_tags(receiver):
    """RCPT for a stranger is refused at once; a tagged accepted address is taken."""
    _, port = receiver()
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.ehlo()
        client.mail("someone@example.org")
        assert client.rcpt("stranger@workflow.example.com")[0] == 550
        assert client.rcpt("actions+task42@Workflow.Example.com")[0] == 250
        client.rset()


def test_a_bounce_for_an_unknown_job_is_refused_with_the_reason(
    receiver, redis_client, namespace
):
    """A DSN naming a job we do not have (or no longer have) gets a 5xx naming that."""
    _, port = receiver()
    message = dsn(
        to=REPLY_TO,
        original_message_id="<no-such-job@example.com>",
        recipient="x@example.org",
    )
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _deliver(port, message)
    assert refused.value.smtp_code == 554
    assert b"no-such-job is unknown or expired" in refused.value.smtp_error


def test_a_human_reply_is_refused_until_actions_exist_and_the_process_lives_on(
    receiver,
):
    """A plain reply is neither a bounce nor an auto-reply: 554 with the reason."""
    _, port = receiver()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _deliver(
            port,
            reply(to=REPLY_TO, in_reply_to="<j1@example.com>"),
            sender="bob@example.org",
        )
    assert b"not a bounce" in refused.value.smtp_error
    # Garbage is refused the same way, and the receiver keeps answering.
    with pytest.raises(smtplib.SMTPDataError):
        _deliver(port, b"\x00\xff garbage without headers\r\n", sender="x@example.org")
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_an_oversized_message_is_refused_at_data_without_being_kept(receiver):
    """Over ``max_message_bytes``: 552 at MAIL when SIZE says so, else after DATA; the
    receiver still answers afterwards."""
    _, port = receiver()
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100  # about 100 KB
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("size") and int(client.esmtp_features["size"]) == 65_536
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("x@example.org", [REPLY_TO], big)
        assert refused.value.smtp_code == 552
    # Without SIZE= (a raw client): the body is read and discarded, then 552.
    with socket.create_connection((HOST, port), timeout=10) as raw:
        stream = raw.makefile("rwb")
        stream.readline()
        for command in (
            b"HELO t",
            b"MAIL FROM:<x@example.org>",
            f"RCPT TO:<{REPLY_TO}>".encode(),
            b"DATA",
        ):
            stream.write(command + b"\r\n")
            stream.flush()
            while True:
                line = stream.readline()
                if line[3:4] != b"-":
                    break
        stream.write(big + b".\r\n")
        stream.flush()
        assert stream.readline().startswith(b"552")
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_redis_away_answers_451_so_the_sender_retries(receiver):
    """No record, no 250: the sending server keeps the message and tries again."""
    dead = redis.Redis(host=HOST, port=free_port(), socket_connect_timeout=1)
    _, port = receiver(client=dead)
    message = dsn(
        to=REPLY_TO, original_message_id="<j@example.com>", recipient="x@example.org"
    )
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        _deliver(port, message)
    assert deferred.value.smtp_code == 451


def test_starttls_is_offered_with_a_certificate(
    receiver, ca, tmp_path, run_worker, redis_client, namespace
):
    """With tls_certificate_file and tls_key_file, STARTTLS is advertised and works."""
    cert = ca.issue_cert(HOST)
    cert_file, key_file = tmp_path / "rx.pem", tmp_path / "rx.key"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    settings, port = receiver(
        inbound={"tls_certificate_file": str(cert_file), "tls_key_file": str(key_file)}
    )
    _, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["tls@example.org"]
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.sendmail(
            "",
            [REPLY_TO],
            dsn(
                to=REPLY_TO,
                original_message_id=f"<{job_id}@example.com>",
                recipient="tls@example.org",
            ),
        )


def test_lmtp_answers_once_per_recipient(receiver, run_worker, redis_client, namespace):
    """LMTP (RFC 2033): after DATA, one reply for each accepted recipient."""
    settings, port = receiver(inbound={"protocol": "lmtp"})
    _, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["l@example.org"]
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="l@example.org",
    )
    with socket.create_connection((HOST, port), timeout=10) as raw:
        stream = raw.makefile("rwb")
        stream.readline()

        def command(line: bytes) -> list[bytes]:
            stream.write(line + b"\r\n")
            stream.flush()
            lines = [stream.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(stream.readline())
            return lines

        assert command(b"LHLO test")[-1].startswith(b"250")
        command(b"MAIL FROM:<>")
        assert command(f"RCPT TO:<{REPLY_TO}>".encode())[0].startswith(b"250")
        assert command(b"RCPT TO:<actions+x@workflow.example.com>")[0].startswith(
            b"250"
        )
        assert command(b"DATA")[0].startswith(b"354")
        stream.write(message + b".\r\n")
        stream.flush()
        replies = [stream.readline(), stream.readline()]
        assert all(r.startswith(b"250") for r in replies), replies


def test_with_a_signed_return_path_a_forged_bounce_bounces_nobody(
    receiver, run_worker, redis_client, namespace, tmp_path
):
    """A DSN to ``bounces+<wrong signature>=<job>`` or one quoting our Message-ID but
    sent to another address is ``other``: the job's recipient stays accepted."""
    key = tmp_path / "bounce.key"
    key.write_text("bounce-signing-key")
    settings, port = receiver(
        bounces={"return_path": "bounces@example.com", "secret_file": str(key)}
    )
    app, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["v@example.org"]
    )
    original = f"<{job_id}@example.com>"
    forged_to = f"bounces+aaaaaaaaaaaaaaaa={job_id}@example.com"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _deliver(
            port,
            dsn(to=forged_to, original_message_id=original, recipient="v@example.org"),
            to=forged_to,
        )
    assert b"does not verify" in refused.value.smtp_error
    with pytest.raises(smtplib.SMTPDataError) as unsigned:
        _deliver(
            port,
            dsn(to=REPLY_TO, original_message_id=original, recipient="v@example.org"),
        )
    assert b"unsigned bounce" in unsigned.value.smtp_error
    record = app.status.get(job_id)
    assert record is not None and record["recipients"][0]["state"] == "accepted"
    # The genuine return path, taken from what the SMTP server saw as MAIL FROM, works.
    from worker.inbound.returnpath import ReturnPath

    signer = ReturnPath.from_settings(settings.bounces)
    assert signer is not None
    genuine = signer.address(job_id)
    _deliver(
        port,
        dsn(to=genuine, original_message_id="<other@x>", recipient="v@example.org"),
        to=genuine,
    )
    record = app.status.get(job_id)
    assert record is not None and record["recipients"][0]["state"] == "bounced"


def test_mailworker_inbound_runs_the_receiver_lists_what_came_and_stops_on_sigterm(
    tmp_path, namespace, redis_client
):
    """The command: ``inbound`` serves; ``inbound list --json`` shows the refused reply
    with its fields; SIGTERM stops it with exit 0."""
    port = free_port()
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "namespace": namespace,
            "broker_url": REDIS_URL,
            "smtp": [
                {
                    "name": "out",
                    "from_address": "n@example.com",
                    "server": HOST,
                    "port": 2,
                    "security": "none",
                }
            ],
            "inbound": [_source(port)],
        },
    )
    env = {"PATH": "/usr/bin:/bin", "MAILWORKER_CONFIG": str(config)}
    proc = subprocess.Popen(
        [str(MAILWORKER), "inbound"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def answers() -> bool:
            try:
                with smtplib.SMTP(HOST, port, timeout=2) as client:
                    return client.noop()[0] == 250
            except OSError:
                return False

        wait_for(answers, timeout=20)
        with pytest.raises(smtplib.SMTPDataError):
            _deliver(
                port,
                reply(to=REPLY_TO, in_reply_to="<j@example.com>"),
                sender="bob@example.org",
            )
        listed = subprocess.run(
            [str(MAILWORKER), "inbound", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        [row] = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert row["source"] == "forwarded" and row["kind"] == "other"
        assert row["outcome"] == "failed" and "not a bounce" in row["reason"]
        assert set(row) == {
            "received_at",
            "source",
            "message_id",
            "kind",
            "outcome",
            "reason",
            "job_id",
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output.decode(errors="replace")


def test_inbound_inspect_prints_what_a_file_would_do_without_doing_it(
    tmp_path, namespace, make_settings, run_worker, smtp_server, redis_client
):
    """``inbound inspect FILE.eml`` names the job and the bounce, and writes nothing."""
    server = smtp_server()
    settings = make_settings(smtp=[server.smtp_section()])
    _, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["gone@example.org"]
    )
    eml = tmp_path / "bounce.eml"
    eml.write_bytes(
        dsn(
            to=REPLY_TO,
            original_message_id=f"<{job_id}@example.com>",
            recipient="gone@example.org",
        )
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "MAILWORKER_CONFIG": str(tmp_path / "mailworker.toml"),
    }
    shown = subprocess.run(
        [str(MAILWORKER), "inbound", "inspect", str(eml), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result = orjson.loads(shown.stdout)
    assert (result["kind"], result["outcome"], result["job_id"]) == (
        "bounce",
        "bounced",
        job_id,
    )
    assert result["suppress"] == ["gone@example.org"]
    assert SuppressionList(redis_client, namespace=namespace).size() == 0
    history = [
        orjson.loads(h)
        for h in redis_client.lrange(history_key(namespace, job_id), 0, -1)
    ]
    assert "bounced" not in [h["event"] for h in history]


def test_a_bounce_naming_no_recipient_of_its_job_is_refused(
    receiver, run_worker, redis_client, namespace
):
    """A DSN that ties to a real job but reports an address the job never had changes
    nothing: 554, the job's recipients as they were, nothing suppressed."""
    settings, port = receiver()
    app, job_id = _send_job(
        run_worker, settings, redis_client, namespace, ["a@example.org"]
    )
    message = dsn(
        to=REPLY_TO,
        original_message_id=f"<{job_id}@example.com>",
        recipient="victim@example.org",
    )
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _deliver(port, message)
    assert b"names no recipient of job" in refused.value.smtp_error
    record = app.status.get(job_id)
    assert record is not None and record["recipients"][0]["state"] == "accepted"
    assert SuppressionList(redis_client, namespace=namespace).size() == 0


@pytest.mark.slow
def test_mailworker_dev_shows_a_bounce_end_to_end(tmp_path):
    """In ``mailworker dev`` a recipient at unknown.mailworker.test bounces: the status,
    ``suppress list``, ``inbound list`` and ``events tail`` all show it."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    dev = subprocess.Popen(
        [str(MAILWORKER), "dev"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert dev.stdout is not None
        export = dev.stdout.readline().decode().strip()
        url = export.partition("=")[2]
        env = {**env, "MAILWORKER_BROKER_URL": url}

        def run(*args: str) -> str:
            return subprocess.run(
                [str(MAILWORKER), *args],
                cwd=tmp_path,
                env=env,
                check=True,
                timeout=30,
                capture_output=True,
                text=True,
            ).stdout

        job_id = run(
            "send",
            "--to",
            "gone@unknown.mailworker.test",
            "--subject",
            "Hi",
            "--text",
            "x",
        ).strip()

        def bounced() -> Any:
            record = orjson.loads(run("status", job_id, "--json"))
            state = record["recipients"][0]["state"] if record["recipients"] else ""
            return record if state == "bounced" else None

        record = wait_for(bounced, timeout=30)
        assert record["state"] == "sent"
        assert record["recipients"][0]["code"] == "5.1.1"
        [entry] = [
            orjson.loads(line)
            for line in run("suppress", "list", "--json").splitlines()
        ]
        assert entry["address"] == "gone@unknown.mailworker.test"
        assert entry["job_id"] == job_id
        [row] = [
            orjson.loads(line) for line in run("inbound", "list", "--json").splitlines()
        ]
        assert (row["kind"], row["outcome"], row["job_id"]) == (
            "bounce",
            "bounced",
            job_id,
        )
        types = [
            orjson.loads(line)["type"]
            for line in run("events", "tail", "--json").splitlines()
        ]
        assert types == ["delivery.sent", "delivery.bounced"]
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=30)
        finally:
            if dev.stdout is not None:
                dev.stdout.close()
    assert dev.returncode == 0
