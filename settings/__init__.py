"""Configuration models and loading; imports nothing else of mailworker."""

from settings.errors import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    JobValidationError,
    MailworkerError,
)
from settings.loading import config_path, load_settings, public_url, read_secret
from settings.models import (
    EVENT_TYPES,
    BouncesSettings,
    BreakerSettings,
    EmailActionsSettings,
    EventsSettings,
    InboundSource,
    IntegratedService,
    Limits,
    MetricsSettings,
    OpenAuthService,
    RetryPolicy,
    Settings,
    SmtpConnection,
    StatusSettings,
    Webhook,
)

__all__ = [
    "EVENT_TYPES",
    "BouncesSettings",
    "BreakerSettings",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "ConfigError",
    "EmailActionsSettings",
    "EventsSettings",
    "InboundSource",
    "IntegratedService",
    "JobValidationError",
    "Limits",
    "MailworkerError",
    "MetricsSettings",
    "OpenAuthService",
    "RetryPolicy",
    "Settings",
    "SmtpConnection",
    "StatusSettings",
    "Webhook",
    "config_path",
    "load_settings",
    "public_url",
    "read_secret",
]
