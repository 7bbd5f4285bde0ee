"""Prometheus metrics: scraped from real worker processes after real deliveries."""

from __future__ import annotations

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
from tests.support.processes import WorkerProcess
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
        producer.enqueue(Notification(to=["gone@example.com"], subject="s", text="t"))
        producer.enqueue(Notification(to=["later@example.com"], subject="s", text="t"))
        samples = wait_for(
            lambda: (
                (s := _scrape_or_empty(port))
                and _value(s, "mailworker_deliveries_total", service="primary") >= 3
                and _total(s, "mailworker_dead_letters_total") >= 1
                and _total(s, "mailworker_job_retries_total") >= 1
                and s
            ),
            timeout=60,
        )
        # Then the scrape counts each once, by service, class and reason
        assert _value(samples, "mailworker_deliveries_total", service="primary") == 3
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
            == 3
        )
        assert _value(samples, "mailworker_worker_threads") == 2
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
    assert _value(after, "mailworker_deliveries_total", service="primary") == 3
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
