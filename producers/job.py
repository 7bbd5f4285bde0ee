"""The notification job (README "The job"): its schema, validated at enqueue and in the worker."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from producers.actions import Action, check_actions, check_context
from producers.validation import JobModel, validation_error
from settings import JobValidationError, Limits
from settings.models import header_text

__all__ = [
    "SCHEMA_VERSION",
    "Attachment",
    "Mailbox",
    "Notification",
    "parse_job",
    "parse_mailbox",
    "validation_error",
]

SCHEMA_VERSION = 1
_LOCAL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAMED = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^"<>]*?))\s*<([^<>]*)>\s*$')
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
_CONTENT_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$"
)
_META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_RESERVED_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
        "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
        "auto-submitted", "return-path", "received", "x-mailworker-job-id",
    }
)  # fmt: skip
MAX_HEADERS = 50
MAX_METADATA_BYTES = 4096


def _check_address(address: str) -> str:
    """Return the address with its domain in ASCII (IDNA), or raise ValueError."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an e-mail address")
    if len(local) > 64 or not _LOCAL.match(local):
        raise ValueError(f"{address!r} has an invalid local part")
    try:
        ascii_domain = (
            domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        )
    except UnicodeError:
        raise ValueError(f"{address!r} has an invalid domain") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{address!r} has an invalid domain")
    result = f"{local}@{ascii_domain.lower()}"
    if len(result) > 254:
        raise ValueError(f"{address!r} is longer than 254 characters")
    return result


class Mailbox(JobModel):
    """An address with an optional display name."""

    address: Annotated[str, AfterValidator(header_text), AfterValidator(_check_address)]
    name: Annotated[str, AfterValidator(header_text), Field(max_length=200)] = ""


def parse_mailbox(value: object) -> object:
    """Turn ``"Name <a@b.example>"`` or ``"a@b.example"`` into Mailbox fields."""
    if not isinstance(value, str):
        return value
    header_text(value)
    match = _NAMED.match(value)
    if match:
        quoted, bare, address = match.groups()
        name = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        return {"name": name.strip(), "address": address.strip()}
    return {"address": value.strip()}


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str | dict | Mailbox) else value


MailboxIn = Annotated[Mailbox, BeforeValidator(parse_mailbox)]
MailboxList = Annotated[list[MailboxIn], BeforeValidator(_as_list)]
Line = Annotated[str, AfterValidator(header_text)]


def _decode_content(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("content must be bytes or base64 text") from None
    return value


class Attachment(JobModel):
    """A file attached to the notification.

    ``content`` is bytes (base64 on the wire).
    """

    filename: Annotated[Line, Field(min_length=1, max_length=255)]
    content_type: str = "application/octet-stream"
    content: Annotated[bytes, BeforeValidator(_decode_content)] = Field(repr=False)

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        if "/" in value or "\\" in value or '"' in value:
            raise ValueError("must be a plain file name without '/', '\\' or '\"'")
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if not _CONTENT_TYPE.match(value):
            raise ValueError(
                f"{value[:80]!r} is not a MIME type such as 'application/pdf'"
            )
        return value.lower()


class Notification(JobModel):
    """One notification job (the README's "The job").

    Raises:
        JobValidationError: on construction or validation of an invalid job. ``field``
            names the part at fault (``to[0].address``, ``metadata.task``) and ``reason``
            says why, in one line.
    """

    to: MailboxList = Field(default_factory=list)
    cc: MailboxList = Field(default_factory=list)
    bcc: MailboxList = Field(default_factory=list)
    subject: Annotated[Line, Field(max_length=2000)]
    text: str | None = Field(None, repr=False)
    html: str | None = Field(None, repr=False)
    reply_to: MailboxList = Field(default_factory=list)
    headers: dict[str, Line] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    sender: Annotated[str, Field(pattern=r"^[a-z0-9_-]+$")] | None = None
    idempotency_key: Annotated[Line, Field(min_length=1, max_length=200)] | None = None
    priority: Literal["high", "normal", "bulk"] = "normal"
    not_after: datetime | None = None
    send_at: datetime | None = None
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    # RFC 3834: "auto-replied" for a message that answers one (a confirmation).
    auto_submitted: Literal["auto-generated", "auto-replied"] = "auto-generated"
    actions: Annotated[list[Action], AfterValidator(check_actions)] = Field(
        default_factory=list
    )
    action_context: Annotated[
        dict[str, str | int | float | bool | None], AfterValidator(check_context)
    ] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} extra headers")
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name[:80]!r} is not a header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by mailworker and cannot be given")
            if len(name) + len(text) > 900:
                raise ValueError(f"{name!r} is too long")
        return value

    @field_validator("not_after", "send_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2026-12-01T09:00:00Z")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _META_KEY.match(key):
                raise ValueError(
                    f"{key[:80]!r} is not a metadata key (letters, digits, _ . -)"
                )
        if len(repr(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _content(self) -> Notification:
        if not self.text and not self.html:
            raise ValueError("text: give text, html or both")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("to: give at least one recipient in to, cc or bcc")
        if self.send_at and self.not_after and self.not_after <= self.send_at:
            raise ValueError("not_after: must be later than send_at")
        if self.action_context and not self.actions:
            raise ValueError("action_context: given without actions")
        if self.actions and self.reply_to:
            raise ValueError(
                "reply_to: not with actions (each recipient's replies go to its key)"
            )
        return self

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: to, cc and bcc, each address once, in order."""
        seen: dict[str, None] = {}
        for box in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(box.address, None)
        return list(seen)

    def check_limits(self, limits: Limits, *, requeue: bool = False) -> None:
        """Refuse a notification over ``[limits]``, or one whose ``not_after`` passed.

        A ``send_at`` must be in the future (unless ``requeue``: a dead letter sent
        again goes now), at most ``limits.max_schedule_ahead`` ahead.

        Raises:
            JobValidationError: too many recipients, surely larger than allowed,
                expired, or scheduled in the past or too far ahead.
        """
        self.check_size(limits)
        now = datetime.now(UTC)
        if self.not_after is not None and self.not_after <= now:
            raise JobValidationError("not_after", "is in the past")
        if self.send_at is not None and not (requeue and self.send_at <= now):
            self.check_schedule(limits, now)

    def check_schedule(self, limits: Limits, now: datetime) -> None:
        """Refuse a ``send_at`` in the past or beyond ``limits.max_schedule_ahead``.

        Raises:
            JobValidationError: naming ``send_at``.
        """
        if self.send_at is None:
            return
        if self.send_at <= now:
            raise JobValidationError(
                "send_at", f"{self.send_at.isoformat()} is in the past"
            )
        ahead = (self.send_at - now).total_seconds()
        if ahead > limits.max_schedule_ahead:
            raise JobValidationError(
                "send_at",
                f"{self.send_at.isoformat()} is {_days(ahead)} ahead; at most "
                f"{_days(limits.max_schedule_ahead)} (limits.max_schedule_ahead)",
            )

    def check_size(self, limits: Limits) -> None:
        """Refuse a notification with more recipients or bytes than ``[limits]`` allow.

        Raises:
            JobValidationError: too many recipients, or surely larger than allowed.
        """
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count > limits.max_recipients:
            raise JobValidationError(
                "to",
                f"{count} recipients; at most {limits.max_recipients} (limits.max_recipients)",
            )
        size = self.estimated_size()
        if size > limits.max_message_bytes:
            raise JobValidationError(
                "attachments",
                f"the message would be about {size} bytes; "
                f"at most {limits.max_message_bytes} (limits.max_message_bytes)",
            )

    def estimated_size(self) -> int:
        """A lower bound of the MIME size: base64 bodies and attachments."""
        raw = len((self.text or "").encode()) + len((self.html or "").encode())
        raw += sum(len(a.content) for a in self.attachments)
        return raw * 4 // 3

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready job as it travels on the queue (attachments base64)."""
        data = self.model_dump(
            mode="json", exclude_defaults=True, exclude={"attachments"}
        )
        data["schema_version"] = SCHEMA_VERSION
        if self.attachments:
            data["attachments"] = [
                {
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "content": base64.b64encode(a.content).decode("ascii"),
                }
                for a in self.attachments
            ]
        return data


def _days(seconds: float) -> str:
    """A span as people read it: ``"31.5 days"``, ``"2.0 hours"``, ``"90 seconds"``."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"


def parse_job(data: object) -> Notification:
    """Validate a job as it comes off the queue or out of a JSON file.

    Args:
        data: the decoded JSON object (``schema_version`` included or absent).

    Returns:
        The notification.

    Raises:
        JobValidationError: the job is malformed. ``field`` names the part at fault.
    """
    if not isinstance(data, dict):
        raise JobValidationError(
            "job", f"expected a JSON object, got {type(data).__name__}"
        )
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise JobValidationError(
            "schema_version",
            f"{version!r} is not supported (this worker reads {SCHEMA_VERSION})",
        )
    fields = {k: v for k, v in data.items() if k != "schema_version"}
    return Notification.model_validate(fields)
