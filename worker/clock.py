"""ISO 8601 UTC timestamps for status records and log lines, cheaply.

The whole second is formatted once. Each call adds only its fraction, a few times
cheaper than ``datetime.now(UTC).isoformat()`` (docs/benchmarks.md).
"""

from __future__ import annotations

import time

__all__ = ["iso_micros", "iso_millis"]

_SECOND: tuple[int, str] = (0, "")  # the last whole second formatted


def _second(second: int) -> str:
    global _SECOND
    cached, text = _SECOND
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SECOND = (second, text)
    return text


def iso_millis() -> str:
    """Now with milliseconds.

    The form is ``...T12:00:00.123+00:00``, as ``datetime.isoformat`` writes it.
    """
    ms = time.time_ns() // 1_000_000
    return f"{_second(ms // 1000)}.{ms % 1000:03d}+00:00"


def iso_micros() -> str:
    """Now with microseconds.

    The form is ``...T12:00:00.123456Z``, as structlog's ``TimeStamper(fmt="iso",
    utc=True)`` writes it (but always with the fraction).
    """
    us = time.time_ns() // 1000
    return f"{_second(us // 1_000_000)}.{us % 1_000_000:06d}Z"
