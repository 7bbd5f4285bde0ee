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
    Breaker,
    IntegratedService,
    Limits,
    OpenAuthService,
    Retry,
    Settings,
    SmtpConnection,
    Status,
)

__all__ = [
    "Breaker",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "ConfigError",
    "IntegratedService",
    "JobValidationError",
    "Limits",
    "MailworkerError",
    "OpenAuthService",
    "Retry",
    "Settings",
    "SmtpConnection",
    "Status",
    "config_path",
    "load_settings",
    "public_url",
    "read_secret",
]
