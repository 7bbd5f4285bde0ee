"""Job models that raise ``JobValidationError``, never pydantic's error.

Also the mapping of pydantic's first error to the field at fault and one reason.
"""

from __future__ import annotations

import re
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from settings import JobValidationError

__all__ = ["JobModel", "validation_error"]


class JobModel(BaseModel):
    """A part of a job whose invalid input raises ``JobValidationError``.

    The error names the field, however the model is built (constructor,
    ``model_validate``, ``model_validate_json``, ``model_validate_strings``). It is never
    pydantic's ``ValidationError``.
    """

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
        """Validate ``obj`` (a dict, or an instance), as pydantic's ``model_validate``.

        Raises:
            JobValidationError: it is not a valid job part. ``field`` names the part.
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
        """Validate a JSON document, as pydantic's ``model_validate_json``.

        Raises:
            JobValidationError: it is not valid JSON or not a valid job part.
        """
        try:
            return super().model_validate_json(json_data, **options)
        except ValidationError as exc:
            raise validation_error(exc) from None

    @classmethod
    def model_validate_strings(cls, obj: Any, **options: Any) -> Self:
        """Validate string data, as pydantic's ``model_validate_strings``.

        Raises:
            JobValidationError: it is not a valid job part.
        """
        try:
            return super().model_validate_strings(obj, **options)
        except ValidationError as exc:
            raise validation_error(exc) from None


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
    flat = ("metadata", "action_context")
    if len(loc) == 3 and loc[0] in flat and loc[2] in _METADATA_TYPES:
        # One reason for a value that is none of the union's members (not one each).
        kind = type(error["input"]).__name__
        return JobValidationError(
            f"{loc[0]}.{loc[1]}",
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
