"""``mailworker send``: enqueue one notification (or many with ``--bulk``) from the shell."""

from __future__ import annotations

import mimetypes
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson

from common.exits import EXIT_BROKER, EXIT_FAILED, EXIT_USAGE, fail, settings_or_fail
from producers.enqueue import Producer
from producers.job import Notification, parse_job
from settings import (
    BrokerUnavailableError,
    JobValidationError,
    config_path,
    public_url,
)
from settings.durations import parse_duration

__all__ = [
    "defaults_in_use",
    "make_producer",
    "send",
    "send_at_flag",
]


def make_producer(broker_url: str | None) -> Producer:
    """The producer for CLI commands: ``--broker-url``, else the environment, else the config.

    Notes on stderr when it falls back to the default broker (see ``defaults_in_use``).
    """
    settings = settings_or_fail()
    if defaults_in_use(broker_url):
        click.echo(
            "mailworker: note: no configuration file and no MAILWORKER_BROKER_URL: "
            f"using {public_url(settings.broker_url.get_secret_value())}, namespace "
            f"{settings.namespace!r}",
            err=True,
        )
    return Producer.from_settings(settings, broker_url=broker_url)


def defaults_in_use(broker_url: str | None) -> bool:
    """True when a command talks to the default broker.

    That is when no ``--broker-url``, ``MAILWORKER_BROKER_URL`` or configuration file
    chooses the broker.
    """
    return (
        not broker_url
        and not os.environ.get("MAILWORKER_BROKER_URL")
        and config_path() is None
    )


def _from_flags(options: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = {
        key: list(options[key])
        for key in ("to", "cc", "bcc", "reply_to")
        if options[key]
    }
    for key in (
        "subject",
        "text",
        "html",
        "sender",
        "idempotency_key",
        "priority",
        "not_after",
    ):
        if options[key] is not None:
            job[key] = options[key]
    if options["send_at"] is not None:
        job["send_at"] = send_at_flag(options["send_at"])
    headers = {}
    for header in options["header"]:
        name, sep, value = header.partition(":")
        if not sep:
            raise JobValidationError("--header", f"{header!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    if headers:
        job["headers"] = headers
    metadata = _pairs(options["metadata"], "--metadata")
    if metadata:
        job["metadata"] = metadata
    job.update(_actions_from_flags(options))
    attachments = []
    for path in options["attach"]:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append(
            {"filename": path.name, "content_type": ctype, "content": path.read_bytes()}
        )
    if attachments:
        job["attachments"] = attachments
    return job


def send_at_flag(value: str) -> str:
    """``--send-at``: ISO 8601 with an offset, or ``+DURATION`` from now (``+10m``).

    Raises:
        JobValidationError: naming ``send_at``, for a relative form that is no
            duration or one too long to be a date.
    """
    if not value.startswith("+"):
        return value
    try:
        seconds = parse_duration(value[1:])
    except ValueError:
        raise JobValidationError(
            "send_at",
            f"{value!r} is neither ISO 8601 (2026-12-03T09:00:00Z) nor +DURATION "
            "(+90s, +10m, +2h, +1d)",
        ) from None
    try:
        moment = datetime.now(UTC) + timedelta(seconds=seconds)
    except OverflowError:
        raise JobValidationError(
            "send_at", f"{value!r} is too far ahead: past any date that can be written"
        ) from None
    return moment.isoformat(timespec="milliseconds")


def _actions_from_flags(options: dict[str, Any]) -> dict[str, Any]:
    """``--action ID:LABEL[:required]`` and ``--action-context key=value``."""
    job: dict[str, Any] = {}
    actions = []
    for item in options["action"]:
        action_id, sep, label = item.partition(":")
        if not sep or not label:
            raise JobValidationError("--action", f"{item!r} is not 'id:Label'")
        entry = {"id": action_id, "label": label}
        if label.endswith(":required"):
            entry.update(label=label.removesuffix(":required"), comment="required")
        actions.append(entry)
    if actions:
        job["actions"] = actions
    context = _pairs(options["action_context"], "--action-context")
    if context:
        job["action_context"] = context
    return job


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """``key=value`` flags as a dict; one without ``=`` is an error naming ``flag``."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise JobValidationError(flag, f"{item!r} is not key=value")
        pairs[key] = value
    return pairs


def _from_json(source: str) -> dict[str, Any]:
    raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JobValidationError("--json", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobValidationError("--json", "expected one JSON object")
    return data


@click.command()
@click.option(
    "--to", multiple=True, help="Recipient; repeat for more ('Name <a@b>' or 'a@b')."
)
@click.option("--cc", multiple=True, help="Cc recipient; repeatable.")
@click.option("--bcc", multiple=True, help="Bcc recipient; repeatable.")
@click.option(
    "--reply-to", "reply_to", multiple=True, help="Reply-To address; repeatable."
)
@click.option("--subject", help="The subject line.")
@click.option("--text", help="The plain-text body.")
@click.option("--html", help="The HTML body.")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Attach a file; repeatable.",
)
@click.option("--header", multiple=True, help="Extra header 'Name: value'; repeatable.")
@click.option(
    "--metadata", multiple=True, help="Metadata key=value for status and logs."
)
@click.option(
    "--action",
    multiple=True,
    metavar="ID:LABEL[:required]",
    help="An e-mail action the recipients can reply with; repeatable (at most 6).",
)
@click.option(
    "--action-context",
    "action_context",
    multiple=True,
    metavar="KEY=VALUE",
    help="Context key=value returned with the action's event; repeatable.",
)
@click.option("--sender", help="Pin one configured service by name (no failover).")
@click.option(
    "--idempotency-key", "idempotency_key", help="Same key + payload = same job."
)
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "bulk"]),
    help="Queue (default normal).",
)
@click.option(
    "--not-after",
    "not_after",
    help="ISO 8601 deadline; later the job is dead-lettered.",
)
@click.option(
    "--send-at",
    "send_at",
    metavar="TIME|+DURATION",
    help="Send at this time: ISO 8601 with an offset (2026-12-03T09:00:00Z) or "
    "+10m, +2h, +1d from now; at most limits.max_schedule_ahead ahead.",
)
@click.option(
    "--json",
    "json_source",
    metavar="FILE|-",
    help="The whole job as JSON (its fields: README.md, 'The job').",
)
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
@click.option(
    "--bulk", metavar="FILE.jsonl|-", help="Many jobs, one JSON object per line."
)
@click.option(
    "--ids-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --bulk: write the job ids here (default: FILE.jsonl.ids).",
)
def send(
    json_source: str | None,
    broker_url: str | None,
    bulk: str | None,
    ids_out: Path | None,
    **options: Any,
) -> None:
    """Enqueue one notification and print its job id alone on the last line.

    With --bulk FILE.jsonl (one job per line, as --json takes it, - for stdin) every valid
    line is enqueued and a summary printed. A refused line never stops the rest.

    Exit codes: 0 enqueued (with --bulk: every line), 1 some --bulk lines refused,
    2 invalid job (the field is named), 4 broker unreachable.
    """
    if bulk is not None:
        _send_bulk(bulk, broker_url, ids_out)
        return
    try:
        data = _from_json(json_source) if json_source else _from_flags(options)
        notification: Notification = parse_job(data)
    except JobValidationError as exc:
        fail(EXIT_USAGE, f"invalid job: {exc}")
    except OSError as exc:
        fail(EXIT_USAGE, f"--json: cannot read {json_source}: {exc.strerror}")
    producer = make_producer(broker_url)
    try:
        job_id = producer.enqueue(notification)
    except JobValidationError as exc:
        fail(EXIT_USAGE, f"invalid job: {exc}")
    except BrokerUnavailableError as exc:
        fail(EXIT_BROKER, str(exc))
    click.echo(job_id)


def _send_bulk(source: str, broker_url: str | None, ids_out: Path | None) -> None:
    from producers.bulk_cli import report, send_bulk

    if ids_out is None and source != "-":
        ids_out = Path(f"{source}.ids")
    producer = make_producer(broker_url)
    try:
        summary = send_bulk(producer, source, ids_out)
    except OSError as exc:
        fail(EXIT_USAGE, f"--bulk: cannot read {source}: {exc.strerror}")
    except BrokerUnavailableError as exc:
        fail(EXIT_BROKER, str(exc))
    click.echo("\n".join(report(summary, ids_out)))
    if summary.refused:
        sys.exit(EXIT_FAILED)
