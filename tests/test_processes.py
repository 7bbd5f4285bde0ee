"""The commands as operators run them: `mailworker worker` and `mailworker dev` as processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from email import message_from_bytes, policy
from importlib.metadata import version
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import redis

from common.sockets import free_port
from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import WorkerProcess

MAILWORKER = str(Path(sys.executable).parent / "mailworker")
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update(extra)
    return env


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _worker(
    tmp_path: Path, config: Path, *args: str
) -> tuple[subprocess.Popen[bytes], dict[str, str], BinaryIO]:
    """`mailworker worker ARGS` on ``config``, its log in tmp_path/worker.log."""
    env = _env(MAILWORKER_CONFIG=str(config))
    stderr = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [MAILWORKER, "worker", *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr
    )
    return process, env, stderr


def _config(tmp_path: Path, redis_url: str, namespace: str, server: Any) -> Path:
    return write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section()],
        },
    )


@pytest.mark.slow
def test_worker_process_delivers_logs_json_and_stops_on_sigterm(
    smtp_server, redis_url, namespace, tmp_path
):
    """`mailworker worker` delivers a `mailworker send` job, logs JSON, exits 0 on SIGTERM."""
    # Given a config for a real SMTP server and a worker process
    started = datetime.now(UTC)
    server = smtp_server("plain", auth=True)
    config = _config(tmp_path, redis_url, namespace, server)
    worker, env, stderr = _worker(tmp_path, config, "-p", "1", "-t", "2")
    try:
        # When a notification is sent from the shell
        sent = subprocess.run(
            [
                MAILWORKER,
                "send",
                "--to",
                "ops@example.org",
                "--subject",
                "Escalation",
                "--text",
                "Task 7 is overdue.",
                "--metadata",
                "workflow=wf-9",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        job_id = sent.stdout.strip().splitlines()[-1]
        # Then the server receives it and the status says sent
        wait_for(lambda: server.recorder.messages, timeout=30)
        assert server.recorder.messages[0].rcpt_tos == ["ops@example.org"]

        def record():
            out = subprocess.run(
                [MAILWORKER, "status", job_id, "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            return json.loads(out.stdout) if out.returncode == 0 else None

        assert (
            wait_for(lambda: (r := record()) and r["state"] == "sent" and r)["service"]
            == "primary"
        )
    finally:
        code = _stop(worker)
        stderr.close()
    assert code == 0
    lines = [
        json.loads(line)
        for line in (tmp_path / "worker.log").read_text().splitlines()
        if line.startswith("{")
    ]
    succeeded = [e for e in lines if e.get("event") == "delivery_succeeded"]
    assert succeeded and succeeded[0]["job_id"] == job_id
    assert succeeded[0]["metadata"] == {"workflow": "wf-9"}
    assert succeeded[0]["level"] == "info"
    # every line is stamped: ISO 8601 UTC with microseconds, during this test
    for entry in lines:
        assert re.fullmatch(TIMESTAMP, entry["timestamp"]), entry
        stamp = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
        assert started <= stamp <= datetime.now(UTC)
    assert "s3cret-smtp-pw" not in (tmp_path / "worker.log").read_text()


@pytest.mark.slow
def test_bulk_jobs_log_one_whole_json_line_each(
    smtp_server, redis_url, namespace, tmp_path
):
    """A bulk send through two worker processes: every job has its own
    `delivery_succeeded` line, and every line of the log is whole JSON (a bulk
    message's lines are written together, in pieces cut between lines)."""
    server = smtp_server("plain")
    config = _config(tmp_path, redis_url, namespace, server)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps(
                {"to": [f"user{i}@example.org"], "subject": f"N{i}", "text": "x" * 300}
            )
            + "\n"
            for i in range(90)
        )
    )
    worker, env, stderr = _worker(tmp_path, config, "-p", "2", "-t", "2")
    try:
        subprocess.run(
            [MAILWORKER, "send", "--bulk", str(jobs)],
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        wait_for(lambda: len(server.recorder.messages) >= 90, timeout=60)
    finally:
        code = _stop(worker)
        stderr.close()
    assert code == 0
    ids = set((tmp_path / "jobs.jsonl.ids").read_text().split())
    text = (tmp_path / "worker.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line whole JSON
    succeeded = [e["job_id"] for e in lines if e.get("event") == "delivery_succeeded"]
    assert sorted(succeeded) == sorted(ids) and len(ids) == 90


@pytest.mark.slow
def test_worker_refuses_a_bad_configuration_with_exit_2(tmp_path):
    """A worker with an invalid configuration exits 2 naming the key, before starting Dramatiq."""
    config = tmp_path / "mailworker.toml"
    config.write_text(
        '[[smtp]]\nname = "x"\nfrom_address = "a@example.com"\nserver = "h"\nprot = 25\n'
    )
    out = subprocess.run(
        [MAILWORKER, "worker"],
        env=_env(MAILWORKER_CONFIG=str(config)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "smtp[x].prot" in out.stderr and "unknown key" in out.stderr


@pytest.mark.slow
def test_worker_takes_broker_url_and_logs_one_startup_line(
    smtp_server, redis_url, namespace, tmp_path
):
    """`mailworker worker --broker-url` overrides the config's broker in every worker
    process, and the main process logs one `worker_started` line: version, broker
    (password masked), namespace, queues, services in delivery order, processes,
    threads."""
    # Given a config whose broker nothing answers, and a URL with a password on the CLI
    server = smtp_server("plain")
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",
            "namespace": namespace,
            "smtp": [
                server.smtp_section("primary"),
                server.smtp_section("spare", enabled=False),
                server.smtp_section("backup"),
            ],
        },
    )
    url = redis_url.replace("redis://", "redis://:start-line-pw@", 1)
    worker = WorkerProcess(
        config,
        tmp_path / "worker.log",
        *("-p", "2", "-t", "3", "-Q", "high,normal", "--broker-url", url),
    )
    try:
        # When a job is enqueued on the URL's broker
        wait_for(
            lambda: len(worker.events("Worker process is ready for action.")) == 2,
            timeout=30,
        )
        [job] = Producer(
            redis.Redis.from_url(redis_url), namespace=namespace
        ).enqueue_many([Notification(to=["ops@example.org"], subject="s", text="t")])
        # Then a worker process delivers it, and the startup line says what runs
        wait_for(lambda: server.recorder.messages, timeout=30)
    finally:
        assert worker.stop() == 0
    assert job.encode() in server.recorder.messages[0].data
    [started] = worker.events("worker_started")
    assert started["level"] == "info"
    assert {k: v for k, v in started.items() if k not in ("level", "timestamp")} == {
        "event": "worker_started",
        "version": version("mailworker"),
        "broker": redis_url.replace("redis://", "redis://:***@", 1),
        "namespace": namespace,
        "queues": ["mail-high", "mail"],
        "services": ["primary", "backup"],
        "processes": 2,
        "threads": 3,
        "shutdown_timeout": 20,
    }
    assert "start-line-pw" not in worker.log.read_text()


@pytest.mark.slow
def test_dev_prints_the_two_lines_that_put_a_message_in_the_outbox(tmp_path):
    """`mailworker dev` prints an export line and a send line; running them writes an .eml file."""
    dev = subprocess.Popen(
        [MAILWORKER, "dev"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert dev.stdout is not None
        export = dev.stdout.readline().decode().strip()
        sample = dev.stdout.readline().decode().strip()
        assert export.startswith("export MAILWORKER_BROKER_URL=redis://127.0.0.1:")
        assert " send " in sample
        subprocess.run(
            ["bash", "-c", f"{export}\n{sample}"],
            cwd=tmp_path,
            env=_env(),
            check=True,
            timeout=30,
            capture_output=True,
        )
        [eml] = wait_for(lambda: list((tmp_path / "outbox").glob("*.eml")), timeout=30)
    finally:
        code = _stop(dev, signal.SIGINT)
        if dev.stdout is not None:
            dev.stdout.close()
    msg = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert msg["To"] == "someone@example.com"
    assert msg["Subject"] == "Hello from mailworker"
    assert msg.get_body(("plain",)).get_content().strip() == "It works."
    assert code == 0
