"""The benchmark's report: medians per scenario, the issue's targets, Markdown tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench.scenarios import BULK_NOTE, THROUGHPUT


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
        f" + {len(changed)} uncommitted change(s) in the product"
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
