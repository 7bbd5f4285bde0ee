"""Litestar against FastAPI: one bare JSON endpoint each under uvicorn, driven by wrk.

``python -m bench.frameworks --rounds 3 --seconds 5`` (needs ``wrk`` and, for the peer,
``pip install fastapi``: it is not one of mailworker's dependencies). The rounds
alternate, so a busy moment of a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx

from common.sockets import free_port


def litestar_app() -> Any:
    """The bare endpoint in Litestar."""
    from litestar import Litestar, post

    @post("/echo", status_code=202)
    async def echo(data: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(len(data))}

    return Litestar([echo], openapi_config=None)


def fastapi_app() -> Any:
    """The same endpoint in FastAPI."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None)

    @app.post("/echo", status_code=202)
    async def echo(data: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(len(data))}

    return app


_LUA = """
wrk.method = "POST"
wrk.body = '{"to": "ann@example.com", "subject": "Hello", "text": "It works."}'
wrk.headers["Content-Type"] = "application/json"
"""


def _serve(factory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", f"bench.frameworks:{factory}",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
         "--log-level", "warning"],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/echo", json={}, timeout=1)
            return process, port
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{factory} did not start")


def _wrk(port: int, seconds: int, script: str) -> float:
    out = subprocess.run(
        [shutil.which("wrk") or "wrk", "-t2", "-c50", f"-d{seconds}s", "-s", script,
         f"http://127.0.0.1:{port}/echo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main(argv: list[str] | None = None) -> None:
    """Alternate rounds of each framework and print requests/s per round and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args(argv)
    script = "/tmp/mailworker-bench-frameworks.lua"  # noqa: S108 - a bench's scratch file
    with open(script, "w") as handle:
        handle.write(_LUA)
    servers = {name: _serve(f"{name}_app") for name in ("litestar", "fastapi")}
    figures: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                figures[name].append(_wrk(port, args.seconds, script))
                print(f"{name:9} {figures[name][-1]:9.0f} req/s", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    mean = {name: sum(v) / len(v) for name, v in figures.items()}
    print(f"mean: litestar {mean['litestar']:.0f}, fastapi {mean['fastapi']:.0f} req/s;"
          f" ratio litestar/fastapi {mean['litestar'] / mean['fastapi']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
