"""The ``mailworker`` command: dev, worker, send, status, test-connection, config check."""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING, Any

import click
import orjson
import redis

from common.broker import broker_error, connect_settings
from common.exits import (
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    fail,
    settings_or_fail,
)
from common.keys import QUEUES
from producers.cli import defaults_in_use, send
from settings import ConfigError, Settings, config_path, public_url
from worker.cli.actions import actions
from worker.cli.api import api
from worker.cli.api_keys import api_key
from worker.cli.dead import dead
from worker.cli.dev import dev
from worker.cli.events import events
from worker.cli.inbound import inbound
from worker.cli.output import render_config, render_status
from worker.cli.scheduled import scheduled
from worker.cli.stats import queue
from worker.cli.suppress import suppress
from worker.middleware.tuning import POLL_ENV

if TYPE_CHECKING:
    from worker.delivery import Service

__all__ = ["main"]

# The variable that overrides broker_url (settings.loading). The worker processes read it.
BROKER_URL_ENV = "MAILWORKER_BROKER_URL"

# The collector's thresholds in worker processes (see worker()).
GC_THRESHOLD = (10_000, 10, 10)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mailworker")
def main() -> None:
    """mailworker: a queue-driven background mail worker.

    Configuration: MAILWORKER_CONFIG, else ./mailworker.toml. MAILWORKER_BROKER_URL
    overrides broker_url. Exit codes: 0 ok, 1 operation failed, 2 usage or configuration
    error, 3 id not found, 4 broker unreachable or refusing the login.
    """


main.add_command(send)
main.add_command(dead)
main.add_command(dev)
main.add_command(queue)
main.add_command(events)
main.add_command(inbound)
main.add_command(suppress)
main.add_command(actions)
main.add_command(api_key)
main.add_command(api)
main.add_command(scheduled)


def _queue_names(queues: tuple[str, ...]) -> list[str]:
    names = []
    for item in (q for value in queues for q in value.split(",") if q):
        if item in QUEUES:
            names.append(QUEUES[item])
        elif item in QUEUES.values():
            names.append(item)
        else:
            fail(EXIT_USAGE, f"--queues: {item!r} is not one of high, normal, bulk")
    return names


@main.command()
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(1, 256),
    default=os.cpu_count() or 1,
    show_default="CPU count",
    help="Worker processes.",
)
@click.option(
    "-t",
    "--threads",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Threads per process (each holds at most one SMTP session per connection).",
)
@click.option(
    "-Q",
    "--queues",
    multiple=True,
    help="Priorities to consume: high, normal, bulk (comma list; default all).",
)
@click.option(
    "--shutdown-timeout",
    type=click.IntRange(1, 3600),
    default=20,
    show_default=True,
    help="Seconds in-flight jobs get to finish on SIGTERM; the rest stay queued.",
)
@click.option(
    "--poll-interval",
    type=click.IntRange(10, 10_000),
    default=50,
    show_default=True,
    help=(
        "Longest pause (ms) between polls of an idle queue (an enqueue wakes idle "
        "workers at once; the poll catches retries coming due): latency vs Redis load."
    ),
)
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
@click.option(
    "--metrics",
    "metrics_listen",
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics of this host's processes here, e.g. 127.0.0.1:9191.",
)
def worker(
    processes: int,
    threads: int,
    queues: tuple[str, ...],
    shutdown_timeout: int,
    poll_interval: int,
    broker_url: str | None,
    metrics_listen: str | None,
) -> None:
    """Run worker processes on the configured broker (Dramatiq's CLI underneath)."""
    if broker_url:
        # The worker processes load the configuration again, from the environment.
        os.environ[BROKER_URL_ENV] = broker_url
    settings = settings_or_fail()
    names = _queue_names(queues)
    _check_worker(settings)
    forks = _metrics(settings, metrics_listen)
    _log_start(
        settings,
        queues=names or list(QUEUES.values()),
        processes=processes,
        threads=threads,
        shutdown_timeout=shutdown_timeout,
    )
    args = [
        "worker.entrypoint:broker",
        "--skip-logging",
        "-p",
        str(processes),
        "-t",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout * 1000),
    ]
    if names:
        args += ["-Q", *names]
    args += forks
    # An idle consumer polls Redis at most this often (ms): pickup latency against Redis
    # load. Each idle process issues about 6 * 1000/poll small scripts a second.
    # (worker.middleware.WorkerTuning applies it in each worker process.)
    os.environ[POLL_ENV] = str(poll_interval)
    sys.stdout.flush()
    # Dramatiq's CLI runs in this process and forks the worker processes, which inherit
    # the modules imported here: each starts without importing them again.
    import dramatiq.cli

    # What is allocated by now lives as long as the process: keep the collector of each
    # forked worker from scanning it again and again (and from copying its pages).
    gc.freeze()
    # A bulk message decodes into thousands of small containers, and at CPython's default
    # (a young-generation pass every 700 allocations) the collector runs very often. A
    # larger threshold saves CPU per job (docs/benchmarks.md). Cyclic garbage is still
    # collected, in larger batches.
    gc.set_threshold(*GC_THRESHOLD)
    parser = dramatiq.cli.make_argument_parser()  # type: ignore[no-untyped-call]
    sys.exit(dramatiq.cli.main(parser.parse_args(args)))  # type: ignore[no-untyped-call]


def _metrics(settings: Settings, listen: str | None) -> list[str]:
    """Prepare the metrics directory; Dramatiq's arguments for the ``--metrics`` server.

    The directory comes first: the worker processes, forked later, write there.
    """
    from worker.metrics.exposition import LISTEN_ENV, parse_listen
    from worker.metrics.process import launch

    if listen is None:
        launch(settings, "worker", record=False)
        return []
    if not settings.metrics.enabled:
        fail(EXIT_USAGE, "--metrics: [metrics] enabled is false")
    try:
        address = parse_listen(listen)
    except ValueError as exc:
        fail(EXIT_USAGE, f"--metrics: {exc}")
    _check_listen(address)
    launch(settings, "worker", record=False)
    os.environ[LISTEN_ENV] = listen
    # Dramatiq starts it once the worker processes are up, and stops it with them.
    return ["--fork-function", "worker.metrics.exposition:serve_forked"]


def _check_listen(address: tuple[str, int]) -> None:
    """Exit 2 now when the metrics address cannot be bound, not later in its process."""
    import socket

    try:
        infos = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.bind(infos[0][4])
    except OSError as exc:
        fail(
            EXIT_USAGE, f"--metrics: cannot listen on {address[0]}:{address[1]}: {exc}"
        )


def _check_worker(settings: Settings) -> None:
    """Exit 2 on a configuration the worker cannot run, 4 when the broker is away."""
    from worker.app import build_services
    from worker.events.signing import signer_for

    url = settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    try:
        build_services(settings, client)
        for webhook in settings.webhook:
            if webhook.enabled:
                signer_for(webhook)  # its secret must be readable, and a key
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
    try:
        client.ping()
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    client.close()


def _log_start(
    settings: Settings,
    *,
    queues: list[str],
    processes: int,
    threads: int,
    shutdown_timeout: int,
) -> None:
    """Configure this (the main) process's logging and write the ``worker_started`` line."""
    from importlib.metadata import version

    import structlog

    from worker.app import secrets_of
    from worker.logging import configure

    configure(
        log_format=settings.log_format,
        log_recipients=settings.log_recipients,
        secrets=secrets_of(settings),  # readable: _check_worker built the services
    )
    structlog.get_logger("mailworker.worker").info(
        "worker_started",
        version=version("mailworker"),
        broker=public_url(settings.broker_url.get_secret_value()),
        namespace=settings.namespace,
        queues=queues,
        services=settings.delivery_order,
        processes=processes,
        threads=threads,
        shutdown_timeout=shutdown_timeout,
    )


@main.command()
@click.argument("job_id")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the record as one JSON object."
)
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
def status(job_id: str, as_json: bool, broker_url: str | None) -> None:
    """Show the status record of one job (exit 3 when unknown or expired)."""
    from worker.actions.keys import action_outcomes
    from worker.status import StatusStore

    settings = settings_or_fail()
    url = broker_url or settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    store = StatusStore(client, namespace=settings.namespace, ttl=settings.status.ttl)
    try:
        record: dict[str, Any] | None = store.get(job_id)  # type: ignore[assignment]
        # E-mail actions: per recipient, whether an action came (no key is shown).
        actions = action_outcomes(client, settings.namespace, job_id) if record else []
        if record is not None and actions:
            record = {**record, "actions": actions}
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    if record is None:
        where = f"{public_url(url)} namespace {settings.namespace!r}"
        if defaults_in_use(broker_url):
            where += " (the defaults: no configuration file, no MAILWORKER_BROKER_URL)"
        fail(
            EXIT_NOT_FOUND,
            f"no job {job_id} in {where}: unknown, or expired after status.ttl",
        )
    if as_json:
        click.echo(orjson.dumps(record).decode())
    else:
        click.echo("\n".join(render_status(record)))


@main.command("test-connection")
@click.option(
    "--service", help="The service to test (default: every enabled one, in order)."
)
@click.option("--to", "to", required=True, help="Recipient of the test message.")
def test_connection_command(service: str | None, to: str) -> None:
    """Send a real test message through a service, reporting each step.

    It never fails over.
    """
    from producers.job import parse_mailbox
    from worker.cli.testconn import describe, probe, services_to_test

    settings = settings_or_fail()
    box = parse_mailbox(to)
    if not isinstance(box, dict) or "@" not in str(box.get("address", "")):
        fail(EXIT_USAGE, f"--to: {to!r} is not an e-mail address")
    services = services_to_test(settings, service)
    if not services:
        known = ", ".join(settings.service_names) or "none configured"
        fail(
            EXIT_USAGE,
            f"--service: no service {service!r} (services: {known})"
            if service
            else "no enabled service to test",
        )
    failed = 0
    for item in services:
        click.echo(describe(item))
        try:
            report = probe(settings, item, str(box["address"]), echo=click.echo)
        except ConfigError as exc:
            fail(EXIT_USAGE, f"configuration: {exc}")
        click.echo(report.verdict)
        if not report.ok:
            failed += 1
            click.echo(f"mailworker: {item.name}: {report.cause}", err=True)
    if failed:
        sys.exit(EXIT_FAILED)


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@click.option(
    "--no-broker",
    is_flag=True,
    help="Do not connect to the broker (offline checks only).",
)
def config_check(no_broker: bool) -> None:
    """Check the configuration as `mailworker worker` would, and the broker.

    Reads every secret and key file, builds every enabled service, and pings the broker.
    Then prints the configuration with every secret masked, each service's resolved
    security, port, auth and scopes, in delivery order.

    Exit codes: 0 the worker would start with it, 2 it would refuse it (every problem
    named), 4 the broker is unreachable or refuses the login.
    """
    from worker.app import build_services, secrets_of
    from worker.events.signing import signer_for

    settings = settings_or_fail()
    url = settings.broker_url.get_secret_value()
    client = connect_settings(settings, url)
    try:
        secrets_of(settings)  # every secret file must be readable
        services = build_services(settings, client)  # what the worker refuses
        for webhook in settings.webhook:
            if webhook.enabled:
                signer_for(webhook)  # a whsec_ secret must be base64
    except ConfigError as exc:
        fail(EXIT_USAGE, f"configuration: {exc}")
    for service in services:
        service.transport.close()
    broker = f"{public_url(url)}, namespace {settings.namespace!r}"
    if no_broker:
        broker += ": not checked (--no-broker)"
    else:
        try:
            client.ping()
        except redis.RedisError as exc:
            fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
        broker += ": answers"
    client.close()
    path = config_path()
    click.echo(f"# configuration: {path if path else '(no file: defaults)'}")
    click.echo(f"# broker: {broker}")
    click.echo("\n".join(render_config(settings, scopes=_scopes(services))))


def _scopes(services: list[Service]) -> dict[str, list[str]]:
    """The OAuth scopes each built service asks for (Graph, or SMTP with XOAUTH2)."""
    from worker.transports.smtp import OUTLOOK_SCOPE, SmtpTransport

    scopes: dict[str, list[str]] = {}
    for service in services:
        transport = service.transport
        if isinstance(transport, SmtpTransport):
            if transport.conn.effective_auth == "xoauth2":
                scopes[service.name] = [OUTLOOK_SCOPE]
        else:
            scopes[service.name] = list(getattr(transport, "scopes", []))
    return scopes


# ---------------------------------------------------------------- health


@main.command()
@click.option(
    "--max-age",
    help=(
        "Oldest heartbeat that counts as alive, e.g. 15s "
        "(default: retry.redelivery_timeout, when other workers take a process's jobs)."
    ),
)
@click.option(
    "--min-processes",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Worker processes that must beat on this host (the worker's --processes).",
)
@click.option(
    "--host",
    help="Whose worker processes to check (default: this host's name, the pod's on Kubernetes).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60),
    default=3.0,
    show_default=True,
    help="Seconds the broker gets to answer.",
)
@click.option(
    "--broker-url", help="Redis URL (default: MAILWORKER_BROKER_URL, else the config)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def health(
    max_age: str | None,
    min_processes: int,
    host: str | None,
    timeout: float,
    broker_url: str | None,
    as_json: bool,
) -> None:
    """Exit 0 when the broker answers and this host's worker processes beat lately.

    For liveness and readiness probes and service monitors: 1 when fewer than
    --min-processes worker processes on the host beat within --max-age (none running,
    killed, frozen, or cut off from the broker), 2 on a configuration error, 4 when the
    broker does not answer.
    """
    import socket

    from settings.durations import parse_duration
    from worker.broker.heartbeats import check_host

    settings = settings_or_fail()
    try:
        limit = (
            settings.retry.redelivery_timeout
            if max_age is None
            else parse_duration(max_age)
        )
    except ValueError:
        fail(EXIT_USAGE, f"--max-age: {max_age!r} is not a duration (15s, 1m)")
    url = broker_url or settings.broker_url.get_secret_value()
    # Bounded by --timeout, not connect()'s 5 s and 10 s: a probe has its own timeout.
    client = connect_settings(settings, url, timeout=timeout, connect_timeout=timeout)
    try:
        found = check_host(
            client,
            settings.namespace,
            host or socket.gethostname(),
            max_age=limit,
            min_processes=min_processes,
        )
    except redis.RedisError as exc:
        fail(EXIT_BROKER, str(broker_error(public_url(url), exc)))
    finally:
        client.close()
    if as_json:
        report = found.as_dict(broker=public_url(url), namespace=settings.namespace)
        click.echo(orjson.dumps(report).decode())
    else:
        click.echo("\n".join(found.lines(broker=public_url(url))))
    if not found.healthy:
        fail(
            EXIT_FAILED,
            f"unhealthy: {len(found.alive)} of {min_processes} worker process(es) on "
            f"{found.host} beat within {limit:g}s (namespace {settings.namespace})",
        )
    if not as_json:
        click.echo(f"healthy: {len(found.alive)} worker process(es) on {found.host}")
