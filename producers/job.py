"""The notification job (README "The job"): its schema, validated at enqueue and in the worker."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from settings import JobValidationError, Limits
from settings.models import header_text

__all__ = [
    "SCHEMA_VERSION",
    "Attachment",
    "Mailbox",
    "Notification",
    "parse_job",
    "parse_mailbox",
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


class _JobModel(BaseModel):
    """A part of a job: invalid input raises ``JobValidationError`` naming the field,
    however the model is built (constructor, ``model_validate``, ``model_validate_json``,
    ``model_validate_strings``), never pydantic's ``ValidationError``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any) -> None:
        # What BaseModel.__init__ does, in one frame (the job's validators return self).
        try:
            self.__pydantic_validator__.validate_python(data, self_instance=self)
        except ValidationError as exc:
            raise validation_error(exc) from None

    # Marks this __init__ as pydantic's own (as pydantic's RootModel does): a nested part
    # (an address inside a Notification) is then still validated inside pydantic-core,
    # with the whole path of the field at fault, instead of through one __init__ call each.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> Self:
        """Validate ``obj`` (a dict, or an instance); see pydantic's ``model_validate``.

        Raises:
            JobValidationError: it is not a valid job part; ``field`` names the part.
        """
        try:
            if options:
                return super().model_validate(obj, **options)
            # The worker validates every job this way: one frame less.
            return cls.__pydantic_validator__.validate_python(obj)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise validation_error(exc) from None

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, **options: Any
    ) -> Self:
        """Validate a JSON document; see pydantic's ``model_validate_json``.

        Raises:
            JobValidationError: it is not valid JSON or not a valid job part.
        """
        try:
            return super().model_validate_json(json_data, **options)
        except ValidationError as exc:
            raise validation_error(exc) from None

    @classmethod
    def model_validate_strings(cls, obj: Any, **options: Any) -> Self:
        """Validate string data; see pydantic's ``model_validate_strings``.

        Raises:
            JobValidationError: it is not a valid job part.
        """
        try:
            return super().model_validate_strings(obj, **options)
        except ValidationError as exc:
            raise validation_error(exc) from None


class Mailbox(_JobModel):
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


class Attachment(_JobModel):
    """A file attached to the notification; ``content`` is bytes (base64 on the wire)."""

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


class Notification(_JobModel):
    """One notification job (the README's "The job").

    Raises:
        JobValidationError: on construction or validation of an invalid job; ``field``
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
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

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

    @field_validator("not_after")
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
        return self

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients: to, cc and bcc, each address once, in order."""
        seen: dict[str, None] = {}
        for box in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(box.address, None)
        return list(seen)

    def check_limits(self, limits: Limits) -> None:
        """Refuse a notification over ``[limits]``.

        Raises:
            JobValidationError: too many recipients, or surely larger than allowed.
        """
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count > limits.max_recipients:
            raise JobValidationError(
                "to",
                f"{count} recipients; at most {limits.max_recipients} (limits.max_recipients)",
            )
        if self.not_after is not None and self.not_after <= datetime.now(UTC):
            raise JobValidationError("not_after", "is in the past")
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


def parse_job(data: object) -> Notification:
    """Validate a job as it comes off the queue or out of a JSON file.

    Args:
        data: the decoded JSON object (``schema_version`` included or absent).

    Returns:
        The notification.

    Raises:
        JobValidationError: the job is malformed; ``field`` names the part at fault.
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


# The members of the metadata value union, as pydantic names them in an error's location.
_METADATA_TYPES = frozenset({"str", "int", "float", "bool"})
# Steps of pydantic's schema that appear in an error's location but name no field.
_SCHEMA_STEP = re.compile(r"^(function-[a-z]+|list|json-or-python|lax-or-strict)\[")
_REASONS = {
    "extra_forbidden": "unknown field",
    "missing": "is required",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def _reason(kind: str, message: str) -> str:
    if kind in _REASONS:
        return _REASONS[kind]
    if kind == "json_invalid":
        return "not valid JSON: " + message.removeprefix("Invalid JSON: ")
    message = message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ")
    return message


def validation_error(exc: ValidationError) -> JobValidationError:
    """Turn pydantic's first error into a JobValidationError naming the field.

    Args:
        exc: what pydantic raised.

    Returns:
        The error, with the field as a path (``to[0].address``) and one reason.
    """
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if len(loc) == 3 and loc[0] == "metadata" and loc[2] in _METADATA_TYPES:
        # One reason for a value that is none of the union's members (not one each).
        kind = type(error["input"]).__name__
        return JobValidationError(
            f"metadata.{loc[1]}",
            f"must be a string, number, boolean or null, not {kind}",
        )
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif not _SCHEMA_STEP.match(item):
            parts.append(item)
    field = ".".join(parts)
    message = _reason(error["type"], str(error["msg"]))
    if not field and ": " in message and message.split(": ", 1)[0].isidentifier():
        field, message = message.split(": ", 1)
    return JobValidationError(field or "job", message)
