"""Helpers for tests that run real processes: worker process groups, private Redis servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from common.sockets import free_port
from tests.support.env import CI

MAILWORKER = str(Path(sys.executable).parent / "mailworker")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without MAILWORKER_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update(extra)
    return env


class WorkerProcess:
    """``mailworker worker`` in its own session, so the whole group can be killed."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log = log
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            [MAILWORKER, "worker", *args],
            env=clean_env(MAILWORKER_CONFIG=str(config)),
            stdout=self._out,
            stderr=self._out,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """kill -9 the master and every worker process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._out.close()

    def signal_group(self, sig: int) -> None:
        os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM and wait; kill -9 if it does not end in time."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        if not self._out.closed:
            self._out.close()
        return int(self.process.returncode)

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                found.append(json.loads(line))
        return found


class RedisServer:
    """A private redis-server on a free loopback port, with AOF in ``directory``."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if CI:
                raise RuntimeError(
                    "CI=true but redis-server is not installed: .ci/run installs it"
                )
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                redis.Redis(port=self.port).ping()
                return
            except (OSError, redis.RedisError):
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        """SHUTDOWN (the AOF is complete) and wait for the process to end."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        self.process.wait(timeout=10)

    def kill(self) -> None:
        """kill -9: what the AOF had written is all that survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)


__all__ = [
    "MAILWORKER",
    "RedisServer",
    "WorkerProcess",
    "clean_env",
]
