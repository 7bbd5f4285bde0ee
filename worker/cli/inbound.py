"""``mailworker inbound``: run the inbound sources, list what came back, inspect a file."""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, EXIT_FAILED, EXIT_USAGE, fail, settings_or_fail
from settings import ConfigError, Settings, public_url
from settings.durations import parse_duration
from worker.inbound.model import InboundUnavailableError, Received

__all__ = ["inbound"]


def _client(settings: Settings, broker_url: str | None) -> tuple[redis.Redis, str]:
    url = broker_url or settings.broker_url.get_secret_value()
    return connect_settings(settings, url), url


_BROKER_URL = click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)


@click.group(invoke_without_command=True)
@click.option("--source", "only", metavar="NAME", help="Run only this source.")
@_BROKER_URL
@click.pass_context
def inbound(ctx: click.Context, only: str | None, broker_url: str | None) -> None:
    """Run every enabled [[inbound]] source: replies and bounces come back here.

    Graph and IMAP sources poll their mailbox; an smtp source listens for the mail
    server's forwarded messages. Stops on SIGTERM or Ctrl-C.
    """
    if ctx.invoked_subcommand is not None:
        return
    from worker.app import secrets_of
    from worker.inbound.runner import build_inbound, build_sources, run_sources
    from worker.logging import configure

    settings = settings_or_fail()
    client, url = _client(settings, broker_url)
    try:
        configure(log_format=settings.log_format, secrets=secrets_of(settings))
        handler = build_inbound(settings, client)
        sources = build_sources(settings, client, handler, only=only)
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
    try:
        client.ping()
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run_sources(sources, stop)


@inbound.command("list")
@click.option(
    "--since",
    metavar="DURATION",
    default="1d",
    show_default=True,
    help="How far back, e.g. 30m, 2h, 7d.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@_BROKER_URL
def list_(since: str, as_json: bool, broker_url: str | None) -> None:
    """Recent inbound messages: kind, outcome, reason and job, newest first."""
    from worker.inbound.store import InboundStore

    settings = settings_or_fail()
    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        fail(EXIT_USAGE, f"--since: {exc}")
    client, url = _client(settings, broker_url)
    store = InboundStore(client, namespace=settings.namespace, ttl=settings.status.ttl)
    try:
        rows = store.recent(since_ms=int((time.time() - seconds) * 1000))
    except InboundUnavailableError as exc:
        fail(EXIT_BROKER, f"{public_url(url)}: {exc}")
    for row in rows:
        if as_json:
            click.echo(orjson.dumps(row).decode())
        else:
            click.echo(_line(row))
    if not rows and not as_json:
        click.echo(f"no inbound messages in the last {since}", err=True)


def _line(row: Any) -> str:
    when = datetime.fromisoformat(row["received_at"]).strftime("%Y-%m-%d %H:%M:%S")
    job = row["job_id"] or "-"
    reason = f"  {row['reason']}" if row["reason"] else ""
    return f"{when}  {row['source']:<12} {row['kind']:<10} {row['outcome']:<8} {job}{reason}"


@inbound.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_BROKER_URL
def inspect(file: Path, as_json: bool, broker_url: str | None) -> None:
    """Print what the message in FILE would do, without doing it.

    It reads the job a bounce is about (or the key a reply to an e-mail action is
    for: the key, the action, the actor and the verdict), and writes nothing.
    """
    from worker.inbound.runner import build_inbound

    settings = settings_or_fail()
    client, url = _client(settings, broker_url)
    try:
        handler = build_inbound(settings, client)
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
    try:
        plan = handler.inspect(Received(raw=file.read_bytes(), source="inspect"))
    except InboundUnavailableError as exc:
        fail(EXIT_BROKER, f"{public_url(url)}: {exc}")
    except OSError as exc:
        fail(EXIT_FAILED, f"cannot read {file}: {exc.strerror}")
    handled = plan.handled
    bounced = [r for r in plan.recipients or [] if r.get("state") == "bounced"]
    suppressed = [address for address, _ in plan.suppress]
    result: dict[str, Any] = {
        "message_id": handled.message_id,
        "kind": handled.kind,
        "outcome": handled.outcome,
        "reason": handled.reason,
        "job_id": handled.job_id,
        "bounced": bounced,
        "suppress": suppressed,
    }
    if handled.kind == "action":
        result.update(
            key=handled.details.get("key") or None,
            action=handled.details.get("action") or None,
            actor=handled.details.get("actor") or None,
        )
    if as_json:
        click.echo(orjson.dumps(result).decode())
        return
    click.echo(f"kind:       {handled.kind}")
    click.echo(f"outcome:    {handled.outcome}")
    if handled.reason:
        click.echo(f"reason:     {handled.reason}")
    click.echo(f"message id: {handled.message_id or '-'}")
    click.echo(f"job:        {handled.job_id or '-'}")
    if handled.kind == "action":
        for name in ("key", "action", "actor"):
            click.echo(f"{name + ':':<12}{handled.details.get(name) or '-'}")
    for r in bounced:
        click.echo(f"bounced:    {r['address']} {r['code']} {r['message']}")
    for address in suppressed:
        click.echo(f"suppress:   {address}")
