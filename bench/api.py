"""The HTTP API's cost: ``POST /v1/notifications`` against a bare endpoint, latency, batches.

``python -m bench.api --rounds 4 --seconds 5`` (needs ``wrk``: ``apt-get install wrk``).
One ``mailworker api`` app serves both endpoints in one uvicorn process, on a Redis of its
own: ``/v1/notifications`` (key, rate limit, validation, the enqueue script) and
``/bare`` (only RPUSHes the raw body). wrk drives each with 50 connections, in
alternating rounds, so the shared machine's busy moments fall on both. Then 8 httpx
clients pace 200 requests/s for the latency, wrk posts batches of 100 (8 connections) against
single posts, and the server's peak RSS is read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from bench.common import HTML, SUBJECT, TEXT, TO_ADDRESS
from bench.infra import RedisInstance, spawn, stop_tree
from common.sockets import free_port

JOB = {"to": TO_ADDRESS, "subject": SUBJECT, "text": TEXT, "html": HTML}
BATCH = 100
ENV_CONFIG = "MAILWORKER_CONFIG"


def served_app() -> Any:
    """The API app with the bare endpoint added (uvicorn ``--factory``)."""
    from litestar import Request, post

    from settings import load_settings
    from worker.api.accesslog import AccessLog
    from worker.api.app import create_app
    from worker.logging import configure

    settings = load_settings()
    configure(log_format=settings.log_format, log_recipients=settings.log_recipients)
    app = create_app(settings)
    client = app.state.api.client
    key = f"{settings.namespace}:bare"

    @post("/bare", status_code=202, include_in_schema=False)
    async def bare(request: Request[Any, Any, Any]) -> dict[str, str]:
        client.rpush(key, await request.body())
        return {"id": "bare"}

    app.register(bare)
    return AccessLog(app)


def _serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, ENV_CONFIG: str(config)}
    process = spawn(
        [sys.executable, "-m", "uvicorn", "--factory", "bench.api:served_app",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
         "--log-level", "warning", "--lifespan", "off"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the API did not start: {log}")


def _lua(path: Path, body: bytes, key: str, kind: str = "application/json") -> Path:
    quoted = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{quoted}'\n"
        f'wrk.headers["Content-Type"] = "{kind}"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    return path


def _wrk(
    url: str, script: Path, seconds: int, connections: int = 50
) -> dict[str, float]:
    out = subprocess.run(
        [shutil.which("wrk") or "wrk", "-t2", f"-c{connections}", f"-d{seconds}s",
         "-s", str(script), "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rate, out
    return {
        "rps": float(rate.group(1)),
        "non2xx": float(errors.group(1)) if errors else 0,
    }


def _paced(url: str, key: str, rate: float, seconds: float) -> dict[str, float]:
    """``rate`` requests/s on a fixed schedule from 8 threads, each its own connection.

    A request's latency counts from when it was due, not from when it was sent, so a
    stall is not hidden by the requests it delayed (coordinated omission).
    """
    body = orjson.dumps(JOB)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    threads, latencies = 8, []
    begin = time.perf_counter() + 0.2

    def run(offset: int) -> list[float]:
        out = []
        with httpx.Client(timeout=10) as client:
            for n in range(offset, int(rate * seconds), threads):
                due = begin + n / rate
                if due > time.perf_counter():
                    time.sleep(due - time.perf_counter())
                answer = client.post(url, content=body, headers=headers)
                assert answer.status_code == 202, answer.text
                out.append((time.perf_counter() - due) * 1000)
        return out

    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(run, range(threads)):
            latencies.extend(part)
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "max_ms": latencies[-1],
        "requests": len(latencies),
    }


def _clear(server: RedisInstance) -> None:
    """Drop the jobs of a round (the API key stays)."""
    client = server.client()
    doomed = [
        k for k in client.scan_iter("benchapi:*", count=10_000) if b":api:" not in k
    ]
    for start in range(0, len(doomed), 10_000):
        client.delete(*doomed[start : start + 10_000])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> None:
    """Run the rounds and print every figure and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mailworker-bench-api-"))
    redis_server = RedisInstance("own", work)
    redis_server.start()
    config = work / "mailworker.toml"
    config.write_text(
        f'broker_url = "{redis_server.url}"\nnamespace = "benchapi"\n'
        'log_format = "json"\n[api]\nrate_limit = "1000000/s"\nmax_batch = 500\n'
    )
    from worker.api.keys import ApiKeys

    _, key = ApiKeys(redis_server.client(), "benchapi").create("bench", ["send"])
    port = free_port()
    server = _serve(config, port, work / "api.log")
    base = f"http://127.0.0.1:{port}"
    single = _lua(work / "single.lua", orjson.dumps(JOB), key)
    batch = _lua(work / "batch.lua", orjson.dumps([JOB] * BATCH), key)
    figures: dict[str, list[float]] = {
        "ours": [],
        "bare": [],
        "single": [],
        "batch": [],
    }
    try:
        for _ in range(args.rounds):
            for name, path in (("ours", "/v1/notifications"), ("bare", "/bare")):
                result = _wrk(base + path, single, args.seconds)
                assert result["non2xx"] == 0, (name, result)
                figures[name].append(result["rps"])
                print(f"{name:6} {result['rps']:9.0f} req/s", flush=True)
                _clear(redis_server)
        paced = _paced(base + "/v1/notifications", key, 200.0, args.paced_seconds)
        print(f"paced 200/s: {paced}", flush=True)
        _clear(redis_server)
        for _ in range(max(2, args.rounds // 2)):
            one = _wrk(base + "/v1/notifications", single, args.seconds)["rps"]
            many = _wrk(base + "/v1/notifications/batch", batch, args.seconds, 8)["rps"]
            figures["single"].append(one)
            figures["batch"].append(many * BATCH)
            print(
                f"single {one:9.0f} notif/s, batch {many * BATCH:9.0f} notif/s",
                flush=True,
            )
            _clear(redis_server)
        rss = _peak_rss_mb(server.pid)
    finally:
        stop_tree(server)
        redis_server.stop()
    ratio = statistics.mean(figures["ours"]) / statistics.mean(figures["bare"])
    speedup = statistics.mean(figures["batch"]) / statistics.mean(figures["single"])
    print(
        f"ours/bare {ratio:.2f} (target >= 0.8); p99 at 200/s {paced['p99_ms']:.1f} ms "
        f"(<= 25); batch/single {speedup:.1f}x (>= 5); peak RSS {rss:.0f} MB (<= 150)"
    )
    print(orjson.dumps({**figures, "paced": paced, "rss_mb": rss}).decode())


if __name__ == "__main__":
    main()
