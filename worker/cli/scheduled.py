"""``mailworker scheduled``: list the scheduled set, cancel a scheduled job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click
import orjson

from common.exits import EXIT_BROKER, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, fail
from producers.cli import make_producer
from settings import BrokerUnavailableError
from settings.durations import parse_duration

__all__ = ["scheduled"]

broker_option = click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)


def _moment(flag: str, value: str | None) -> datetime | None:
    """An ISO 8601 time, or a duration from now (``2h``), for a due window bound."""
    if value is None:
        return None
    try:
        return datetime.now(UTC) + timedelta(seconds=parse_duration(value))
    except OverflowError:
        fail(EXIT_USAGE, f"{flag}: {value!r} is too long: past any date")
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(EXIT_USAGE, f"{flag}: {value!r} is neither a duration (2h) nor ISO 8601")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@click.group()
def scheduled() -> None:
    """Scheduled jobs (send_at) and broker retries waiting in Redis for their time."""


@scheduled.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option(
    "--offset", type=click.IntRange(0), default=0, help="Skip this many (paging)."
)
@click.option(
    "--due-before", help="Only those due before a time (ISO 8601) or within 2h."
)
@click.option("--due-after", help="Only those due after a time or a duration.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@broker_option
def list_command(
    limit: int,
    offset: int,
    due_before: str | None,
    due_after: str | None,
    as_json: bool,
    broker_url: str | None,
) -> None:
    """List scheduled entries, soonest first, a page at a time."""
    producer = make_producer(broker_url)
    try:
        page = producer.list_scheduled(
            limit=limit,
            offset=offset,
            due_after=_moment("--due-after", due_after),
            due_before=_moment("--due-before", due_before),
        )
    except BrokerUnavailableError as exc:
        fail(EXIT_BROKER, str(exc))
    if page.entries and not as_json:
        click.echo(f"{'ID':<36}  {'DUE AT':<29}  {'STATE':<10} {'QUEUE':<10} SUBJECT")
    for entry in page.entries:
        if as_json:
            line: dict[str, Any] = {
                "id": entry.job_id,
                "due_at": entry.due_at,
                "state": entry.state or None,
                "queue": entry.queue,
                "subject": entry.subject,
                "jobs": entry.jobs,
                "bulk": entry.bulk,
            }
            click.echo(orjson.dumps(line).decode())
            continue
        subject = entry.subject if entry.jobs == 1 else f"({entry.jobs} jobs)"
        if entry.bulk:
            subject = f"(bulk retry of {entry.jobs} jobs: cannot be cancelled)"
        state = "bulk" if entry.bulk else entry.state or "-"
        click.echo(
            f"{entry.job_id:<36}  {entry.due_at:<29}  {state:<10} "
            f"{entry.queue or '-':<10} {(subject or '-')[:60]}"
        )
    if not as_json:
        shown = len(page.entries)
        more = offset + shown < page.total
        hint = f"; next page: --offset {offset + shown}" if more and shown else ""
        click.echo(f"{shown} of {page.total} scheduled{hint}", err=True)
        if any(entry.bulk for entry in page.entries):
            click.echo(
                "STATE bulk: a bulk message's retry, under the message's id; its jobs "
                "say `retrying` in their own records and are retried together",
                err=True,
            )


@scheduled.command("cancel")
@click.argument("job_id")
@broker_option
def cancel_command(job_id: str, broker_url: str | None) -> None:
    """Cancel a scheduled job: it never sends, its status says cancelled.

    Exit codes: 0 cancelled, 1 already released to its queue (or done) or a bulk
    message's retry (which carries several jobs and is never cancelled), 3 unknown.
    """
    producer = make_producer(broker_url)
    try:
        result = producer.cancel_scheduled(job_id)
    except BrokerUnavailableError as exc:
        fail(EXIT_BROKER, str(exc))
    if result.cancelled:
        click.echo(f"cancelled {job_id} (it was {result.state or 'scheduled'})")
        return
    if result.bulk_jobs:
        fail(
            EXIT_FAILED,
            f"{job_id} is a bulk message's retry ({result.bulk_jobs} jobs) and cannot "
            "be cancelled: it would drop its jobs. Nothing was changed; they are "
            "retried together when it is due. To stop mail to a recipient, run "
            "`mailworker suppress add ADDRESS` before then",
        )
    if not result.state:
        fail(EXIT_NOT_FOUND, f"no scheduled job {job_id}")
    if result.state == "cancelled":
        fail(EXIT_FAILED, f"job {job_id} is already cancelled")
    fail(
        EXIT_FAILED,
        f"job {job_id} cannot be cancelled: it is no longer in the scheduled set "
        f"(state {result.state}): released to its queue, being sent, or done",
    )
