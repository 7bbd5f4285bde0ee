"""One webhook's HTTP side: each event POSTed once, signed, its answer turned into an outcome."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

import requests

from settings import ConfigError, Webhook
from worker.events.model import body_of
from worker.events.signing import Signer

__all__ = ["Failure", "WebhookSender"]

_ANSWER_READ = (
    64 * 1024
)  # bytes of an answer read (and dropped) so its connection is reused


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one POST did not succeed: the HTTP status (None without an answer), in words."""

    code: int | None
    message: str


class WebhookSender:
    """POSTs events to one ``[[webhook]]`` URL over one ``requests`` session.

    TLS is verified (against ``ca_bundle`` when set), redirects are never followed and
    each request is bounded by the webhook's ``timeout``. Errors name the webhook and
    its host, never the URL's path or query (they may hold a token) nor the secret.

    Args:
        webhook: its settings.
        signer: signs each attempt.
        clock: the Unix time of an attempt, for ``webhook-timestamp``.
    """

    def __init__(
        self,
        webhook: Webhook,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = webhook.name
        self.timeout = webhook.timeout
        self._url = webhook.url
        self._host = urlsplit(webhook.url).hostname or "?"
        if urlsplit(webhook.url).scheme.lower() != "https" and not webhook.allow_http:
            raise ConfigError(f"webhook[{self.name}].url", "must be an https:// URL")
        self._signer = signer
        self._clock = clock
        self._verify: str | bool = str(webhook.ca_bundle) if webhook.ca_bundle else True
        self._agent = f"mailworker-webhook/{version('mailworker')}"
        self._session = requests.Session()
        # The environment (proxies, netrc, REQUESTS_CA_BUNDLE) is read once, here:
        # requests would read it again on every POST, half of a POST's CPU time.
        self._session.proxies = requests.utils.get_environ_proxies(webhook.url)
        self._session.trust_env = False

    def __repr__(self) -> str:
        return f"WebhookSender({self.name!r}, host={self._host!r})"

    def post(self, event: dict[str, Any]) -> Failure | None:
        """POST one event: None when the receiver answered 2xx, else why not."""
        body = body_of(event)
        headers = {
            "content-type": "application/json",
            "user-agent": self._agent,
            **self._signer.headers(str(event["id"]), int(self._clock()), body),
        }
        try:
            response = self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self.timeout,
                verify=self._verify,
                allow_redirects=False,
                stream=True,
            )
        except (requests.RequestException, OSError, ValueError) as exc:
            # ValueError: urllib3's own, say for a host name IDNA refuses.
            return Failure(None, f"{self._where()}: {_unanswered(exc, self.timeout)}")
        with response:
            code = response.status_code
            if 200 <= code < 300:
                _drain(response)
                return None
        return Failure(code, f"{self._where()}: {_answer(code, response.reason)}")

    def close(self) -> None:
        """Close pooled HTTP connections."""
        self._session.close()

    def _where(self) -> str:
        return f"webhook {self.name} ({self._host})"


def _drain(response: requests.Response) -> None:
    # Delivered all the same if this fails; the connection is then not reused.
    with contextlib.suppress(requests.RequestException, OSError):
        next(response.iter_content(_ANSWER_READ), None)


def _answer(code: int, reason: str | None) -> str:
    text = f"HTTP {code}" + (f" {reason}" if reason else "")
    if 300 <= code < 400:
        return f"{text}: a redirect, not followed (set url to the final address)"
    return text


def _unanswered(exc: Exception, timeout: float) -> str:
    """What went wrong before an answer came, without the URL (requests puts it in)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g}s (timeout)"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed: {_tls_reason(exc)}"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed ({_root(exc).__class__.__name__})"
    return f"request failed ({exc.__class__.__name__})"


def _tls_reason(exc: BaseException) -> str:
    root = _root(exc)
    if isinstance(root, ssl.SSLCertVerificationError):
        return f"the certificate did not verify ({root.verify_message})"
    if isinstance(root, ssl.SSLError):
        return str(root.reason or root.__class__.__name__)
    return root.__class__.__name__


def _root(exc: BaseException) -> BaseException:
    """The innermost error: requests wraps urllib3's, which wraps the socket's."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if isinstance(inner, BaseException):
            exc = inner
            continue
        first = exc.args[0] if exc.args else None
        if isinstance(first, BaseException):
            exc = first
            continue
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc
