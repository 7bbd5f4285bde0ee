"""``mailworker suppress``: the addresses later jobs do not send to."""

from __future__ import annotations

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, EXIT_NOT_FOUND, EXIT_USAGE, fail, settings_or_fail
from settings import public_url
from settings.models import Address
from worker.inbound.suppression import SuppressionList

__all__ = ["suppress"]

_BROKER_URL = click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)


def _list(broker_url: str | None) -> tuple[SuppressionList, str]:
    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    return SuppressionList(client, namespace=settings.namespace), url


def _address(value: str) -> str:
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Address).validate_python(value.strip())
    except ValidationError:
        fail(EXIT_USAGE, f"ADDR: {value!r} is not an e-mail address")


@click.group()
def suppress() -> None:
    """The suppression list: hard-bounced (or added) addresses jobs skip.

    A job's suppressed recipient has state "suppressed"; a job whose every recipient
    is suppressed is dead with reason "suppressed".
    """


@suppress.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@_BROKER_URL
def list_(as_json: bool, broker_url: str | None) -> None:
    """Every suppressed address, newest first: address, reason, job, since when."""
    store, url = _list(broker_url)
    try:
        entries = store.entries()
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    for e in entries:
        if as_json:
            click.echo(orjson.dumps(e).decode())
        else:
            click.echo(
                f"{e['at'][:19]}  {e['address']}  {e['reason']}  {e['job_id'] or '-'}"
            )
    if not entries and not as_json:
        click.echo("no address is suppressed", err=True)


@suppress.command()
@click.argument("addr")
@click.option("--reason", default="added by an operator", show_default=True)
@_BROKER_URL
def add(addr: str, reason: str, broker_url: str | None) -> None:
    """Suppress ADDR: later jobs do not send to it."""
    address = _address(addr)
    store, url = _list(broker_url)
    try:
        added = store.add(address, reason=" ".join(reason.split()))
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    click.echo(f"{address}: {'suppressed' if added else 'was suppressed already'}")


@suppress.command()
@click.argument("addr")
@_BROKER_URL
def remove(addr: str, broker_url: str | None) -> None:
    """Take ADDR off the list (exit 3 when it was not on it)."""
    store, url = _list(broker_url)
    try:
        removed = store.remove(addr)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    if not removed:
        fail(EXIT_NOT_FOUND, f"{addr} is not suppressed")
    click.echo(f"{addr}: no longer suppressed")
