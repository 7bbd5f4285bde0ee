"""What ``[broker] wait_replicas = 1`` costs: ``.venv/bin/python -m bench.replicas``.

Starts its own primary and one replica (``redis-server`` on free loopback ports, no
persistence), an SMTP sink (Postfix's ``smtp-sink`` when installed, else ``bench.sink``)
and, per run, one ``mailworker worker -p P -t T``. Runs alternate between
``wait_replicas = 0`` and ``1`` (the order flips each round, so drift hits both alike).
Each run:

- enqueues ``--n`` single jobs (pipelined), then starts the worker and times the drain,
  from its first message at the sink to the last: the single-job delivery rate (every
  job: a fetch, a begin, an SMTP send, an acknowledgement with its status write, each
  waiting for the replica in mode 1).

Each round also times single enqueues, one ``Producer.enqueue`` call each (the
producer's ``WAIT`` in the same round trip in mode 1), in blocks of 100 that alternate
between the modes (``--enqueue-blocks`` of each), so both see the same load.

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


def _synced(port: int) -> None:
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 30
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync within 30 s")
            time.sleep(0.1)
    finally:
        client.close()


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
    producer.enqueue_many(
        (
            Notification(to=[f"user{i}@example.org"], subject="Task due", text="Hi.")
            for i in range(n)
        ),
        bulk=False,
    )
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
    }
    if ok and first is not None and last is not None and last > first:
        row["drain_per_s"] = round((n - 1) / (last - first), 1)
    return row


def enqueue_rates(url: str, blocks: int) -> dict[str, Any]:
    """Single enqueues per second for each mode, in alternating blocks of 100."""
    from producers import Notification, Producer

    namespace = f"bench-rep-{uuid.uuid4().hex[:8]}"
    producers = {
        wait: Producer.from_url(
            url, namespace=namespace, wait_replicas=wait, wait_timeout=1.0
        )
        for wait in (0, 1)
    }
    spent = {0: 0.0, 1: 0.0}
    job = Notification(to=["user@example.org"], subject="Task due", text="Hi.")
    for block in range(blocks):
        for wait in (0, 1) if block % 2 == 0 else (1, 0):
            started = time.perf_counter()
            for _ in range(100):
                producers[wait].enqueue(job)
            spent[wait] += time.perf_counter() - started
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(f"{namespace}:*", count=1000):
            client.delete(key)
    finally:
        client.close()
    rates = {w: round(blocks * 100 / spent[w], 1) for w in (0, 1)}
    return {"enqueue_per_s": rates, "ratio": round(rates[1] / rates[0], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas")
    parser.add_argument("--n", type=int, default=3000, help="jobs per run (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    parser.add_argument("--processes", "-p", type=int, default=1)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument("--run-timeout", type=float, default=180)
    parser.add_argument("--enqueue-blocks", type=int, default=20)
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
        _synced(replica_port)
        sink: Sink = (
            PostfixSink(workdir) if Path(SMTP_SINK).exists() else AioSink(workdir)
        )
        stack.callback(sink.stop)
        sink.start()
        url = f"redis://127.0.0.1:{primary_port}/0"
        enqueues = []
        for index in range(args.rounds):
            rates = enqueue_rates(url, args.enqueue_blocks)
            rates["round"] = index
            enqueues.append(rates)
            print(json.dumps(rates), file=sys.stderr, flush=True)
            for wait in (0, 1) if index % 2 == 0 else (1, 0):
                row = one_run(workdir, url, sink, wait, args.n, args)
                row["round"] = index
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"runs": rows, "enqueues": enqueues, "sink": sink.kind}
    medians = {}
    for wait in (0, 1):
        values = [
            r["drain_per_s"]
            for r in rows
            if r["wait_replicas"] == wait and "drain_per_s" in r
        ]
        medians[wait] = statistics.median(values) if values else None
    summary["drain_per_s"] = medians
    ratios = [
        b["drain_per_s"] / a["drain_per_s"]
        for a, b in zip(rows[0::2], rows[1::2], strict=False)
        if "drain_per_s" in a and "drain_per_s" in b
    ]
    # each round's pair, as mode 1 / mode 0 (the order flips each round)
    ratios = [
        r if rows[2 * i]["wait_replicas"] == 0 else 1 / r for i, r in enumerate(ratios)
    ]
    summary["drain_ratio_per_round"] = [round(r, 3) for r in ratios]
    summary["drain_ratio_median"] = (
        round(statistics.median(ratios), 3) if ratios else None
    )
    summary["enqueue_ratio_median"] = round(
        statistics.median(e["ratio"] for e in enqueues), 3
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"drain (single jobs/s): wait_replicas=0 {medians[0]}, 1 {medians[1]}; "
            f"ratio per round {summary['drain_ratio_per_round']}, median "
            f"{summary['drain_ratio_median']}"
        )
        print(
            "single enqueues/s per round: "
            + ", ".join(f"{e['enqueue_per_s']}" for e in enqueues)
            + f"; ratio median {summary['enqueue_ratio_median']}"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
