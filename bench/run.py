"""The mailworker benchmark, one command: ``.venv/bin/python -m bench.run``.

Starts its own Redis (or uses the one on 127.0.0.1:6379 under its own key prefixes), an
SMTP sink on loopback, and measures, with the same worker flags for every contender:

1. ceiling (no-op Dramatiq actor), 2. the bare peer, 3. the typical Dramatiq and Celery
peers, 4. mailworker single jobs, 5. mailworker bulk: N pre-enqueued notifications each,
msg/s (median of the runs), worker CPU per message, peak RSS per worker process;
6. latency at a steady rate (mailworker and the naive peer); 7. high-priority latency
while a bulk send drains. Prints the tables and writes JSON (and the tables as Markdown)
into bench/results/. Every run has a time bound; everything started is stopped.
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
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.infra import SMTP_SINK, AioSink, PostfixSink, RedisInstance, Sink
from bench.scenarios import (
    BULK_NOTE,
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


# ---------------------------------------------------------------- the report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per throughput scenario: medians over its successful runs, and the runs."""
    out: dict[str, dict[str, Any]] = {}
    for name in THROUGHPUT:
        mine = [r for r in runs if r["scenario"] == name]
        if not mine:
            continue
        ok = [r for r in mine if r["ok"]]

        def col(key: str, rows: list[dict[str, Any]] = ok) -> list[float]:
            return [r[key] for r in rows if r.get(key) is not None]

        out[name] = {
            "runs": len(mine),
            "failed": len(mine) - len(ok),
            "errors": [r.get("error") for r in mine if not r["ok"]],
            "consume_msg_s": _median(col("consume_msg_s")),
            "consume_runs": col("consume_msg_s"),
            "steady_msg_s": _median(col("steady_msg_s")),
            "cpu_us_per_msg": _median(col("cpu_us_per_msg")),
            "cpu_runs": col("cpu_us_per_msg"),
            "steady_cpu_us_per_msg": _median(col("steady_cpu_us_per_msg")),
            "peak_rss_mb": max(col("peak_rss_mb"), default=None),
            "other_cpu_s": _median(col("other_cpu_s")),
            "other_load_runs": col("other_load_cores"),
            "redis_scripts_per_msg": _median(col("redis_scripts_per_msg")),
            "sys_us_per_msg": _median(col("sys_us_per_msg")),
            "switches_per_msg": _median(col("switches_per_msg")),
            "redis_us_per_msg": _median(
                [r["redis_cpu_s"] / r["n"] * 1e6 for r in ok if "redis_cpu_s" in r]
            ),
            "first_after_s": _median(col("first_after_s")),
            "sent_records": col("sent_records"),
            "actors": _merge_counts(r.get("delivered_by_actor") or {} for r in ok),
        }
    return out


def _merge_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _per_run_ratios(runs: list[dict[str, Any]], a: str, b: str) -> list[float]:
    by = {(r["scenario"], r["run"]): r for r in runs if r["ok"]}
    out = []
    for (name, run), row in sorted(by.items(), key=lambda kv: kv[0][1]):
        other = by.get((b, run))
        if name == a and other:
            out.append(round(row["consume_msg_s"] / other["consume_msg_s"], 2))
    return out


def _latency_met(
    mine: float | None, naive: float | None, unbounded: bool
) -> bool | None:
    if mine is None:
        return None
    if naive is None:
        return True if unbounded else None
    return mine <= naive


def targets(
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    phases: dict[str, Any],
    bulk_path: bool,
) -> list[dict[str, Any]]:
    """The issue's targets against what was measured (None: not measured)."""
    msg = {k: v["consume_msg_s"] for k, v in summary.items()}
    rows: list[dict[str, Any]] = []

    def ratio_row(label: str, a: str, b: str, limit: float, note: str = "") -> None:
        value = _ratio(msg.get(a), msg.get(b))
        rows.append({
            "target": label, "limit": f">= {limit}", "value": value,
            "per_run": _per_run_ratios(runs, a, b),
            "met": None if value is None else value >= limit, "note": note,
        })  # fmt: skip

    ratio_row("single jobs / bare peer", "mailworker", "bare", 0.65)
    ratio_row(
        "single jobs / typical Dramatiq peer", "mailworker", "typical-dramatiq", 3
    )
    ratio_row("single jobs / typical Celery peer", "mailworker", "typical-celery", 3)
    ratio_row(
        "bulk / ceiling", "mailworker-bulk", "ceiling", 1.5,
        "" if bulk_path else "bulk = single-job path until a bulk job exists",
    )  # fmt: skip
    lat = phases.get("latency", {})
    mw, naive = lat.get("mailworker", {}), lat.get("naive", {})
    mw_p99, naive_p99 = mw.get("p99_ms"), naive.get("p99_ms")
    naive_unbounded = (
        naive.get("ok") and naive_p99 is None and naive.get("never_arrived")
    )
    rows.append({
        "target": "latency p99 (mailworker) <= naive peer's p99", "limit": "<= naive",
        "value": mw_p99, "per_run": [naive_p99],
        "met": _latency_met(mw_p99, naive_p99, bool(naive_unbounded)),
        "note": f"naive p99 {naive_p99} ms" if naive_p99 is not None
        else "naive p99 unbounded: some of its jobs never arrived" if naive_unbounded
        else "",
    })  # fmt: skip
    rows.append({
        "target": "latency p99 (mailworker) <= 50 ms", "limit": "<= 50 ms",
        "value": mw_p99, "per_run": [],
        "met": None if mw_p99 is None else mw_p99 <= 50, "note": "",
    })  # fmt: skip
    pri = phases.get("priority", {})
    every = (pri.get("high") or {}).get("p99_ms") if pri.get("ok") else None
    during = (pri.get("high_while_bulk_drained") or {}) if pri.get("ok") else {}
    # What the target names: the high jobs enqueued while the bulk send drained (all of
    # them when none was, e.g. a bulk send that ended before the first high job).
    high = during.get("p99_ms") if during.get("sent") else every
    rows.append({
        "target": "priority: high p99 while a bulk send drains <= 100 ms",
        "limit": "<= 100 ms", "value": high, "per_run": [],
        "met": None if high is None else high <= 100,
        "note": f"the {during.get('sent')} high jobs enqueued while the bulk send "
        f"drained; all {(pri.get('high') or {}).get('sent')}: p99 {every} ms"
        if during.get("sent") else "no high job was enqueued while the bulk drained",
    })  # fmt: skip
    rss = [
        v["peak_rss_mb"] for k, v in summary.items()
        if k.startswith("mailworker") and v["peak_rss_mb"] is not None
    ] + [
        p.get("peak_rss_mb") for p in (mw, pri) if p.get("peak_rss_mb") is not None
    ]  # fmt: skip
    peak = max(rss, default=None)
    rows.append({
        "target": "peak RSS per mailworker worker process <= 100 MB", "limit": "<= 100 MB",
        "value": peak, "per_run": [], "met": None if peak is None else peak <= 100,
        "note": "largest process of the tree, any mailworker scenario",
    })  # fmt: skip
    return rows


def _product_line(data: dict[str, Any]) -> str:
    product = data.get("product") or {}
    changed = product.get("uncommitted") or []
    state = f"commit {product.get('head')}" + (
        f" + {len(changed)} uncommitted change(s) in settings/producers/worker"
        if changed else ""
    )  # fmt: skip
    path = (
        "bulk path (enqueue_many bulk=True)"
        if data.get("bulk_path")
        else "no bulk path"
    )
    return f"Product: {state if product else 'work tree (no snapshot)'}; {path}."


def _header(data: dict[str, Any]) -> list[str]:
    cfg, box = data["config"], data["machine"]
    return [
        f"# mailworker benchmark {data['started']}",
        "",
        f"Machine: {box['nproc']} CPU ({box['cpu_model']}), {box['memory_gib']} GiB, "
        f"Python {box['python']}. Redis {data.get('redis_version', '?')} "
        f"({data.get('redis_mode', '?')}); sink: {data.get('sink', '?')}.",
        f"Workers: -p {cfg['processes']} -t {cfg['threads']} and an idle poll of "
        f"{data.get('poll_interval_ms')} ms for every contender; "
        f"N = {cfg['n']:,}, {cfg['runs']} run(s), round-robin.",
        _product_line(data),
        "",
    ]


def _per_contender(
    summary: dict[str, dict[str, Any]],
    key: str,
    intro: str,
    item: Callable[[dict[str, Any]], str],
    sep: str,
) -> list[str]:
    """One report line: ``intro`` and ``item(row)`` for each contender that has ``key``."""
    parts = [
        f"{name} {item(row)}"
        for name, row in summary.items()
        if row.get(key) is not None
    ]
    return [f"{intro}{sep.join(parts)}."] if parts else []


def _throughput_lines(data: dict[str, Any]) -> list[str]:
    summary, n = data.get("summary", {}), data["config"]["n"]
    if not summary:
        return []
    lines = [
        "| scenario | msg/s median (runs) | steady msg/s | ÷ ceiling | ÷ bare | "
        "CPU µs/msg (runs) | steady CPU µs/msg | peak RSS/proc MB | other load, "
        "cores (runs) | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ceiling = summary.get("ceiling", {}).get("consume_msg_s")
    bare = summary.get("bare", {}).get("consume_msg_s")
    for name, row in summary.items():
        runs = ", ".join(_fmt(v) for v in row["consume_runs"])
        cpus = ", ".join(_fmt(v) for v in row["cpu_runs"])
        lines.append(
            f"| {THROUGHPUT[name].label} | **{_fmt(row['consume_msg_s'])}** ({runs}) | "
            f"{_fmt(row['steady_msg_s'])} | "
            f"{_fmt(_ratio(row['consume_msg_s'], ceiling), 2)} | "
            f"{_fmt(_ratio(row['consume_msg_s'], bare), 2)} | "
            f"{_fmt(row['cpu_us_per_msg'])} ({cpus}) | "
            f"{_fmt(row['steady_cpu_us_per_msg'])} | {_fmt(row['peak_rss_mb'], 1)} | "
            f"{', '.join(_fmt(v, 2) for v in row['other_load_runs'])} | {row['failed']} |"
        )
    lines.append("")
    lines += _per_contender(
        summary,
        "redis_scripts_per_msg",
        "- Redis scripts run per message (EVAL/EVALSHA calls, median; Dramatiq's "
        "fetch and ack are scripts too): ",
        lambda row: f"{row['redis_scripts_per_msg']:.2f}",
        ", ",
    )
    lines += _per_contender(
        summary,
        "sys_us_per_msg",
        "- Per message (median): workers' system CPU (part of CPU µs/msg), workers' "
        "context switches, redis-server CPU; first delivery after worker start: ",
        lambda row: (
            f"{_fmt(row['sys_us_per_msg'])} µs system, "
            f"{_fmt(row['switches_per_msg'], 1)} switches, "
            f"Redis {_fmt(row['redis_us_per_msg'])} µs, "
            f"first after {_fmt(row['first_after_s'], 2)} s"
        ),
        "; ",
    )
    for name, row in summary.items():
        if row["sent_records"]:
            sent = ", ".join(str(v) for v in row["sent_records"])
            lines.append(
                f'- {name}: status records with state "sent" after each run: {sent} '
                f"(of {n:,}); delivered by actor: {row['actors']}."
            )
        lines += [f"- {name}: FAILED run: {error}" for error in row["errors"]]
    if "mailworker-bulk" in summary and not data.get("bulk_path"):
        lines.append(f"- Note: {BULK_NOTE}")
    return [*lines, ""]


def _latency_row(label: str, row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        if row.get(key) is None and row.get("never_arrived"):
            return "unbounded"  # reaches jobs that never arrived
        return _fmt(row.get(key), 1)

    return (
        f"| {label} | {row['sent']} | {row['arrived']} | {ms('p50_ms')} | "
        f"{ms('p95_ms')} | {ms('p99_ms')} | {ms('max_ms')} |"
    )


def _latency_lines(data: dict[str, Any]) -> list[str]:
    cfg, lat = data["config"], data.get("phases", {}).get("latency", {})
    if not lat:
        return []
    lines = [
        f"Latency: a steady {cfg['latency_rate']:g} msg/s for {cfg['latency_seconds']:g} s "
        "into idle workers, enqueue → accepted by the sink:",
        "",
        "| contender | sent | arrived | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for who, row in lat.items():
        if not row.get("ok"):
            lines.append(f"| {who} | FAILED: {row.get('error')} ||||||")
            continue
        lines.append(_latency_row(who, row))
        notes.append(
            f"- {who}: rate achieved {row['achieved_rate']} msg/s, "
            f"{_fmt(row['cpu_us_per_msg'])} µs worker CPU/msg, "
            f"peak RSS {_fmt(row['peak_rss_mb'], 1)} MB/process."
        )
    return [*lines, "", *notes, ""]


def _priority_lines(data: dict[str, Any]) -> list[str]:
    cfg, pri = data["config"], data.get("phases", {}).get("priority")
    if not pri:
        return []
    lines = [
        f"Priority: {cfg['priority_bulk']:,} bulk-priority jobs pre-enqueued "
        f"({'bulk path' if pri.get('bulk_path') else 'single jobs'}); from the first "
        f"accepted bulk message, high-priority jobs at {cfg['priority_rate']:g}/s for "
        f"{cfg['priority_seconds']:g} s:",
        "",
    ]
    if not pri.get("ok"):
        return [*lines, f"FAILED: {pri.get('error')}", ""]
    ended = pri["bulk_ended_after_high_start_s"]
    drained = (
        f"ended {ended} s after the first high job"
        if ended is not None
        else "had not ended when the phase stopped"
    )
    return [
        *lines,
        "| high-priority jobs | sent | arrived | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        _latency_row("all", pri["high"]),
        _latency_row(
            "enqueued while the bulk send drained", pri["high_while_bulk_drained"]
        ),
        "",
        f"- Bulk: {pri['bulk_arrived']:,} accepted at {_fmt(pri['bulk_msg_s'])} msg/s "
        f"(from worker start); the bulk send {drained} (high window "
        f"{pri['high_window_s']} s). States: {pri.get('states')}; delivered by actor: "
        f"{pri.get('delivered_by_actor')}.",
        *_few_met_the_drain(pri, cfg),
        "",
    ]


# Fewer high jobs than this during the drain make its p99 little more than its maximum.
_FEW_HIGH = 100


def _few_met_the_drain(pri: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    met = pri["high_while_bulk_drained"].get("sent", 0)
    if met >= _FEW_HIGH:
        return []
    window = pri["high_window_s"] or cfg["priority_seconds"]
    # a drain that outlasts the high window, at the rate this one ran
    enough = int((pri.get("bulk_msg_s") or 0) * window * 1.2 // 10_000 + 1) * 10_000
    return [
        f"- Only {met} high jobs met the drain: for a figure over a bulk send that lasts "
        f"the whole window, run `--only priority --priority-bulk {enough}`."
    ]


def _target_lines(data: dict[str, Any]) -> list[str]:
    rows = data.get("targets", [])
    if not rows:
        return []
    lines = [
        "Targets:",
        "",
        "| target | limit | measured | per run | met |",
        "|---|---|---:|---|---|",
    ]
    for row in rows:
        value = row["value"]
        shown = (
            "–" if value is None else f"{value:.2f}" if value < 20 else f"{value:.1f}"
        )
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        extra = f" ({row['note']})" if row["note"] else ""
        per_run = ", ".join(str(v) for v in row["per_run"] if v is not None)
        lines.append(
            f"| {row['target']}{extra} | {row['limit']} | {shown} | {per_run} | {met} |"
        )
    return [*lines, ""]


def report(data: dict[str, Any]) -> str:
    """The tables, as Markdown."""
    lines = [
        *_header(data),
        *_throughput_lines(data),
        *_latency_lines(data),
        *_priority_lines(data),
        *_target_lines(data),
        "Worker commands:",
        "",
        *(
            f"- {name}: `{command}`"
            for name, command in data.get("workers", {}).items()
        ),
        "",
    ]
    if data.get("aborted"):
        lines.append(f"ABORTED: {data['aborted']} (the figures above are partial)")
    return "\n".join(lines)


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


PRODUCT = ("settings", "producers", "worker")


def snapshot(workdir: Path, rev: str | None) -> tuple[str, dict[str, Any]]:
    """Copy the product's packages (the work tree as it is now, or commit ``rev``) and
    run that copy, harness and mailworker workers alike, so edits made during a long run
    cannot mix versions."""
    target = workdir / "product"
    git = ["git", "-C", str(REPO)]
    if rev:
        target.mkdir()
        archive = subprocess.run(
            [*git, "archive", "--format=tar", rev, "--", *PRODUCT],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(target, filter="data")
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
