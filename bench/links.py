"""Action links' benchmark: ``.venv/bin/python -m bench.links``.

Against a Redis of its own, the links app (``create_links_app``) under uvicorn on a free
loopback port, in a process of its own (``--factory bench.links:app_from_env``), and one
httpx client: for ``--keys`` keys,
one after another, the page's GET (what a scanner or the recipient costs) and the
button's POST up to its ``action.accepted`` (written before the answer): p50, p99, max,
and the requests per second of each. Then ``--scans`` GETs and HEADs of one key, as a
link scanner would send them, and a check that the key is still open.

Every step has a time bound; everything started is stopped. Prints the figures and writes
JSON into bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from bench.infra import RedisInstance, spawn, stop_tree
from common.keys import action_key, events_key

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = re.compile(r'name="token" value="([^"]+)"')
DEADLINE = 300.0  # seconds: the whole run


def _figures(samples: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "per_s": round(len(ordered) / seconds, 1),
    }


def _config(url: str, namespace: str, workdir: Path) -> Path:
    config = workdir / "links.toml"
    config.write_text(
        f'broker_url = "{url}"\nnamespace = "{namespace}"\nlog_format = "json"\n'
        '[[inbound]]\nname = "r"\nkind = "smtp"\naccept = ["actions@bench.test"]\n'
        '[email_actions]\nenabled = true\nreply_address = "actions@bench.test"\n'
    )
    return config


def app_from_env() -> Any:
    """uvicorn's factory: the links app for the file ``MW_BENCH_LINKS_CONFIG`` names."""
    from common.broker import connect
    from settings import load_settings
    from worker.actions.web import create_links_app

    settings = load_settings(Path(os.environ["MW_BENCH_LINKS_CONFIG"]), environ={})
    return create_links_app(settings, connect(settings.broker_url.get_secret_value()))


def _serve(config: Path, port: int) -> Any:
    process = spawn(
        [
            sys.executable, "-m", "uvicorn", "bench.links:app_from_env", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--no-access-log",
        ],
        env={**os.environ, "MW_BENCH_LINKS_CONFIG": str(config)},
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("uvicorn exited") from None
            time.sleep(0.05)
    stop_tree(process)
    raise RuntimeError("uvicorn did not start")


def _keys(client: redis.Redis, namespace: str, n: int) -> list[str]:
    from producers import Notification
    from worker.actions.keys import ActionKeys

    keys = ActionKeys(client, namespace=namespace, key_ttl=3600, keep=3600)
    job = Notification(
        to=["ann@example.org"],
        subject="Approve invoice 42",
        text="x",
        actions=[{"id": "approve", "label": "Approve"}],
        action_context={"task": 42},
    )
    return [
        keys.issue(str(uuid.uuid4()), job, ["ann@example.org"])["ann@example.org"]
        for _ in range(n)
    ]


def _visits(base: str, keys: list[str], start: float) -> dict[str, Any]:
    gets: list[float] = []
    posts: list[float] = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for key in keys:
            if time.monotonic() - start > DEADLINE:
                break
            began = time.perf_counter()
            page = client.get(f"/{key}/approve")
            gets.append(time.perf_counter() - began)
            token = TOKEN.search(page.text)
            assert page.status_code == 200
            assert token is not None
            began = time.perf_counter()
            done = client.post(
                f"/{key}/approve",
                data={"token": token.group(1), "comment": "ok"},
                headers={"Origin": base, "Sec-Fetch-Site": "same-origin"},
            )
            posts.append(time.perf_counter() - began)
            assert done.status_code == 200, done.status_code
    return {
        "get": _figures(gets, sum(gets)),
        "post_to_accepted": _figures(posts, sum(posts)),
    }


def _scans(base: str, key: str, n: int) -> dict[str, Any]:
    samples: list[float] = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for i in range(n):
            began = time.perf_counter()
            answer = (client.get if i % 2 else client.head)(f"/{key}/approve")
            samples.append(time.perf_counter() - began)
            assert answer.status_code == 200
    return _figures(samples, sum(samples))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.links", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--scans", type=int, default=500)
    args = parser.parse_args(argv)
    from common.sockets import free_port

    workdir = Path(tempfile.mkdtemp(prefix="mw-bench-links-"))
    redis_server = RedisInstance("auto", workdir)
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    namespace = f"blink-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"redis": redis_server.mode}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = None
    start = time.monotonic()
    try:
        web = _serve(_config(redis_server.url, namespace, workdir), port)
        keys = _keys(client, namespace, args.keys + 1)
        scanned = keys.pop()
        results["scans"] = _scans(base, scanned, args.scans)
        state = client.hget(action_key(namespace, scanned), "state")
        results["scanned_key_state"] = state.decode() if state else None
        results.update(_visits(base, keys, start))
        results["accepted_events"] = client.xlen(events_key(namespace))
    finally:
        if web is not None:
            stop_tree(web)
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, value in results.items():
        print(f"{name}: {value}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"links-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
