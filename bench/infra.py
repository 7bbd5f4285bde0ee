"""Processes the benchmark starts and watches: Redis, the sinks, worker process trees.

Everything started here is a child of the harness, started from the main thread with a
parent-death signal (``setpriv --pdeathsig``) where available, and stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import redis

from common.sockets import free_port

REPO = Path(__file__).resolve().parent.parent

# The product's packages; commits before common/ existed have only the other three.
PRODUCT = ("settings", "common", "producers", "worker")


def product_at(rev: str) -> list[str]:
    """The product's packages that exist at commit ``rev``."""
    listed = subprocess.run(
        [shutil.which("git") or "git", "-C", str(REPO), "ls-tree", "--name-only", rev],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    return [p for p in PRODUCT if p in listed]


def regular_packages(target: Path) -> None:
    """Give each package of an extracted commit an ``__init__.py`` it lacks.

    Before ``worker/`` was a regular package it was a namespace package, and a
    namespace package loses to a regular one of the same name anywhere on
    ``sys.path`` (the work tree's): the snapshot would not be the code that runs.
    """
    for package in PRODUCT:
        folder = target / package
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")


SMTP_SINK = "/usr/sbin/smtp-sink"
_SETPRIV = shutil.which("setpriv")


def _with_pdeathsig(argv: Sequence[str]) -> list[str]:
    # The child gets SIGTERM if the harness dies without cleaning up (e.g. kill -9).
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
    return list(argv)


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (its tree never gets the terminal's ^C)."""
    return subprocess.Popen(
        _with_pdeathsig(argv),
        env=env,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        start_new_session=True,
    )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the root, wait up to ``timeout``, then SIGKILL every process of its tree
    (found before the SIGTERM and again now), each by its pid."""
    members = {p.pid: p for p in _tree(process.pid)}
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    members.update({p.pid: p for p in _tree(process.pid)})
    for proc in members.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    psutil.wait_procs(list(members.values()), timeout=5)


# ---------------------------------------------------------------- Redis


class RedisInstance:
    """The Redis the benchmark uses: its own ``redis-server`` on a free loopback port
    (preferred), or the shared one, used only through keys under our own prefixes."""

    def __init__(self, mode: str, workdir: Path) -> None:
        self.mode = mode
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.version = ""

    def start(self) -> None:
        binary = shutil.which("redis-server")
        shared_ok = self._ping("redis://127.0.0.1:6379/0")
        if self.mode == "own" and binary is None:
            raise RuntimeError("--redis own: redis-server is not installed")
        if self.mode == "shared" and not shared_ok:
            raise RuntimeError("--redis shared: nothing answers on 127.0.0.1:6379")
        if self.mode in ("own", "auto") and binary is not None:
            port = free_port()
            self.process = spawn(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                    "--logfile",
                    str(self.workdir / "redis.log"),
                ],
            )
            self.url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while not self._ping(self.url):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"own redis-server did not start ({self.workdir})"
                    )
                time.sleep(0.05)
        elif shared_ok:
            # The shared server: db 12 (mailworker, Dramatiq peers) and 13 (Celery),
            # every key under a prefix of this run; never FLUSHDB.
            self.url = "redis://127.0.0.1:6379/12"
        else:
            raise RuntimeError("no redis-server binary and nothing on 127.0.0.1:6379")
        info = self.client().info("server")
        self.version = str(info.get("redis_version", "?"))

    @staticmethod
    def _ping(url: str) -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    @property
    def own(self) -> bool:
        return self.process is not None

    @property
    def celery_url(self) -> str:
        base = self.url.rsplit("/", 1)[0]
        return f"{base}/1" if self.own else f"{base}/13"

    def client(self, url: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(url or self.url, socket_timeout=30)

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return None

    def stop(self) -> None:
        if self.process is not None:
            stop_tree(self.process, timeout=5)


# ---------------------------------------------------------------- sinks


@dataclass
class Arrivals:
    """What a sink has accepted: a count, and (for the aiosmtpd sink) each message's
    acceptance time, id and recipient, in order."""

    count: int = 0
    # (acceptance time, cumulative count) for every update the sink reported
    times: list[tuple[float, int]] = field(default_factory=list)
    refs: list[tuple[float, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, when: float, count: int, ref: str | None = None) -> None:
        with self.cond:
            if count > self.count:
                self.count = count
                self.times.append((when, count))
            if ref is not None:
                self.refs.append((when, ref))
            self.cond.notify_all()

    def wait_for(self, target: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.count >= target, timeout)

    def time_of(self, target: int) -> float | None:
        """When the cumulative count first reached ``target``."""
        with self.cond:
            for when, count in self.times:
                if count >= target:
                    return when
        return None


class Sink:
    """An SMTP sink process on loopback with a reader thread that fills ``arrivals``."""

    kind = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.arrivals = Arrivals()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        if self.process is not None:
            stop_tree(self.process, timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)


class PostfixSink(Sink):
    """Postfix's ``smtp-sink -c``: counts messages; we time each counter update."""

    kind = "postfix smtp-sink"

    def start(self) -> None:
        self.port = free_port()
        argv = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # it refuses to run as root without -u
        argv += [f"127.0.0.1:{self.port}", "1000"]
        self.process = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._reader = threading.Thread(
            target=self._read, daemon=True, name="smtp-sink"
        )
        self._reader.start()
        _wait_port(self.port, self.process)

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            now = time.time()
            if not chunk:
                return
            pending += chunk
            *updates, pending = pending.split(b"\r")
            if updates:
                # "sess=0 quit=0 mesg=123": the last update of this read is the newest
                last = updates[-1].rsplit(b"mesg=", 1)
                if len(last) == 2 and last[1].strip().isdigit():
                    self.arrivals.add(now, int(last[1]))


class AioSink(Sink):
    """``bench.sink`` (aiosmtpd): times every message and reports its Message-ID."""

    kind = "aiosmtpd sink (bench.sink)"

    def start(self) -> None:
        self.port = free_port()
        self.process = spawn(
            [sys.executable, "-m", "bench.sink", "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "aiosink.log").open("ab"),
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True, name="aio-sink")
        self._reader.start()
        _wait_port(self.port, self.process)

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        count = 0
        for raw in self.process.stdout:
            parts = raw.decode("ascii", "replace").split()
            if len(parts) != 3:
                continue  # "ready <port>"
            count += 1
            self.arrivals.add(float(parts[0]), count, parts[1])


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sink exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sink did not listen on 127.0.0.1:{port}")


# ---------------------------------------------------------------- measuring


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _switches(pid: int) -> int:
    """Context switches of all threads of a process so far (Linux; 0 elsewhere)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as fh:
                for line in fh:
                    if line.endswith(b"ctxt_switches:", 0, line.index(b":") + 1):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


class TreeSampler:
    """Samples CPU seconds and RSS of every process of some process trees (psutil).

    Members are found again every 0.5 s; their CPU and RSS every ``interval``. The CPU of
    a member is the last value seen, so one that exits early still counts.
    """

    def __init__(self, roots: Sequence[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.cpu: dict[int, float] = {}
        self.sys: dict[int, float] = {}  # of which system time
        self.switches: dict[int, int] = {}  # context switches, voluntary + involuntary
        self.rss: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.history: list[tuple[float, float]] = []  # (time, total CPU seconds)
        self._procs: dict[int, psutil.Process] = {}
        self._found = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="sampler")

    def start(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def _discover(self) -> None:
        for root in self.roots:
            for proc in _tree(root):
                if proc.pid not in self._procs:
                    self._procs[proc.pid] = proc
                    try:
                        self.names[proc.pid] = " ".join(proc.cmdline()[:6])[:160]
                    except psutil.Error:
                        self.names[proc.pid] = "?"
        self._found = time.monotonic()

    def sample(self) -> float:
        """Take one sample now; returns the total CPU seconds of the trees."""
        with self._lock:
            if time.monotonic() - self._found >= 0.5:
                self._discover()
            for pid, proc in list(self._procs.items()):
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        self.cpu[pid] = float(times.user + times.system)
                        self.sys[pid] = float(times.system)
                        self.switches[pid] = _switches(pid)
                        rss = proc.memory_info().rss
                except psutil.Error:
                    self._procs.pop(pid, None)
                    continue
                self.rss[pid] = max(self.rss.get(pid, 0), rss)
            total = sum(self.cpu.values())
            self.history.append((time.time(), total))
            return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> float:
        """Stop sampling after one last sample; returns the total CPU seconds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._found = 0.0
        return self.sample()

    def cpu_at(self, when: float) -> float:
        """Total CPU seconds at the last sample taken at or before ``when``."""
        best = self.history[0][1] if self.history else 0.0
        for stamp, total in self.history:
            if stamp > when:
                break
            best = total
        return best

    def peak_rss(self) -> tuple[int, str]:
        """The largest peak RSS of one process (bytes) and that process's command."""
        if not self.rss:
            return 0, ""
        pid = max(self.rss, key=lambda p: self.rss[p])
        return self.rss[pid], self.names.get(pid, "?")


def pid_cpu(pid: int | None) -> float:
    """CPU seconds used so far by one process (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        return _cpu(psutil.Process(pid))
    except psutil.Error:
        return 0.0


def cpu_by_pid() -> dict[int, float]:
    """CPU seconds used so far by every process on the machine."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["cpu_times"]):
        times = proc.info.get("cpu_times")
        if times is not None:
            out[proc.pid] = float(times.user + times.system)
    return out


def cpu_delta(
    before: dict[int, float], after: dict[int, float], exclude: set[int]
) -> float:
    """CPU seconds used between two ``cpu_by_pid`` snapshots by processes not excluded
    (those that exited in between are not seen)."""
    return sum(
        v - before.get(pid, 0.0) for pid, v in after.items() if pid not in exclude
    )
