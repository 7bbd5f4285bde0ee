"""Ids in paths and queries, checked before they become part of a Redis key.

A job id is what producers make (a UUID) or what a wire-format producer chose
(``message_id``): letters, digits, ``.``, ``_`` and ``-``, at most 128 characters. A
colon, a slash, a NUL or anything longer is refused, so no id can name a key outside
the job's own (``{ns}:job:ID``). A webhook delivery's dead letter is
``webhook:NAME:EVENT_ID``, each part of the same alphabet.
"""

from __future__ import annotations

import re

from worker.api.problems import problem

__all__ = ["check_dead_id", "check_job_id", "check_stream_id"]

_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_WEBHOOK = re.compile(r"^webhook:[a-z0-9_-]{1,64}:[A-Za-z0-9._-]{1,128}$")
_STREAM_ID = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")


def check_job_id(value: str, field: str = "id") -> str:
    """``value`` when it can be a job id, else a 404 problem (no such job can exist)."""
    if not _ID.match(value) or value in {".", ".."}:
        raise problem(
            404,
            "no such id: an id is 1-128 of A-Z, a-z, 0-9, '.', '_', '-'",
            errors=[{"field": field, "message": "not an id"}],
        )
    return value


def check_dead_id(value: str) -> str:
    """A job id, or a webhook delivery's dead-letter id (``webhook:NAME:EVENT_ID``)."""
    if value.startswith("webhook:") and _WEBHOOK.match(value):
        return value
    return check_job_id(value)


def check_stream_id(value: str, field: str) -> str:
    """An events stream position (``1733150000000-0``), else a 400 problem."""
    if not _STREAM_ID.match(value):
        raise problem(
            400,
            f"{field}: not an event position such as 1733150000000-0",
            errors=[{"field": field, "message": "not an event position (MS-SEQ)"}],
        )
    return value
