"""``mailworker events tail``: the outcome events engines read, for people."""

from __future__ import annotations

from typing import Any, cast

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import EXIT_BROKER, fail, settings_or_fail
from common.keys import events_key
from settings import EVENT_TYPES, public_url

__all__ = ["events"]

# Entries as redis-py returns them: (stream id, fields).
_Entry = tuple[bytes, dict[bytes, bytes]]


@click.group()
def events() -> None:
    """Read the outcome events on the events stream ({namespace}:events)."""


@events.command("tail")
@click.option("--count", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option(
    "--type", "types", multiple=True, type=click.Choice(EVENT_TYPES), help="Only these."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
def tail(
    count: int,
    follow: bool,
    types: tuple[str, ...],
    as_json: bool,
    broker_url: str | None,
) -> None:
    """Print the last COUNT events, oldest first; with --follow, then every new one.

    Reading here takes nothing from an engine's consumer group.
    """
    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    key = events_key(settings.namespace)
    try:
        last = reversed(
            cast("list[_Entry]", client.xrevrange(key, "+", "-", count=count))
        )
        # An empty stream: everything from its start is new (a fixed "$" would miss
        # what is added between two reads).
        position = _show(list(last), types, as_json) or "0-0"
        while follow:
            replies = cast(
                "list[tuple[bytes, list[_Entry]]] | None",
                client.xread({key: position}, block=1000, count=1000),
            )
            for _stream, entries in replies or []:
                position = _show(entries, types, as_json) or position
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    except KeyboardInterrupt:
        return


def _show(entries: list[_Entry], types: tuple[str, ...], as_json: bool) -> str | None:
    """Print ``entries`` (those of ``types``, when given); the last stream id seen."""
    seen = None
    for stream_id, raw in entries:
        seen = stream_id.decode()
        fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        if types and fields.get("type") not in types:
            continue
        data: Any = orjson.loads(fields["data"]) if fields.get("data") else None
        if as_json:
            event = {k: fields.get(k, "") for k in ("id", "type", "job_id", "at")}
            click.echo(orjson.dumps({**event, "data": data}).decode(), nl=True)
        else:
            click.echo(
                f"{fields.get('at', ''):<32} {fields.get('type', ''):<16} "
                f"{fields.get('job_id', ''):<36} {_summary(data)}"
            )
    return seen


def _summary(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    if "actor" in data:  # action.accepted / action.refused
        line = f"{data.get('action') or '-'} by {data['actor']}"
        return (f"{line}: {data['reason']}" if data.get("reason") else line)[:100]
    if data.get("address"):  # delivery.bounced
        line = f"{data['address']} {data.get('code', '')}: {data.get('message', '')}"
        return line[:100]
    if data.get("reason"):
        error = data.get("error") or {}
        return f"{data['reason']}: {error.get('message', '')}"[:100]
    counts = data.get("counts") or {}
    return f"{data.get('service') or '-'} accepted={counts.get('accepted', 0)}"
