"""``mailworker actions``: the engine's side of e-mail actions (close a job's keys)."""

from __future__ import annotations

import click

from common.exits import EXIT_BROKER, EXIT_NOT_FOUND, fail
from producers.cli import make_producer
from settings import BrokerUnavailableError

__all__ = ["actions"]


@click.group()
def actions() -> None:
    """E-mail actions: the keys that let a notification's recipients act by replying."""


@actions.command("close")
@click.argument("job_id")
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
def close(job_id: str, broker_url: str | None) -> None:
    """Close every action key of JOB_ID: later replies are refused "closed".

    For a task that moved on (another approver acted). A key already used keeps its
    outcome. Exit codes: 0 closed (or already closed), 3 the job has no action keys,
    4 broker unreachable.
    """
    producer = make_producer(broker_url)
    try:
        result = producer.close_actions(job_id)
    except BrokerUnavailableError as exc:
        fail(EXIT_BROKER, str(exc))
    if not result.keys:
        fail(EXIT_NOT_FOUND, f"job {job_id} has no action keys (unknown or expired)")
    click.echo(f"closed {result.closed} of {result.keys} keys of job {job_id}")
