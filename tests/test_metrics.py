"""Prometheus metrics: scraped from real worker processes after real deliveries."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.sockets import free_port
from producers import Notification, Producer
from settings import load_settings
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, WorkerProcess
from worker.metrics.directory import subdirectories
from worker.metrics.exposition import Exposition

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) → value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples: Samples, name: str) -> float:
    """The sum of a metric's samples over every label set."""
    return sum(v for (n, _), v in samples.items() if n == name)


def _scrape(port: int) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return _samples(response.read().decode())


def _scrape_or_empty(port: int) -> Samples:
    try:
        return _scrape(port)
    except OSError:
        return {}


def _read_directory(directory: Path) -> Samples:
    """What /metrics shows from the directory alone, read in this process."""
    from prometheus_client import generate_latest

    return _samples(generate_latest(Exposition(directory)).decode())  # type: ignore[arg-type]


def _config(tmp_path: Path, redis_url: str, namespace: str, server: Any) -> Path:
    return write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section()],
            "retry": {"max_attempts": 3},
            "metrics": {"directory": str(tmp_path / "metrics")},
        },
    )


def _stale_counter(directory: Path) -> Path:
    """A subdirectory a launcher that died left, with a delivery counted in it."""
    code = (
        "import os, pathlib, sys\n"
        "d = pathlib.Path(sys.argv[1]) / f'worker-{os.getpid()}'\n"
        "d.mkdir(parents=True)\n"
        "os.environ['PROMETHEUS_MULTIPROC_DIR'] = str(d)\n"
        "from prometheus_client import Counter\n"
        "Counter('mailworker_deliveries', '', ['service']).labels('primary').inc(41)\n"
        "print(d)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _producer(redis_url: str, namespace: str) -> Producer:
    return Producer.from_url(redis_url, namespace=namespace)


@pytest.mark.slow
def test_worker_metrics_count_deliveries_dead_letters_and_retries(
    smtp_server, redis_url, namespace, tmp_path
):
    """Deliveries, a 550 dead letter and a 451 retry show in `worker --metrics`."""
    # Given an SMTP server that refuses one address for good and defers another
    server = smtp_server("plain", auth=True)
    server.recorder.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    server.recorder.rcpt_replies["later@example.com"] = "451 4.3.0 try again later"
    config = _config(tmp_path, redis_url, namespace, server)
    # and a subdirectory with a count a dead launcher left behind
    stale = _stale_counter(tmp_path / "metrics")
    port = free_port()
    worker = WorkerProcess(
        config, tmp_path / "worker.log", "-p", "1", "-t", "2", "--metrics",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    try:
        # When three jobs are delivered, one is refused and one deferred
        producer = _producer(redis_url, namespace)
        for n in range(3):
            producer.enqueue(
                Notification(to=[f"u{n}@example.com"], subject="s", text="t")
            )
        # and four more in one bulk message (each job counted once, not the message)
        producer.enqueue_many(
            [
                Notification(to=[f"b{n}@example.com"], subject="s", text="t")
                for n in range(4)
            ]
        )
        producer.enqueue(Notification(to=["gone@example.com"], subject="s", text="t"))
        producer.enqueue(Notification(to=["later@example.com"], subject="s", text="t"))
        samples = wait_for(
            lambda: (
                (s := _scrape_or_empty(port))
                and _value(s, "mailworker_deliveries_total", service="primary") >= 7
                and _total(s, "mailworker_dead_letters_total") >= 1
                and _total(s, "mailworker_job_retries_total") >= 1
                and s
            ),
            timeout=60,
        )
        # Then the scrape counts each once, by service, class and reason
        assert _value(samples, "mailworker_deliveries_total", service="primary") == 7
        assert _value(samples, "mailworker_dead_letters_total", reason="permanent") == 1
        assert _total(samples, "mailworker_dead_letters_total") == 1
        assert (
            _value(
                samples,
                "mailworker_delivery_failures_total",
                service="primary",
                error_class="recipient_refused",
            )
            == 1
        )
        assert (
            _value(samples, "mailworker_job_retries_total", error_class="transient")
            >= 1
        )
        assert (
            _value(samples, "mailworker_delivery_latency_seconds_count", queue="mail")
            == 7
        )
        assert _value(samples, "mailworker_worker_threads") == 2
        assert _value(samples, "mailworker_worker_processes") == 1
        assert _value(samples, "mailworker_broker_up") == 1
        assert _value(samples, "mailworker_dead_letters_stored") == 1
        assert _value(samples, "mailworker_breaker_open", service="primary") == 0
        assert (
            _value(
                samples,
                "mailworker_smtp_stage_seconds_count",
                service="primary",
                stage="auth",
            )
            >= 1
        )
        assert (
            _value(
                samples,
                "mailworker_smtp_stage_seconds_count",
                service="primary",
                stage="data",
            )
            >= 5
        )
        # and the dead launcher's count was wiped at start
        assert not stale.exists()
    finally:
        code = worker.stop()
    assert code == 0
    # And once the worker stopped, its counts stay but its live gauges are gone
    after = _read_directory(tmp_path / "metrics")
    assert _value(after, "mailworker_deliveries_total", service="primary") == 7
    assert _value(after, "mailworker_worker_threads") == 0


@pytest.mark.slow
def test_a_killed_worker_process_is_marked_dead(
    smtp_server, redis_url, namespace, tmp_path
):
    """A worker process killed with -9 loses its live gauges at the next scrape."""
    # Given a worker with two processes that delivered a job
    server = smtp_server("plain", auth=True)
    config = _config(tmp_path, redis_url, namespace, server)
    directory = tmp_path / "metrics"
    port = free_port()
    worker = WorkerProcess(
        config, tmp_path / "worker.log", "-p", "2", "-t", "2", "--metrics",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    try:
        _producer(redis_url, namespace).enqueue(
            Notification(to=["a@example.com"], subject="s", text="t")
        )
        wait_for(
            lambda: (
                (s := _scrape_or_empty(port))
                and _value(s, "mailworker_worker_threads") == 4
                and _value(s, "mailworker_deliveries_total", service="primary") == 1
            ),
            timeout=60,
        )
        ((own, _),) = list(subdirectories(directory))
        live = sorted(own.glob("gauge_livesum_*.db"))
        assert len(live) == 2
        # When one worker process is killed outright (Dramatiq then stops the other)
        victim = int(live[0].stem.rpartition("_")[2])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not worker.alive(), timeout=60)
    finally:
        worker.stop()
    # Then the killed one could not mark itself, the one that stopped did
    assert [p.name for p in own.glob("gauge_livesum_*.db")] == [live[0].name]
    # and the next scrape marks it: no live gauge is left, the counts stay
    after = _read_directory(directory)
    assert _value(after, "mailworker_worker_threads") == 0
    assert list(own.glob("gauge_livesum_*.db")) == []
    assert _value(after, "mailworker_deliveries_total", service="primary") == 1


def test_worker_metrics_address_is_checked_at_start(redis_url, namespace, tmp_path):
    """`worker --metrics` with an address that is not host:port exits 2, naming it."""
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [{"name": "primary", "server": "127.0.0.1", "port": 25,
                      "from_address": "noreply@example.com", "security": "none",
                      "auth": "none"}],
        },
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    done = subprocess.run(
        [MAILWORKER, "worker", "--metrics", "9191"],
        env={**env, "MAILWORKER_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--metrics: '9191' is not host:port" in done.stderr


def test_metrics_asgi_app_serves_queue_gauges_under_uvicorn(
    redis_url, namespace, tmp_path
):
    """The ASGI app the API mounts shows the broker's queues, under a real uvicorn."""
    import uvicorn

    from worker.metrics.exposition import asgi_app

    # Given two jobs waiting with no worker, and the app on a loopback port
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [{"name": "primary", "server": "127.0.0.1", "port": 25,
                      "from_address": "noreply@example.com", "security": "none",
                      "auth": "none"}],
            "metrics": {"directory": str(tmp_path / "metrics")},
        },
    )  # fmt: skip
    producer = _producer(redis_url, namespace)
    producer.enqueue(Notification(to=["a@example.com"], subject="s", text="t"))
    producer.enqueue(Notification(to=["b@example.com"], subject="s", text="t"))
    settings = load_settings(config)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            asgi_app(settings), host="127.0.0.1", port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        # When it is scraped
        samples = wait_for(lambda: _scrape_or_empty(port))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # Then the queue depth and the oldest job's age come from Redis
    assert _value(samples, "mailworker_broker_up") == 1
    assert (
        _value(samples, "mailworker_queue_messages", queue="mail", state="ready") == 2
    )
    assert (
        _value(samples, "mailworker_queue_messages", queue="mail-high", state="ready")
        == 0
    )
    assert _value(samples, "mailworker_queue_oldest_age_seconds", queue="mail") > 0
    assert (
        _value(samples, "mailworker_queue_oldest_age_seconds", queue="mail-bulk") == 0
    )


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# Every recorder method once, in a process of its own, then the whole exposition.
_EXPOSE_ALL = """
import os, sys
from pathlib import Path
from worker.metrics.directory import ENV
directory = Path(sys.argv[1])
own = directory / f"worker-{os.getpid()}"
own.mkdir(parents=True)
os.environ[ENV] = str(own)
import redis
from prometheus_client import generate_latest
from settings import load_settings
from worker.metrics.broker import BrokerCollector
from worker.metrics.exposition import Exposition
from worker.metrics.recorder import Recorder
r = Recorder.live()
r.enqueued("normal", source="api")
r.attempt([("primary", "transient")], [("primary", "budget")])
r.delivered("primary", "mail", 0.5)
r.retried("transient")
r.waited("budget")
r.dead("permanent")
r.token("entra", source="cache", outcome="ok")
r.inbound("bounce", "bounced", "")
r.inbound("action", "accepted", "")
r.smtp_stage("primary", "connect", 0.01)
r.in_progress("mail", 1)
r.threads(2)
settings = load_settings(Path(sys.argv[2]))
client = redis.Redis.from_url(settings.broker_url.get_secret_value())
sys.stdout.write(generate_latest(Exposition(directory, BrokerCollector(settings, client))).decode())
"""


def _exposed_names(tmp_path: Path, redis_url: str, namespace: str) -> set[str]:
    """The sample names our /metrics can show (a family without samples by its TYPE)."""
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [{"name": "primary", "server": "127.0.0.1", "port": 25,
                      "from_address": "noreply@example.com", "security": "none",
                      "auth": "none"}],
        },
    )  # fmt: skip
    text = subprocess.run(
        [sys.executable, "-c", _EXPOSE_ALL, str(tmp_path / "metrics"), str(config)],
        check=True,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")},
    ).stdout
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "gauge":
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split()[0])
    return names


def _named_in(text: str) -> set[str]:
    import re

    return set(re.findall(r"\b(mailworker_[a-z_]+)\b", text))


def test_every_metric_the_alerts_and_dashboard_use_is_exposed(
    redis_url, namespace, tmp_path
):
    """Each series deploy/prometheus/alerts.yml and the Grafana dashboard query exists
    in our exposition (a renamed metric would leave them blind)."""
    import json

    import yaml

    exposed = _exposed_names(tmp_path, redis_url, namespace)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "mailworker.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = _named_in("\n".join(exprs + queries))
    assert used, "the rules and the dashboard name no metric"
    assert sorted(used - exposed) == []
    # Every alert the issue asks for is there
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {
        "MailworkerDeadLettersRising",
        "MailworkerOldestJobTooOld",
        "MailworkerBreakerOpen",
        "MailworkerNoDeliveries",
    }
    assert {"mailworker_deliveries_total", "mailworker_queue_messages"} <= exposed


def test_the_alert_rules_pass_promtool_and_their_unit_tests():
    """`promtool check rules` accepts alerts.yml and `promtool test rules` passes."""
    import shutil

    from tests.support.env import CI

    promtool = shutil.which("promtool")
    if promtool is None:
        if CI:
            raise RuntimeError("CI=true but promtool is missing: .ci/run installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    folder = DEPLOY / "prometheus"
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        done = subprocess.run(
            [promtool, *args], cwd=folder, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mailworker_inbound_counts_the_bounces_it_records(tmp_path, namespace):
    """A bounce `mailworker inbound` records shows in the host's metrics."""
    import smtplib

    from tests.support.env import HOST, REDIS_URL
    from tests.support.mail import dsn

    # Given `mailworker inbound` with an smtp source, on a metrics directory
    port = free_port()
    directory = tmp_path / "metrics"
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "namespace": namespace,
            "broker_url": REDIS_URL,
            "smtp": [{"name": "out", "from_address": "n@example.com", "server": HOST,
                      "port": 2, "security": "none"}],
            "inbound": [{"name": "forwarded", "kind": "smtp", "listen": f"{HOST}:{port}",
                         "accept": ["bounces@example.com"]}],
            "metrics": {"directory": str(directory)},
        },
    )  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "MAILWORKER_CONFIG": str(config)}
    proc = subprocess.Popen(
        [MAILWORKER, "inbound"],
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
        # When a delivery status notification for an unknown message comes back
        raw = dsn(to="bounces@example.com", original_message_id="<nobody@example.com>",
                  recipient="v@example.org")  # fmt: skip
        # (a refusal comes after the record: counted all the same)
        with (
            smtplib.SMTP(HOST, port, timeout=10) as client,
            contextlib.suppress(smtplib.SMTPDataError),
        ):
            client.sendmail("", ["bounces@example.com"], raw)
        # Then the host's metrics count one inbound bounce, from the inbound process
        samples = wait_for(
            lambda: (
                (s := _read_directory(directory))
                and _total(s, "mailworker_bounces_total") >= 1
                and s
            )
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output.decode(errors="replace")
    assert _total(samples, "mailworker_bounces_total") == 1
    kinds = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "mailworker_inbound_messages_total"
    }
    assert sum(v for labels, v in kinds.items() if ("kind", "bounce") in labels) == 1
    assert [p.name.split("-")[0] for p, _ in subdirectories(directory)] == ["inbound"]


@pytest.mark.slow
def test_office365_tokens_deliveries_and_budget_show_in_worker_metrics(
    fake_microsoft, ca_file, redis_url, namespace, tmp_path
):
    """Graph deliveries count their service, their token requests, and the budget spent."""
    from tests.test_openauth import _integrated, _openauth

    # Given a worker on the Office 365 stand-in, with a budget of 30 messages a minute
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "openauth": [_openauth(fake_microsoft, ca_file, messages_per_minute=30)],
            "integrated_services": _integrated(fake_microsoft, ca_file),
            "metrics": {"directory": str(tmp_path / "metrics")},
        },
    )
    port = free_port()
    worker = WorkerProcess(
        config, tmp_path / "worker.log", "-p", "1", "-t", "2", "--metrics",
        f"127.0.0.1:{port}",
    )  # fmt: skip
    try:
        # When three jobs go out through Graph
        producer = _producer(redis_url, namespace)
        for n in range(3):
            producer.enqueue(
                Notification(to=[f"u{n}@example.org"], subject="s", text="t")
            )
        samples = wait_for(
            lambda: (
                (s := _scrape_or_empty(port))
                and _value(s, "mailworker_deliveries_total", service="o365") == 3
                and s
            ),
            timeout=60,
        )
    finally:
        assert worker.stop() == 0
    # Then one token came from the identity provider, the others from MSAL's cache
    tokens = "mailworker_token_acquisitions_total"
    asked = _value(
        samples, tokens, integrated_service="graph-mailer",
        source="identity_provider", outcome="ok",
    )  # fmt: skip
    cached = _value(
        samples, tokens, integrated_service="graph-mailer", source="cache", outcome="ok"
    )
    assert asked == 1 and asked + cached == 3
    # and the minute's budget has the three messages spent
    assert (
        _value(samples, "mailworker_budget_used", service="o365", window="minute") == 3
    )
    assert (
        _value(samples, "mailworker_budget_limit", service="o365", window="minute")
        == 30
    )
