"""``mailworker send --bulk FILE.jsonl``: many notifications, one per line.

A refused line never stops the rest.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import click
import orjson

from common.keys import BATCH_SIZE
from producers.enqueue import Producer
from producers.job import Notification, parse_job
from settings import BrokerUnavailableError, JobValidationError

__all__ = ["BrokerUnavailableError", "BulkSummary", "report", "send_bulk"]


@dataclass
class BulkSummary:
    """What a bulk send did."""

    enqueued: list[tuple[int, str]] = field(default_factory=list)  # (line, job id)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, Notification | str]]:
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            yield number, parse_job(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            yield number, f"not valid JSON: {exc}"
        except JobValidationError as exc:
            yield number, str(exc)


def _enqueue_batch(
    producer: Producer, batch: list[tuple[int, Notification]], summary: BulkSummary
) -> None:
    """One bulk message.

    A line whose idempotency key conflicts is refused, and the rest are sent.
    """
    while batch:
        try:
            ids = producer.enqueue_many([n for _, n in batch])
        except JobValidationError as exc:
            index = _index(exc.field)
            if index is None or index >= len(batch):
                for number, _ in batch:
                    summary.refused.append((number, str(exc)))
                return
            number, _ = batch.pop(index)
            summary.refused.append((number, str(exc).split(".", 1)[-1]))
            continue
        summary.enqueued.extend(
            (number, job_id) for (number, _), job_id in zip(batch, ids, strict=True)
        )
        return


def _index(field_name: str) -> int | None:
    if field_name.startswith("[") and "]" in field_name:
        try:
            return int(field_name[1 : field_name.index("]")])
        except ValueError:
            return None
    return None


def send_bulk(producer: Producer, source: str, ids_out: Path | None) -> BulkSummary:
    """Enqueue every valid line of ``source`` (a path, or - for stdin).

    Raises:
        BrokerUnavailableError: Redis cannot be reached (what was enqueued is in the summary).
        OSError: the file cannot be read.
    """
    summary = BulkSummary()
    opened: contextlib.AbstractContextManager[IO[bytes]] = (
        contextlib.nullcontext(sys.stdin.buffer)
        if source == "-"
        else Path(source).open("rb")  # noqa: SIM115 - entered just below
    )
    total = None if source == "-" else Path(source).stat().st_size
    show = sys.stderr.isatty()
    batch: list[tuple[int, Notification]] = []
    with (
        opened as stream,
        click.progressbar(
            length=total or 0,
            label="enqueueing",
            file=sys.stderr,
            hidden=not show or not total,
        ) as bar,
    ):
        for number, parsed in _lines(stream):
            if isinstance(parsed, str):
                summary.refused.append((number, parsed))
            else:
                batch.append((number, parsed))
            if len(batch) == BATCH_SIZE:
                _enqueue_batch(producer, batch, summary)
                batch = []
                bar.update(stream.tell() - bar.pos if total else 0)
        if batch:
            _enqueue_batch(producer, batch, summary)
        if total:
            bar.update(total - bar.pos)
    if ids_out is not None:
        ids_out.write_text("".join(f"{job_id}\n" for _, job_id in summary.enqueued))
    return summary


def report(summary: BulkSummary, ids_out: Path | None) -> list[str]:
    """The summary printed at the end."""
    lines = [f"enqueued {len(summary.enqueued)}", f"refused {len(summary.refused)}"]
    lines += [f"  line {number}: {reason}" for number, reason in summary.refused[:100]]
    if len(summary.refused) > 100:
        lines.append(f"  … and {len(summary.refused) - 100} more")
    if ids_out is not None:
        lines.append(f"job ids written to {ids_out}")
    return lines
