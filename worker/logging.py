"""structlog, configured once per process: JSON or console, bound job context, no secrets."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, BinaryIO, Literal

import orjson
import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer

from worker.clock import iso_micros

__all__ = ["DramatiqArgsFilter", "configure", "lines_together", "show_address"]

_SECRET_KEYS = frozenset(
    {"password", "secret", "client_secret", "token", "access_token", "authorization"}
)
_secrets: set[str] = set()
_recipients_mode = "full"


def show_address(address: str) -> str:
    """An address as logs may show it, per ``log_recipients`` (full | domain | hash)."""
    if _recipients_mode == "full":
        return address
    domain = address.rpartition("@")[2]
    if _recipients_mode == "domain":
        return f"***@{domain}"
    return "sha256:" + hashlib.sha256(address.lower().encode()).hexdigest()[:16]


_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        if _recipients_mode != "full" and "@" in value:
            # Server replies and errors quote addresses too ("550 <a@b>: unknown").
            value = _ADDRESS.sub(lambda m: show_address(m.group(0)), value)
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {
            k: "***" if str(k).lower() in _SECRET_KEYS else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


# Values _scrub returns unchanged.
_PLAIN = frozenset({int, float, bool, type(None)})


def _redact(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Last line of defence: no configured secret and no secret-named key reaches output."""
    for key, value in event.items():  # only values change: the dict keeps its size
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif value.__class__ not in _PLAIN:
            event[key] = _scrub(value)
    return event


def _timestamp(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``timestamp``: now, ISO 8601 UTC with microseconds."""
    event["timestamp"] = iso_micros()
    return event


class DramatiqArgsFilter(logging.Filter):
    """Replace Dramatiq message objects in log arguments by their ids (their repr holds the job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                getattr(a, "message_id", a) if hasattr(a, "message_id") else a
                for a in record.args
            )
        return True


def _stream() -> BinaryIO:
    # A dup of fd 2, unbuffered: one write(2) a line, around Dramatiq's log pipe.
    return os.fdopen(os.dup(2), "wb", buffering=0)


# What one write(2) to a pipe keeps whole among the other processes' writes.
_PIPE_BUF = 4096


class _Lines:
    """The JSON log stream of structlog's logger.

    It makes one write(2) a line, except in ``together()``. There a thread's lines are
    gathered and written in pieces of at most ``_PIPE_BUF`` bytes, cut between lines, so
    a line of another process never lands inside one. A piece goes out as soon as it is
    full, so little is ever held back.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._local = threading.local()
        self.lost = 0  # lines the stream could not take

    def write(self, data: bytes) -> int:
        pending: list[bytes] | None = getattr(self._local, "pending", None)
        if pending is None:
            return self._out(data)
        if pending and self._local.size + len(data) > _PIPE_BUF:
            self._write_out()
        pending.append(data)
        self._local.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: what is not held by ``together()`` is written at once."""

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        if getattr(self._local, "pending", None) is not None:
            yield  # already gathering
            return
        self._local.pending, self._local.size = [], 0
        try:
            yield
        finally:
            self._write_out()
            self._local.pending = None

    def _write_out(self) -> None:
        pending: list[bytes] = self._local.pending
        if pending:
            self._out(b"".join(pending))
            pending.clear()
            self._local.size = 0

    def _out(self, data: bytes) -> int:
        """Write, and never raise.

        A log line that cannot be written (a closed pipe, a full disk) is dropped. It is
        never allowed to break off a delivery after its send, which would lose its record
        and send it again.
        """
        try:
            return self._raw.write(data)
        except (OSError, ValueError):
            self.lost += data.count(b"\n")
            return len(data)


_lines: _Lines | None = None  # the JSON stream, once configure() has made it


def lines_together() -> contextlib.AbstractContextManager[None]:
    """Write the log lines this thread makes inside the block together.

    A bulk message's per-job lines go in one write(2) per 4 KB instead of one each. It is
    a no-op for console logs and before ``configure``.
    """
    return _lines.together() if _lines is not None else contextlib.nullcontext()


def configure(
    *,
    log_format: Literal["auto", "json", "console"],
    log_recipients: str = "full",
    secrets: Iterable[str] = (),
    dev: bool = False,
    level: int = logging.INFO,
) -> None:
    """Configure structlog and route stdlib loggers (dramatiq, …) through it.

    Args:
        log_format: ``auto`` is console for ``mailworker dev``, JSON otherwise.
        log_recipients: what log lines show of addresses.
        secrets: values that must never be printed (passwords, client secrets).
        dev: whether this is ``mailworker dev``.
        level: the lowest level written.
    """
    global _recipients_mode
    _recipients_mode = log_recipients
    _secrets.update(s for s in secrets if len(s) >= 4)
    console = log_format == "console" or (log_format == "auto" and dev)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
        _redact,
    ]
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory: Any = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        global _lines
        _lines = _Lines(_stream())
        factory = structlog.BytesLoggerFactory(file=_lines)  # type: ignore[arg-type]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, renderer, console, level)


def _route_stdlib(shared: list[Any], renderer: Any, console: bool, level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _to_text(renderer),
        ],
    )
    handler = logging.StreamHandler(sys.stderr if console else _TextStream(_stream()))
    handler.setFormatter(formatter)
    handler.addFilter(DramatiqArgsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # flufl.bounce logs every detector it runs at INFO.
    for noisy in ("mail.log", "msal", "httpx", "httpcore", "flufl.bounce"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _to_text(renderer: Any) -> Any:
    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        out = renderer(logger, method, event)
        return out.decode() if isinstance(out, bytes) else str(out)

    return render


class _TextStream:
    """A text stream over a binary fd, one write per line."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw

    def write(self, text: str) -> int:
        return self._raw.write(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        self._raw.flush()
