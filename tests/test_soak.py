"""A bounded soak: a few thousand jobs against an SMTP server that randomly answers 421 and
451, drops connections and stalls, with one worker killed mid-way. Every job ends sent or
dead, and the counts reconcile."""

from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest

from tests.support.helpers import wait_for
from tests.support.processes import WorkerProcess
from tests.test_crash import SlowRecorder, _config, _enqueue
from worker.status import StatusStore

JOBS = 2000


class FlakyRecorder(SlowRecorder):
    """Misbehaves on purpose, with a fixed seed so a failure can be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.random = random.Random(20261126)
        self.faults: collections.Counter[str] = collections.Counter()

    async def handle_MAIL(self, server, session, envelope, address, options):
        roll = self.random.random()
        if roll < 0.03:
            self.faults["421"] += 1
            return "421 4.3.2 Service shutting down"
        if roll < 0.05:
            self.faults["drop"] += 1
            server.transport.close()
            return "421 4.4.2 Connection dropped"
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(self, server, session, envelope, address, options):
        roll = self.random.random()
        if roll < 0.03:
            self.faults["451"] += 1
            return "451 4.3.0 Try again later"
        if roll < 0.04:
            self.faults["stall"] += 1
            await asyncio.sleep(3)  # longer than the client's timeout
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.mark.slow
def test_soak_every_job_ends_sent_or_dead_and_counts_reconcile(
    smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """Enqueued = sent + dead, and duplicates never exceed the jobs logged in doubt."""
    recorder = FlakyRecorder()
    server = smtp_server(recorder=recorder)
    config = _config(
        tmp_path,
        redis_url,
        namespace,
        server,
        redelivery_timeout="3s",
        min_backoff="0.2s",
        max_backoff="0.5s",
    )
    section = config.read_text().replace('timeout = "10s"', 'timeout = "1s"')
    config.write_text(section)
    ids = _enqueue(redis_url, namespace, JOBS)
    workers = [
        WorkerProcess(config, tmp_path / "a.log", "-p", "1", "-t", "8"),
        WorkerProcess(config, tmp_path / "b.log", "-p", "1", "-t", "8"),
    ]
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    try:
        wait_for(lambda: len(recorder.messages) >= JOBS // 3, timeout=120)
        workers[0].kill()
        workers.append(WorkerProcess(config, tmp_path / "c.log", "-p", "1", "-t", "8"))

        def settled() -> bool:
            return (
                len(set(recorder.ids())) >= JOBS
                or _states(status, ids).get("dead", 0) + len(set(recorder.ids()))
                >= JOBS
            )

        wait_for(settled, timeout=150, interval=0.5)
        time.sleep(1)  # let the last status writes land
    finally:
        for worker in workers:
            worker.stop()
    states = _states(status, ids)
    received = collections.Counter(recorder.ids())
    duplicates = sum(n - 1 for n in received.values())
    in_doubt = sum(len(w.events("delivery_in_doubt")) for w in workers)
    print(
        f"\nsoak: enqueued {JOBS}, sent {states.get('sent', 0)}, dead {states.get('dead', 0)}, "
        f"other {JOBS - states.get('sent', 0) - states.get('dead', 0)}, duplicates "
        f"{duplicates}, in doubt {in_doubt}, faults {dict(recorder.faults)}"
    )
    assert states.get("sent", 0) + states.get("dead", 0) == JOBS
    assert len(received) == states.get("sent", 0)
    assert duplicates <= in_doubt
    assert sum(recorder.faults.values()) > 50


def _states(status: StatusStore, ids: list[str]) -> dict[str, int]:
    return dict(collections.Counter(status.get(i)["state"] for i in ids))


BULK_JOBS = 1000


@pytest.mark.slow
def test_soak_bulk_sends_through_a_redis_restart(smtp_server, private_redis, tmp_path):
    """1,000 jobs in bulk messages, Redis killed (kill -9) for 2 s mid-drain and
    restarted on its AOF: every job ends sent, and duplicates never exceed the jobs
    logged in doubt."""
    server = smtp_server(recorder=SlowRecorder(delay=0.005))
    config = _config(tmp_path, private_redis.url, "mw", server)
    ids = _enqueue(private_redis.url, "mw", BULK_JOBS, bulk=True)
    worker = WorkerProcess(config, tmp_path / "w.log", "-p", "2", "-t", "4")
    recorder = server.recorder
    try:
        wait_for(lambda: len(recorder.messages) >= BULK_JOBS // 4, timeout=60)
        started = time.monotonic()
        private_redis.kill()
        time.sleep(2)
        private_redis.start()
        wait_for(lambda: len(set(recorder.ids())) >= BULK_JOBS, timeout=120)
        status = StatusStore(private_redis.client(), namespace="mw", ttl=60)
        wait_for(lambda: _states(status, ids).get("sent") == BULK_JOBS, timeout=60)
        drained = time.monotonic() - started
    finally:
        assert worker.stop() == 0
    received = collections.Counter(recorder.ids())
    duplicates = sum(n - 1 for n in received.values())
    in_doubt = len(worker.events("delivery_in_doubt"))
    print(
        f"\nbulk soak through a Redis restart: {BULK_JOBS} jobs, duplicates "
        f"{duplicates}, in doubt {in_doubt}, drained {drained:.1f} s after the kill"
    )
    assert len(received) == BULK_JOBS
    assert duplicates <= in_doubt
