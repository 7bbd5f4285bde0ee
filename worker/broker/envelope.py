"""Broker messages as they arrive: shape checks, decoding, and the jobs each carries.

Pure functions of the message bytes and fields, no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, TypeGuard

import orjson
from dramatiq.errors import DecodeError
from dramatiq.message import Message

from common.envelope import envelope
from common.keys import ACTOR_NAME, BATCH_ACTOR_NAME
from settings import MailworkerError
from worker.broker.keys import q_name

__all__ = [
    "JOB_ID_RULE",
    "JobRef",
    "MalformedMessageError",
    "attempt_of",
    "bulk_items",
    "decode",
    "envelope_problem",
    "is_job_id",
    "jobs_of",
    "message_id_of",
    "single_message",
]

# What a job id may be: it keys the job's records and goes into its Message-ID
# (``<id@domain>``). Producers write uuid4s. A wire-format producer may write its own.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_ID_RULE = (
    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
)

# The options Dramatiq and our middleware compute with (a count, times in milliseconds).
_NUMBER_OPTIONS = ("retries", "eta", "time_limit")
# orjson writes at most 254 levels of nesting (it reads 1024). A message nested deeper
# could not be written again as a dead letter or a retry, so it is refused at once.
_MAX_DEPTH = 254


class JobRef(NamedTuple):
    """One job of a broker message, as status records and the prefetch know it."""

    id: str
    attempt: int
    queue: str
    redis_id: str


class MalformedMessageError(MailworkerError, DecodeError):
    """A message that decodes but is not one Dramatiq and our actors can handle."""


def is_job_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a usable job id (``JOB_ID_RULE``)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def attempt_of(options: dict[str, Any]) -> int:
    """The number of the attempt a message's options stand for (1 for the first)."""
    return int(options.get("retries") or 0) + 1


def envelope_problem(fields: Any) -> str | None:
    """What makes a decoded message one no actor can run, or None.

    Dramatiq could not acknowledge or track such a message either. The field is named,
    so a producer's bug is found at once.
    """
    if not isinstance(fields, dict):
        return "the message is not an object"
    options = fields.get("options")
    if not isinstance(options, dict):
        return "options is not an object"
    if not isinstance(options.get("redis_message_id"), str):
        return "options.redis_message_id is missing"
    for name in _NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and not _is_number(value):
            return f"options.{name} is not a number"
    if not is_job_id(fields.get("message_id")):
        return f"message_id is not {JOB_ID_RULE}"
    for name in ("queue_name", "actor_name"):
        if not isinstance(fields.get(name), str):
            return f"{name} is not a string"
    if not isinstance(fields.get("args"), list | tuple):
        return "args is not a list"
    if not isinstance(fields.get("kwargs"), dict):
        return "kwargs is not an object"
    stamp = fields.get("message_timestamp")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        return "message_timestamp is not a whole number of milliseconds"
    return None


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def decode(data: bytes) -> Message[Any]:
    """``Message.decode`` with orjson, which also wrote the message (producers).

    orjson takes about a third of the stdlib's time here (docs/benchmarks.md). What
    orjson refuses and ``json`` would take (NaN, lone surrogates, integers past 64
    bits) no producer of ours writes. Such a message is quarantined like any
    undecodable one, and so is one of the wrong shape (``envelope_problem``).

    Raises:
        DecodeError: not JSON, or ``MalformedMessageError``: the wrong shape.
    """
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("Failed to decode message.", data, exc) from exc  # type: ignore[no-untyped-call]
    problem = envelope_problem(fields)
    if problem is None and data.count(b"{") + data.count(b"[") > _MAX_DEPTH:
        # Only where so many brackets make the depth possible.
        try:
            orjson.dumps(fields)
        except orjson.JSONEncodeError:
            problem = f"the message nests deeper than {_MAX_DEPTH} levels"
    if problem is not None:
        raise MalformedMessageError(problem, data, ValueError(problem))  # type: ignore[no-untyped-call]
    try:
        fields["args"] = tuple(fields["args"])
        return Message(**fields)
    except Exception as exc:  # as Dramatiq's Message.decode
        raise DecodeError("Failed to decode message.", data, exc) from exc  # type: ignore[no-untyped-call]


def jobs_of(message: Any) -> list[JobRef]:
    """Each job a broker message carries (none when its shape is wrong)."""
    if envelope_problem(message) is not None:
        return []  # the consumer quarantines it when its turn comes
    options = message["options"]
    redis_id = options["redis_message_id"]
    attempt = attempt_of(options)
    queue = q_name(message["queue_name"])
    if message["actor_name"] == BATCH_ACTOR_NAME:
        jobs = message["kwargs"].get("jobs")
        if not isinstance(jobs, list):
            return []
        # Each once, in order (a bulk message sends a repeated id once).
        ids = {
            job["id"]: None
            for job in jobs
            if isinstance(job, dict) and is_job_id(job.get("id"))
        }
        return [JobRef(job_id, attempt, queue, redis_id) for job_id in ids]
    if message["actor_name"] == ACTOR_NAME:
        return [JobRef(message["message_id"], attempt, queue, redis_id)]
    return []


def bulk_items(message: dict[str, Any]) -> dict[str, Any] | None:
    """Job id → job of each usable item of a bulk message, or None for another message."""
    jobs = message["kwargs"].get("jobs")
    if message["actor_name"] != BATCH_ACTOR_NAME or not isinstance(jobs, list):
        return None
    return {
        item["id"]: item.get("job")
        for item in jobs
        if isinstance(item, dict) and is_job_id(item.get("id"))
    }


def message_id_of(payload: bytes) -> str | None:
    """The ``message_id`` of an encoded Dramatiq message, or None if it cannot be read."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return message.get("message_id") if isinstance(message, dict) else None


def single_message(
    job_id: str, queue: str, job: Any, timestamp_ms: int
) -> dict[str, Any]:
    """A job of a bulk message as the single-job message it would have been."""
    return envelope(job_id, queue, ACTOR_NAME, {"job": job}, timestamp_ms=timestamp_ms)
