"""App-only tokens from MSAL's client-credentials flow.

There is one MSAL app per integrated service per process, shared by every thread, with
one token request in flight at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msal
import requests

from settings import IntegratedService, read_secret
from worker.errors import (
    DeliveryError,
    TransientDeliveryError,
    TransportUnavailableError,
)
from worker.metrics.recorder import recorder

__all__ = ["HttpClient", "Token", "TokenProvider"]

# Entra's "retry the request" errors. All else from the token endpoint is our config.
_RETRYABLE = {"temporarily_unavailable", "server_error", "slow_down"}


@dataclass(frozen=True, slots=True)
class Token:
    """An access token. It is never logged and never part of a repr."""

    access_token: str
    expires_on: float
    from_cache: bool

    def __repr__(self) -> str:
        return f"Token(expires_on={self.expires_on:.0f}, from_cache={self.from_cache})"


class HttpClient:
    """The two methods MSAL needs, over one ``requests`` session with our TLS trust.

    ``verify`` is passed on every call so ``REQUESTS_CA_BUNDLE`` cannot override it.
    """

    def __init__(self, *, verify: str | bool, timeout: float) -> None:
        self.session = requests.Session()
        self.verify = verify
        self.timeout = timeout

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        """GET, as MSAL calls it."""
        kwargs.setdefault("timeout", self.timeout)
        return self.session.get(url, verify=self.verify, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        """POST, as MSAL and Graph call it."""
        kwargs.setdefault("timeout", self.timeout)
        return self.session.post(url, verify=self.verify, **kwargs)

    def close(self) -> None:
        """Close pooled HTTP connections."""
        self.session.close()


class TokenProvider:
    """Tokens for one ``[integrated_services.NAME]`` service account.

    Args:
        name: the integrated service's name (for messages).
        service: its settings.
        http: the HTTP client MSAL uses.
    """

    def __init__(self, name: str, service: IntegratedService, http: HttpClient) -> None:
        self.name = name
        self.service = service
        self._http = http
        self._lock = threading.Lock()
        self._app: msal.ConfidentialClientApplication | None = None
        # Token requests sent to the identity provider (for tests, stats).
        self.requests = 0

    def __repr__(self) -> str:
        return f"TokenProvider({self.name!r}, tenant={self.service.tenant_id!r})"

    def _credential(self) -> str | dict[str, str]:
        svc, field = self.service, f"integrated_services.{self.name}"
        secret = read_secret(
            svc.client_secret,
            svc.client_secret_file,
            f"{field}.client_secret" + ("_file" if svc.client_secret_file else ""),
        )
        if secret is not None:
            return secret.get_secret_value()
        assert svc.certificate_file is not None
        assert svc.private_key_file is not None
        credential = {
            "private_key": _read(svc.private_key_file, f"{field}.private_key_file"),
            # No thumbprint: MSAL computes the SHA-256 one and signs PS256 (msal >= 1.35).
            "public_certificate": _read(
                svc.certificate_file, f"{field}.certificate_file"
            ),
        }
        passphrase = read_secret(
            svc.private_key_passphrase,
            svc.private_key_passphrase_file,
            f"{field}.private_key_passphrase",
        )
        if passphrase is not None:
            credential["passphrase"] = passphrase.get_secret_value()
        return credential

    def _build(self) -> msal.ConfidentialClientApplication:
        svc = self.service
        return msal.ConfidentialClientApplication(
            svc.client_id,
            client_credential=self._credential(),
            authority=f"{svc.authority_host.rstrip('/')}/{svc.tenant_id}",
            http_client=self._http,
            # Our authority is always tenant-specific and given by the operator.
            instance_discovery=False,
        )

    def acquire(self, scopes: list[str], *, service: str) -> Token:
        """A token for ``scopes``: from the cache, or one request for all waiting threads.

        Args:
            scopes: the ``/.default`` scope(s) of one resource.
            service: the mail service asking, for error messages.

        Raises:
            TransportUnavailableError: a configuration or credential problem.
            TransientDeliveryError: the identity provider is throttling or down.
        """
        try:
            token = self._acquire(scopes, service=service)
        except DeliveryError:
            recorder().token(self.name, source="identity_provider", outcome="error")
            raise
        source = "cache" if token.from_cache else "identity_provider"
        recorder().token(self.name, source=source, outcome="ok")
        return token

    def _acquire(self, scopes: list[str], *, service: str) -> Token:
        with self._lock, _map_token_errors(self, service):
            if self._app is None:
                self._app = self._build()
            before = time.time()
            result = self._app.acquire_token_for_client(scopes=scopes)
            if "access_token" not in result:
                self._app = None if _is_credential_error(result) else self._app
                raise _token_error(
                    result, service=service, tenant=self.service.tenant_id
                )
            from_cache = result.get("token_source") == "cache"
            if not from_cache:
                self.requests += 1
            expires = before + float(result.get("expires_in", 0))
            return Token(result["access_token"], expires, from_cache)

    def invalidate(self) -> None:
        """Forget cached tokens (after a 401) so the next ``acquire`` asks again."""
        with self._lock:
            if self._app is not None:
                self._app.remove_tokens_for_client()


def _read(path: Any, field: str) -> str:
    from settings import ConfigError

    try:
        return str(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None


def _is_credential_error(result: dict[str, Any]) -> bool:
    # Drop the app so the next attempt re-reads a rotated secret or certificate.
    return result.get("error") in {"invalid_client", "unauthorized_client"}


def _token_error(result: dict[str, Any], *, service: str, tenant: str) -> DeliveryError:
    error = str(result.get("error", "unknown_error"))
    codes = result.get("error_codes") or []
    code = f" (AADSTS{codes[0]})" if codes else ""
    first = (
        str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0][:200]
    )
    message = f"token request for tenant {tenant} failed: {error}{code}: {first}"
    if error in _RETRYABLE:
        return TransientDeliveryError(message, service=service)
    return TransportUnavailableError(
        message, service=service, auth=_is_credential_error(result)
    )


@contextmanager
def _map_token_errors(provider: TokenProvider, service: str) -> Iterator[None]:
    tenant = provider.service.tenant_id
    try:
        yield
    except DeliveryError:
        raise
    except msal.exceptions.MsalServiceError as exc:  # a 5xx from the token endpoint
        raise TransientDeliveryError(
            f"identity provider for tenant {tenant} failed: {exc.error_description or exc}",
            service=service,
        ) from exc
    except requests.Timeout as exc:
        raise TransientDeliveryError(
            f"identity provider for tenant {tenant} timed out", service=service
        ) from exc
    except requests.RequestException as exc:
        raise TransportUnavailableError(
            f"cannot reach the identity provider {provider.service.authority_host}: "
            f"{exc.__class__.__name__}",
            service=service,
        ) from exc
    except (
        ValueError
    ) as exc:  # unknown tenant (discovery 4xx), a text 429 body, bad PEM
        raise TransportUnavailableError(
            f"identity provider for tenant {tenant}: {str(exc)[:200]}", service=service
        ) from exc
