"""Durations written as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"7d"`` or plain seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["Duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Return the duration in seconds.

    Args:
        value: a number of seconds, or a string such as ``"30s"`` or ``"7d"``.

    Returns:
        The duration in seconds, never negative.

    Raises:
        ValueError: the value is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m', '1h' or '7d'")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    raise ValueError("expected a duration such as '30s', '5m', '1h' or '7d'")


Duration = Annotated[float, BeforeValidator(parse_duration)]
