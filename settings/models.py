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

from settings.actions import EmailActionsSettings, receiving_source
from settings.durations import Duration
from settings.endpoints import parse_broker_url
from settings.errors import ConfigError

__all__ = [
    "EVENT_TYPES",
    "ApiSettings",
    "BouncesSettings",
    "BreakerSettings",
    "BrokerSettings",
    "EmailActionsSettings",
    "EventType",
    "EventsSettings",
    "InboundSource",
    "IntegratedService",
    "Limits",
    "OpenAuthService",
    "RetryPolicy",
    "Settings",
    "SmtpConnection",
    "StatusSettings",
    "Webhook",
    "header_text",
]

SERVICE_NAME = re.compile(r"^[a-z0-9_-]+$")
_ADDRESS = re.compile(
    r"^[^@\s<>\"(),;:\\\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# A plain name, or one hash tag (``{mailworker}``): on Redis Cluster every key of a
# hash-tagged namespace is in one slot (docs/scaling.md).
NAMESPACE = re.compile(r"^(?:[A-Za-z0-9_.-]{1,64}|\{[A-Za-z0-9_.-]{1,62}\})$")


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
    # How far ahead a job's ``send_at`` may be (README "Scheduled sends").
    max_schedule_ahead: Duration = 30 * 86400.0


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


def _broker_url(value: SecretStr) -> SecretStr:
    try:
        parse_broker_url(value.get_secret_value())
    except ConfigError as exc:
        raise ValueError(exc.reason) from None
    return value


class BrokerSettings(_Section):
    """``[broker]``: what an acknowledged write promises (docs/scaling.md).

    With ``wait_replicas`` above 0 an enqueue, an acknowledgement and a status write
    return only once that many replicas have it (Redis ``WAIT``, up to ``wait_timeout``).
    """

    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout: Duration = Field(1.0, gt=0, le=60)


class StatusSettings(_Section):
    """``[status]``: how long status records, dead letters and idempotency keys live."""

    ttl: Duration = 7 * 86400.0
    idempotency_ttl: Duration = 86400.0
    # At most this many dead letters; past it the oldest go first. 0 = no cap.
    max_dead_letters: int = Field(100_000, ge=0)


# The kinds of event on the events stream (docs/design.md §9).
EventType = Literal[
    "delivery.sent",
    "delivery.dead",
    "delivery.cancelled",
    "delivery.bounced",
    "action.accepted",
    "action.refused",
]
EVENT_TYPES: tuple[EventType, ...] = (
    "delivery.sent",
    "delivery.dead",
    "delivery.cancelled",
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
    # Sending budgets across all workers, sliding windows; 0 = no budget.
    messages_per_minute: int = Field(0, ge=0)
    messages_per_hour: int = Field(0, ge=0)
    recipients_per_day: int = Field(0, ge=0)
    overflow: Literal["failover", "wait"] = "failover"

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


# Which keys belong to which kind of [[inbound]] source (the rest are refused).
_INBOUND_KEYS: dict[str, frozenset[str]] = {
    "graph": frozenset(
        {"integrated_service", "mailbox", "folder", "processed_folder"}
        | {"failed_folder", "poll_interval"}
    ),
    "imap": frozenset(
        {"folder", "processed_folder", "failed_folder", "poll_interval", "server"}
        | {"port", "security", "auth", "username", "password", "password_file"}
        | {"integrated_service", "verify_certificates", "ca_bundle", "timeout"}
    ),
    "smtp": frozenset(
        {"listen", "protocol", "accept", "max_message_bytes", "tls_certificate_file"}
        | {"tls_key_file"}
    ),
}
_COMMON_INBOUND_KEYS = frozenset({"name", "enabled", "kind"})


def _listen_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. '127.0.0.1:2525')")
    return value


_RATE = re.compile(r"^\s*([1-9][0-9]{0,8})\s*/\s*(s|m|h)\s*$")
_RATE_SECONDS = {"s": 1, "m": 60, "h": 3600}


def _rate(value: str) -> str:
    if not _RATE.match(value):
        raise ValueError(f"{value!r} is not a rate: use N/s, N/m or N/h (e.g. '200/s')")
    return value.replace(" ", "")


Rate = Annotated[str, AfterValidator(_rate)]


def rate_parts(rate: str) -> tuple[int, int]:
    """A validated rate (``"200/s"``) as (requests, window in seconds)."""
    found = _RATE.match(rate)
    if found is None:
        raise ValueError(f"{rate!r} is not a rate")
    return int(found.group(1)), _RATE_SECONDS[found.group(2)]


class ApiSettings(_Section):
    """``[api]``: the HTTP API, the ``/ops/`` console and ``/metrics`` (§11)."""

    listen: Annotated[str, AfterValidator(_listen_address)] = "127.0.0.1:8025"
    rate_limit: Rate = "200/s"
    max_batch: int = Field(500, ge=1, le=10_000)
    # 0: derived from limits.max_message_bytes (x 1.4 for base64, + 64 KiB of JSON).
    max_body_bytes: int = Field(0, ge=0)
    tls_certificate_file: Path | None = None
    tls_key_file: Path | None = None
    session_ttl: Duration = 8 * 3600.0

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_certificate_file is None) != (self.tls_key_file is None):
            missing = (
                "tls_key_file" if self.tls_key_file is None else "tls_certificate_file"
            )
            raise ValueError(
                f"{missing}: TLS needs both the certificate and the key file"
            )
        return self

    def body_cap(self, limits: Limits) -> int:
        """The largest request body read, in bytes."""
        if self.max_body_bytes:
            return self.max_body_bytes
        return int(limits.max_message_bytes * 1.4) + 65_536


class InboundSource(_Section):
    """One ``[[inbound]]`` source of replies and bounces (docs/design.md §10).

    ``kind`` says which keys apply: ``graph`` (an Office 365 mailbox read with the
    service account's app-only token), ``imap`` (any IMAP server) or ``smtp`` (a
    receiver the company's mail server forwards the reply address to).
    """

    name: ServiceName
    enabled: bool = True
    kind: Literal["graph", "imap", "smtp"]
    # graph and imap
    folder: Line = "inbox"
    processed_folder: Line = "mailworker-processed"
    failed_folder: Line = "mailworker-failed"
    poll_interval: Duration = 30.0
    integrated_service: str = ""
    # graph
    mailbox: Address = ""
    # imap
    server: Line = ""
    port: Port | None = None
    security: Security = "tls"
    auth: Literal["password", "xoauth2"] = "password"
    username: Line = ""
    password: SecretStr | None = None
    password_file: Path | None = None
    verify_certificates: bool = True
    ca_bundle: Path | None = None
    timeout: Duration = 30.0
    # smtp
    listen: Annotated[str, AfterValidator(_listen_address)] = "127.0.0.1:2525"
    protocol: Literal["smtp", "lmtp"] = "smtp"
    accept: list[Address] = Field(default_factory=list)
    max_message_bytes: int = Field(10_485_760, ge=1024)
    tls_certificate_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def keys(self) -> frozenset[str]:
        """The keys that apply to this source's ``kind``."""
        return _INBOUND_KEYS[self.kind] | _COMMON_INBOUND_KEYS

    @model_validator(mode="after")
    def _rules(self) -> InboundSource:
        foreign = sorted(
            self.model_fields_set - _INBOUND_KEYS[self.kind] - _COMMON_INBOUND_KEYS
        )
        if foreign:
            raise ValueError(
                f"{', '.join(foreign)}: not a key of kind = {self.kind!r} "
                f"(its keys: {', '.join(sorted(_INBOUND_KEYS[self.kind]))})"
            )
        if self.poll_interval < 1:
            raise ValueError("poll_interval must be at least 1s")
        if self.kind == "graph":
            self._graph_rules()
        elif self.kind == "imap":
            self._imap_rules()
        else:
            self._smtp_rules()
        return self

    def _graph_rules(self) -> None:
        if not self.integrated_service:
            raise ValueError("kind = 'graph' needs integrated_service")
        if not self.mailbox:
            raise ValueError("kind = 'graph' needs mailbox (the address to read)")
        self._folders_differ()

    def _imap_rules(self) -> None:
        if not self.server:
            raise ValueError("kind = 'imap' needs server")
        if not self.username:
            raise ValueError("kind = 'imap' needs username")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.auth == "password" and self.password is None and not self.password_file:
            raise ValueError("auth = 'password' needs password or password_file")
        if self.auth == "xoauth2" and not self.integrated_service:
            raise ValueError("auth = 'xoauth2' needs integrated_service")
        self._folders_differ()

    def _smtp_rules(self) -> None:
        if not self.accept:
            raise ValueError(
                "kind = 'smtp' needs accept: the addresses it receives for"
            )
        if (self.tls_certificate_file is None) != (self.tls_key_file is None):
            raise ValueError("give tls_certificate_file and tls_key_file together")

    def _folders_differ(self) -> None:
        folders = [self.folder, self.processed_folder, self.failed_folder]
        if len({f.lower() for f in folders}) != 3:
            raise ValueError("folder, processed_folder and failed_folder must differ")

    @property
    def effective_port(self) -> int:
        """The configured IMAP port, or the usual one for the TLS mode."""
        if self.port is not None:
            return self.port
        return 993 if self.security == "tls" else 143

    @property
    def listen_host(self) -> str:
        """The receiver's host, without brackets around an IPv6 address."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        """The receiver's port."""
        return int(self.listen.rpartition(":")[2])


class BouncesSettings(_Section):
    """``[bounces]``: the signed per-job return path SMTP sends use."""

    return_path: Address = ""
    secret: SecretStr | None = None
    secret_file: Path | None = None

    @model_validator(mode="after")
    def _rules(self) -> BouncesSettings:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.return_path:
            if "+" in self.return_path.partition("@")[0]:
                raise ValueError(
                    "return_path must not hold '+': the job's token is added after one"
                )
            if self.secret is None and self.secret_file is None:
                raise ValueError(
                    "return_path needs secret or secret_file (it signs each job's token)"
                )
        return self


class Webhook(_Section):
    """One ``[[webhook]]``: where worker processes POST events, signed."""

    name: ServiceName
    enabled: bool = True
    url: Line
    secret: SecretStr | None = None
    secret_file: Path | None = None
    types: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES))
    timeout: Duration = 10.0
    ca_bundle: Path | None = None
    allow_http: bool = False

    @model_validator(mode="after")
    def _rules(self) -> Webhook:
        scheme = self.url.partition("://")[0].lower()
        if scheme not in ("https", "http") or "://" not in self.url:
            raise ValueError(f"url {self.url!r} must be an https:// URL")
        if scheme == "http" and not self.allow_http:
            raise ValueError(
                "url must be https (set allow_http = true only for a loopback receiver)"
            )
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.secret is None and self.secret_file is None:
            raise ValueError("needs secret_file (the key that signs each delivery)")
        return self


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

    broker_url: Annotated[SecretStr, AfterValidator(_broker_url)] = SecretStr(
        DEFAULT_BROKER_URL
    )
    broker_ca_bundle: Path | None = None
    namespace: Annotated[str, Field(pattern=NAMESPACE.pattern)] = "mailworker"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_recipients: Literal["full", "domain", "hash"] = "full"
    redirect_all_to: Address = ""
    limits: Limits = Field(default_factory=Limits)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    bounces: BouncesSettings = Field(default_factory=BouncesSettings)
    smtp: list[SmtpConnection] = Field(default_factory=list)
    openauth: list[OpenAuthService] = Field(default_factory=list)
    integrated_services: dict[ServiceName, IntegratedService] = Field(
        default_factory=dict
    )
    inbound: list[InboundSource] = Field(default_factory=list)
    webhook: list[Webhook] = Field(default_factory=list)
    email_actions: EmailActionsSettings = Field(default_factory=EmailActionsSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

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
    def _cluster_namespace(self) -> Settings:
        endpoint = parse_broker_url(self.broker_url.get_secret_value())
        if endpoint.kind == "cluster" and not self.namespace.startswith("{"):
            raise ValueError(
                f"namespace: {self.namespace!r} is not a hash tag; on Redis Cluster "
                f"every key must be in one slot: write namespace = "
                f'"{{{self.namespace}}}"'
            )
        return self

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
        self._inbound_references()
        self._actions_references()
        return self

    def _actions_references(self) -> None:
        actions = self.email_actions
        if (
            actions.enabled
            and receiving_source(actions.reply_address, self.inbound) is None
        ):
            raise ValueError(
                f"email_actions.reply_address: no enabled [[inbound]] source receives "
                f"{actions.reply_address!r} (an smtp source's accept, a graph source's "
                "mailbox, or an imap source's username)"
            )

    def _inbound_references(self) -> None:
        for kind, entries in (("inbound", self.inbound), ("webhook", self.webhook)):
            seen: set[str] = set()
            for entry in entries:
                if entry.name in seen:
                    raise ValueError(f"{kind} name {entry.name!r} is used twice")
                seen.add(entry.name)
        for source in self.inbound:
            needs = source.kind == "graph" or (
                source.kind == "imap" and source.auth == "xoauth2"
            )
            if needs and source.integrated_service not in self.integrated_services:
                raise ValueError(
                    f"inbound[{source.name}].integrated_service: "
                    f"no [integrated_services.{source.integrated_service}]"
                )

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
