"""`mailworker health` against real worker processes and a real Redis: what probes see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, WorkerProcess, clean_env

pytestmark = pytest.mark.slow


def _config(path: Path, url: str, namespace: str, server: Any, **extra: Any) -> Path:
    # A short redelivery_timeout: heartbeats age past it in seconds, not 15 s.
    return write_toml(
        path / "mailworker.toml",
        {
            "broker_url": url,
            "namespace": namespace,
            "retry": {"redelivery_timeout": "2s"},
            "smtp": [server.smtp_section()],
            **extra,
        },
    )


def _health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILWORKER, "health", *args],
        env=clean_env(MAILWORKER_CONFIG=str(config)),
        capture_output=True,
        text=True,
        timeout=30,
    )


def _report(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = _health(config, "--json", *args)
    return done.returncode, json.loads(done.stdout)


def test_healthy_while_the_workers_beat_then_not_after_kill_9(
    smtp_server, redis_url, namespace, tmp_path
):
    """Both processes of a running worker make health exit 0; after kill -9 of the
    group, health exits 1 once their heartbeats are older than the timeout."""
    # Given a worker with two processes
    config = _config(tmp_path, redis_url, namespace, smtp_server("plain"))
    worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "2", "-t", "1")
    try:
        # Then health reports both of them alive on this host, and exits 0
        wait_for(
            lambda: _health(config, "--min-processes", "2").returncode == 0,
            timeout=60,
            interval=0.5,
        )
        code, report = _report(config, "--min-processes", "2")
        assert code == 0 and report["healthy"] is True
        assert report["host"] == os.uname().nodename
        assert len(report["processes"]) == 2
        assert all(p["age"] <= 2 for p in report["processes"])
        done = _health(config)
        assert done.returncode == 0
        assert done.stdout.splitlines()[-1].startswith("healthy: 2 worker process(es)")
        # When every process is killed without a chance to say goodbye
        worker.kill()
        # Then health fails once the last heartbeats are older than redelivery_timeout
        wait_for(lambda: _health(config).returncode == 1, timeout=20, interval=0.5)
        done = _health(config)
        assert done.returncode == 1
        assert "0 of 1 worker process(es)" in done.stderr
        assert done.stdout.count("silent") == 2
    finally:
        if worker.alive():
            worker.kill()


def test_a_frozen_process_is_missed_and_a_stopped_worker_leaves(
    smtp_server, redis_url, namespace, tmp_path
):
    """One of two processes frozen (SIGSTOP) fails `--min-processes 2` while the other
    beats, passes again once it runs; after SIGTERM the worker's lines are gone at once."""
    # Given a worker with two processes, both beating
    config = _config(tmp_path, redis_url, namespace, smtp_server("plain"))
    worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "2", "-t", "1")
    frozen = 0
    try:
        wait_for(
            lambda: _health(config, "--min-processes", "2").returncode == 0,
            timeout=60,
            interval=0.5,
        )
        _, report = _report(config)
        frozen = report["processes"][0]["pid"]
        # When one of them is frozen
        os.kill(frozen, signal.SIGSTOP)
        # Then the host no longer has two live processes, though it has one
        wait_for(
            lambda: _health(config, "--min-processes", "2").returncode == 1,
            timeout=20,
            interval=0.5,
        )
        assert _health(config).returncode == 0
        # When it runs again, both are back
        os.kill(frozen, signal.SIGCONT)
        frozen = 0
        wait_for(
            lambda: _health(config, "--min-processes", "2").returncode == 0,
            timeout=20,
            interval=0.5,
        )
        # When the worker stops cleanly, its processes leave the record: unhealthy at once
        assert worker.stop() == 0
        code, report = _report(config)
        assert code == 1 and report["processes"] == []
    finally:
        if frozen:
            os.kill(frozen, signal.SIGCONT)
        if worker.alive():
            worker.kill()


def test_broker_down_is_unhealthy(smtp_server, private_redis, namespace, tmp_path):
    """With the broker gone, health exits 4 (broker unreachable), within its --timeout."""
    # Given a healthy worker on a Redis of the test's own
    config = _config(tmp_path, private_redis.url, namespace, smtp_server("plain"))
    worker = WorkerProcess(config, tmp_path / "worker.log", "-p", "1", "-t", "1")
    try:
        wait_for(lambda: _health(config).returncode == 0, timeout=60, interval=0.5)
        # When Redis stops
        private_redis.stop()
        # Then health says the broker is unreachable, naming it without secrets
        done = _health(config, "--timeout", "1")
        assert done.returncode == 4
        assert f"broker {private_redis.url} unreachable" in done.stderr
    finally:
        worker.kill()


def test_bad_max_age_and_password_in_url(redis_url, namespace, tmp_path, smtp_server):
    """A --max-age that is no duration is a usage error (2) naming the option; a password
    in the broker URL never appears in the output."""
    config = _config(tmp_path, redis_url, namespace, smtp_server("plain"))
    done = _health(config, "--max-age", "soon")
    assert done.returncode == 2 and "--max-age" in done.stderr
    done = _health(
        config,
        "--broker-url",
        "redis://:hunter2-secret@127.0.0.1:1/0",
        "--timeout",
        "1",
    )
    assert done.returncode == 4
    assert "hunter2-secret" not in done.stdout + done.stderr


def test_a_beat_records_its_process_and_forgets_dead_ones(make_settings, redis_client):
    """Each heartbeat writes the process's line into its host's record and drops lines
    silent for four redelivery timeouts; the record expires a day after the last beat."""
    from worker.app import build
    from worker.broker.heartbeats import HOST_RECORD_TTL, host_beats, host_key
    from worker.middleware.heartbeat import Heartbeat

    settings = make_settings(
        smtp=[
            {
                "name": "x",
                "from_address": "a@example.org",
                "server": "127.0.0.1",
                "port": 25,
            }
        ]
    )
    app = build(settings, client=redis_client)
    try:
        key = host_key(settings.namespace, "node-1")
        # Given the line of a process that died ten minutes ago
        stale = int((time.time() - 600) * 1000)
        redis_client.hset(key, "dead-broker", f"{stale} 4711")
        # When a live process on the same host beats (redelivery_timeout 15 s)
        Heartbeat(timeout=15, ttl=60, host="node-1").beat(app.broker)
        # Then only the live one is left, with this process's pid, and the record expires
        (beat,) = host_beats(redis_client, settings.namespace, "node-1")
        assert beat.broker_id == app.broker.broker_id and beat.pid == os.getpid()
        assert 0 <= beat.age < 15
        assert 0 < redis_client.ttl(key) <= HOST_RECORD_TTL
    finally:
        app.close()
