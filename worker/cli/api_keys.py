"""``mailworker api-key``: the keys the HTTP API and the ``/ops/`` console accept."""

from __future__ import annotations

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, EXIT_NOT_FOUND, EXIT_USAGE, fail, settings_or_fail
from settings import public_url
from worker.api.keys import SCOPES, ApiKeyError, ApiKeys

__all__ = ["api_key"]

_BROKER_URL = click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)


def _keys(broker_url: str | None) -> tuple[ApiKeys, str]:
    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    return ApiKeys(client, namespace=settings.namespace), url


@click.group("api-key")
def api_key() -> None:
    """API keys: each has a name and scopes (send, read, ops); only its hash is kept.

    send: POST notifications. read: GET notifications, events and dead letters.
    ops: requeue and purge dead letters, and log in to the /ops/ console.
    """


@api_key.command()
@click.argument("name")
@click.option(
    "--scopes",
    required=True,
    help=f"Comma list of {', '.join(SCOPES)} (e.g. send,read).",
)
@_BROKER_URL
def create(name: str, scopes: str, broker_url: str | None) -> None:
    """Create the key NAME; its secret is printed once, alone on the last line."""
    keys, url = _keys(broker_url)
    try:
        key, secret = keys.create(name, scopes.split(","))
    except ApiKeyError as exc:
        fail(EXIT_USAGE, str(exc))
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    click.echo(
        f"created key {key.name!r} (scopes {','.join(sorted(key.scopes))}); "
        "it is shown once, store it now:",
        err=True,
    )
    click.echo(secret)


@api_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@_BROKER_URL
def list_(as_json: bool, broker_url: str | None) -> None:
    """Every key: name, scopes, when it was created (never a secret)."""
    keys, url = _keys(broker_url)
    try:
        found = keys.list()
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    for key in found:
        scopes = ",".join(sorted(key.scopes))
        if as_json:
            record = {
                "name": key.name,
                "scopes": scopes.split(","),
                "at": key.created_at,
            }
            click.echo(orjson.dumps(record).decode())
        else:
            click.echo(f"{key.created_at[:19]}  {key.name}  {scopes}")
    if not found and not as_json:
        click.echo("no API key exists", err=True)


@api_key.command()
@click.argument("name")
@_BROKER_URL
def revoke(name: str, broker_url: str | None) -> None:
    """Delete the key NAME: requests with it are refused at once (exit 3 if none)."""
    keys, url = _keys(broker_url)
    try:
        revoked = keys.revoke(name)
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    if not revoked:
        fail(EXIT_NOT_FOUND, f"no API key is named {name!r}")
    click.echo(f"{name}: revoked")
