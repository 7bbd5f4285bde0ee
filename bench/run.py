"""The mailworker benchmark, one command: ``.venv/bin/python -m bench.run``.

Starts its own Redis (or uses the one on 127.0.0.1:6379 under its own key prefixes), an
SMTP sink on loopback, and measures, with the same worker flags for every contender:

1. ceiling (no-op Dramatiq actor), 2. the bare peer, 3. the typical Dramatiq and Celery
peers, 4. mailworker single jobs, 5. mailworker bulk: N pre-enqueued notifications each,
msg/s (median of the runs), worker CPU per message, peak RSS per worker process;
6. latency at a steady rate (mailworker and the naive peer); 7. high-priority latency
while a bulk send drains. Prints the tables (``bench.report`` builds them) and writes
JSON (and the tables as Markdown) into bench/results/. Every run has a time bound;
everything started is stopped.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.infra import (
    PRODUCT,
    SMTP_SINK,
    AioSink,
    PostfixSink,
    RedisInstance,
    Sink,
    product_at,
    regular_packages,
)
from bench.report import report, summarize, targets
from bench.scenarios import (
    MAILWORKER,
    NAIVE,
    REPO,
    THROUGHPUT,
    Context,
    bulk_path_exists,
    latency_run,
    priority_run,
    product_poll_interval,
    throughput_run,
)

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("latency", "priority")
SCENARIOS = (*THROUGHPUT, *PHASES)


class Interrupted(BaseException):
    """A signal or the overall time bound: stop, clean up, report what was measured."""


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--n", type=int, help="notifications per throughput run (5000)")
    parser.add_argument("--runs", type=int, help="runs per throughput scenario (3)")
    parser.add_argument("--processes", "-p", type=int, default=2)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument(
        "--only", help=f"comma list of scenarios (default all): {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: N=500, 1 run, 5 s latency and priority phases, 3,000 bulk",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="hard bound on the whole benchmark (s)",
    )
    parser.add_argument(
        "--run-timeout", type=float, help="bound on one throughput run (s; 60 + N/25)"
    )
    parser.add_argument(
        "--redis",
        choices=("auto", "own", "shared"),
        default="auto",
        help="own redis-server (auto: when installed) or 127.0.0.1:6379",
    )
    parser.add_argument(
        "--sink",
        choices=("auto", "postfix", "aiosmtpd"),
        default="auto",
        help="throughput sink (auto: Postfix smtp-sink when installed)",
    )
    parser.add_argument("--latency-rate", type=float, default=200)
    parser.add_argument("--latency-seconds", type=float)
    parser.add_argument("--priority-bulk", type=int)
    parser.add_argument("--priority-rate", type=float, default=20)
    parser.add_argument("--priority-seconds", type=float)
    parser.add_argument(
        "--high-workers",
        type=int,
        default=0,
        metavar="P",
        help="priority phase: also run `mailworker worker -p P -t 2 -Q high` (0: none)",
    )
    parser.add_argument(
        "--poll-interval",
        type=int,
        metavar="MS",
        help="idle poll of every Dramatiq contender (default: mailworker's own default)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15,
        help="before each run, wait up to this long for other processes' load to pass",
    )
    parser.add_argument(
        "--product",
        metavar="REV",
        help="measure the product at git commit REV (default: the work tree at start)",
    )
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run the work tree's product code, not a copy taken at start",
    )
    parser.add_argument(
        "--webhook",
        metavar="URL",
        help="mailworker's workers also POST every event to this [[webhook]] URL "
        "(http allowed; see bench.webhook_receiver)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the temp dir with configs and worker logs",
    )
    args = parser.parse_args(argv)  # fmt: skip
    quick = args.quick
    args.n = args.n or (500 if quick else 5000)
    args.runs = args.runs or (1 if quick else 3)
    args.latency_seconds = args.latency_seconds or (5 if quick else 20)
    args.priority_seconds = args.priority_seconds or (5 if quick else 20)
    args.priority_bulk = args.priority_bulk or (3000 if quick else 20000)
    args.run_timeout = args.run_timeout or 60 + args.n / 25
    only = [
        s.strip() for s in (args.only or ",".join(SCENARIOS)).split(",") if s.strip()
    ]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        parser.error(
            f"--only: unknown {', '.join(unknown)} (known: {', '.join(SCENARIOS)})"
        )
    args.only = only
    if min(args.n, args.runs, args.processes, args.threads) < 1:
        parser.error("--n, --runs, --processes and --threads must be at least 1")
    return args


# ---------------------------------------------------------------- the machine


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    """nproc, CPU model, memory, OS, Python and the package versions that matter."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    versions = {}
    for name in ("mailworker", "dramatiq", "redis", "hiredis", "celery", "kombu",
                 "aiosmtpd", "psutil", "pydantic", "structlog", "orjson"):  # fmt: skip
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    postfix = (
        _run(["postconf", "-d", "-h", "mail_version"])
        if shutil.which("postconf")
        else ""
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "packages": versions,
        "postfix": postfix or None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------- main


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise Interrupted("the overall --timeout passed")


def _workers(args: argparse.Namespace, ctx: Context) -> dict[str, str]:
    shown = {name: c.config(ctx) for name, c in THROUGHPUT.items() if name in args.only}
    if "latency" in args.only:
        shown["naive"] = NAIVE.config(ctx)
    if {"latency", "priority"} & set(args.only):
        shown.setdefault("mailworker", MAILWORKER.config(ctx))
    return shown


def snapshot(workdir: Path, rev: str | None) -> tuple[str, dict[str, Any]]:
    """Copy the product's packages (the work tree as it is now, or commit ``rev``) and
    run that copy, harness and mailworker workers alike, so edits made during a long run
    cannot mix versions."""
    target = workdir / "product"
    git = ["git", "-C", str(REPO)]
    if rev:
        target.mkdir()
        archive = subprocess.run(
            [*git, "archive", "--format=tar", rev, "--", *product_at(rev)],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(target, filter="data")
        regular_packages(target)
        state = {"head": _run([*git, "rev-parse", "--short", rev]), "uncommitted": []}
    else:
        for package in PRODUCT:
            shutil.copytree(REPO / package, target / package,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        state = {
            "head": _run([*git, "rev-parse", "--short", "HEAD"]) or None,
            "uncommitted": _run(
                [*git, "status", "--porcelain", "--", *PRODUCT]
            ).splitlines(),
        }
    sys.path.insert(0, str(target))
    return str(target), state


def precompile(product: list[Path]) -> None:
    """Byte-compile the product and the peers before any worker starts, as installing a
    package does. Every contender then starts from bytecode, even where the environment
    sets PYTHONDONTWRITEBYTECODE (which would leave each start compiling from source)."""
    for path in [*product, REPO / "bench"]:
        compileall.compile_dir(path, quiet=1, workers=1)


def run(args: argparse.Namespace, data: dict[str, Any], workdir: Path) -> None:
    """Everything between starting the servers and stopping them."""
    deadline = time.time() + args.timeout
    pythonpath = ""
    if not args.no_snapshot:
        pythonpath, data["product"] = snapshot(workdir, args.product)
    precompile([Path(pythonpath)] if pythonpath else [REPO / p for p in PRODUCT])
    data["bulk_path"] = bulk_path_exists()
    default_poll, poll_flag = product_poll_interval()
    poll_ms = args.poll_interval or default_poll
    data["poll_interval_ms"] = poll_ms
    stack = contextlib.ExitStack()
    with stack:
        server = RedisInstance(args.redis, workdir)
        stack.callback(server.stop)
        server.start()
        data["redis_mode"] = (
            "own redis-server, loopback, no persistence" if server.own
            else "shared 127.0.0.1:6379, own key prefixes"
        )  # fmt: skip
        data["redis_version"] = server.version
        tp_names = [n for n in THROUGHPUT if n in args.only]
        throughput_sink: Sink | None = None
        latency_sink: AioSink | None = None
        if tp_names or "priority" in args.only:  # priority: the bulk jobs' sink
            use_postfix = args.sink == "postfix" or (
                args.sink == "auto" and Path(SMTP_SINK).exists()
            )
            throughput_sink = PostfixSink(workdir) if use_postfix else AioSink(workdir)
            stack.callback(throughput_sink.stop)
            throughput_sink.start()
            data["sink"] = throughput_sink.kind
        if set(PHASES) & set(args.only):
            latency_sink = AioSink(workdir)
            stack.callback(latency_sink.stop)
            latency_sink.start()
            data["latency_sink"] = latency_sink.kind
        ctx = Context(server, throughput_sink, latency_sink, args.processes, args.threads,
                      workdir, pythonpath, args.quiet_wait, poll_ms, poll_flag)  # fmt: skip
        ctx.webhook_url = args.webhook or ""
        data["webhook"] = ctx.webhook_url or None
        data["workers"] = _workers(args, ctx)
        runs: list[dict[str, Any]] = data["runs"]
        for index in range(args.runs):
            # rotate the order each round, so drift hits every scenario alike
            shift = index % max(len(tp_names), 1)
            for name in tp_names[shift:] + tp_names[:shift]:
                left = deadline - time.time()
                if left < 15:
                    runs.append({"scenario": name, "run": index, "ok": False,
                                 "error": "skipped: the overall --timeout is near"})  # fmt: skip
                    continue
                row = throughput_run(ctx, THROUGHPUT[name], args.n,
                                     min(args.run_timeout, left - 10), index)  # fmt: skip
                runs.append(row)
                _progress(row)
        phases: dict[str, Any] = data["phases"]
        if "latency" in args.only:
            phases["latency"] = {}
            for who in ("naive", "mailworker"):
                bound = min(args.latency_seconds + 120, deadline - time.time() - 10)
                if bound < args.latency_seconds + 10:
                    phases["latency"][who] = _skipped("latency", who)
                    continue
                row = latency_run(
                    ctx, who, args.latency_rate, args.latency_seconds, bound
                )
                phases["latency"][who] = row
                _progress(row)
        if "priority" in args.only:
            bound = min(
                120 + args.priority_bulk / 100 + args.priority_seconds,
                deadline - time.time() - 10,
            )
            if bound < args.priority_seconds + 20:
                phases["priority"] = _skipped("priority", None)
                return
            row = priority_run(ctx, args.priority_bulk, args.priority_rate,
                               args.priority_seconds, bound,
                               high_workers=args.high_workers)  # fmt: skip
            phases["priority"] = row
            _progress(row)


def _skipped(scenario: str, who: str | None) -> dict[str, Any]:
    return {"scenario": scenario, "contender": who, "ok": False,
            "error": "skipped: the overall --timeout is near"}  # fmt: skip


def _progress(row: dict[str, Any]) -> None:
    name = row.get("contender") or row["scenario"]
    if not row["ok"]:
        print(f"  {name}: FAILED {row.get('error')}", file=sys.stderr, flush=True)
        for line in row.get("log_tail", [])[-5:]:
            print(f"    | {line[:200]}", file=sys.stderr)
        return
    if row["scenario"] in THROUGHPUT:
        print(
            f"  run {row['run']} {name}: {row['consume_msg_s']:,.0f} msg/s "
            f"(steady {row['steady_msg_s']:,.0f}), {row['cpu_us_per_msg']:,} µs CPU/msg, "
            f"{row['peak_rss_mb']} MB, other CPU {row['other_cpu_s']} s"
            + (f", sent records {row['sent_records']}" if "sent_records" in row else ""),
            file=sys.stderr, flush=True,
        )  # fmt: skip
    elif row["scenario"] == "latency":
        print(f"  latency {name}: p50 {row['p50_ms']} p95 {row['p95_ms']} p99 "
              f"{row['p99_ms']} ms, {row['arrived']}/{row['sent']} arrived",
              file=sys.stderr, flush=True)  # fmt: skip
    else:
        print(f"  priority: high p99 {row['high']['p99_ms']} ms "
              f"({row['high']['arrived']}/{row['high']['sent']}), "
              f"bulk {row['bulk_arrived']} at {row['bulk_msg_s']} msg/s",
              file=sys.stderr, flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data: dict[str, Any] = {
        "started": started,
        "command": " ".join(
            [Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]
        ),
        "config": {k: v for k, v in vars(args).items() if k != "keep_logs"},
        "machine": machine(),
        "runs": [],
        "phases": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="mailworker-bench-"))
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGALRM, _on_alarm)
    # a backstop over the deadlines the phases keep themselves
    signal.setitimer(signal.ITIMER_REAL, args.timeout + 30)
    print(f"bench: {', '.join(args.only)}; N={args.n}, runs={args.runs}, "
          f"-p {args.processes} -t {args.threads}; logs in {workdir}",
          file=sys.stderr, flush=True)  # fmt: skip
    began = time.time()
    try:
        run(args, data, workdir)
    except Interrupted as exc:
        data["aborted"] = str(exc)
    except Exception as exc:
        data["aborted"] = f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    data["elapsed_s"] = round(time.time() - began, 1)
    data["summary"] = summarize(data["runs"])
    data["targets"] = targets(
        data["runs"], data["summary"], data["phases"], bool(data.get("bulk_path"))
    )
    text = report(data)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"\nresults: {stem}.json, {stem}.md ({data['elapsed_s']} s)", file=sys.stderr)
    if args.keep_logs:
        print(f"logs: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if data.get("aborted") else 0


if __name__ == "__main__":
    sys.exit(main())
