"""The multi-process directory: one per host, a subdirectory per launching process.

``prometheus_client``'s multi-process mode keeps each process's samples in files named
by its pid, in the directory ``PROMETHEUS_MULTIPROC_DIR`` names. That directory must be
wiped between runs, and the live gauges of a process that died removed
(``mark_process_dead``). Several of our launchers may share a host (``mailworker
worker``, ``mailworker api``, ``mailworker inbound``) and one ``/metrics`` shows them
all, so each launcher gets a subdirectory of its own, ``<role>-<pid>``: it wipes its own
when it starts, and removes those of launchers no longer running. Restarting the API
never resets the worker's counters.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from settings import Settings

__all__ = [
    "ENV",
    "alive",
    "default_directory",
    "directory_of",
    "mark_dead",
    "prepare",
    "subdirectories",
    "sweep",
]

# prometheus_client reads it, in every process, before its first sample is written.
ENV = "PROMETHEUS_MULTIPROC_DIR"

_LAUNCHER = re.compile(r"^(?P<role>[a-z]+)-(?P<pid>[0-9]+)$")
_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(?P<pid>[0-9]+)\.db$")


def default_directory(namespace: str) -> Path:
    """``$XDG_RUNTIME_DIR/mailworker-metrics-<ns>``, else under the temporary directory.

    ``XDG_RUNTIME_DIR`` is per user, in memory, and emptied at logout and boot: what
    the samples need.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(tempfile.gettempdir())
    return base / f"mailworker-metrics-{namespace}"


def directory_of(settings: Settings) -> Path:
    """The host's metrics directory for this configuration."""
    return settings.metrics.directory or default_directory(settings.namespace)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def subdirectories(directory: Path) -> Iterator[tuple[Path, int]]:
    """Each launcher's subdirectory and that launcher's pid."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            found = _LAUNCHER.match(entry.name)
            if found and entry.is_dir():
                yield entry, int(found["pid"])


def prepare(settings: Settings, role: str) -> Path:
    """Make this launcher's empty subdirectory and point ``PROMETHEUS_MULTIPROC_DIR`` at it.

    Call it first thing in a launching process, before any process of its own records
    a sample: the processes it forks inherit the variable. Subdirectories of launchers
    that no longer run are removed.

    Returns:
        The subdirectory.

    Raises:
        OSError: the directory cannot be made.
    """
    directory = directory_of(settings)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = os.getpid()
    for path, owner in subdirectories(directory):
        if owner == pid or not alive(owner):
            shutil.rmtree(path, ignore_errors=True)
    own = directory / f"{role}-{pid}"
    own.mkdir(mode=0o700)
    os.environ[ENV] = str(own)
    _switch_value_class()
    return own


def _switch_value_class() -> None:
    """Let a ``prometheus_client`` this process imported already write to the directory.

    It picks its value class when first imported, from the variable. A metric made
    after this writes to the files, which is what the recorder's are: it makes them
    when installed.
    """
    import sys

    values: Any = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def mark_dead(pid: int, directory: Path | None = None) -> None:
    """Remove the live gauges of process ``pid`` (``mark_process_dead``).

    Its counters and histograms stay: what it counted happened.
    """
    from prometheus_client import multiprocess

    path = directory or Path(os.environ[ENV])
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def sweep(directory: Path) -> None:
    """Mark dead every process of ``directory`` whose live gauges outlived it.

    A process that exits normally marks itself; this catches one killed (kill -9, the
    out-of-memory killer), at the next scrape.
    """
    for path, _ in subdirectories(directory):
        with contextlib.suppress(FileNotFoundError):
            for file in path.iterdir():
                found = _LIVE_FILE.match(file.name)
                if found and not alive(int(found["pid"])):
                    mark_dead(int(found["pid"]), path)
