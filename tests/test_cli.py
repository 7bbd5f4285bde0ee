"""The ``mailworker`` command as a user runs it: real subprocesses, real config files,
the real Redis and real aiosmtpd servers (docs/design.md §3, §6, §7)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from common.keys import queue_key, queue_messages_key
from common.sockets import free_port
from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.env import HOST, REDIS_URL
from tests.support.helpers import wait_for
from tests.support.smtp import PASSWORD

MAILWORKER = Path(sys.executable).parent / "mailworker"
TIMEOUT = 60  # seconds per command: generous, but a hang fails instead of blocking
SMTP_PASSWORD = "smtp-pw-inline-4711"
BROKER_PASSWORD = "brokerpw123"
STEP = re.compile(r"^\s+(connect|tls|auth|send)\s+(ok|FAILED)\s+(.*)$")
SEND = ("send", "--to", "a@example.org", "--subject", "s", "--text", "t")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def mailworker(
    *args: str,
    config: Path | None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the console script with only our own MAILWORKER_* variables set."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    if config is not None:
        environ["MAILWORKER_CONFIG"] = str(config)
    environ.update(env or {})
    result = subprocess.run(
        [str(MAILWORKER), *args],
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd or (config.parent if config is not None else None),
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_line_cause(result: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a failed command: exactly one non-empty line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].strip()
    return lines[0]


def reports(stdout: str) -> dict[str, list[tuple[str, str, str]]]:
    """Each tested service's steps, as (step, verdict, detail), keyed by service name."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    current: list[tuple[str, str, str]] = []
    for line in stdout.splitlines():
        header = re.match(r"^smtp ([a-z0-9_-]+) \(", line)
        if header:
            current = found.setdefault(header.group(1), [])
        elif match := STEP.match(line):
            step, verdict, detail = match.groups()
            current.append((step, verdict, detail))
    return found


@pytest.fixture
def write_config(tmp_path: Path, namespace: str) -> Callable[..., Path]:
    """Write ``mailworker.toml`` into tmp_path (this test's namespace) and return its path."""

    def write(**data: Any) -> Path:
        data.setdefault("namespace", namespace)
        data.setdefault("broker_url", REDIS_URL)
        return write_toml(tmp_path / "mailworker.toml", data)

    return write


def queued_jobs(redis_client: redis.Redis, namespace: str) -> dict[str, dict[str, Any]]:
    """The jobs waiting on the normal queue of ``namespace``, by job id."""
    ids = redis_client.lrange(queue_key(namespace, "mail"), 0, -1)
    payloads = (
        redis_client.hmget(queue_messages_key(namespace, "mail"), ids) if ids else []
    )
    messages = [orjson.loads(p) for p in payloads if p is not None]
    return {m["message_id"]: m["kwargs"]["job"] for m in messages}


# ---------------------------------------------------------------- help


def test_help_lists_every_command(tmp_path):
    """`mailworker --help` lists dev, worker, send, status, test-connection and config."""
    result = mailworker("--help", config=None, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == ""
    section = result.stdout.split("Commands:", 1)[1]
    commands = {line.split()[0] for line in section.splitlines() if line.strip()}
    assert commands >= {"dev", "worker", "send", "status", "test-connection", "config"}


@pytest.mark.parametrize(
    "command",
    [["send"], ["status"], ["config", "check"], ["worker"], ["dev"],
     ["test-connection"], ["queue", "stats"], ["dead", "list"]],
    ids=" ".join,
)  # fmt: skip
def test_help_points_only_to_documents_the_repository_has(tmp_path, command):
    """`--help` refers to the README or docs/, never to a document not in the repository."""
    result = mailworker(*command, "--help", config=None, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DESIGN" not in result.stdout


# ---------------------------------------------------------------- send and status


def test_send_prints_job_id_and_status_reports_it_queued(
    redis_url, write_config, redis_client, namespace
):
    """`send` prints the job id alone on its last line; `status --json` shows it queued."""
    # Given a config on the real Redis
    config = write_config()
    # When a notification is sent with flags
    sent = mailworker(
        "send",
        "--to", "Ann Example <ann@example.org>",
        "--cc", "cc@example.org",
        "--subject", "Task 42 is waiting",
        "--text", "Please approve task 42.",
        "--metadata", "workflow=wf-7",
        config=config,
    )  # fmt: skip
    # Then it exits 0 with the job id alone on the last line, and the job is on the queue
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.splitlines()[-1]
    assert UUID.match(job_id), sent.stdout
    job = queued_jobs(redis_client, namespace)[job_id]
    assert job["subject"] == "Task 42 is waiting"
    assert job["text"] == "Please approve task 42."
    # When its status is asked for as JSON
    status = mailworker("status", job_id, "--json", config=config)
    # Then stdout is one JSON object describing a queued job
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""
    assert len(status.stdout.strip().splitlines()) == 1
    record = json.loads(status.stdout)
    assert isinstance(record, dict)
    assert record["id"] == job_id
    assert record["state"] == "queued"
    assert record["attempts"] == 0
    assert record["error"] is None
    assert isinstance(record["recipients"], list)
    created = datetime.fromisoformat(record["created_at"])
    updated = datetime.fromisoformat(record["updated_at"])
    assert created.tzinfo is not None
    assert updated >= created
    assert record["metadata"] == {"workflow": "wf-7"}


def test_status_without_json_prints_human_lines(redis_url, write_config):
    """`status ID` without --json prints aligned `key value` lines, not JSON."""
    config = write_config()
    sent = mailworker(*SEND, config=config)
    job_id = sent.stdout.splitlines()[-1]
    status = mailworker("status", job_id, config=config)
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""
    lines = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert lines["job"] == job_id
    assert lines["state"] == "queued"
    assert lines["attempts"] == "0"
    assert "created_at" in lines
    with pytest.raises(json.JSONDecodeError):
        json.loads(status.stdout)


@pytest.mark.parametrize("as_json", [False, True])
def test_status_of_unknown_id_exits_3(redis_url, write_config, as_json):
    """An unknown job id exits 3 with empty stdout and a one-line cause on stderr."""
    config = write_config()
    flags = ["--json"] if as_json else []
    result = mailworker("status", "no-such-job-0000", *flags, config=config)
    assert result.returncode == 3
    assert result.stdout == ""
    assert "no-such-job-0000" in one_line_cause(result)


def test_commands_on_the_default_broker_say_so(redis_url, tmp_path):
    """Run where no configuration is found, `send` notes on stderr that it uses the
    default broker, and `status` says where it looked for the job."""
    # A deadline in the past is refused at enqueue, before anything is written.
    past = ("--not-after", "2001-01-01T00:00:00Z")
    sent = mailworker(*SEND, *past, config=None, cwd=tmp_path)
    assert sent.returncode == 2
    note, cause = sent.stderr.splitlines()
    assert note == (
        "mailworker: note: no configuration file and no MAILWORKER_BROKER_URL: "
        "using redis://127.0.0.1:6379/0, namespace 'mailworker'"
    )
    assert "not_after" in cause
    status = mailworker("status", "no-such-job-0000", config=None, cwd=tmp_path)
    assert status.returncode == 3
    assert one_line_cause(status) == (
        "mailworker: no job no-such-job-0000 in redis://127.0.0.1:6379/0 namespace "
        "'mailworker' (the defaults: no configuration file, no MAILWORKER_BROKER_URL): "
        "unknown, or expired after status.ttl"
    )
    configured = mailworker(
        *SEND,
        *past,
        config=None,
        cwd=tmp_path,
        env={"MAILWORKER_BROKER_URL": REDIS_URL},
    )
    assert "note" not in configured.stderr


def test_status_shows_each_reply_code_once_and_no_missing_attempt(
    redis_url, smtp_server, make_settings, run_worker, redis_client, namespace, tmp_path
):
    """`status` of a job with a refused recipient, dead and requeued, prints each reply
    code once, no "attempt None" for events of no attempt, and `dead_at`."""
    # Given a server that refuses one address, and a job to it alone, dead and requeued
    server = smtp_server()
    server.recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    app = run_worker(make_settings(smtp=[server.smtp_section()]))
    producer = Producer(redis_client, namespace=namespace)
    job_id = producer.enqueue(
        Notification(to=["gone@example.org"], subject="s", text="t")
    )
    # (join returns when the queue is empty; the dead record may be a moment behind)
    app.broker.join("mail", timeout=10_000)
    wait_for(lambda: (app.status.get(job_id) or {}).get("state") == "dead")
    config = tmp_path / "mailworker.toml"  # make_settings wrote it
    assert mailworker("dead", "requeue", job_id, config=config).returncode == 0
    app.broker.join("mail", timeout=10_000)
    wait_for(lambda: len((app.status.get(job_id) or {}).get("history", [])) == 3)
    # When its status is printed
    result = mailworker("status", job_id, config=config)
    # Then the refusal reads "550 5.1.1 …" once, and every history line is whole
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    [refusal] = [line for line in lines if "gone@example.org" in line]
    assert refusal.split()[1:] == ["refused", "550", "5.1.1", "no", "such", "user"]
    history = [line for line in lines if line.startswith("history")]
    assert [line.split()[2:] for line in history] == [
        ["attempt", "1", "dead", "permanent"],
        ["requeued"],
        ["attempt", "1", "dead", "permanent"],
    ]
    assert "None" not in result.stdout
    assert any(line.startswith("dead_at ") for line in lines)


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_send_json_from_file_or_stdin(
    redis_url, write_config, redis_client, namespace, tmp_path, source
):
    """`send --json FILE` and `send --json -` enqueue the job the JSON describes."""
    config = write_config()
    job = {
        "to": ["ops@example.org"],
        "subject": f"from JSON {source}",
        "html": "<p>hello</p>",
        "priority": "normal",
        "metadata": {"task": 7},
    }
    if source == "file":
        path = tmp_path / "job.json"
        path.write_text(json.dumps(job))
        sent = mailworker("send", "--json", str(path), config=config)
    else:
        sent = mailworker("send", "--json", "-", config=config, stdin=json.dumps(job))
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.splitlines()[-1]
    assert UUID.match(job_id)
    queued = queued_jobs(redis_client, namespace)[job_id]
    assert queued["subject"] == f"from JSON {source}"
    assert queued["html"] == "<p>hello</p>"
    status = mailworker("status", job_id, "--json", config=config)
    assert status.returncode == 0
    assert json.loads(status.stdout)["metadata"] == {"task": 7}


@pytest.mark.parametrize(
    ("args", "stdin", "field"),
    [
        (["--to", "not-an-address", "--subject", "s", "--text", "t"], None, "to[0]"),
        (["--to", "a@example.org", "--subject", "hi\r\nBcc: x@evil.example",
          "--text", "t"], None, "subject"),
        (["--to", "a@example.org", "--subject", "hi\nthere", "--text", "t"], None,
         "subject"),
        (["--json", "-"], '{"to": ["a@example.org"], "subject": "a\\r\\nb"}', "subject"),
        (["--json", "-"], '{"to": ["bad@"], "subject": "s", "text": "t"}', "to[0]"),
        (["--json", "-"], "[1, 2]", "--json"),
    ],
    ids=["bad-address", "crlf-subject", "lf-subject", "json-crlf-subject",
         "json-bad-address", "json-not-object"],
)  # fmt: skip
def test_send_invalid_job_exits_2_naming_the_field(
    redis_url, write_config, redis_client, namespace, args, stdin, field
):
    """An invalid job exits 2, names the field on stderr and enqueues nothing."""
    config = write_config()
    result = mailworker("send", *args, config=config, stdin=stdin)
    assert result.returncode == 2
    assert result.stdout == ""
    assert field in one_line_cause(result)
    assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []


@pytest.mark.parametrize("given", ["flag", "env"])
def test_unreachable_broker_exits_4(redis_url, write_config, given):
    """A broker that does not answer makes `send` and `status` exit 4, password masked."""
    config = write_config()
    dead = f"redis://:deadpw987@127.0.0.1:{free_port()}/0"
    flags = ["--broker-url", dead] if given == "flag" else []
    env = {"MAILWORKER_BROKER_URL": dead} if given == "env" else {}
    sent = mailworker(*SEND, *flags, config=config, env=env)
    status = mailworker("status", "some-job-id", *flags, config=config, env=env)
    for result in (sent, status):
        assert result.returncode == 4, result.stderr
        assert result.stdout == ""
        cause = one_line_cause(result)
        assert "unreachable" in cause
        assert "deadpw987" not in cause


def test_broker_refusing_the_password_exits_4_saying_so(private_redis, write_config):
    """`send` and `status` against a broker that refuses the password exit 4 with a
    cause that says the login was refused (not "unreachable"), password masked."""
    private_redis.client().config_set("requirepass", "the-right-one")
    wrong = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    config = write_config(broker_url=wrong)
    sent = mailworker(*SEND, config=config)
    status = mailworker("status", "some-job-id", config=config)
    for result in (sent, status):
        assert result.returncode == 4, result.stderr
        cause = one_line_cause(result)
        assert f"broker redis://:***@127.0.0.1:{private_redis.port}/0" in cause
        assert "refused the login" in cause and "password" in cause
        assert "unreachable" not in cause
        assert BROKER_PASSWORD not in cause + result.stdout


def test_broker_url_flag_overrides_the_environment(redis_url, write_config, namespace):
    """`--broker-url` wins over MAILWORKER_BROKER_URL, which wins over the config."""
    config = write_config(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    dead = {"MAILWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    live = {"MAILWORKER_BROKER_URL": REDIS_URL}
    assert mailworker(*SEND, config=config).returncode == 4
    assert mailworker(*SEND, config=config, env=live).returncode == 0
    flagged = mailworker(*SEND, "--broker-url", REDIS_URL, config=config, env=dead)
    assert flagged.returncode == 0, flagged.stderr
    job_id = flagged.stdout.splitlines()[-1]
    status = mailworker(
        "status", job_id, "--json", "--broker-url", REDIS_URL, config=config, env=dead
    )
    assert status.returncode == 0
    assert json.loads(status.stdout)["state"] == "queued"


# ---------------------------------------------------------------- config check


def _services(password: dict[str, str]) -> list[dict[str, Any]]:
    base = {"from_address": "noreply@example.com", "server": "smtp.example.com"}
    return [
        {"name": "primary", **base, "port": 587, "security": "starttls",
         "username": "mailer", **password},
        {"name": "backup", **base, "port": 25},
        {"name": "spare", **base, "port": 25, "enabled": False},
    ]  # fmt: skip


@pytest.mark.parametrize("source", ["inline", "file", "env"])
def test_config_check_masks_every_secret(write_config, tmp_path, source):
    """`config check` exits 0, prints the delivery order and never a password."""
    # Given the SMTP password inline, in a file or in the environment, and a broker password
    env: dict[str, str] = {}
    if source == "inline":
        password = {"password": SMTP_PASSWORD}
    elif source == "file":
        secret = tmp_path / "smtp.secret"
        secret.write_text(SMTP_PASSWORD + "\n")
        password = {"password_file": str(secret)}
    else:
        password = {}
        env["MAILWORKER_SMTP__PRIMARY__PASSWORD"] = SMTP_PASSWORD
    config = write_config(
        broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/0",
        smtp=_services(password),
    )
    # When the configuration is checked
    result = mailworker("config", "check", config=config, env=env)
    # Then it is printed with the secrets masked, and the delivery order
    assert result.returncode == 0, result.stderr
    for output in (result.stdout, result.stderr):
        assert SMTP_PASSWORD not in output
        assert BROKER_PASSWORD not in output
    lines = result.stdout.splitlines()
    assert 'broker_url = "redis://:***@127.0.0.1:6379/0"' in lines
    if source != "file":
        assert 'password = "***"' in lines
    assert lines[-1] == "# delivery order: primary (smtp) -> backup (smtp)"


def test_config_check_prints_every_section_with_its_secrets_masked(write_config):
    """Inbound sources (only their kind's keys), webhooks, bounces, actions and the API."""
    config = write_config(
        smtp=_services({})[1:2],
        bounces={"return_path": "bounces@example.com", "secret": "bouncesecret77"},
        inbound=[
            {"name": "replies", "kind": "imap", "server": "imap.example.com",
             "username": "replies@example.com", "password": "imapsecret88"},
        ],
        webhook=[
            {"name": "engine", "url": "https://engine.example.com/hook",
             "secret": "hooksecret99"},
        ],
    )  # fmt: skip
    result = mailworker("config", "check", config=config)
    assert result.returncode == 0, result.stderr
    for secret in ("bouncesecret77", "imapsecret88", "hooksecret99"):
        assert secret not in result.stdout + result.stderr
    text = result.stdout
    for header in (
        "[bounces]",
        "[[inbound]]",
        "[[webhook]]",
        "[email_actions]",
        "[api]",
    ):
        assert f"\n{header}\n" in text, header
    inbound = text.split("[[inbound]]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert 'password = "***"' in inbound and 'server = "imap.example.com"' in inbound
    assert not any(line.startswith(("listen =", "accept =")) for line in inbound)


def test_config_check_masks_broker_password_from_environment(write_config):
    """A password in MAILWORKER_BROKER_URL is masked too, and that URL is the one shown."""
    config = write_config(broker_url="redis://127.0.0.1:6379/0", smtp=_services({})[1:])
    env = {"MAILWORKER_BROKER_URL": "redis://:envbrokerpw55@127.0.0.1:6379/1"}
    result = mailworker("config", "check", config=config, env=env)
    assert result.returncode == 0, result.stderr
    assert "envbrokerpw55" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert 'broker_url = "redis://:***@127.0.0.1:6379/1"' in lines
    assert lines[1].startswith("# broker: redis://:***@127.0.0.1:6379/1, namespace ")
    assert lines[-1] == "# delivery order: backup (smtp)"


@pytest.mark.parametrize(
    ("smtp", "cause"),
    [
        ([], "smtp: no enabled service"),
        (_services({})[2:], "smtp: no enabled service"),  # only a disabled one
    ],
    ids=["no-service", "only-disabled"],
)
def test_config_check_exits_2_where_the_worker_would_refuse(write_config, smtp, cause):
    """A file the worker refuses (no enabled service) fails `config check` with 2."""
    config = write_config(**({"smtp": smtp} if smtp else {}))
    result = mailworker("config", "check", "--no-broker", config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert cause in one_line_cause(result)


def test_config_check_exits_2_on_an_unreadable_certificate(write_config, tmp_path):
    """A certificate file the worker could not read fails `config check` naming it."""
    missing = tmp_path / "absent.pem"
    config = write_config(
        openauth=[{"name": "o365", "client_type": "office365", "service": "graph",
                   "service_identity": "n@contoso.com"}],
        integrated_services={"graph": {"account_type": "service", "tenant_id": "t",
                                       "client_id": "c", "certificate_file": str(missing),
                                       "private_key_file": str(missing)}},
    )  # fmt: skip
    result = mailworker("config", "check", "--no-broker", config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "integrated_services.graph.private_key_file" in one_line_cause(result)


def test_config_check_exits_4_when_the_broker_does_not_answer(write_config):
    """An unreachable broker fails `config check` with 4; --no-broker skips the check."""
    dead = f"redis://:deadpw987@127.0.0.1:{free_port()}/0"
    config = write_config(broker_url=dead, smtp=_services({})[1:])
    result = mailworker("config", "check", config=config)
    assert result.returncode == 4
    assert result.stdout == ""
    cause = one_line_cause(result)
    assert f"broker {dead.replace('deadpw987', '***')} unreachable" in cause
    assert "deadpw987" not in cause
    skipped = mailworker("config", "check", "--no-broker", config=config)
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.splitlines()[1].endswith(": not checked (--no-broker)")


def test_config_check_exits_4_when_the_broker_refuses_the_password(
    private_redis, write_config
):
    """A broker that refuses the password fails `config check` with 4, saying so."""
    private_redis.client().config_set("requirepass", "the-right-one")
    url = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    config = write_config(broker_url=url, smtp=_services({})[1:])
    result = mailworker("config", "check", config=config)
    assert result.returncode == 4
    assert "refused the login" in one_line_cause(result)
    assert BROKER_PASSWORD not in result.stderr


def test_config_check_prints_resolved_modes_and_scopes_in_delivery_order(
    redis_url, write_config, tmp_path
):
    """Each service is printed in delivery order (OpenAuth first) with its resolved
    security, port, auth and scopes; a disabled one is marked; the broker answered."""
    secret = tmp_path / "graph.secret"
    secret.write_text("s3cret\n")
    config = write_config(
        smtp=[
            {"name": "implicit", "from_address": "a@example.com", "server": "s",
             "ssl": True, "port": 465},
            {"name": "o365-smtp", "from_address": "n@contoso.com",
             "server": "smtp.office365.com", "security": "starttls", "auth": "xoauth2",
             "username": "n@contoso.com", "integrated_service": "graph"},
            {"name": "plain", "from_address": "a@example.com", "server": "s",
             "enabled": False},
        ],
        openauth=[{"name": "o365", "client_type": "office365", "service": "graph",
                   "service_identity": "n@contoso.com"}],
        integrated_services={"graph": {"account_type": "service", "tenant_id": "t",
                                       "client_id": "c",
                                       "client_secret_file": str(secret)}},
    )  # fmt: skip
    result = mailworker("config", "check", config=config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].endswith(": answers")
    names = [line.split('"')[1] for line in lines if line.startswith("name = ")]
    assert names == ["o365", "implicit", "o365-smtp", "plain"]
    resolved = [line for line in lines if line.startswith("# resolved: ")]
    assert resolved == [
        '# resolved: scopes = ["https://graph.microsoft.com/.default"]',
        '# resolved: security = "tls", port = 465, auth = "none"',
        '# resolved: security = "starttls", port = 587, auth = "xoauth2", '
        'scopes = ["https://outlook.office365.com/.default"]',
    ]
    assert "# disabled: not in the delivery order" in lines
    assert lines[-1] == (
        "# delivery order: o365 (openauth) -> implicit (smtp) -> o365-smtp (smtp)"
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"colour_scheme": "blue"}, "colour_scheme"),
        ({"retry": {"max_attempts": 3, "max_atempts": 4}}, "max_atempts"),
        ({"smtp": [{"name": "primary", "from_address": "noreply@example.com",
                    "server": "smtp.example.com", "pasword": "x"}]}, "pasword"),
    ],
    ids=["root", "section", "smtp"],
)  # fmt: skip
def test_config_check_unknown_key_exits_2(write_config, data, key):
    """An unknown key anywhere in the file exits 2 and names the key on stderr."""
    config = write_config(**data)
    result = mailworker("config", "check", config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    cause = one_line_cause(result)
    assert key in cause
    assert "unknown key" in cause


def test_config_check_reports_every_error_one_line_each(write_config):
    """Several mistakes exit 2 with one stderr line each, each naming its field."""
    config = write_config(
        nmespace="x",
        smtp={"name": "primary", "from_address": "a@example.com", "server": "s"},
    )
    env = {"MAILWORKER_SMTP__PRIMARY__PASWORD": "x"}
    result = mailworker("config", "check", config=config, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(": ")[:3] for line in lines] == [
        ["mailworker", "configuration", "MAILWORKER_SMTP__PRIMARY__PASWORD"],
        ["mailworker", "configuration", "smtp"],
        ["mailworker", "configuration", "nmespace"],
    ]
    assert "no smtp service named 'primary'" in lines[0]
    assert "write [[smtp]] (two brackets)" in lines[1]
    assert "did you mean 'namespace'?" in lines[2]


def test_config_check_unknown_variable_exits_2(write_config):
    """An unknown MAILWORKER_FOO variable exits 2 and names the variable."""
    config = write_config()
    result = mailworker("config", "check", config=config, env={"MAILWORKER_FOO": "1"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert "MAILWORKER_FOO" in one_line_cause(result)


def test_config_check_missing_password_file_exits_2(write_config, tmp_path):
    """A password_file that does not exist exits 2 naming the field and the file."""
    missing = tmp_path / "secrets" / "nope"
    config = write_config(smtp=_services({"password_file": str(missing)}))
    result = mailworker("config", "check", config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    cause = one_line_cause(result)
    assert "smtp[primary].password_file" in cause
    assert str(missing) in cause


# ---------------------------------------------------------------- test-connection


def unreachable_section(name: str) -> dict[str, Any]:
    """An [[smtp]] table for a loopback port where nothing listens."""
    return {
        "name": name,
        "from_address": "noreply@example.com",
        "server": HOST,
        "port": free_port(),
        "security": "none",
        "timeout": "5s",
    }


def test_connection_starttls_auth_succeeds(smtp_server, write_config, ca_file):
    """Against STARTTLS+AUTH every step is ok and exactly one test message arrives."""
    # Given a STARTTLS server with AUTH whose CA the config trusts
    server = smtp_server("starttls", auth=True)
    config = write_config(smtp=[server.smtp_section(ca_bundle=str(ca_file))])
    # When the connection is tested
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    # Then each step is reported ok and the server received one message to ops@
    assert result.returncode == 0, result.stdout + result.stderr
    steps = reports(result.stdout)["primary"]
    assert [(step, verdict) for step, verdict, _ in steps] == [
        ("connect", "ok"), ("tls", "ok"), ("auth", "ok"), ("send", "ok"),
    ]  # fmt: skip
    assert "STARTTLS" in steps[1][2]
    assert "verified" in steps[1][2]
    assert "ok: test message accepted" in result.stdout
    [message] = server.recorder.messages
    assert message.rcpt_tos == ["ops@example.org"]
    assert message.mail_from == "noreply@example.com"
    assert PASSWORD not in result.stdout + result.stderr


def test_connection_wrong_password_fails_at_auth(smtp_server, write_config, ca_file):
    """A wrong password exits 1 with the auth step FAILED, never showing the password."""
    server = smtp_server("starttls", auth=True)
    section = server.smtp_section(ca_bundle=str(ca_file), password="wrong-pw-zz9")
    config = write_config(smtp=[section])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    steps = reports(result.stdout)["primary"]
    assert [(s, v) for s, v, _ in steps] == [
        ("connect", "ok"), ("tls", "ok"), ("auth", "FAILED"),
    ]  # fmt: skip
    cause = steps[-1][2]
    assert "authentication" in cause.lower()
    assert "\n" not in cause
    assert "wrong-pw-zz9" not in result.stdout + result.stderr
    assert server.recorder.messages == []


def test_connection_unreachable_port_fails_at_connect(write_config):
    """Nothing listening on the port exits 1 with connect FAILED: cannot connect."""
    section = unreachable_section("primary")
    config = write_config(smtp=[section])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    [(step, verdict, cause)] = reports(result.stdout)["primary"]
    assert (step, verdict) == ("connect", "FAILED")
    assert "cannot connect" in cause
    assert f"{HOST}:{section['port']}" in cause


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_connection_untrusted_certificate_fails(smtp_server, write_config, mode):
    """An untrusted CA (no ca_bundle) exits 1 with the tls step FAILED on the certificate."""
    server = smtp_server(mode)
    config = write_config(smtp=[server.smtp_section()])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    steps = reports(result.stdout)["primary"]
    assert [(s, v) for s, v, _ in steps] == [("connect", "ok"), ("tls", "FAILED")]
    assert "certificate" in steps[-1][2]
    assert server.recorder.messages == []
    assert server.recorder.commands == []


def test_connection_starttls_required_but_not_offered(smtp_server, write_config):
    """`security = "starttls"` against a server without STARTTLS fails closed, sending nothing."""
    server = smtp_server("plain")
    config = write_config(smtp=[server.smtp_section(security="starttls")])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    steps = reports(result.stdout)["primary"]
    assert [(s, v) for s, v, _ in steps] == [("connect", "ok"), ("tls", "FAILED")]
    assert "does not offer STARTTLS" in steps[-1][2]
    assert server.recorder.messages == []
    assert server.recorder.commands == []  # no MAIL or RCPT in plaintext


def test_connection_implicit_tls_on_a_starttls_port_names_the_likely_mistake(
    smtp_server, write_config, ca_file
):
    """`security = "tls"` against a port that speaks plain SMTP first (STARTTLS) fails
    at the tls step with a hint: this port likely expects security = "starttls"."""
    server = smtp_server("starttls")
    section = server.smtp_section(security="tls", ca_bundle=str(ca_file))
    config = write_config(smtp=[section])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    steps = reports(result.stdout)["primary"]
    assert [(s, v) for s, v, _ in steps] == [("connect", "ok"), ("tls", "FAILED")]
    cause = steps[-1][2]
    assert "WRONG_VERSION_NUMBER" in cause
    assert 'security = "starttls"' in cause and "587" in cause
    assert server.recorder.messages == []


def test_connection_unknown_service_exits_2(smtp_server, write_config):
    """`--service nosuch` exits 2 naming the service and contacts no server."""
    server = smtp_server("plain")
    config = write_config(smtp=[server.smtp_section()])
    args = ("test-connection", "--service", "nosuch", "--to", "ops@example.org")
    result = mailworker(*args, config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    cause = one_line_cause(result)
    assert "nosuch" in cause
    assert "primary" in cause  # the services that do exist
    assert server.recorder.ehlos == 0


def test_connection_invalid_recipient_exits_2(smtp_server, write_config):
    """`--to` that is not an address exits 2 naming --to and contacts no server."""
    server = smtp_server("plain")
    config = write_config(smtp=[server.smtp_section()])
    result = mailworker("test-connection", "--to", "not-an-address", config=config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--to" in one_line_cause(result)
    assert server.recorder.ehlos == 0


def test_connection_missing_password_file_exits_2(smtp_server, write_config, tmp_path):
    """A password_file that cannot be read is a configuration error (2), not a verdict."""
    server = smtp_server("plain", auth=True)
    section = server.smtp_section(password_file=str(tmp_path / "secrets" / "nope"))
    del section["password"]
    config = write_config(smtp=[section])
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 2
    assert "smtp[primary].password_file" in one_line_cause(result)
    assert server.recorder.ehlos == 0
    assert server.recorder.messages == []


def test_connection_tests_every_enabled_service_in_order(smtp_server, write_config):
    """Without --service every enabled service is tested in order; disabled ones are not."""
    # Given two enabled services and a disabled one, each with its own server
    first, second, spare = (smtp_server("plain") for _ in range(3))
    config = write_config(smtp=[
        first.smtp_section("first"),
        second.smtp_section("second"),
        spare.smtp_section("spare", enabled=False),
    ])  # fmt: skip
    # When the connections are tested
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    # Then both enabled ones are reported ok, in order, and each got one message
    assert result.returncode == 0, result.stdout + result.stderr
    found = reports(result.stdout)
    assert list(found) == ["first", "second"]
    for name in ("first", "second"):
        assert all(verdict == "ok" for _, verdict, _ in found[name])
        assert [s for s, _, _ in found[name]] == ["connect", "tls", "auth", "send"]
    assert result.stdout.count("ok: test message accepted") == 2
    for server in (first, second):
        [message] = server.recorder.messages
        assert message.rcpt_tos == ["ops@example.org"]
    assert spare.recorder.messages == []
    assert spare.recorder.ehlos == 0


def test_connection_failing_service_does_not_stop_the_next(smtp_server, write_config):
    """When the first service fails the second is still tested, and the exit code is 1."""
    second = smtp_server("plain")
    config = write_config(
        smtp=[unreachable_section("first"), second.smtp_section("second")]
    )
    result = mailworker("test-connection", "--to", "ops@example.org", config=config)
    assert result.returncode == 1
    found = reports(result.stdout)
    assert list(found) == ["first", "second"]
    assert found["first"][-1][:2] == ("connect", "FAILED")
    assert [v for _, v, _ in found["second"]] == ["ok"] * 4
    [message] = second.recorder.messages  # tested on its own, not as a failover
    assert message.rcpt_tos == ["ops@example.org"]
