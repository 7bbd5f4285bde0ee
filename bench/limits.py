"""What a send limit costs: ``.venv/bin/python -m bench.limits``.

Against a Redis of its own (or the one on 127.0.0.1:6379 under its own key prefixes), an
in-process worker (4 threads) delivers ``--jobs`` single jobs, then ``--jobs`` jobs in
bulk messages, to an aiosmtpd sink in a process of its own, once through an ``[[smtp]]``
connection without budgets and once through one with all three budgets set so high
that they never refuse (every message pays the check: one script, three sorted sets).
The two alternate, ``--rounds`` times each, each round in a fresh namespace. Then
``--jobs`` dead-letter writes (the status script, one call each) into an index of
``--dead-letters`` entries, under no cap and under a cap it has reached (each write trims
one). Prints each round's figures and the medians' ratios; writes JSON into
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from bench.infra import RedisInstance, spawn, stop_tree
from common.sockets import free_port

RESULTS = Path(__file__).resolve().parent / "results"
NEVER = 10**9  # a budget this large never refuses: only its cost is measured
BUDGETS = {
    "all": ("messages_per_minute", "messages_per_hour", "recipients_per_day"),
    "hour": ("messages_per_hour",),
}


def _round(url: str, port: int, workdir: Path, jobs: int, *, limited: str, bulk: bool
           ) -> dict[str, float]:  # fmt: skip
    from dramatiq import Worker

    from producers import Notification, Producer
    from settings import load_settings
    from worker.app import build

    namespace = f"blim-{uuid.uuid4().hex[:8]}"
    config = workdir / f"{namespace}.toml"
    config.write_text(
        f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
        '[status]\nttl = "1h"\n'
        '[[smtp]]\nname = "sink"\nfrom_address = "noreply@bench.test"\n'
        f'server = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
        + "".join(f"{name} = {NEVER}\n" for name in BUDGETS.get(limited, ()))
    )
    settings = load_settings(config, environ={})
    app = build(settings)
    notes = (
        Notification(to=["ann@example.org"], subject="Invoice 42", text="Ready.\n" * 20)
        for _ in range(jobs)
    )
    Producer.from_settings(settings).enqueue_many(notes, bulk=bulk)
    app.broker.emit_after("process_boot")
    queue = "mail-bulk" if bulk else "mail"
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    worker = Worker(app.broker, worker_threads=4, worker_timeout=50)
    worker.start()
    app.broker.join(queue, timeout=600_000)
    worker.join()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    worker.stop()
    app.close()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "wall_s": round(wall, 3),
        "msg_per_s": round(jobs / wall, 1),
        "cpu_ms_per_msg": round(cpu * 1000 / jobs, 3),
    }


def _dead_writes(url: str, writes: int, *, full: int, cap: int) -> dict[str, float]:
    """``writes`` dead letters written as the worker writes them, one script each, into
    an index already holding ``full`` entries, under ``cap`` (0: none)."""
    import redis

    from worker.status import StatusStore

    client = redis.Redis.from_url(url)
    namespace = f"blim-{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)  # recent: the write's own TTL sweep keeps them
    for start in range(0, full, 10_000):
        client.zadd(
            f"{namespace}:dead",
            {
                f"old-{n}": now_ms - full + n
                for n in range(start, min(full, start + 10_000))
            },
        )
    status = StatusStore(client, namespace=namespace, ttl=3600, max_dead_letters=cap)
    t0 = time.perf_counter()
    for n in range(writes):
        status.write(
            f"job-{n}",
            {"id": f"job-{n}", "state": "dead", "reason": "permanent"},
            event={"event": "dead", "reason": "permanent"},
            dead_payload=b'{"queue_name": "mail"}',
        )
    wall = time.perf_counter() - t0
    kept = int(client.zcard(f"{namespace}:dead"))
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.unlink(key)
    return {"us_per_write": round(wall * 1e6 / writes, 1), "kept": kept}


def _ratio(rounds: dict[str, list[dict[str, float]]], key: str) -> float:
    limited = statistics.median(r[key] for r in rounds["limited"])
    plain = statistics.median(r[key] for r in rounds["none"])
    return round(limited / plain, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limits", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=2000, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="per contender")
    parser.add_argument("--redis", choices=("auto", "own", "shared"), default="auto")
    parser.add_argument(
        "--dead-letters", type=int, default=100_000, help="in the index beforehand"
    )
    parser.add_argument(
        "--budgets", choices=tuple(BUDGETS), default="all", help="set when limited"
    )
    parser.add_argument("--modes", default="single,bulk,dead", help="what to measure")
    args = parser.parse_args(argv)
    # One line per delivery would cost both contenders alike and blur the difference.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-limits-"))
    redis_server = RedisInstance(args.redis, workdir)
    redis_server.start()
    port = free_port()
    sink = spawn([sys.executable, "-m", "bench.sink", "--port", str(port)])
    results: dict[str, Any] = {
        "jobs": args.jobs,
        "rounds": args.rounds,
        "budgets": BUDGETS[args.budgets],
    }
    try:
        time.sleep(1.0)
        modes = args.modes.split(",")
        for mode in [m for m in ("single", "bulk") if m in modes]:
            rounds: dict[str, list[dict[str, float]]] = {"none": [], "limited": []}
            for n in range(args.rounds):
                for name in ("none", "limited") if n % 2 == 0 else ("limited", "none"):
                    row = _round(
                        redis_server.url, port, workdir, args.jobs,
                        limited=args.budgets if name == "limited" else "",
                        bulk=mode == "bulk",
                    )  # fmt: skip
                    rounds[name].append(row)
                    print(f"{mode:<6} round {n + 1} {name:<8} {row}", flush=True)
            results[mode] = {
                **rounds,
                "msg_per_s_ratio": _ratio(rounds, "msg_per_s"),
                "cpu_per_msg_ratio": _ratio(rounds, "cpu_ms_per_msg"),
            }
            print(
                f"{mode}: limited/none msg/s {results[mode]['msg_per_s_ratio']}, "
                f"CPU per message {results[mode]['cpu_per_msg_ratio']}",
                flush=True,
            )
        rows: dict[str, list[dict[str, float]]] = {"no cap": [], "cap reached": []}
        for n in range(args.rounds if "dead" in modes else 0):
            for name in ("no cap", "cap reached")[:: 1 if n % 2 == 0 else -1]:
                cap = args.dead_letters if name == "cap reached" else 0
                row = _dead_writes(
                    redis_server.url, args.jobs, full=args.dead_letters, cap=cap
                )
                rows[name].append(row)
                print(f"dead   round {n + 1} {name:<11} {row}", flush=True)
        if rows["no cap"]:
            results["dead_writes"] = {
                **rows,
                "us_per_write_ratio": round(
                    statistics.median(r["us_per_write"] for r in rows["cap reached"])
                    / statistics.median(r["us_per_write"] for r in rows["no cap"]),
                    3,
                ),
            }
            print(f"dead writes: {results['dead_writes']['us_per_write_ratio']}")
    finally:
        stop_tree(sink)
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"limits-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
