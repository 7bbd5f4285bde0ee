"""Calls to one Office 365 mailbox over Microsoft Graph, inside Outlook's limits.

Every call sends ``Prefer: IdType="ImmutableId"`` (ids survive moves), holds one of the
mailbox's concurrency slots across processes, waits out 429/503 ``Retry-After`` a bounded
number of times, and retries once with a new token after a 401.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import requests

from settings import MailworkerError
from worker.errors import DeliveryError
from worker.limits import Slots
from worker.transports.graph import graph_error
from worker.transports.oauth import HttpClient, TokenProvider

__all__ = [
    "IMMUTABLE_IDS",
    "MAX_CONCURRENT_REQUESTS",
    "DeltaResetError",
    "GraphMailbox",
    "GraphMailboxError",
    "StoppedError",
]

IMMUTABLE_IDS = 'IdType="ImmutableId"'
# Outlook allows 4 concurrent requests per app and mailbox (Graph throttling limits).
MAX_CONCURRENT_REQUESTS = 4
# Graph's answers that ask to be asked again later.
_THROTTLED = frozenset({429, 503, 504})
# Longer waits than this end the poll: the next poll comes no sooner than asked.
_MAX_WAIT = 60.0
# Error codes (lower case) that say a delta token is no longer known: sync again.
_RESYNC_CODES = frozenset(
    {"syncstatenotfound", "syncstateinvalid", "resyncrequired", "invaliddeltatoken"}
)


class GraphMailboxError(MailworkerError):
    """A mailbox call failed. The message names method, path and status, never a token.

    Attributes:
        status: the HTTP status, None when there was no answer.
        code: Graph's error code ("" when none).
        retry_after: seconds Graph asked us to wait, when it did.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class DeltaResetError(GraphMailboxError):
    """Graph no longer knows the delta token (410 Gone, SyncStateNotFound): sync anew."""


class StoppedError(GraphMailboxError):
    """The source was stopped while it waited out a ``Retry-After``."""


class GraphMailbox:
    """The Graph calls of one mailbox, all relative to ``/v1.0/users/{mailbox}``.

    Args:
        mailbox: the mailbox's address (or user id).
        service: the integrated service's name, for token errors.
        graph_endpoint: ``https://graph.microsoft.com`` or a stand-in.
        tokens: the service account's token provider.
        http: the HTTP client (TLS trust of the integrated service).
        slots: the mailbox's concurrency slots, shared by every process.
        timeout: seconds per request, and to wait for a free slot.
        retries: how many times a 429/503/504 is waited out and asked again.
        wait: sleeps for the given seconds; True means stop (``threading.Event.wait``).
    """

    def __init__(
        self,
        mailbox: str,
        *,
        service: str,
        graph_endpoint: str,
        tokens: TokenProvider,
        http: HttpClient,
        slots: Slots,
        timeout: float,
        retries: int,
        wait: Callable[[float], bool],
    ) -> None:
        self.mailbox = mailbox
        self.endpoint = graph_endpoint.rstrip("/")
        self.base = f"{self.endpoint}/v1.0/users/{quote(mailbox)}"
        self.scopes = [f"{self.endpoint}/.default"]
        self._service = service
        self._tokens = tokens
        self._http = http
        self._slots = slots
        self._timeout = timeout
        self._retries = retries
        self._wait = wait

    def __repr__(self) -> str:
        return f"GraphMailbox({self.mailbox!r}, {self.endpoint})"

    def close(self) -> None:
        """Close pooled HTTP connections (a later call opens new ones)."""
        self._http.close()

    def get(self, target: str, *, params: dict[str, str] | None = None) -> Any:
        """GET a path under the mailbox (or a whole link Graph gave) and decode its JSON.

        Raises:
            GraphMailboxError: no answer, or an error answer after the retries.
            DeltaResetError: the delta token in ``target`` is no longer known.
            StoppedError: stopped while waiting out a ``Retry-After``.
        """
        return _json(self.request("GET", target, params=params))

    def get_bytes(self, target: str) -> bytes:
        """GET a path under the mailbox and return the body as it came (``$value``).

        Raises:
            GraphMailboxError: as ``get``.
        """
        return self.request("GET", target).content

    def post(self, target: str, body: dict[str, Any]) -> Any:
        """POST JSON to a path under the mailbox and decode the JSON answer.

        Raises:
            GraphMailboxError: as ``get``.
        """
        return _json(self.request("POST", target, body=orjson.dumps(body)))

    def request(
        self,
        method: str,
        target: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> requests.Response:
        """One call, with its 401 and throttling retries; a 2xx answer or an error.

        Raises:
            GraphMailboxError: as ``get``.
        """
        url = self._url(target)
        for attempt in range(self._retries + 1):
            response = self._once_more_on_401(method, url, params, body)
            status = response.status_code
            if status not in _THROTTLED or attempt == self._retries:
                break
            delay = _retry_after(response)
            delay = float(2**attempt) if delay is None else delay
            if delay > _MAX_WAIT:
                break
            # The slot is free while we wait: the wait is Graph's, not ours to hold.
            if self._wait(delay):
                raise StoppedError(f"stopped waiting on {method} {_path(url)}")
        if response.status_code >= 400:
            raise self._error(method, url, response)
        return response

    def _url(self, target: str) -> str:
        if target.startswith("/"):
            return self.base + target
        # A link Graph gave (nextLink, deltaLink). It must be ours: it gets our token.
        if not target.startswith(self.endpoint + "/"):
            raise GraphMailboxError(
                f"refusing a link outside {self.endpoint}: {_path(target)}"
            )
        return target

    def _once_more_on_401(
        self, method: str, url: str, params: dict[str, str] | None, body: bytes | None
    ) -> requests.Response:
        response = self._send(method, url, params, body)
        if response.status_code == 401:
            # An expired or revoked token: drop it and try once more with a new one.
            self._tokens.invalidate()
            response = self._send(method, url, params, body)
        return response

    def _send(
        self, method: str, url: str, params: dict[str, str] | None, body: bytes | None
    ) -> requests.Response:
        try:
            token = self._tokens.acquire(self.scopes, service=self._service)
        except DeliveryError as exc:
            raise GraphMailboxError(str(exc), code="token") from exc
        headers = {
            "Authorization": f"Bearer {token.access_token}",
            "Prefer": IMMUTABLE_IDS,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        with self._slots.held(self._timeout) as got:
            if not got:
                raise GraphMailboxError(
                    f"no free slot of {self._slots.limit} for {self.mailbox} "
                    f"within {self._timeout:g}s"
                )
            with self._map_errors(method, url):
                if method == "GET":
                    return self._http.get(
                        url, params=params, headers=headers, timeout=self._timeout
                    )
                return self._http.post(
                    url, data=body, headers=headers, timeout=self._timeout
                )

    @contextmanager
    def _map_errors(self, method: str, url: str) -> Iterator[None]:
        try:
            yield
        except requests.Timeout as exc:
            raise GraphMailboxError(
                f"{method} {_path(url)} timed out after {self._timeout:g}s"
            ) from exc
        except requests.RequestException as exc:
            raise GraphMailboxError(
                f"{method} {_path(url)} at {self.endpoint} failed: "
                f"{exc.__class__.__name__}"
            ) from exc

    def _error(
        self, method: str, url: str, response: requests.Response
    ) -> GraphMailboxError:
        status = response.status_code
        code, text = graph_error(response)
        detail = f"Graph answered {status} {code} to {method} {_path(url)}"
        detail = f"{detail}: {text}" if text else detail
        kind = (
            DeltaResetError
            if status == 410 or code.lower() in _RESYNC_CODES
            else GraphMailboxError
        )
        return kind(
            detail, status=status, code=code, retry_after=_retry_after(response)
        )


def _path(url: str) -> str:
    # Never the query: delta and skip tokens stay out of messages.
    return urlsplit(url).path


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _json(response: requests.Response) -> Any:
    if not response.content:
        return {}
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise GraphMailboxError(
            f"Graph answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from exc
