"""``mailworker inbound``: build the handler and every enabled source, and run them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import redis
import structlog

from settings import ConfigError, InboundSource, Settings
from worker.inbound.handler import Inbound
from worker.inbound.model import Source
from worker.inbound.returnpath import ReturnPath
from worker.inbound.store import InboundStore
from worker.services import Accounts

if TYPE_CHECKING:
    from worker.actions.replies import ActionReplies

__all__ = ["build_inbound", "build_sources", "run_sources"]

log = structlog.get_logger("mailworker.inbound")


def build_inbound(settings: Settings, client: redis.Redis) -> Inbound:
    """The handler, with the return path and SMTP connections the config names.

    Raises:
        ConfigError: the ``[bounces]`` secret file cannot be read.
    """
    store = InboundStore(
        client,
        namespace=settings.namespace,
        ttl=settings.status.ttl,
        events=settings.events,
    )
    return Inbound(
        store,
        return_path=ReturnPath.from_settings(settings.bounces),
        smtp_services=frozenset(c.name for c in settings.smtp),
        actions=_actions(settings, client),
    )


def _actions(settings: Settings, client: redis.Redis) -> ActionReplies | None:
    """The handler of action replies, when ``[email_actions]`` is on."""
    if not settings.email_actions.enabled:
        return None
    from producers.enqueue import Producer
    from worker.actions.confirm import Confirmations
    from worker.actions.replies import ActionReplies

    confirmations = None
    if settings.email_actions.confirm_by_email:
        producer = Producer(
            client,
            namespace=settings.namespace,
            limits=settings.limits,
            status_ttl=settings.status.ttl,
            idempotency_ttl=settings.status.idempotency_ttl,
        )
        confirmations = Confirmations(producer)
    return ActionReplies(
        client,
        namespace=settings.namespace,
        settings=settings.email_actions,
        events=settings.events,
        ttl=settings.status.ttl,
        confirmations=confirmations,
        mailboxes=frozenset(s.name for s in settings.inbound if s.kind == "graph"),
    )


def build_sources(
    settings: Settings,
    client: redis.Redis,
    inbound: Inbound,
    *,
    only: str | None = None,
) -> list[Source]:
    """Every enabled source (or only the one named), ready to run.

    Raises:
        ConfigError: ``only`` names no source, or none is enabled.
    """
    chosen = [s for s in settings.inbound if s.enabled and only in (None, s.name)]
    if only is not None and not chosen:
        names = ", ".join(s.name for s in settings.inbound) or "none"
        raise ConfigError(
            "--source", f"no enabled [[inbound]] source {only!r} ({names})"
        )
    if not chosen:
        raise ConfigError("inbound", "no enabled [[inbound]] source to run")
    accounts = Accounts(settings)
    return [_source(settings, client, inbound, accounts, c) for c in chosen]


def _source(
    settings: Settings,
    client: redis.Redis,
    inbound: Inbound,
    tokens: Accounts,
    config: InboundSource,
) -> Source:
    if config.kind == "smtp":
        from worker.inbound.receiver import SmtpReceiver

        return SmtpReceiver(config, sink=inbound)
    if config.kind == "imap":
        from worker.inbound.imap import ImapSource

        provider = (
            tokens.get(config.integrated_service) if config.auth == "xoauth2" else None
        )
        return ImapSource(
            config,
            sink=inbound,
            client=client,
            namespace=settings.namespace,
            tokens=provider,
        )
    from worker.inbound.graph import GraphSource

    return GraphSource(
        config,
        sink=inbound,
        tokens=tokens.get(config.integrated_service),
        service=settings.integrated_services[config.integrated_service],
        client=client,
        namespace=settings.namespace,
    )


def run_sources(sources: list[Source], stop: threading.Event) -> None:
    """Run each source in its own thread until ``stop`` is set, then wait for them."""
    threads = []
    for source in sources:
        thread = threading.Thread(
            target=_run_one, args=(source, stop), name=f"inbound-{source.name}"
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


def _run_one(source: Source, stop: threading.Event) -> None:
    try:
        source.run(stop)
    except Exception:
        # A source that cannot run (its port is taken) stops the whole process: a
        # supervisor restarts it, and the operator sees why.
        log.error("inbound_source_crashed", source=source.name, exc_info=True)
        stop.set()
