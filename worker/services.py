"""Build the configured services, in delivery order, with their shared limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from producers.job import Mailbox
from settings import (
    ConfigError,
    IntegratedService,
    Settings,
    SmtpConnection,
    read_secret,
)
from worker.delivery import Service
from worker.inbound.returnpath import ReturnPath
from worker.limits import Slots, graph_budget, smtp_budget
from worker.transports.smtp import SmtpTransport, lease_seconds

if TYPE_CHECKING:
    from worker.transports.oauth import TokenProvider

__all__ = ["Accounts", "build_services"]

_TOKEN_TIMEOUT = 30.0


def _password_reader(conn: SmtpConnection) -> Callable[[], str | None]:
    field_name = f"smtp[{conn.name}].password_file"
    first = read_secret(conn.password, conn.password_file, field_name)  # fail at start

    def current() -> str | None:
        if conn.password_file is None:
            return first.get_secret_value() if first is not None else None
        # Read again: it may have been rotated.
        secret = read_secret(None, conn.password_file, field_name)
        return secret.get_secret_value() if secret is not None else None

    return current


class Accounts:
    """One token provider per integrated service, shared by every service that uses it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._providers: dict[str, TokenProvider] = {}

    def get(self, name: str) -> TokenProvider:
        """The provider of integrated service ``name``, made on first use."""
        if name not in self._providers:
            # msal, requests and cryptography (~70 ms of imports and ~10 MB per
            # process) load only when a configuration uses OpenAuth.
            from worker.transports.oauth import HttpClient, TokenProvider

            svc: IntegratedService = self._settings.integrated_services[name]
            http = HttpClient(
                verify=str(svc.ca_bundle) if svc.ca_bundle else True,
                timeout=_TOKEN_TIMEOUT,
            )
            provider = TokenProvider(name, svc, http)
            provider._credential()  # read secret and certificate files now: fail at start
            self._providers[name] = provider
        return self._providers[name]


def build_services(settings: Settings, client: redis.Redis) -> list[Service]:
    """Enabled services in delivery order (docs/design.md §5): OpenAuth first, then SMTP.

    Args:
        settings: the configuration.
        client: Redis, for limits shared by all workers (connects lazily).

    Raises:
        ConfigError: a secret file is unreadable, or no service is enabled.
    """
    ns = settings.namespace
    accounts = Accounts(settings)
    services: list[Service] = []
    for oa in settings.openauth:
        if not oa.enabled:
            continue
        from worker.transports.graph import GraphTransport
        from worker.transports.oauth import HttpClient

        svc = settings.integrated_services[oa.service]
        scope = (
            svc.client_id
            if oa.concurrency_scope == "app"
            else (f"{svc.client_id}:{oa.service_identity}")
        )
        transport = GraphTransport(
            oa,
            graph_endpoint=svc.graph_endpoint,
            tokens=accounts.get(oa.service),
            http=HttpClient(
                verify=str(svc.ca_bundle) if svc.ca_bundle else True, timeout=oa.timeout
            ),
            slots=Slots(
                client,
                f"{ns}:slots:graph:{scope}",
                limit=oa.max_concurrent_requests,
                lease=2 * oa.timeout + 10,
            ),
            budget=graph_budget(client, ns, oa),
        )
        services.append(Service(transport, Mailbox(address=oa.service_identity)))
    return_path = ReturnPath.from_settings(settings.bounces)
    for conn in settings.smtp:
        if not conn.enabled:
            continue
        xoauth2 = conn.effective_auth == "xoauth2"
        total = None
        if conn.max_connections_total:
            total = Slots(
                client,
                f"{ns}:slots:smtp:{conn.name}",
                limit=conn.max_connections_total,
                lease=lease_seconds(conn),
            )
        smtp = SmtpTransport(
            conn,
            password=_password_reader(conn),
            tokens=accounts.get(conn.integrated_service) if xoauth2 else None,
            total=total,
            budget=smtp_budget(client, ns, conn),
        )
        from_box = Mailbox(address=conn.from_address, name=conn.from_display_name)
        services.append(Service(smtp, from_box, return_path))
    if not services:
        raise ConfigError(
            "smtp", "no enabled service: configure an [[openauth]] or [[smtp]] service"
        )
    return services
