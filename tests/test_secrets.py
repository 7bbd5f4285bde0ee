"""No password, client secret, token or Authorization header in any output, and no full
recipient address in logs with log_recipients = "domain"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.smtp import PASSWORD

MAILWORKER = str(Path(sys.executable).parent / "mailworker")
WRONG_CLIENT_SECRET = "wrong-client-secret-987"
WRONG_SMTP_PASSWORD = "wrong-smtp-pw-555"
RECIPIENT = "alice.private@example.org"


@pytest.mark.slow
def test_no_secret_in_any_output_of_a_failing_and_failing_over_worker(
    fake_microsoft, smtp_server, ca_file, redis_url, namespace, tmp_path
):
    """A job that meets a wrong client secret, a Graph outage (real tokens), a wrong SMTP
    password and finally succeeds leaves no secret in logs, status, dead letters or CLI."""
    # Given four services that fail in four ways before the last one delivers
    for _ in range(3):
        fake_microsoft.graph_responses.append(
            (503, {}, {"error": {"code": "serviceNotAvailable"}})
        )
    bad_smtp, good_smtp = (
        smtp_server("starttls", auth=True),
        smtp_server("starttls", auth=True),
    )
    integrated = {
        "account_type": "service",
        "tenant_id": fake_microsoft.tenant,
        "client_id": fake_microsoft.client_id,
        "authority_host": fake_microsoft.url,
        "graph_endpoint": fake_microsoft.url,
        "ca_bundle": str(ca_file),
    }
    oa = {
        "client_type": "office365",
        "service_identity": "svc@contoso.com",
        "messages_per_minute": 0,
        "recipients_per_day": 0,
        "timeout": "5s",
    }
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "log_recipients": "domain",
            "retry": {"transport_retries": 2, "min_backoff": "1s", "max_backoff": "2s"},
            "openauth": [
                {"name": "o365-bad", "service": "bad-app", **oa},
                {"name": "o365-down", "service": "good-app", **oa},
            ],
            "integrated_services": {
                "bad-app": {**integrated, "client_secret": WRONG_CLIENT_SECRET},
                "good-app": {
                    **integrated,
                    "client_secret": fake_microsoft.client_secret,
                },
            },
            "smtp": [
                bad_smtp.smtp_section(
                    "smtp-bad", ca_bundle=str(ca_file), password=WRONG_SMTP_PASSWORD
                ),
                good_smtp.smtp_section("smtp-good", ca_bundle=str(ca_file)),
            ],
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["MAILWORKER_CONFIG"] = str(config)

    def cli(*args: str) -> str:
        out = subprocess.run(
            [MAILWORKER, *args], env=env, capture_output=True, text=True, timeout=60
        )
        return out.stdout + out.stderr

    log = tmp_path / "worker.log"
    outputs: list[str] = []
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [MAILWORKER, "worker", "-p", "1", "-t", "2"],
            env=env,
            stdout=err,
            stderr=err,
        )
        try:
            sent = cli(
                "send", "--to", RECIPIENT, "--subject", "Payroll", "--text", "hi"
            )
            outputs.append(sent)
            job_id = sent.strip().splitlines()[-1]
            wait_for(lambda: good_smtp.recorder.messages, timeout=60)
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
    status = cli("status", job_id, "--json")
    record = json.loads(status)
    # The job met every failure on its way
    assert record["service"] == "smtp-good"
    assert [s["service"] for s in record["skipped"]] == [
        "o365-bad",
        "o365-down",
        "smtp-bad",
    ]
    assert fake_microsoft.tokens_issued, "the Graph outage happened with a real token"
    outputs += [
        status,
        cli("status", job_id),
        cli("dead", "list"),
        cli("config", "check"),
        cli("test-connection", "--to", "ops@example.org"),
    ]
    # Then no secret appears anywhere
    everything = "\n".join([log.read_text(), *outputs])
    secrets = [
        WRONG_CLIENT_SECRET,
        fake_microsoft.client_secret,
        PASSWORD,
        WRONG_SMTP_PASSWORD,
        *fake_microsoft.tokens_issued,
    ]
    for secret in secrets:
        assert secret not in everything
    assert "Bearer " not in everything and "Authorization" not in everything
    # And the worker's log shows the recipient's domain, never the address
    assert RECIPIENT not in log.read_text()
    assert "***@example.org" in log.read_text()
