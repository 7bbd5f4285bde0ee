"""The configuration (docs/configuration.md) as pydantic models: every section and rule, no I/O."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from settings.durations import Duration

__all__ = [
    "EVENT_TYPES",
    "BreakerSettings",
    "EventType",
    "EventsSettings",
    "IntegratedService",
    "Limits",
    "OpenAuthService",
    "RetryPolicy",
    "Settings",
    "SmtpConnection",
    "StatusSettings",
    "header_text",
]

SERVICE_NAME = re.compile(r"^[a-z0-9_-]+$")
_ADDRESS = re.compile(
    r"^[^@\s<>\"(),;:\\\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _service_name(value: str) -> str:
    if not SERVICE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a service name: use lowercase a-z, 0-9, '_' and '-'"
        )
    return value


def _plain_address(value: str) -> str:
    if value and not _ADDRESS.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


# What RFC 5322 allows in a header is printable text and WSP: every C0 control but TAB,
# and DEL, are refused. So are NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR, which
# str.splitlines() (and so Python's own e-mail parser) takes for line breaks.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_CONTROL_NAMES = {"\r": "CR", "\n": "LF", "\0": "NUL", "\x7f": "DEL"}


def header_text(value: str) -> str:
    """Return ``value`` if it may go into a mail header; shared by jobs and settings.

    Raises:
        ValueError: it holds CR, LF, NUL or another control character (TAB is allowed).
    """
    match = _CONTROL.search(value)
    if match is not None:
        char = match.group()
        name = _CONTROL_NAMES.get(char, f"U+{ord(char):04X}")
        raise ValueError(
            f"control character {name} at position {match.start()}: CR, LF, NUL and "
            "other control characters are not allowed (header injection)"
        )
    return value


ServiceName = Annotated[str, AfterValidator(_service_name)]
Address = Annotated[str, AfterValidator(_plain_address)]
Line = Annotated[str, AfterValidator(header_text)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    """``[limits]``: what one notification may be."""

    max_message_bytes: int = Field(26_214_400, ge=1024)
    max_recipients: int = Field(500, ge=1)


class RetryPolicy(_Section):
    """``[retry]``: broker attempts, backoff and in-process retries."""

    max_attempts: int = Field(8, ge=1)
    min_backoff: Duration = 30.0
    max_backoff: Duration = 3600.0
    max_age: Duration = 86400.0
    transport_retries: int = Field(2, ge=0, le=10)
    max_in_process_wait: Duration = 5.0
    redelivery_limit: int = Field(5, ge=1)
    redelivery_timeout: Duration = 15.0

    @model_validator(mode="after")
    def _redelivery(self) -> RetryPolicy:
        if self.redelivery_timeout < 1:
            raise ValueError("redelivery_timeout must be at least 1s")
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> RetryPolicy:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff must not be greater than max_backoff")
        return self

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first).

        Exponential from ``min_backoff``, up to half again at random, so that jobs that
        failed together (an outage) come back spread out; never above ``max_backoff``.
        """
        base = self.min_backoff * 2 ** min(max(attempt - 1, 0), 32)
        return min(self.max_backoff, random.uniform(base, 1.5 * base))


class BreakerSettings(_Section):
    """``[breaker]``: when a failing service is skipped, and for how long."""

    failures: int = Field(5, ge=1)
    cooldown: Duration = 60.0


class StatusSettings(_Section):
    """``[status]``: how long status records, dead letters and idempotency keys live."""

    ttl: Duration = 7 * 86400.0
    idempotency_ttl: Duration = 86400.0


# The kinds of event on the events stream (docs/design.md §9).
EventType = Literal[
    "delivery.sent",
    "delivery.dead",
    "delivery.bounced",
    "action.accepted",
    "action.refused",
]
EVENT_TYPES: tuple[EventType, ...] = (
    "delivery.sent",
    "delivery.dead",
    "delivery.bounced",
    "action.accepted",
    "action.refused",
)


class EventsSettings(_Section):
    """``[events]``: the outcome stream engines read (``{namespace}:events``)."""

    max_len: int = Field(1_000_000, ge=1_000)
    types: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES))


Security = Literal["none", "starttls", "tls"]


class SmtpConnection(_Section):
    """One ``[[smtp]]`` connection ("SMTP Connections"), tried in file order."""

    name: ServiceName
    enabled: bool = True
    from_address: Address
    from_display_name: Line = ""
    server: Line
    port: Port | None = None
    ssl: bool | None = None
    security: Security | None = None
    auth: Literal["password", "xoauth2", "none"] | None = None
    username: Line = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    integrated_service: str = ""
    verify_certificates: bool = True
    ca_bundle: Path | None = None
    timeout: Duration = 30.0
    max_connections: int = Field(8, ge=1, le=1000)
    max_connections_total: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _rules(self) -> SmtpConnection:
        self._ssl_agrees()
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        auth = self.effective_auth
        if auth == "password" and not self.username:
            raise ValueError("auth = 'password' needs username")
        if auth == "password" and self.password is None and self.password_file is None:
            raise ValueError("auth = 'password' needs password or password_file")
        if auth == "xoauth2" and not self.integrated_service:
            raise ValueError("auth = 'xoauth2' needs integrated_service")
        if auth == "xoauth2" and not self.username:
            raise ValueError("auth = 'xoauth2' needs username (the mailbox)")
        return self

    def _ssl_agrees(self) -> None:
        """Refuse an ``ssl`` that says another TLS mode than ``security``."""
        if self.ssl is None or self.security is None:
            return
        port = self.port or {"tls": 465, "starttls": 587, "none": 25}[self.security]
        implied = ("tls" if port == 465 else "starttls") if self.ssl else "none"
        if implied != self.security:
            on = f" on port {port}" if self.ssl else ""
            raise ValueError(
                f"ssl = {'true' if self.ssl else 'false'}{on} means security = "
                f"{implied!r}, which contradicts security = {self.security!r}: "
                "give ssl or security, not both"
            )

    @property
    def effective_security(self) -> Security:
        """The TLS mode the security rule (docs/configuration.md, ``ssl``) gives."""
        if self.security is not None:
            return self.security
        if self.ssl:
            return "tls" if self.port in (465, None) else "starttls"
        return "none"

    @property
    def effective_port(self) -> int:
        """The configured port, or the usual one for the TLS mode."""
        if self.port is not None:
            return self.port
        return {"tls": 465, "starttls": 587, "none": 25}[self.effective_security]

    @property
    def effective_auth(self) -> str:
        """``auth``, or ``password`` when a username is set and ``none`` otherwise."""
        if self.auth is not None:
            return self.auth
        return "password" if self.username else "none"


class OpenAuthService(_Section):
    """One ``[[openauth]]`` service ("OpenAuth-Based E-Mail Services"); preferred over SMTP."""

    name: ServiceName
    enabled: bool = True
    client_type: Literal["office365"]
    service: str
    service_identity: Address
    scopes: list[Line] = Field(default_factory=list)
    max_concurrent_requests: int = Field(4, ge=1)
    concurrency_scope: Literal["app", "mailbox"] = "app"
    messages_per_minute: int = Field(30, ge=0)
    recipients_per_day: int = Field(10_000, ge=0)
    overflow: Literal["failover", "wait"] = "failover"
    timeout: Duration = 30.0


class IntegratedService(_Section):
    """``[integrated_services.NAME]``: an Entra ID application used as a service account."""

    account_type: Literal["service"]
    tenant_id: Line
    client_id: Line
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    private_key_passphrase: SecretStr | None = None
    private_key_passphrase_file: Path | None = None
    authority_host: Line = "https://login.microsoftonline.com"
    graph_endpoint: Line = "https://graph.microsoft.com"
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _credential(self) -> IntegratedService:
        secret = self.client_secret is not None or self.client_secret_file is not None
        cert = self.certificate_file is not None or self.private_key_file is not None
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("give client_secret or client_secret_file, not both")
        if secret and cert:
            raise ValueError("give a client secret or a certificate, not both")
        if not secret and not cert:
            raise ValueError(
                "needs client_secret(_file) or certificate_file + private_key_file"
            )
        if cert and (self.certificate_file is None or self.private_key_file is None):
            raise ValueError(
                "a certificate credential needs certificate_file and private_key_file"
            )
        return self


class Settings(BaseSettings):
    """The whole configuration. Built by ``settings.loading.load_settings``."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    broker_url: SecretStr = SecretStr(DEFAULT_BROKER_URL)
    broker_ca_bundle: Path | None = None
    namespace: Annotated[str, Field(pattern=NAMESPACE.pattern)] = "mailworker"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_recipients: Literal["full", "domain", "hash"] = "full"
    redirect_all_to: Address = ""
    limits: Limits = Field(default_factory=Limits)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    smtp: list[SmtpConnection] = Field(default_factory=list)
    openauth: list[OpenAuthService] = Field(default_factory=list)
    integrated_services: dict[ServiceName, IntegratedService] = Field(
        default_factory=dict
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file and the environment are merged by settings.loading, whose rules
        # (named services, unknown variables as errors) pydantic-settings cannot express.
        return (init_settings,)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names: set[str] = set()
        services: list[OpenAuthService | SmtpConnection] = [*self.openauth, *self.smtp]
        for service in services:
            if service.name in names:
                raise ValueError(f"service name {service.name!r} is used twice")
            names.add(service.name)
        for oa in self.openauth:
            if oa.service not in self.integrated_services:
                raise ValueError(
                    f"openauth[{oa.name}].service: no [integrated_services.{oa.service}]"
                )
        for conn in self.smtp:
            if conn.effective_auth == "xoauth2" and (
                conn.integrated_service not in self.integrated_services
            ):
                raise ValueError(
                    f"smtp[{conn.name}].integrated_service: "
                    f"no [integrated_services.{conn.integrated_service}]"
                )
        return self

    @property
    def service_names(self) -> list[str]:
        """Every configured service, enabled or not, in delivery order."""
        return [s.name for s in self.openauth] + [s.name for s in self.smtp]

    @property
    def delivery_order(self) -> list[str]:
        """Enabled OpenAuth services, then enabled SMTP connections (README "Delivery")."""
        return [s.name for s in self.openauth if s.enabled] + [
            s.name for s in self.smtp if s.enabled
        ]
