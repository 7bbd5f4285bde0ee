"""What ``[broker] wait_replicas = 1`` costs: ``.venv/bin/python -m bench.replicas``.

Starts its own primary and one replica (``redis-server`` on free loopback ports, no
persistence), an SMTP sink (Postfix's ``smtp-sink`` when installed, else ``bench.sink``)
and, per run, one ``mailworker worker -p P -t T``. Runs alternate between
``wait_replicas = 0`` and ``1`` (the order flips each round, so drift hits both alike).
Each run:

- enqueues ``--n`` single jobs with one ``Producer.enqueue`` call each (the producer
  waits for the replica as the workers do): the enqueue rate;
- then starts the worker and times the drain, from its first message at the sink to
  the last: the single-job delivery rate (every job: a fetch, a begin, an SMTP send,
  an acknowledgement with its status write, each waiting for the replica in mode 1).

Reported: every run's figures and, per mode, the median; the ratio mode 1 / mode 0.
Every wait is bounded; everything started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.infra import SMTP_SINK, AioSink, PostfixSink, Sink, spawn, stop_tree
from common.sockets import free_port

MAILWORKER = str(Path(sys.executable).parent / "mailworker")


def _redis(workdir: Path, port: int, *extra: str) -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.replicas: redis-server is not installed")
    process = spawn(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir),
         "--logfile", str(workdir / f"redis-{port}.log"), *extra]
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis(port=port, socket_connect_timeout=0.5)
            try:
                if client.ping():
                    return process
            finally:
                client.close()
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start")


def _config(workdir: Path, url: str, namespace: str, sink: Sink, wait: int) -> Path:
    path = workdir / f"{namespace}.toml"
    path.write_text(
        f'broker_url = "{url}"\nnamespace = "{namespace}"\n'
        f'[broker]\nwait_replicas = {wait}\nwait_timeout = "1s"\n'
        '[[smtp]]\nname = "sink"\nfrom_address = "noreply@example.com"\n'
        f'server = "127.0.0.1"\nport = {sink.port}\nsecurity = "none"\n'
        'timeout = "10s"\n'
    )
    return path


def one_run(
    workdir: Path, url: str, sink: Sink, wait: int, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    from producers import Notification, Producer

    namespace = f"bench-rep-{uuid.uuid4().hex[:8]}"
    config = _config(workdir, url, namespace, sink, wait)
    producer = Producer.from_url(
        url, namespace=namespace, wait_replicas=wait, wait_timeout=1.0
    )
    started = time.perf_counter()
    for i in range(n):
        producer.enqueue(
            Notification(to=[f"user{i}@example.org"], subject="Task due", text="Hi.")
        )
    enqueue_s = time.perf_counter() - started
    before = sink.arrivals.count
    log = (workdir / f"{namespace}.log").open("ab")
    worker = spawn(
        [MAILWORKER, "worker", "-p", str(args.processes), "-t", str(args.threads)],
        env={**os.environ, "MAILWORKER_CONFIG": str(config)},
        stdout=log,
        stderr=log,
    )
    try:
        ok = sink.arrivals.wait_for(before + n, timeout=args.run_timeout)
        first = sink.arrivals.time_of(before + 1)
        last = sink.arrivals.time_of(before + n)
    finally:
        stop_tree(worker, timeout=20)
        log.close()
    row: dict[str, Any] = {
        "wait_replicas": wait,
        "n": n,
        "ok": ok,
        "enqueue_per_s": round(n / enqueue_s, 1),
    }
    if ok and first is not None and last is not None and last > first:
        row["drain_per_s"] = round((n - 1) / (last - first), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas")
    parser.add_argument("--n", type=int, default=3000, help="jobs per run (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    parser.add_argument("--processes", "-p", type=int, default=1)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument("--run-timeout", type=float, default=180)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    primary_port, replica_port = free_port(), free_port()
    stack = contextlib.ExitStack()
    rows: list[dict[str, Any]] = []
    with stack:
        primary = _redis(workdir, primary_port)
        stack.callback(stop_tree, primary, 5)
        replica = _redis(
            workdir, replica_port, "--replicaof", "127.0.0.1", str(primary_port)
        )
        stack.callback(stop_tree, replica, 5)
        sink: Sink = (
            PostfixSink(workdir) if Path(SMTP_SINK).exists() else AioSink(workdir)
        )
        stack.callback(sink.stop)
        sink.start()
        url = f"redis://127.0.0.1:{primary_port}/0"
        for index in range(args.rounds):
            for wait in (0, 1) if index % 2 == 0 else (1, 0):
                row = one_run(workdir, url, sink, wait, args.n, args)
                row["round"] = index
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"runs": rows, "sink": sink.kind}
    for key in ("enqueue_per_s", "drain_per_s"):
        medians = {}
        for wait in (0, 1):
            values = [r[key] for r in rows if r["wait_replicas"] == wait and key in r]
            medians[wait] = statistics.median(values) if values else None
        summary[key] = medians
        if medians[0] and medians[1]:
            summary[f"{key}_ratio"] = round(medians[1] / medians[0], 3)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key in ("enqueue_per_s", "drain_per_s"):
            m = summary[key]
            print(
                f"{key}: wait_replicas=0 {m[0]}, wait_replicas=1 {m[1]}, "
                f"ratio {summary.get(key + '_ratio')}"
            )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
