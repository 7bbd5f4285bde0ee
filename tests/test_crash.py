"""Crashes, restarts and broken servers lose nothing and send nothing twice (outside the
in-doubt window): real worker processes, kill -9, SIGSTOP, SIGTERM, Redis restarts."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import MAILWORKER, WorkerProcess, clean_env
from tests.support.smtp import Recorder
from worker.status import StatusStore

MESSAGE_ID = re.compile(rb"Message-ID: <([^@>]+)@")


class SlowRecorder(Recorder):
    """A recorder whose DATA takes ``delay`` seconds and may call ``on_data`` first."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.on_data = None

    async def handle_DATA(self, server, session, envelope):
        if self.on_data is not None:
            self.on_data(envelope)
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)

    def ids(self) -> list[bytes]:
        return [m.group(1) for r in self.messages if (m := MESSAGE_ID.search(r.data))]


def _config(tmp_path, redis_url, namespace, server, **retry):
    retry = {"min_backoff": "0.5s", "max_backoff": "1s", **retry}
    return write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "retry": retry,
            "smtp": [server.smtp_section(timeout="10s")],
        },
    )


def _enqueue(redis_url, namespace, count, *, bulk=False, **fields):
    import redis as redis_lib

    fields.setdefault("subject", "Task due")
    fields.setdefault("text", "Please act.")
    producer = Producer(redis_lib.Redis.from_url(redis_url), namespace=namespace)
    return producer.enqueue_many(
        (Notification(to=[f"user{i}@example.org"], **fields) for i in range(count)),
        bulk=bulk,
    )


@pytest.mark.slow
def test_kill_9_mid_batch_redelivers_everything_within_30s(
    smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """After kill -9 of the workers mid-DATA, a new worker delivers every job, the last
    within 30 s of the crash; duplicates only for jobs logged delivery_in_doubt."""
    # Given a slow server and 300 jobs being worked by a worker process group
    server = smtp_server(recorder=SlowRecorder(delay=0.02))
    config = _config(tmp_path, redis_url, namespace, server)
    ids = _enqueue(redis_url, namespace, 300)
    first = WorkerProcess(config, tmp_path / "first.log", "-p", "2", "-t", "4")
    # When it is killed with kill -9 while messages are in DATA
    wait_for(lambda: len(server.recorder.messages) >= 60, timeout=60)
    first.kill()
    crashed_at = time.monotonic()
    second = WorkerProcess(config, tmp_path / "second.log", "-p", "1", "-t", "4")
    try:
        # Then every job arrives, the redelivered ones within 30 s of the crash
        wait_for(
            lambda: set(server.recorder.ids()) >= {i.encode() for i in ids}, timeout=60
        )
        recovered_in = time.monotonic() - crashed_at
    finally:
        assert second.stop() == 0
    received = collections.Counter(server.recorder.ids())
    duplicates = sum(n - 1 for n in received.values())
    in_doubt = len(second.events("delivery_in_doubt"))
    print(
        f"\nkill -9: 300 jobs, {duplicates} duplicates, {in_doubt} in doubt, "
        f"all delivered {recovered_in:.1f}s after the crash"
    )
    assert recovered_in <= 30
    assert duplicates <= in_doubt
    assert second.events("messages_redelivered")
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    assert all(status.get(i)["state"] == "sent" for i in ids)


def _no_resend_while_alive(
    smtp_server, redis_url, namespace, tmp_path, *, timeout, freeze
):
    server = smtp_server(recorder=SlowRecorder(delay=1.5))
    config = _config(tmp_path, redis_url, namespace, server, redelivery_timeout=timeout)
    busy = WorkerProcess(config, tmp_path / "busy.log", "-p", "1", "-t", "1")
    wait_for(lambda: busy.events("Worker process is ready for action."), timeout=30)
    ids = _enqueue(
        redis_url, namespace, 6
    )  # one thread: ~9 s of work, the rest prefetched
    wait_for(lambda: server.recorder.commands, timeout=30)
    rescuer = WorkerProcess(config, tmp_path / "rescuer.log", "-p", "1", "-t", "2")
    try:
        if freeze:
            time.sleep(1)
            busy.signal_group(signal.SIGSTOP)
            time.sleep(freeze)
            busy.signal_group(signal.SIGCONT)
        wait_for(
            lambda: set(server.recorder.ids()) >= {i.encode() for i in ids}, timeout=90
        )
    finally:
        busy.signal_group(signal.SIGCONT)
        assert rescuer.stop() == 0
        assert busy.stop() == 0
    received = collections.Counter(server.recorder.ids())
    assert all(n == 1 for n in received.values()), received
    assert not rescuer.events("messages_redelivered")


@pytest.mark.slow
def test_a_busy_process_keeps_its_jobs(smtp_server, redis_url, namespace, tmp_path):
    """With a 2 s redelivery timeout, a process whose only thread is busy for ~9 s (its
    consumers fetch nothing meanwhile) keeps its prefetched jobs: none is sent twice."""
    _no_resend_while_alive(
        smtp_server, redis_url, namespace, tmp_path, timeout="2s", freeze=0
    )


@pytest.mark.slow
def test_a_process_stopped_for_10s_keeps_its_jobs(
    smtp_server, redis_url, namespace, tmp_path
):
    """With the default 15 s redelivery timeout, a process frozen by SIGSTOP for 10 s keeps
    its jobs: none is sent twice."""
    _no_resend_while_alive(
        smtp_server, redis_url, namespace, tmp_path, timeout="15s", freeze=10
    )


@pytest.mark.slow
def test_a_stopping_process_keeps_its_jobs_until_it_exits(
    smtp_server, redis_url, namespace, tmp_path
):
    """With a 1 s redelivery timeout, a process that got SIGTERM while its job's DATA
    takes 6 s stays alive for the others (it fetches nothing more, its heartbeat goes
    on): the job is sent once, and the other worker takes nothing back."""
    recorder = SlowRecorder(delay=6)
    in_data = threading.Event()
    recorder.on_data = lambda envelope: in_data.set()
    server = smtp_server(recorder=recorder)
    config = _config(tmp_path, redis_url, namespace, server, redelivery_timeout="1s")
    busy = WorkerProcess(
        config, tmp_path / "busy.log", "-p", "1", "-t", "1", "--shutdown-timeout", "15"
    )
    rescuer = None
    try:
        wait_for(lambda: busy.events("Worker process is ready for action."), timeout=30)
        [job] = _enqueue(redis_url, namespace, 1)
        assert in_data.wait(30)
        started = time.monotonic()
        rescuer = WorkerProcess(config, tmp_path / "rescuer.log", "-p", "1", "-t", "1")
        wait_for(
            lambda: rescuer.events("Worker process is ready for action."), timeout=30
        )
        assert time.monotonic() - started < 4, "too slow a start for this test"
        assert busy.stop(timeout=30) == 0  # waits for the DATA to finish
        time.sleep(2)  # the other worker's reaper runs every 0.2 s
    finally:
        if rescuer is not None:
            assert rescuer.stop() == 0
        assert busy.stop() == 0
    assert server.recorder.ids() == [job.encode()]
    assert not busy.events("messages_redelivered")
    assert not rescuer.events("messages_redelivered")


@pytest.mark.slow
def test_job_that_kills_its_worker_every_time_ends_as_redelivery_limit(
    smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """A job that crashes every worker that takes it is dead as `redelivery_limit`."""
    recorder = SlowRecorder()
    server = smtp_server(recorder=recorder)
    config = _config(
        tmp_path,
        redis_url,
        namespace,
        server,
        redelivery_timeout="1s",
        redelivery_limit=3,
    )
    workers: list[WorkerProcess] = []

    def crash_on_poison(envelope) -> None:
        if b"Subject: Poison" in (envelope.original_content or b"") and workers:
            os.killpg(workers[-1].process.pid, signal.SIGKILL)

    recorder.on_data = crash_on_poison
    [poison] = _enqueue(redis_url, namespace, 1, subject="Poison")
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    deadline = time.monotonic() + 90
    try:
        while (
            time.monotonic() < deadline
            and (status.get(poison) or {}).get("state") != "dead"
        ):
            if not workers or not workers[-1].alive():
                workers.append(
                    WorkerProcess(
                        config, tmp_path / f"w{len(workers)}.log", "-p", "1", "-t", "1"
                    )
                )
            time.sleep(0.2)
        [healthy] = _enqueue(redis_url, namespace, 1, subject="Healthy")
        wait_for(lambda: status.get(healthy)["state"] == "sent", timeout=30)
    finally:
        for worker in workers:
            worker.stop()
    record = status.get(poison)
    assert record["state"] == "dead" and record["reason"] == "redelivery_limit"
    assert 3 <= len(workers) <= 6


@pytest.mark.slow
@pytest.mark.parametrize("bulk", [False, True], ids=["single", "bulk"])
def test_sigterm_finishes_in_flight_jobs_and_leaves_the_rest_queued(
    bulk, smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """SIGTERM: jobs in flight finish, the process exits 0 in time, the rest stay queued."""
    server = smtp_server(recorder=SlowRecorder(delay=2.0))
    config = _config(tmp_path, redis_url, namespace, server)
    ids = _enqueue(redis_url, namespace, 10, bulk=bulk)
    worker = WorkerProcess(
        config, tmp_path / "w.log", "-p", "1", "-t", "2", "--shutdown-timeout", "10"
    )
    wait_for(
        lambda: (
            server.recorder.commands.count("RCPT user0@example.org")
            or len(server.recorder.commands) >= 2
        ),
        timeout=30,
    )
    started = time.monotonic()
    assert worker.stop(timeout=30) == 0
    assert time.monotonic() - started < 15
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    states = collections.Counter(status.get(i)["state"] for i in ids)
    assert states["sent"] == len(server.recorder.messages) >= 1
    assert states["sent"] + states["queued"] == 10, states
    queued = redis_client.hlen(f"{namespace}:mail.msgs") + redis_client.hlen(
        f"{namespace}:mail.DQ.msgs"
    )
    assert queued == states["queued"]  # each job not sent is on the queue, once


@pytest.mark.slow
def test_redis_restart_loses_nothing_and_producers_get_a_clear_error(
    smtp_server, private_redis, tmp_path
):
    """Redis (with AOF) restarted under workers and producers: nothing queued is lost;
    while it is down `mailworker send` exits 4."""
    server = smtp_server(recorder=SlowRecorder())
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": private_redis.url,
            "namespace": "mw",
            "retry": {"min_backoff": "0.5s", "max_backoff": "1s"},
            "smtp": [server.smtp_section()],
        },
    )
    first = _enqueue(private_redis.url, "mw", 20)
    worker = WorkerProcess(config, tmp_path / "w.log", "-p", "1", "-t", "2")
    try:
        wait_for(lambda: len(server.recorder.messages) >= 20, timeout=30)
        private_redis.stop()
        down = subprocess.run(
            [
                MAILWORKER,
                "send",
                "--to",
                "a@example.org",
                "--subject",
                "s",
                "--text",
                "t",
            ],
            env=clean_env(MAILWORKER_CONFIG=str(config)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 4 and "unreachable" in down.stderr
        private_redis.start()
        second = _enqueue(private_redis.url, "mw", 20)
        wait_for(lambda: len(server.recorder.messages) >= 40, timeout=60)
    finally:
        assert worker.stop() == 0
    assert set(server.recorder.ids()) == {i.encode() for i in first + second}
    client = private_redis.client()
    assert client.llen("mw:mail") == 0 and client.hlen("mw:mail.msgs") == 0


def test_retry_whose_enqueue_fails_is_not_lost(
    smtp_server, private_redis, make_settings
):
    """A retry that cannot be enqueued because Redis is down is not acknowledged: once
    Redis is back the job is retried and delivered."""
    from dramatiq import Worker

    from worker.app import build

    recorder = SlowRecorder()
    server = smtp_server(recorder=recorder)
    server.recorder.data_replies.append("451 4.3.0 Try later")

    def redis_goes_away(envelope) -> None:
        if recorder.on_data is not None:
            recorder.on_data = None
            private_redis.stop()  # before the worker records the failure and retries
            threading.Timer(2.0, private_redis.start).start()

    recorder.on_data = redis_goes_away
    settings = make_settings(
        broker_url=private_redis.url,
        smtp=[server.smtp_section()],
        retry={"transport_retries": 0, "min_backoff": "0.2s", "max_backoff": "0.5s"},
    )
    app = build(settings, client=private_redis.client(), backoff=0.01)
    app.broker.emit_after("process_boot")
    worker = Worker(app.broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        [job_id] = Producer(
            private_redis.client(), namespace=settings.namespace
        ).enqueue_many([Notification(to=["ok@example.org"], subject="s", text="t")])
        wait_for(lambda: len(recorder.messages) == 1, timeout=40)
        wait_for(lambda: app.status.get(job_id)["state"] == "sent", timeout=20)
    finally:
        worker.stop(timeout=5000)
        app.close()
