"""Redis memory per job: ``.venv/bin/python -m bench.redis_memory [--jobs 10000]``.

Starts its own ``redis-server`` (nothing else uses it, so ``INFO memory`` deltas are ours)
and an SMTP sink on loopback; for single jobs, bulk jobs and single jobs with an
idempotency key, enqueues ``--jobs`` small notifications, reads Redis' memory, runs
``mailworker worker -p 2 -t 8`` until every job is sent and acknowledged, and reads it
again. What stays is what every job keeps for ``status.ttl`` (the idempotency claim for
``status.idempotency_ttl``). Prints one line per case and ``MEMORY USAGE`` of each key
of one sent job (docs/operations.md quotes the output). Bounded: 10 minutes in all.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/redis_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.infra import AioSink, RedisInstance, spawn, stop_tree
from common.keys import accepted_key, history_key, idempotency_key, status_key
from producers import Notification, Producer
from worker.cli.stats import queue_stats

NAMESPACE = "mwmem"
MAILWORKER = str(Path(sys.executable).parent / "mailworker")
DEADLINE = 600.0  # seconds, for the whole run


def _used(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _settle(client: Any) -> int:
    """used_memory once the wake-up gates (5 ms keys) and lazy frees are gone."""
    time.sleep(0.5)
    return _used(client)


def _notifications(count: int, *, idempotent: bool) -> list[Notification]:
    return [
        Notification(
            to=[f"user{i}@example.org"],
            subject=f"Task {i} is waiting for your approval",
            text=f"Please approve task {i}.",
            metadata={"workflow": "wf-7", "task": i},
            idempotency_key=f"wf-7/task-{i}/assigned" if idempotent else None,
        )
        for i in range(count)
    ]


def _drain(client: Any, config: Path, deadline: float, workdir: Path) -> None:
    """Run a worker until nothing is ready or in flight, then stop it (SIGTERM)."""
    log = (workdir / "worker.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    worker = spawn(
        [MAILWORKER, "worker", "-p", "2", "-t", "8"],
        env={**env, "MAILWORKER_CONFIG": str(config)},
        stdout=log,
        stderr=log,
    )
    try:
        while time.monotonic() < deadline:
            stats = queue_stats(client, NAMESPACE)["queues"].values()
            if all(row["ready"] == 0 and row["in_flight"] == 0 for row in stats):
                return
            time.sleep(0.5)
        raise RuntimeError("the worker did not drain the queue in time")
    finally:
        stop_tree(worker, timeout=30)


def _case(
    name: str, client: Any, config: Path, jobs: int, workdir: Path, deadline: float
) -> tuple[str, list[str]]:
    client.flushall()
    producer = Producer(client, namespace=NAMESPACE)
    before, keys_before = _settle(client), client.dbsize()
    notifications = _notifications(jobs, idempotent=name == "single + idempotency key")
    ids = producer.enqueue_many(notifications, bulk=name == "bulk")
    queued = _settle(client)
    _drain(client, config, deadline, workdir)
    sent = _settle(client)
    states = {client.hget(status_key(NAMESPACE, i), "state") for i in ids[:100]}
    assert states == {b"sent"}, states
    per_key = client.dbsize() - keys_before
    line = (
        f"{name:<26} queued {(queued - before) / jobs:7.0f} B/job   "
        f"kept after sending {(sent - before) / jobs:6.0f} B/job   "
        f"{per_key / jobs:.2f} keys/job"
    )
    return line, ids


def main(argv: list[str] | None = None) -> int:
    """Run the three cases and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + DEADLINE
    with tempfile.TemporaryDirectory(prefix="mailworker-redis-memory-") as tmp:
        workdir = Path(tmp)
        redis_server, sink = RedisInstance("own", workdir), AioSink(workdir)
        redis_server.start()
        sink.start()
        try:
            client = redis_server.client()
            config = workdir / "mailworker.toml"
            config.write_text(
                f'broker_url = "{redis_server.url}"\nnamespace = "{NAMESPACE}"\n'
                '[[smtp]]\nname = "sink"\nfrom_address = "noreply@example.com"\n'
                f'server = "127.0.0.1"\nport = {sink.port}\nsecurity = "none"\n'
            )
            print(f"redis {redis_server.version}, {args.jobs} jobs a case")
            for name in ("single", "bulk", "single + idempotency key"):
                line, ids = _case(name, client, config, args.jobs, workdir, deadline)
                print(line, flush=True)
            job = ids[0]
            for key in (
                status_key(NAMESPACE, job),
                history_key(NAMESPACE, job),
                accepted_key(NAMESPACE, job),
                idempotency_key(NAMESPACE, "wf-7/task-0/assigned"),
            ):
                usage = client.memory_usage(key, samples=0)
                print(f"MEMORY USAGE {key.replace(job, '<id>')}: {usage} B")
        finally:
            sink.stop()
            redis_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
