"""``mailworker dead``: list, show, requeue and purge dead letters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail
from settings import ConfigError, Settings, load_settings, public_url
from worker.deadletter import (
    REASONS,
    DeadLetters,
    Filters,
    RequeueRefusedError,
    since_moment,
)
from worker.status import StatusRecord

__all__ = ["dead"]


def _store(broker_url: str | None) -> tuple[Settings, DeadLetters, str]:
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
    url = broker_url or settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    store = DeadLetters(client, namespace=settings.namespace, ttl=settings.status.ttl)
    return settings, store, public_url(url)


def _since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return since_moment(value)
    except ValueError:
        fail(
            EXIT_USAGE,
            f"--since: {value!r} is neither a duration (2h, 7d) nor an ISO time",
        )


def _filters(since: str | None, reason: str | None, service: str | None) -> Filters:
    return Filters(since=_since(since), reason=reason, service=service)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


broker_option = click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
filter_options = [
    click.option(
        "--since", help="Only those that died within a duration (2h) or after a time."
    ),
    click.option("--reason", type=click.Choice(REASONS), help="Only this reason."),
    click.option(
        "--service",
        help="Only those that this service refused, failed or skipped.",
    ),
]


def _with_filters(fn: Any) -> Any:
    for option in reversed(filter_options):
        fn = option(fn)
    return fn


@click.group()
def dead() -> None:
    """Dead letters: jobs and webhook deliveries that ended undelivered, with the reason."""


@dead.command("list")
@_with_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@broker_option
def list_command(
    since: str | None,
    reason: str | None,
    service: str | None,
    as_json: bool,
    broker_url: str | None,
) -> None:
    """List dead letters, oldest first."""
    _, store, label = _store(broker_url)
    try:
        entries = store.entries(_filters(since, reason, service))
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(label, exc)))
    if entries and not as_json:
        click.echo(
            f"{'ID':<36}  {'DEAD AT':<25}  {'REASON':<17} {'SERVICE':<12} "
            f"{'ACCEPTED':<8} ERROR"
        )
    for job_id, dead_at, record in entries:
        error: dict[str, Any] = dict(record["error"] or {})
        named = error.get("service") or record["service"]
        if as_json:
            line = {
                "id": job_id,
                "dead_at": _when(dead_at),
                "reason": record.get("reason"),
                "service": named,
                "attempts": record.get("attempts"),
                "partial": record.get("partial", False),
                "counts": record.get("counts"),
                "error": error,
            }
            click.echo(orjson.dumps(line).decode())
        else:
            message = str(error.get("message") or "")[:80]
            click.echo(
                f"{job_id:<36}  {_when(dead_at):<25}  {record.get('reason') or '-':<17} "
                f"{named or '-':<12} {_got(record):<8} {message}"
            )
    if not as_json:
        trimmed = store.trimmed()
        past = f"; {trimmed} trimmed past status.max_dead_letters" if trimmed else ""
        click.echo(f"{len(entries)} dead letter(s){past}", err=True)


def _got(record: StatusRecord) -> str:
    """How many recipients have the message, of how many.

    "1/2" is a partial delivery, not a job nobody received.
    """
    counts = record["counts"]
    total = len(record["recipients"])
    return f"{counts['accepted'] if counts else 0}/{total}" if total else "-"


@dead.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@broker_option
def show_command(job_id: str, as_json: bool, broker_url: str | None) -> None:
    """Show one dead letter: record, attempts, errors, recipients, the message (elided)."""
    _, store, label = _store(broker_url)
    try:
        record = store.show(job_id)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(label, exc)))
    if record is None:
        fail(EXIT_NOT_FOUND, f"no dead letter {job_id}")
    if as_json:
        click.echo(orjson.dumps(record).decode())
        return
    from worker.cli.output import render_status

    click.echo("\n".join(render_status(record)))
    click.echo("message")
    click.echo(orjson.dumps(record["message"], option=orjson.OPT_INDENT_2).decode())


@dead.command("requeue")
@click.argument("job_id", required=False)
@click.option(
    "--all", "all_", is_flag=True, help="Every dead letter the filters select."
)
@_with_filters
@broker_option
def requeue_command(
    job_id: str | None,
    all_: bool,
    since: str | None,
    reason: str | None,
    service: str | None,
    broker_url: str | None,
) -> None:
    """Validate again and enqueue under the same job id (exit 1 if any is refused).

    A webhook delivery (webhook:NAME:EVENT_ID) goes back to that webhook alone.
    """
    settings, store, label = _store(broker_url)
    if bool(job_id) == all_:
        fail(EXIT_USAGE, "give a JOB_ID or --all")
    try:
        ids = (
            [job_id]
            if job_id
            else [e[0] for e in store.entries(_filters(since, reason, service))]
        )
        refused = 0
        enabled = [w.name for w in settings.webhook if w.enabled]
        for item in ids:
            assert item is not None
            try:
                store.requeue(item, settings.limits, webhooks=enabled)
                click.echo(f"requeued {item}")
            except RequeueRefusedError as exc:
                refused += 1
                click.echo(f"mailworker: requeue refused: {exc}", err=True)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(label, exc)))
    if job_id and refused and store.show(job_id) is None:
        raise SystemExit(EXIT_NOT_FOUND)
    if refused:
        raise SystemExit(EXIT_FAILED)


@dead.command("purge")
@click.argument("job_id", required=False)
@click.option(
    "--all", "all_", is_flag=True, help="Every dead letter the filters select."
)
@click.option("--yes", is_flag=True, help="Confirm purging with --all.")
@_with_filters
@broker_option
def purge_command(
    job_id: str | None,
    all_: bool,
    yes: bool,
    since: str | None,
    reason: str | None,
    service: str | None,
    broker_url: str | None,
) -> None:
    """Delete dead letters for good (their status records expire on their own)."""
    _, store, label = _store(broker_url)
    if bool(job_id) == all_:
        fail(EXIT_USAGE, "give a JOB_ID or --all")
    if all_ and not yes:
        fail(EXIT_USAGE, "--all needs --yes")
    try:
        ids = (
            [job_id]
            if job_id
            else [e[0] for e in store.entries(_filters(since, reason, service))]
        )
        purged = sum(store.purge(i) for i in ids if i)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(label, exc)))
    if job_id and not purged:
        fail(EXIT_NOT_FOUND, f"no dead letter {job_id}")
    click.echo(f"purged {purged} dead letter(s)")
