"""Turn pydantic's errors about the configuration into problems that name the key (or
the variable that set it), with hints: brackets to write, the key meant."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from settings.models import (
    BouncesSettings,
    BreakerSettings,
    BrokerSettings,
    EmailActionsSettings,
    EventsSettings,
    InboundSource,
    IntegratedService,
    Limits,
    OpenAuthService,
    RetryPolicy,
    Settings,
    SmtpConnection,
    StatusSettings,
    Webhook,
)

__all__ = ["problems_of"]


# The model behind each section, for "did you mean" on an unknown key.
_SECTIONS: dict[str, type[BaseModel]] = {
    "limits": Limits,
    "retry": RetryPolicy,
    "breaker": BreakerSettings,
    "broker": BrokerSettings,
    "status": StatusSettings,
    "events": EventsSettings,
    "bounces": BouncesSettings,
    "email_actions": EmailActionsSettings,
    "inbound": InboundSource,
    "webhook": Webhook,
    "smtp": SmtpConnection,
    "openauth": OpenAuthService,
    "integrated_services": IntegratedService,
}
_LISTS = {
    "smtp": "connection",
    "openauth": "service",
    "inbound": "source",
    "webhook": "webhook",
}


def problems_of(
    exc: ValidationError,
    data: dict[str, Any],
    path: Path | None,
    origins: dict[tuple[str | int, ...], str],
) -> list[tuple[str, str]]:
    """Every error pydantic found, once per field, each as (field, message).

    Args:
        exc: what pydantic raised for the merged file and environment.
        data: that merged input, to name list entries by their ``name``.
        path: the file, named in messages of keys that came from it.
        origins: the location of each key a variable set → the variable.
    """
    problems: dict[str, str] = {}
    where = f"{path}: " if path is not None else ""
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        field = _field_name(loc, data)
        var = origins.get(loc[:3]) or origins.get(loc[:1])
        if error["type"] == "extra_forbidden":
            guess = _did_you_mean(loc)
            if guess:
                guess = (
                    repr(guess)
                    if var is None
                    else var.rsplit("__", 1)[0] + "__" + guess.upper()
                )
            message = f"unknown key (did you mean {guess}?)" if guess else "unknown key"
        else:
            message = _message(error, loc, data)
        if var is not None:
            field, message = var, f"{field}: {message}"
        else:
            message = where + message
        problems.setdefault(field, message)
    return list(problems.items())


def _message(error: Any, loc: tuple[str | int, ...], data: dict[str, Any]) -> str:
    kind = error["type"]
    section = loc[0] if len(loc) == 1 else None
    given = data.get(section) if isinstance(section, str) else None
    if kind == "list_type" and section in _LISTS and isinstance(given, dict):
        return (
            f"must be a list of {_LISTS[section]}s: write [[{section}]] (two brackets) "
            f"above each {_LISTS[section]}, not [{section}]"
        )
    if kind == "dict_type" and section == "integrated_services" and given is not None:
        return (
            "must be a table of service accounts: write [integrated_services.NAME] "
            "above each, not [[integrated_services]]"
        )
    if kind == "model_type" and section in _SECTIONS and isinstance(given, list):
        return f"must be one table: write [{section}], not [[{section}]]"
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return message


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """The known key closest to an unknown one at ``loc``, or ""."""
    key = loc[-1]
    if not isinstance(key, str):
        return ""
    if len(loc) == 1:
        model: type[BaseModel] = Settings
    elif isinstance(loc[0], str) and loc[0] in _SECTIONS:
        model = _SECTIONS[loc[0]]
    else:
        return ""
    match = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return match[0] if match else ""


def _field_name(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            parts[-1] += f"[{name if isinstance(name, str) else item}]"
            continue
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(item, str) and item in {"function-after", "function-before"}:
            continue
        parts.append(str(item))
    return ".".join(parts) or "config"
