"""Scheduled sends: ``.venv/bin/python -m bench.scheduled release|spread``.

``release``: ``--jobs`` (10,000) jobs that fall due in the same second are enqueued
with ``send_at`` (no worker runs); once the second has passed, ``Schedule.release_due``
(what every worker's releaser calls) moves them onto their queue, timed. Each round
has a namespace of its own; with ``--racers N`` N threads release at once (each its
own connection) and the wall time until the set is empty is the figure.

``spread``: ``--jobs`` (100,000) jobs due over ``--seconds`` (200) at an even rate,
enqueued ahead of their time while a ``mailworker worker -p P -t T`` runs, into the
aiosmtpd sink (``bench.sink``), which times each message and names its job. Reported:
each job's lateness (accepted by the sink minus its ``send_at``), and the worker processes'
RSS sampled every second. Everything started is stopped; every wait is bounded.

Redis is a private ``redis-server`` on a free loopback port when one is installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):  # `python bench/scheduled.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import FROM_ADDRESS, HTML, SUBJECT, TEXT, TO_ADDRESS, delete_prefix
from bench.infra import AioSink, RedisInstance, spawn, stop_tree
from producers import Notification, Producer
from settings import Limits

_CHUNK = 2_000


def _job(send_at: datetime, index: int) -> Notification:
    return Notification(
        to=[TO_ADDRESS],
        subject=f"{SUBJECT} #{index}",
        text=TEXT,
        html=HTML,
        send_at=send_at,
    )


def _release_round(url: str, jobs: int, racers: int) -> tuple[float, float, int]:
    """One round: (seconds to enqueue, seconds to release, how many were released)."""
    from worker.broker.schedule import Schedule

    client = redis.Redis.from_url(url)
    ns = f"bench-sched-{uuid.uuid4().hex[:8]}"
    producer = Producer(client, namespace=ns)
    # Enough time to enqueue them all on a busy machine.
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)
    started = time.monotonic()
    made = 0
    while made < jobs:
        count = min(_CHUNK, jobs - made)
        spread = [
            due + timedelta(microseconds=(made + i) * 997 % 1_000_000)
            for i in range(count)
        ]
        producer.enqueue_many(_job(at, made + i) for i, at in enumerate(spread))
        made += count
        if datetime.now(UTC) >= due:
            raise SystemExit("enqueueing took past the due second: use fewer --jobs")
    enqueued = time.monotonic() - started
    time.sleep(
        max(0.0, (due + timedelta(seconds=1) - datetime.now(UTC)).total_seconds())
    )
    schedules = [Schedule(redis.Redis.from_url(url), ns) for _ in range(racers)]
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda s=s: counts.append(s.release_due()))
        for s in schedules
    ]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    took = time.perf_counter() - began
    left = client.zcard(f"{ns}:scheduled")
    queued = client.llen(f"{ns}:mail")
    delete_prefix(client, ns)
    if left or queued != jobs or sum(counts) != jobs:
        raise SystemExit(f"release lost or duplicated: {left=} {queued=} {counts=}")
    return enqueued, took, sum(counts)


def _dramatiq_round(url: str, jobs: int) -> tuple[float, int]:
    """Dramatiq's own delayed messages: (seconds from due until its delay queue is
    empty, the most messages one worker held in memory meanwhile).

    A plain ``RedisBroker`` and ``Worker`` (8 threads, Dramatiq's default delayed
    prefetch) with a no-op actor; the messages are enqueued while it runs.
    """
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    ns = f"bench-dq-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    broker = RedisBroker(url=url, namespace=ns)
    done = threading.Semaphore(0)

    def noop() -> None:
        done.release()

    actor = dramatiq.actor(broker=broker, actor_name="noop", queue_name="mail")(noop)
    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()
    try:
        due_ms = int((time.time() + 6) * 1000) // 1000 * 1000
        for i in range(jobs):
            delay = due_ms - int(time.time() * 1000) + i * 997 % 1000
            actor.send_with_options(delay=max(1, delay))
        held = 0
        while time.time() < due_ms / 1000 + 1:
            held = max(
                held, sum(len(c.delay_queue.queue) for c in worker.consumers.values())
            )
            time.sleep(0.05)
        began = time.perf_counter()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            held = max(
                held, sum(len(c.delay_queue.queue) for c in worker.consumers.values())
            )
            if client.hlen(f"{ns}:mail.DQ.msgs") == 0:
                break
            time.sleep(0.005)
        took = time.perf_counter() - began
    finally:
        worker.stop(timeout=10_000)
        broker.close()
        delete_prefix(client, ns)
    return took, held


def release(args: argparse.Namespace, url: str) -> None:
    figures, baseline = [], []
    for round_ in range(1, args.rounds + 1):
        enqueued, took, count = _release_round(url, args.jobs, args.racers)
        figures.append(took)
        print(
            f"round {round_}: {count} due in one second released in {took * 1000:.0f} ms "
            f"by {args.racers} releaser(s) ({count / took:,.0f}/s); enqueue took "
            f"{enqueued:.1f} s",
            flush=True,
        )
        if args.baseline:
            took, held = _dramatiq_round(url, args.jobs)
            baseline.append(took)
            print(
                f"round {round_}: Dramatiq's delayed messages: {args.jobs} due in one "
                f"second off its delay queue in {took * 1000:.0f} ms; its worker held "
                f"up to {held} in memory",
                flush=True,
            )
    print(
        f"release of {args.jobs}: median {statistics.median(figures) * 1000:.0f} ms, "
        f"max {max(figures) * 1000:.0f} ms over {len(figures)} rounds"
    )
    if baseline:
        print(
            f"Dramatiq's delay queue: median {statistics.median(baseline) * 1000:.0f} "
            f"ms, max {max(baseline) * 1000:.0f} ms"
        )


def _worker_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            if "worker" in " ".join(proc.cmdline()):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def spread(args: argparse.Namespace, url: str, workdir: Path) -> None:
    sink = AioSink(workdir)
    sink.start()
    ns = f"bench-spread-{uuid.uuid4().hex[:8]}"
    config = workdir / "mailworker.toml"
    config.write_text(
        f'broker_url = "{url}"\nnamespace = "{ns}"\nlog_format = "json"\n'
        "[[smtp]]\n"
        f'name = "sink"\nfrom_address = "{FROM_ADDRESS}"\nserver = "127.0.0.1"\n'
        f'port = {sink.port}\nsecurity = "none"\nauth = "none"\n'
    )
    log = (workdir / "worker.log").open("ab")
    worker = spawn(
        [
            str(Path(sys.executable).parent / "mailworker"),
            "worker",
            "-p",
            str(args.processes),
            "-t",
            str(args.threads),
        ],
        env={"MAILWORKER_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        stdout=log,
        stderr=log,
    )
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    root = psutil.Process(worker.pid)

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.time(), _worker_rss(root)))

    try:
        time.sleep(5)  # the worker boots
        before = _worker_rss(root)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        client = redis.Redis.from_url(url)
        producer = Producer(
            client, namespace=ns, limits=Limits(max_schedule_ahead=7 * 86400)
        )
        start = datetime.now(UTC) + timedelta(seconds=args.lead)
        step = args.seconds / args.jobs
        due: dict[str, float] = {}
        began = time.monotonic()
        for first in range(0, args.jobs, _CHUNK):
            times = [
                start + timedelta(seconds=(first + i) * step)
                for i in range(min(_CHUNK, args.jobs - first))
            ]
            ids = producer.enqueue_many(
                _job(at, first + i) for i, at in enumerate(times)
            )
            due.update(zip(ids, (t.timestamp() for t in times), strict=True))
        enqueued = time.monotonic() - began
        print(f"enqueued {len(due):,} scheduled jobs in {enqueued:.1f} s", flush=True)
        full = _worker_rss(root)
        memory = client.info("memory")["used_memory"]
        print(
            f"redis used_memory with all enqueued: {memory / 2**20:.0f} MiB", flush=True
        )
        deadline = time.monotonic() + args.lead + args.seconds + 60
        while sink.arrivals.count < args.jobs and time.monotonic() < deadline:
            sink.arrivals.wait_for(args.jobs, 5)
        stop.set()
        late = sorted(when - due[ref] for when, ref in sink.arrivals.refs if ref in due)
        seen = {ref for _, ref in sink.arrivals.refs}
        print(
            f"sent {len(late):,} of {args.jobs:,} ({len(sink.arrivals.refs) - len(seen)} "
            f"duplicates); lateness p50 {_q(late, 0.5)} ms, p99 {_q(late, 0.99)} ms, "
            f"max {late[-1] * 1000:.0f} ms, early {sum(1 for x in late if x < 0)}, "
            f"over 1 s {sum(1 for x in late if x > 1)}"
        )
        rss = [r for _, r in samples]
        print(
            f"worker RSS (all processes): {before / 2**20:.1f} MiB before, "
            f"{full / 2**20:.1f} MiB with all enqueued, min {min(rss) / 2**20:.1f}, "
            f"max {max(rss) / 2**20:.1f}, last {rss[-1] / 2**20:.1f} MiB over "
            f"{len(rss)} samples"
        )
        delete_prefix(client, ns)
    finally:
        stop.set()
        stop_tree(worker, timeout=30)
        sink.stop()


def _q(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("phase", choices=["release", "spread"])
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--racers", type=int, default=1)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="release: alternate rounds with Dramatiq's own delayed messages",
    )
    parser.add_argument("--seconds", type=float, default=200.0)
    parser.add_argument("--lead", type=float, default=15.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--redis", choices=["own", "shared", "auto"], default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        workdir = Path(tmp)
        instance = RedisInstance(args.redis, workdir)
        instance.start()
        try:
            print(f"redis {instance.version} ({'own' if instance.own else 'shared'})")
            if args.phase == "release":
                args.jobs = args.jobs or 10_000
                release(args, instance.url)
            else:
                args.jobs = args.jobs or 100_000
                spread(args, instance.url, workdir)
        finally:
            instance.stop()


if __name__ == "__main__":
    main()
