"""What the console's pages show, read from Redis: pure shaping apart from the reads.

Each page costs a bounded number of round trips: the overview reads the queues in one,
the hosts' heartbeats in one per host, the breakers in one and the last hour's minute
counts in one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis

from common.keys import minute_counts_key, suppressed_key
from settings import Settings
from worker.broker.heartbeats import host_beats, hosts_key
from worker.cli.stats import queue_stats
from worker.deadletter import REASONS, DeadLetters, Filters, since_moment
from worker.status import StatusRecord

__all__ = [
    "CHART_MINUTES",
    "MAX_HOSTS",
    "PER_PAGE",
    "Breaker",
    "LetterFilter",
    "Minute",
    "Page",
    "breakers",
    "chart",
    "hosts",
    "letter_page",
    "minutes",
    "overview",
    "parse_filter",
]

PER_PAGE = 50
MAX_HOSTS = 100
CHART_MINUTES = 60
OUTCOMES = ("sent", "retrying", "dead")


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """The dead-letter filters as the form sent them, what they mean, and what was wrong."""

    since: str = ""
    reason: str = ""
    service: str = ""
    filters: Filters = field(default_factory=Filters)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        """Whether any filter is given."""
        return bool(self.since or self.reason or self.service)

    def query(self) -> dict[str, str]:
        """The filters as query parameters (empty ones left out)."""
        given = {"since": self.since, "reason": self.reason, "service": self.service}
        return {k: v for k, v in given.items() if v}


def parse_filter(query: Mapping[str, str], *, now: float | None = None) -> LetterFilter:
    """The filters of a query or form, as ``mailworker dead list`` takes them."""
    now = time.time() if now is None else now
    since = (query.get("since") or "").strip()[:64]
    reason = (query.get("reason") or "").strip()[:64]
    service = (query.get("service") or "").strip()[:64]
    errors: dict[str, str] = {}
    moment = None
    if since:
        try:
            moment = since_moment(since, now)
        except ValueError:
            errors["since"] = "a duration (2h, 7d) or an ISO time (2026-05-01T08:00)"
    if reason and reason not in REASONS:
        errors["reason"] = "one of the listed reasons"
    filters = Filters(
        since=moment,
        reason=reason if reason in REASONS else None,
        service=service or None,
    )
    return LetterFilter(since, reason, service, filters, errors)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of dead letters, newest first."""

    rows: list[dict[str, Any]]
    total: int
    number: int
    pages: int


def _row(job_id: str, dead_at: float, record: StatusRecord) -> dict[str, Any]:
    error: dict[str, Any] = dict(record["error"] or {})
    counts = record["counts"]
    total = len(record["recipients"])
    return {
        "id": job_id,
        "dead_at": datetime.fromtimestamp(dead_at, UTC).isoformat(timespec="seconds"),
        "reason": record.get("reason") or "",
        "service": error.get("service") or record["service"] or "",
        "accepted": f"{counts['accepted'] if counts else 0}/{total}" if total else "",
        "error": str(error.get("message") or "")[:200],
        "attempts": record.get("attempts") or 0,
    }


def letter_page(store: DeadLetters, chosen: LetterFilter, number: int) -> Page:
    """The ``number``th page (from 1) of the dead letters the filters select."""
    entries = store.entries(chosen.filters) if not chosen.errors else []
    entries.reverse()  # newest first: what people look for
    pages = max(1, -(-len(entries) // PER_PAGE))
    number = min(max(1, number), pages)
    start = (number - 1) * PER_PAGE
    rows = [_row(*entry) for entry in entries[start : start + PER_PAGE]]
    return Page(rows=rows, total=len(entries), number=number, pages=pages)


@dataclass(frozen=True, slots=True)
class Breaker:
    """A delivery service's breaker: closed, open until a time, or letting a probe by."""

    service: str
    state: str  # closed | open | probing
    failures: int
    open_until: str


def breakers(client: redis.Redis, settings: Settings) -> list[Breaker]:
    """Each enabled service's breaker (``worker.limits.Breaker``'s keys), in one trip."""
    names = settings.delivery_order
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            key = f"{settings.namespace}:breaker:{name}"
            pipe.hmget(key, "failures", "open_until")
            pipe.exists(f"{key}:probe")
        replies = pipe.execute()
    out = []
    for index, name in enumerate(names):
        (count, until), probe = replies[2 * index], replies[2 * index + 1]
        until_s = float(until or 0)
        if until_s and now < until_s:
            state = "open"
        elif until_s or probe:
            state = "probing"  # cooled down: one delivery may try it
        else:
            state = "closed"
        shown = (
            datetime.fromtimestamp(until_s, UTC).isoformat(timespec="seconds")
            if until_s
            else ""
        )
        out.append(Breaker(name, state, int(count or 0), shown))
    return out


def hosts(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Each host's worker processes and whether they beat lately (``mailworker health``).

    The hosts that beat most lately come first, at most ``MAX_HOSTS`` of them (pods that
    came and went are forgotten a day after their last beat).

    A process is alive when its last beat is within ``retry.redelivery_timeout``, the
    default of ``mailworker health --max-age``.
    """
    found = cast(
        "list[bytes]",
        client.zrevrange(hosts_key(settings.namespace), 0, MAX_HOSTS - 1),
    )
    names = [raw.decode(errors="replace") for raw in found]
    limit = settings.retry.redelivery_timeout
    out = []
    for host in names:
        beats = host_beats(client, settings.namespace, host)
        processes = [
            {"pid": b.pid, "age": round(b.age, 1), "alive": b.age <= limit}
            for b in beats
        ]
        out.append(
            {
                "host": host,
                "alive": sum(1 for p in processes if p["alive"]),
                "processes": processes,
            }
        )
    return out


@dataclass(frozen=True, slots=True)
class Minute:
    """One minute's outcomes."""

    at: str  # HH:MM, UTC
    sent: int
    retrying: int
    dead: int


def minutes(
    client: redis.Redis, namespace: str, *, now: float | None = None
) -> list[Minute]:
    """The last ``CHART_MINUTES`` minutes' outcomes, oldest first, in one round trip."""
    current = int((time.time() if now is None else now) // 60)
    span = range(current - CHART_MINUTES + 1, current + 1)
    with client.pipeline(transaction=False) as pipe:
        for minute in span:
            pipe.hmget(minute_counts_key(namespace, minute), *OUTCOMES)
        replies = pipe.execute()
    return [
        Minute(
            at=datetime.fromtimestamp(minute * 60, UTC).strftime("%H:%M"),
            sent=int(sent or 0),
            retrying=int(retrying or 0),
            dead=int(dead or 0),
        )
        for minute, (sent, retrying, dead) in zip(span, replies, strict=True)
    ]


CHART_WIDTH, CHART_HEIGHT = 600, 120


def chart(counts: list[Minute]) -> dict[str, Any]:
    """The per-minute bars as SVG geometry: sent, retrying and dead stacked up.

    The scale is the busiest minute's total, shown as the axis label, so a quiet hour
    and a busy one both fill the chart and say how tall it is.
    """
    top = max((m.sent + m.retrying + m.dead for m in counts), default=0)
    width = CHART_WIDTH / max(1, len(counts))
    bars = []
    for index, minute in enumerate(counts):
        y = float(CHART_HEIGHT)
        parts = []
        for kind in OUTCOMES:
            value = getattr(minute, kind)
            height = CHART_HEIGHT * value / top if top else 0.0
            y -= height
            if value:
                parts.append({"kind": kind, "y": round(y, 2), "h": round(height, 2)})
        bars.append(
            {
                "x": round(index * width, 2),
                "w": round(width - 1, 2),
                "parts": parts,
                "minute": minute,
            }
        )
    totals = {kind: sum(getattr(m, kind) for m in counts) for kind in OUTCOMES}
    return {
        "bars": bars,
        "top": top,
        "totals": totals,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "first": counts[0].at if counts else "",
        "last": counts[-1].at if counts else "",
    }


def overview(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Everything the overview page shows."""
    return {
        "stats": queue_stats(client, settings.namespace),
        "breakers": breakers(client, settings),
        "hosts": hosts(client, settings),
        "minutes": minutes(client, settings.namespace),
        "suppressed": int(client.hlen(suppressed_key(settings.namespace))),
    }
