"""Signals as supervisors send them: SIGTERM to every process of the worker's group
(systemd's default `KillMode=control-group`, foreman and honcho, `kill -TERM -PGID`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import subprocess

import pytest

from producers import Notification, Producer
from tests.support.config import write_toml
from tests.support.helpers import wait_for
from tests.support.processes import WorkerProcess
from tests.support.smtp import Recorder
from worker.status import StatusStore

MESSAGE_ID = re.compile(rb"Message-ID: <([^@>]+)@")
JOBS = 60


class SlowData(Recorder):
    """A recorder that answers each DATA after ``delay`` seconds, counting those in DATA."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.in_data = 0

    async def handle_DATA(self, server, session, envelope):
        self.in_data += 1
        try:
            await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.in_data -= 1

    def ids(self) -> list[str]:
        return [
            m.group(1).decode()
            for r in self.messages
            if (m := MESSAGE_ID.search(r.data))
        ]


def _stopped(worker: WorkerProcess, timeout: float = 60) -> int:
    """The exit code of a worker that was signalled; kill -9 it if it does not end."""
    try:
        worker.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise
    return worker.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bulk", "signals"),
    [(False, 1), (False, 2), (True, 1)],
    ids=["single-once", "single-repeated", "bulk-once"],
)
def test_sigterm_to_the_whole_group_drains_like_sigterm_to_the_main_process(
    bulk, signals, smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """SIGTERM to every process of the group (each worker process gets it twice: the
    group's and the main process's forward; `-repeated` sends it to the group once more):
    in-flight jobs finish, exit 0, every job sent once or back to `queued`, none left
    `sending`; a second worker then delivers the rest, each exactly once."""
    # Given a slow server and 60 jobs being worked by two worker processes
    server = smtp_server(recorder=SlowData(delay=0.3))
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section(timeout="10s")],
        },
    )
    producer = Producer(redis_client, namespace=namespace)
    ids = producer.enqueue_many(
        (
            Notification(to=[f"user{i}@example.org"], subject="Task due", text="Act.")
            for i in range(JOBS)
        ),
        bulk=bulk,
    )
    first = WorkerProcess(
        config, tmp_path / "first.log", "-p", "2", "-t", "2", "--shutdown-timeout", "20"
    )
    try:
        wait_for(
            lambda: server.recorder.in_data >= 2 and server.recorder.messages,
            timeout=60,
        )
        # When SIGTERM goes to the whole group while messages are in DATA
        first.signal_group(signal.SIGTERM)
        if signals > 1:
            wait_for(lambda: len(first.events("Stopping worker process...")) >= 2)
            with contextlib.suppress(ProcessLookupError):  # all gone already
                first.signal_group(signal.SIGTERM)
        code = _stopped(first)
    finally:
        if first.alive():
            first.kill()
    # Then it exits 0, and each job is either sent once or queued again, none `sending`
    assert code == 0, first.log.read_text()[-3000:]
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    states = {i: status.get(i)["state"] for i in ids}
    received = collections.Counter(server.recorder.ids())
    assert all(n == 1 for n in received.values()), received
    assert collections.Counter(states.values()).keys() <= {"sent", "queued"}, states
    assert {i for i, s in states.items() if s == "sent"} == set(received)
    assert 0 < len(received) < JOBS
    # And a second worker delivers the rest, every job exactly once
    second = WorkerProcess(config, tmp_path / "second.log", "-p", "1", "-t", "4")
    try:
        wait_for(lambda: len(server.recorder.messages) >= JOBS, timeout=90)
    finally:
        assert second.stop() == 0
    received = collections.Counter(server.recorder.ids())
    assert set(received) == set(ids) and all(n == 1 for n in received.values())
    assert all(status.get(i)["state"] == "sent" for i in ids)


@pytest.mark.slow
def test_ctrl_c_twice_at_a_terminal_still_stops_the_worker_at_once(
    smtp_server, redis_url, redis_client, namespace, tmp_path
):
    """SIGINT to the group twice (Ctrl-C twice at a terminal) ends the worker without
    waiting for the job in flight (exit 1); its job is not lost but stays `sending`
    until another worker takes it back after `redelivery_timeout`."""
    # Given a job whose DATA takes 60 s, and a shutdown timeout that would wait for it
    server = smtp_server(recorder=SlowData(delay=60))
    config = write_toml(
        tmp_path / "mailworker.toml",
        {
            "broker_url": redis_url,
            "namespace": namespace,
            "smtp": [server.smtp_section(timeout="90s")],
        },
    )
    [job] = Producer(redis_client, namespace=namespace).enqueue_many(
        [Notification(to=["ops@example.org"], subject="Task due", text="Act.")]
    )
    worker = WorkerProcess(
        config, tmp_path / "w.log", "-p", "1", "-t", "1", "--shutdown-timeout", "90"
    )
    try:
        wait_for(lambda: server.recorder.in_data, timeout=30)
        # When Ctrl-C is pressed once: the process begins to stop, and waits
        worker.signal_group(signal.SIGINT)
        wait_for(lambda: worker.events("Shutting down..."))
        assert worker.alive()
        # And once more
        worker.signal_group(signal.SIGINT)
        # Then it ends at once, well before the DATA is answered
        code = _stopped(worker, timeout=30)
    finally:
        if worker.alive():
            worker.kill()
    assert code == 1
    assert not server.recorder.messages
    status = StatusStore(redis_client, namespace=namespace, ttl=60)
    assert status.get(job)["state"] == "sending"
