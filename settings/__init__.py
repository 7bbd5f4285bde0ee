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
    BreakerSettings,
    EventsSettings,
    IntegratedService,
    Limits,
    OpenAuthService,
    RetryPolicy,
    Settings,
    SmtpConnection,
    StatusSettings,
)

__all__ = [
    "EVENT_TYPES",
    "BreakerSettings",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "ConfigError",
    "EventsSettings",
    "IntegratedService",
    "JobValidationError",
    "Limits",
    "MailworkerError",
    "OpenAuthService",
    "RetryPolicy",
    "Settings",
    "SmtpConnection",
    "StatusSettings",
    "config_path",
    "load_settings",
    "public_url",
    "read_secret",
]
