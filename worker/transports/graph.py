"""The Microsoft Graph transport.

It sends with ``POST /users/{identity}/sendMail`` as the service identity, with a token
from the service account, inside Office 365's limits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import orjson
import requests

from producers.job import Mailbox, Notification
from settings import OpenAuthService
from worker.errors import (
    BudgetExhaustedError,
    DeliveryError,
    MessageRefusedError,
    RecipientRefusedError,
    TransientDeliveryError,
    TransportUnavailableError,
)
from worker.limits import Budget, Slots
from worker.mime import render
from worker.transports.base import OutgoingMessage, Receipt
from worker.transports.oauth import HttpClient, TokenProvider

__all__ = ["MAX_REQUEST_BYTES", "GraphTransport", "graph_error", "mime_required"]

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # Graph's limit per REST request
# Graph takes 5 internetMessageHeaders, and x-mailworker-job-id is one.
_MAX_JSON_HEADERS = 4


def mime_required(notification: Notification) -> bool:
    """Whether the job goes to Graph as MIME rather than JSON.

    JSON cannot carry headers that are not ``x-`` headers, nor more than four of them.
    """
    headers = notification.headers
    return len(headers) > _MAX_JSON_HEADERS or any(
        not name.lower().startswith("x-") for name in headers
    )


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class GraphTransport:
    """Sends through one ``[[openauth]]`` service.

    Args:
        service: the OpenAuth service's settings.
        graph_endpoint: ``https://graph.microsoft.com`` or a stand-in.
        tokens: the service account's token provider.
        http: the HTTP client (TLS trust of the integrated service).
        slots: ``max_concurrent_requests`` across all workers (None: no limit, as for
            ``test-connection``).
        budget: ``messages_per_minute`` and ``recipients_per_day`` of the mailbox.
    """

    # JSON by default. This transport writes the MIME form itself when required.
    needs_mime = False

    def __init__(
        self,
        service: OpenAuthService,
        *,
        graph_endpoint: str,
        tokens: TokenProvider,
        http: HttpClient,
        slots: Slots | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.name = service.name
        self.service = service
        self._tokens = tokens
        self._http = http
        self._slots = slots
        self._budget = budget
        endpoint = graph_endpoint.rstrip("/")
        self.url = f"{endpoint}/v1.0/users/{quote(service.service_identity)}/sendMail"
        self.scopes = list(service.scopes) or [f"{endpoint}/.default"]

    def __repr__(self) -> str:
        return f"GraphTransport({self.name!r}, {self.service.service_identity})"

    def send(self, message: OutgoingMessage) -> Receipt:
        """POST the message to Graph. A 202 means every recipient was handed over.

        Raises:
            BudgetExhaustedError: the mailbox's budget is spent (nothing was sent).
            RecipientRefusedError: Graph refused the recipients.
            MessageRefusedError: too large for Graph, or a 400/413 about the message.
            TransportUnavailableError: token errors, 401 after one re-acquire, 403, 404.
            TransientDeliveryError: 429, 5xx, timeouts, no free concurrency slot in time.
        """
        body, content_type = self._payload(message)
        if len(body) > MAX_REQUEST_BYTES:
            raise MessageRefusedError(
                f"{len(body)} bytes is over Graph's {MAX_REQUEST_BYTES}-byte request limit",
                service=self.name,
                code=413,
            )
        spent = (
            self._budget.spend_many([len(message.recipients)]) if self._budget else None
        )
        if spent is not None and spent.wait:
            raise BudgetExhaustedError.spent(
                spent.limit,
                self.service.service_identity,
                spent.wait,
                service=self.name,
                overflow=self.service.overflow,
            )
        if self._slots is None:
            return self._receipt(
                self._post_once_more_on_401(body, content_type), message
            )
        with self._slots.held(self.service.timeout) as got:
            if not got:
                raise TransientDeliveryError(
                    f"no free Graph slot of {self._slots.limit} within "
                    f"{self.service.timeout:g}s",
                    service=self.name,
                )
            response = self._post_once_more_on_401(body, content_type)
        return self._receipt(response, message)

    def _post_once_more_on_401(
        self, body: bytes, content_type: str
    ) -> requests.Response:
        response = self._post(body, content_type)
        if response.status_code == 401:
            # An expired or revoked token: drop it and try once more with a new one.
            self._tokens.invalidate()
            response = self._post(body, content_type)
        return response

    def _post(self, body: bytes, content_type: str) -> requests.Response:
        token = self._tokens.acquire(self.scopes, service=self.name)
        headers = {
            "Authorization": f"Bearer {token.access_token}",
            "Content-Type": content_type,
        }
        with self._map_errors():
            return self._http.post(
                self.url, data=body, headers=headers, timeout=self.service.timeout
            )

    @contextmanager
    def _map_errors(self) -> Iterator[None]:
        try:
            yield
        except requests.Timeout as exc:
            # In doubt: Graph may have taken it. Retrying may duplicate (docs/design.md §5).
            raise TransientDeliveryError(
                f"Graph timed out after {self.service.timeout:g}s", service=self.name
            ) from exc
        except requests.ConnectionError as exc:
            raise TransportUnavailableError(
                f"cannot connect to Graph at {self.url.split('/v1.0')[0]}: "
                f"{exc.__class__.__name__}",
                service=self.name,
            ) from exc
        except requests.RequestException as exc:
            raise TransientDeliveryError(
                f"Graph request failed: {exc.__class__.__name__}", service=self.name
            ) from exc

    def _receipt(
        self, response: requests.Response, message: OutgoingMessage
    ) -> Receipt:
        status = response.status_code
        if status == 202:
            return Receipt(accepted=list(message.recipients), response="202 Accepted")
        raise self._error(status, response)

    def _error(self, status: int, response: requests.Response) -> DeliveryError:
        code, text = graph_error(response)
        detail = f"Graph answered {status} {code}: {text}".rstrip(": ")
        name = self.name
        if status in (429, 500, 502, 503, 504):
            return TransientDeliveryError(
                detail, service=name, code=status, retry_after=_retry_after(response)
            )
        if status in (401, 403, 404):
            return TransportUnavailableError(
                detail, service=name, code=status, auth=status in (401, 403)
            )
        if status == 400 and code in (
            "ErrorInvalidRecipients",
            "ErrorRecipientNotFound",
        ):
            return RecipientRefusedError(detail, service=name, code=status)
        return MessageRefusedError(detail, service=name, code=status)

    def _payload(self, message: OutgoingMessage) -> tuple[bytes, str]:
        notification = message.notification
        if mime_required(notification):
            return base64.b64encode(self._mime(message)), "text/plain"
        return orjson.dumps(self._json(message)), "application/json"

    def _mime(self, message: OutgoingMessage) -> bytes:
        # Graph takes the recipients from the MIME headers, so write only those still
        # to send to. Bcc is included, and Graph does not transmit it.
        notification, wanted = message.notification, set(message.recipients)
        if {
            b.address for b in (*notification.to, *notification.cc, *notification.bcc)
        } == (wanted):
            copy = notification
        else:
            copy = notification.model_copy(update=_recipients(notification, message))
        return render(
            copy,
            job_id=message.job_id,
            from_box=Mailbox(address=self.service.service_identity),
            bcc=True,
        )

    def _json(self, message: OutgoingMessage) -> dict[str, Any]:
        n = message.notification
        split = _recipients(n, message)
        body = (
            {"contentType": "HTML", "content": n.html}
            if n.html
            else {"contentType": "Text", "content": n.text or ""}
        )
        mail: dict[str, Any] = {
            "subject": n.subject,
            "body": body,
            "toRecipients": _addresses(split["to"]),
            "ccRecipients": _addresses(split["cc"]),
            "bccRecipients": _addresses(split["bcc"]),
            "internetMessageHeaders": [
                *({"name": k, "value": v} for k, v in n.headers.items()),
                {"name": "x-mailworker-job-id", "value": message.job_id},
            ],
        }
        if n.reply_to:
            mail["replyTo"] = _addresses(n.reply_to)
        if n.attachments:
            mail["attachments"] = [
                {
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": a.filename,
                    "contentType": a.content_type,
                    "contentBytes": base64.b64encode(a.content).decode("ascii"),
                }
                for a in n.attachments
            ]
        return {"message": mail, "saveToSentItems": False}

    def close(self) -> None:
        """Close pooled HTTP connections."""
        self._http.close()


def _recipients(n: Notification, message: OutgoingMessage) -> dict[str, list[Mailbox]]:
    """to/cc/bcc limited to the envelope.

    Envelope addresses in none of them (staging) go to ``to``.
    """
    wanted = list(message.recipients)
    split: dict[str, list[Mailbox]] = {
        field: [b for b in getattr(n, field) if b.address in wanted]
        for field in ("to", "cc", "bcc")
    }
    known = {b.address for boxes in split.values() for b in boxes}
    split["to"] += [Mailbox(address=a) for a in wanted if a not in known]
    return split


def _addresses(boxes: list[Mailbox]) -> list[dict[str, Any]]:
    return [
        {"emailAddress": {"address": b.address, **({"name": b.name} if b.name else {})}}
        for b in boxes
    ]


def graph_error(response: requests.Response) -> tuple[str, str]:
    """The (code, message) of a Graph error answer, ("", "") when it has none."""
    try:
        error = orjson.loads(response.content).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        return "", ""
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code", "")), str(error.get("message", ""))[:200]
