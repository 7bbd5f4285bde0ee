"""The contenders and the three kinds of measurement: throughput, latency, priority."""

from __future__ import annotations

import inspect
import math
import os
import re
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from bench.common import (
    ENV_NAMESPACE,
    ENV_QUEUE,
    ENV_REDIS_URL,
    ENV_SMTP_HOST,
    ENV_SMTP_PORT,
    FROM_ADDRESS,
    HTML,
    SUBJECT,
    TEXT,
    TO_ADDRESS,
    delete_prefix,
    dramatiq_enqueue,
    peer_kwargs,
)
from bench.infra import (
    AioSink,
    RedisInstance,
    Sink,
    TreeSampler,
    cpu_by_pid,
    cpu_delta,
    pid_cpu,
    spawn,
    stop_tree,
)

REPO = Path(__file__).resolve().parent.parent
PEER_QUEUE = "bench"
# The idle poll (Dramatiq's ``dramatiq_worker_timeout``, ms) of versions of
# `mailworker worker` without ``--poll-interval``: they set 250 ms for themselves.
OLD_POLL_MS = 250


def product_poll_interval() -> tuple[int, bool]:
    """mailworker's default idle poll (ms) and whether ``mailworker worker`` takes
    ``--poll-interval``. Every Dramatiq contender gets the same poll, so all run with the
    same worker flags and environment."""
    try:
        from worker.cli.main import worker as command
    except ImportError:  # versions before worker/cli/ was a package
        from worker.cli import worker as command  # type: ignore[attr-defined,no-redef]

    for param in command.params:
        if param.name == "poll_interval":
            return int(param.default), True
    return OLD_POLL_MS, False


# "mailworker-bulk" uses the bulk path (many notifications per broker message) when the
# product has one: ``Producer.enqueue_many(..., bulk=True)``. Without it, it runs exactly
# the single-job path of "mailworker", and the report says so.
BULK_NOTE = (
    "mailworker-bulk: no bulk job exists in this version, so this scenario runs the same "
    "path as 'mailworker' (Producer.enqueue_many of single jobs); the bulk target is not "
    "meaningful until the bulk path exists."
)


def bulk_path_exists() -> bool:
    """Whether ``Producer.enqueue_many`` has the bulk switch (imported when asked: the
    harness may first put a snapshot of the product on ``sys.path``)."""
    from producers import Producer

    return "bulk" in inspect.signature(Producer.enqueue_many).parameters


def enqueue_single(prod: Any, jobs: list[Any]) -> list[str]:
    """One broker message per notification, in few round trips."""
    if bulk_path_exists():
        return list(prod.enqueue_many(jobs, bulk=False))
    return list(prod.enqueue_many(jobs))


def enqueue_bulk(prod: Any, jobs: list[Any]) -> list[str]:
    """Many notifications per broker message when the product can (else single jobs)."""
    if bulk_path_exists():
        return list(prod.enqueue_many(jobs, bulk=True))
    return list(prod.enqueue_many(jobs))


@dataclass
class Context:
    """What every measurement needs: servers, worker settings, where files go."""

    redis: RedisInstance
    throughput_sink: Sink | None
    latency_sink: AioSink | None
    processes: int
    threads: int
    workdir: Path
    pythonpath: str = ""  # a snapshot of the product to run instead of the work tree
    quiet_limit: float = 0.0  # wait up to this long for other load to pass before a run
    poll_ms: int = OLD_POLL_MS  # the idle poll of every Dramatiq contender
    poll_flag: bool = False  # whether `mailworker worker` takes --poll-interval
    python: str = sys.executable
    mailworker: str = str(Path(sys.executable).parent / "mailworker")
    webhook_url: str = ""  # `--webhook`: mailworker's workers POST every event here
    _clients: dict[str, redis.Redis] = field(default_factory=dict)

    def client(self, url: str | None = None) -> redis.Redis:
        url = url or self.redis.url
        if url not in self._clients:
            self._clients[url] = self.redis.client(url)
        return self._clients[url]

    def worker_env(self, **extra: str) -> dict[str, str]:
        """This environment without MAILWORKER_*, dramatiq_* and BENCH_*, plus ``extra``."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MAILWORKER_", "dramatiq_", "BENCH_"))
        }
        env.update(extra)
        return env


def namespace(tag: str) -> str:
    """A fresh namespace (Redis key prefix) for one run: nothing is shared between runs."""
    return f"bench-{tag}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------- contenders


class Contender:
    """One way of delivering the notifications, started as its own process tree."""

    name = ""
    label = ""
    completion = "sink"  # "sink": N messages accepted; "acked": N messages acknowledged

    def prepare(self, ctx: Context, ns: str, n: int, sink: Sink) -> None:
        """Enqueue ``n`` notifications."""
        raise NotImplementedError

    def start(self, ctx: Context, ns: str, sink: Sink, log: IO[bytes]) -> list[Any]:
        """Start the workers; returns the root processes."""
        raise NotImplementedError

    def remaining(self, ctx: Context, ns: str) -> int:
        """Messages not yet acknowledged (for completion "acked")."""
        raise NotImplementedError

    def verify(self, ctx: Context, ns: str, n: int) -> dict[str, Any]:
        """Facts checked after the measurement (workers still running)."""
        return {}

    def cleanup(self, ctx: Context, ns: str) -> None:
        delete_prefix(ctx.client(), ns)

    def config(self, ctx: Context) -> str:
        """The worker command, for the report."""
        raise NotImplementedError


class DramatiqPeer(Contender):
    """A peer module run by Dramatiq's own CLI with the same flags as mailworker's."""

    def __init__(self, name: str, label: str, module: str, actor: str, completion: str):
        self.name, self.label, self.module, self.actor = name, label, module, actor
        self.completion = completion

    def argv(self, ctx: Context) -> list[str]:
        return [
            ctx.python, "-m", "dramatiq", self.module, "--skip-logging",
            "-p", str(ctx.processes), "-t", str(ctx.threads),
            "--worker-shutdown-timeout", "20000", "-Q", PEER_QUEUE,
        ]  # fmt: skip

    def config(self, ctx: Context) -> str:
        argv = " ".join(self.argv(ctx)[1:])
        return f"dramatiq_worker_timeout={ctx.poll_ms} python {argv}"

    def enqueue(self, ctx: Context, ns: str, refs: list[str]) -> None:
        dramatiq_enqueue(
            ctx.client(),
            ns,
            PEER_QUEUE,
            self.actor,
            [peer_kwargs(ref) for ref in refs],
            ids=refs,
        )

    def prepare(self, ctx: Context, ns: str, n: int, sink: Sink) -> None:
        refs = [secrets.token_hex(16) for _ in range(n)]
        self.enqueue(ctx, ns, refs)
        queued = ctx.client().llen(f"{ns}:{PEER_QUEUE}")
        if queued != n:
            raise RuntimeError(f"{queued} of {n} messages on the queue")

    def start(self, ctx: Context, ns: str, sink: Sink, log: IO[bytes]) -> list[Any]:
        env = ctx.worker_env(
            **{
                ENV_REDIS_URL: ctx.redis.url,
                ENV_NAMESPACE: ns,
                ENV_QUEUE: PEER_QUEUE,
                ENV_SMTP_HOST: "127.0.0.1",
                ENV_SMTP_PORT: str(sink.port),
                "dramatiq_worker_timeout": str(ctx.poll_ms),
            }
        )
        return [spawn(self.argv(ctx), env=env, stdout=log, cwd=REPO)]

    def remaining(self, ctx: Context, ns: str) -> int:
        return int(ctx.client().hlen(f"{ns}:{PEER_QUEUE}.msgs"))

    def verify(self, ctx: Context, ns: str, n: int) -> dict[str, Any]:
        return {"unacked_after": self.remaining(ctx, ns)}


class CeleryPeer(Contender):
    """The typical Celery task, ``--pool threads``: one Celery worker process per
    ``--processes``, each with ``--threads`` threads (the same P x T as everyone)."""

    name = "typical-celery"
    label = "3b. typical Celery peer (EmailMessage, reused conn, --pool threads)"

    def __init__(self) -> None:
        self._apps: dict[str, Any] = {}

    def _app(self, ctx: Context, ns: str) -> Any:
        from bench.peers._celery import make_app

        if ns not in self._apps:
            self._apps[ns] = make_app(ctx.redis.celery_url, ns, PEER_QUEUE)
        return self._apps[ns]

    def argv(self, ctx: Context, index: int) -> list[str]:
        return [
            ctx.python, "-m", "celery", "-A", "bench.peers.typical_celery", "worker",
            "--pool", "threads", "-c", str(ctx.threads), "-Q", PEER_QUEUE,
            "-n", f"bench{index}@%h", "-l", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip

    def config(self, ctx: Context) -> str:
        return f"{ctx.processes} x python " + " ".join(self.argv(ctx, 0)[1:])

    def prepare(self, ctx: Context, ns: str, n: int, sink: Sink) -> None:
        app = self._app(ctx, ns)
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task(
                    "send_notification",
                    kwargs=peer_kwargs(secrets.token_hex(16)),
                    queue=PEER_QUEUE,
                    producer=producer,
                )
        queued = ctx.client(ctx.redis.celery_url).llen(f"{ns}:{PEER_QUEUE}")
        if queued != n:
            raise RuntimeError(f"{queued} of {n} messages on the Celery queue")

    def start(self, ctx: Context, ns: str, sink: Sink, log: IO[bytes]) -> list[Any]:
        env = ctx.worker_env(
            **{
                ENV_REDIS_URL: ctx.redis.celery_url,
                ENV_NAMESPACE: ns,
                ENV_QUEUE: PEER_QUEUE,
                ENV_SMTP_HOST: "127.0.0.1",
                ENV_SMTP_PORT: str(sink.port),
            }
        )
        return [
            spawn(self.argv(ctx, i), env=env, stdout=log, cwd=REPO)
            for i in range(ctx.processes)
        ]

    def verify(self, ctx: Context, ns: str, n: int) -> dict[str, Any]:
        return {
            "queued_after": ctx.client(ctx.redis.celery_url).llen(f"{ns}:{PEER_QUEUE}")
        }

    def cleanup(self, ctx: Context, ns: str) -> None:
        app = self._apps.pop(ns, None)
        if app is not None:
            app.close()
        delete_prefix(ctx.client(ctx.redis.celery_url), ns)


def notification(priority: str = "normal", sender: str | None = None) -> Any:
    """The benchmark's notification as a mailworker job (``sender``: a pinned service)."""
    from producers import Notification

    extra = {"sender": sender} if sender else {}
    return Notification(
        to=[TO_ADDRESS],
        subject=SUBJECT,
        text=TEXT,
        html=HTML,
        priority=priority,
        **extra,
    )


def write_config(
    ctx: Context,
    ns: str,
    sink: Sink,
    bulk_sink: Sink | None = None,
    *,
    metrics: bool = True,
) -> Path:
    """A mailworker configuration for one run: its own namespace, one SMTP connection
    to the sink (no TLS, no AUTH), JSON logs (the harness sends them to a file); with
    ``bulk_sink``, a second connection named ``bulk`` to it; with ``--webhook``, a
    ``[[webhook]]`` to that URL. Metrics are recorded in the run's own directory, or
    not at all (``metrics=False``: the A/B of their cost)."""
    path = ctx.workdir / f"{ns}.toml"
    metrics_section = (
        f'\n[metrics]\ndirectory = "{ctx.workdir / f"metrics-{ns}"}"\n'
        if metrics
        else "\n[metrics]\nenabled = false\n"
    )
    sinks = [("sink", sink)] + ([("bulk", bulk_sink)] if bulk_sink else [])
    path.write_text(
        f'broker_url = "{ctx.redis.url}"\n'
        f'namespace = "{ns}"\n'
        'log_format = "json"\n'
        + "".join(
            "\n[[smtp]]\n"
            f'name = "{name}"\n'
            f'from_address = "{FROM_ADDRESS}"\n'
            'server = "127.0.0.1"\n'
            f"port = {target.port}\n"
            'security = "none"\n'
            for name, target in sinks
        )
        + (
            '\n[[webhook]]\nname = "bench"\n'
            f'url = "{ctx.webhook_url}"\nsecret = "bench-secret"\nallow_http = true\n'
            if ctx.webhook_url
            else ""
        )
        + metrics_section
    )
    return path


def producer(ctx: Context, ns: str) -> Any:
    from producers import Producer

    return Producer(ctx.client(), namespace=ns)


def count_states(client: redis.Redis, ns: str) -> dict[str, int]:
    """The status records of a namespace by state: SCAN ``{ns}:job:*``, HGET ``state``."""
    prefix = f"{ns}:job:".encode()
    keys = [
        key
        for key in client.scan_iter(match=f"{ns}:job:*", count=5000)
        if b":" not in key[len(prefix) :]  # not :history / :accepted
    ]
    states: dict[str, int] = {}
    for start in range(0, len(keys), 2000):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 2000]:
                pipe.hget(key, "state")
            for state in pipe.execute():
                name = state.decode() if state else "none"
                states[name] = states.get(name, 0) + 1
    return states


def wait_sent(client: redis.Redis, ns: str, n: int, timeout: float) -> dict[str, int]:
    """Count states until ``n`` are ``sent`` or ``timeout`` passes (status is written
    after the server's reply, so the last few can lag the sink by milliseconds)."""
    deadline = time.monotonic() + timeout
    while True:
        states = count_states(client, ns)
        if states.get("sent", 0) >= n or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


class Mailworker(Contender):
    """``mailworker worker -p P -t T`` on a configuration of its own."""

    def __init__(
        self, name: str, label: str, bulk: bool = False, *, metrics: bool = True
    ) -> None:
        self.name, self.label, self.bulk = name, label, bulk
        self.metrics = metrics

    def argv(self, ctx: Context) -> list[str]:
        argv = [
            ctx.mailworker,
            "worker",
            "-p",
            str(ctx.processes),
            "-t",
            str(ctx.threads),
        ]
        if ctx.poll_flag:
            argv += ["--poll-interval", str(ctx.poll_ms)]
        return argv

    def config(self, ctx: Context) -> str:
        command = " ".join(["mailworker", *self.argv(ctx)[1:]])
        # without --poll-interval, `mailworker worker` honours the variable
        return (
            command
            if ctx.poll_flag
            else f"dramatiq_worker_timeout={ctx.poll_ms} {command}"
        )

    def prepare(self, ctx: Context, ns: str, n: int, sink: Sink) -> None:
        write_config(ctx, ns, sink, metrics=self.metrics)
        jobs = [notification() for _ in range(n)]
        (enqueue_bulk if self.bulk else enqueue_single)(producer(ctx, ns), jobs)

    @staticmethod
    def env(ctx: Context, ns: str) -> dict[str, str]:
        """The environment of a `mailworker worker` on the run's configuration."""
        env = ctx.worker_env(MAILWORKER_CONFIG=str(ctx.workdir / f"{ns}.toml"))
        if ctx.pythonpath:
            env["PYTHONPATH"] = ctx.pythonpath
        if not ctx.poll_flag:
            env["dramatiq_worker_timeout"] = str(ctx.poll_ms)
        return env

    def start(self, ctx: Context, ns: str, sink: Sink, log: IO[bytes]) -> list[Any]:
        env = self.env(ctx, ns)
        return [spawn(self.argv(ctx), env=env, stdout=log, cwd=ctx.workdir)]

    def verify(self, ctx: Context, ns: str, n: int) -> dict[str, Any]:
        states = wait_sent(ctx.client(), ns, n, timeout=10)
        return {
            "states": states,
            "sent_records": states.get("sent", 0),
            "delivered_by_actor": actors_in_log(ctx.workdir / f"{ns}.log"),
        }


_ACTOR = re.compile(r'"actor":\s*"([^"]+)"')


def actors_in_log(path: Path) -> dict[str, int]:
    """Which actor delivered how many jobs, from the worker's JSON log (best effort)."""
    counts: dict[str, int] = {}
    try:
        with path.open(errors="replace") as log:
            for line in log:
                if "delivery_succeeded" in line:
                    found = _ACTOR.search(line)
                    name = found.group(1) if found else "?"
                    counts[name] = counts.get(name, 0) + 1
    except OSError:
        pass
    return counts


THROUGHPUT: dict[str, Contender] = {
    c.name: c
    for c in (
        DramatiqPeer(
            "ceiling", "1. ceiling: no-op Dramatiq actor", "bench.peers.ceiling",
            "noop", "acked",
        ),
        DramatiqPeer(
            "bare", "2. bare peer (pre-made bytes, reused smtplib conn)",
            "bench.peers.bare", "bare", "sink",
        ),
        DramatiqPeer(
            "typical-dramatiq", "3a. typical Dramatiq peer (EmailMessage, reused conn)",
            "bench.peers.typical_dramatiq", "send_notification", "sink",
        ),
        CeleryPeer(),
        Mailworker("mailworker", "4. mailworker, single jobs (a broker message each)"),
        Mailworker(
            "mailworker-bulk", "5. mailworker bulk (enqueue_many bulk)", bulk=True
        ),
        # The A/B of metrics' cost: 4. and 5. record metrics (the default).
        Mailworker(
            "mailworker-nometrics", "4b. mailworker, single jobs, [metrics] off",
            metrics=False,
        ),
        Mailworker(
            "mailworker-bulk-nometrics", "5b. mailworker bulk, [metrics] off",
            bulk=True, metrics=False,
        ),
    )
}  # fmt: skip
NAIVE = DramatiqPeer(
    "naive", "naive peer (EmailMessage, new connection per message)",
    "bench.peers.naive", "send_notification", "sink",
)  # fmt: skip
MAILWORKER = THROUGHPUT["mailworker"]


# ---------------------------------------------------------------- throughput


def _log_tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _interpolate(history: list[tuple[float, float]], when: float) -> float:
    before = [(t, c) for t, c in history if t <= when]
    after = [(t, c) for t, c in history if t > when]
    if not before:
        return history[0][1] if history else 0.0
    if not after:
        return before[-1][1]
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def _ours(ctx: Context) -> set[int]:
    pids = {os.getpid(), ctx.redis.pid}
    pids |= {s.pid for s in (ctx.throughput_sink, ctx.latency_sink) if s is not None}
    return {p for p in pids if p is not None}


def wait_quiet(ctx: Context, limit: float, threshold: float = 0.15) -> dict[str, float]:
    """Before a measurement, wait (at most ``limit`` s) until processes that are not ours
    use less than ``threshold`` cores over a second: another job on the machine skews
    every figure. Returns how long it waited and the load it saw last."""
    began, ours = time.time(), _ours(ctx)
    while True:
        before = cpu_by_pid()
        time.sleep(1.0)
        load = cpu_delta(before, cpu_by_pid(), ours)
        if load < threshold or time.time() - began >= limit:
            return {
                "quiet_wait_s": round(time.time() - began, 1),
                "load_before": round(load, 2),
            }


class _Infra:
    """CPU of everything around the workers during one measurement: Redis, the sink, the
    harness, and every other process on the machine (per process, from psutil: the
    machine-wide tick counters of this VM disagree with the per-process ones)."""

    def __init__(self, ctx: Context, sink: Sink | None) -> None:
        self.pids = {"redis": ctx.redis.pid, "sink": sink.pid if sink else None}
        self.pids["harness"] = os.getpid()
        self.ours = _ours(ctx)
        self.start = {name: pid_cpu(pid) for name, pid in self.pids.items()}
        self.all_start = cpu_by_pid()
        self.client = redis.Redis.from_url(ctx.redis.url)
        self.scripts_start = _scripts_run(self.client)

    def delta(self, tree: TreeSampler) -> dict[str, float]:
        out = {
            f"{name}_cpu_s": round(pid_cpu(pid) - self.start[name], 3)
            for name, pid in self.pids.items()
        }
        exclude = self.ours | set(tree.cpu)
        out["other_cpu_s"] = round(cpu_delta(self.all_start, cpu_by_pid(), exclude), 3)
        out["redis_scripts"] = _scripts_run(self.client) - self.scripts_start
        self.client.close()
        return out


def _scripts_run(client: redis.Redis) -> int:
    """Lua scripts (EVAL, EVALSHA) the server has run: Dramatiq's fetch and ack, and
    mailworker's status scripts are all scripts, so this counts their round trips."""
    stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0))
        for name in ("cmdstat_eval", "cmdstat_evalsha")
    )


def _wait_done(
    ctx: Context,
    contender: Contender,
    ns: str,
    n: int,
    sink: Sink,
    base: int,
    procs: list[Any],
    deadline: float,
) -> tuple[float, float, int]:
    """Wait for the N-th message; returns (first time, N-th time, count at first time)."""
    arrivals = sink.arrivals
    first: tuple[float, int] | None = None
    while True:
        if contender.completion == "acked":
            left = contender.remaining(ctx, ns)
            now = time.time()
            if first is None and left < n:
                first = (now, n - left)
            if left == 0:
                assert first is not None
                return first[0], now, first[1]
            time.sleep(0.01)
        elif arrivals.wait_for(base + n, 0.05):
            t_first = arrivals.time_of(base + 1)
            t_end = arrivals.time_of(base + n)
            assert t_first is not None
            assert t_end is not None
            with arrivals.cond:
                at_first = next(c for t, c in arrivals.times if t >= t_first) - base
            return t_first, t_end, at_first
        if time.time() > deadline:
            got = (
                n - contender.remaining(ctx, ns)
                if contender.completion == "acked"
                else (arrivals.count - base)
            )
            raise TimeoutError(f"only {got} of {n} done within the run's time bound")
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker process exited with {proc.returncode}")


def throughput_run(
    ctx: Context, contender: Contender, n: int, bound: float, run: int
) -> dict[str, Any]:
    """One run: pre-enqueue N, start the workers, measure until N are done, stop them."""
    sink = ctx.throughput_sink
    assert sink is not None
    ns = namespace(f"{contender.name}-r{run}")
    log_path = ctx.workdir / f"{ns}.log"
    result: dict[str, Any] = {
        "scenario": contender.name,
        "run": run,
        "n": n,
        "ok": False,
    }
    procs: list[Any] = []
    sampler: TreeSampler | None = None
    with log_path.open("wb") as log:
        try:
            began = time.time()
            contender.prepare(ctx, ns, n, sink)
            result["enqueue_s"] = round(time.time() - began, 3)
            if ctx.quiet_limit > 0:
                result.update(wait_quiet(ctx, ctx.quiet_limit))
            base = sink.arrivals.count
            infra = _Infra(ctx, sink)
            t0 = time.time()
            procs = contender.start(ctx, ns, sink, log)
            sampler = TreeSampler([p.pid for p in procs]).start()
            t_first, t_end, at_first = _wait_done(
                ctx, contender, ns, n, sink, base, procs, t0 + bound
            )
            cpu = sampler.stop()
            cpu_first = _interpolate(sampler.history, t_first)
            rss, rss_proc = sampler.peak_rss()
            result.update(
                ok=True,
                consume_msg_s=round(n / (t_end - t0), 1),
                steady_msg_s=round((n - at_first) / max(t_end - t_first, 1e-6), 1),
                seconds=round(t_end - t0, 3),
                first_after_s=round(t_first - t0, 3),
                cpu_s=round(cpu, 3),
                cpu_us_per_msg=round(cpu / n * 1e6),
                steady_cpu_us_per_msg=round(
                    (cpu - cpu_first) / max(n - at_first, 1) * 1e6
                ),
                peak_rss_mb=round(rss / 2**20, 1),
                peak_rss_process=rss_proc,
                processes=len(sampler.rss),
                sys_us_per_msg=round(sum(sampler.sys.values()) / n * 1e6),
                switches_per_msg=round(sum(sampler.switches.values()) / n, 1),
                **infra.delta(sampler),
            )
            result["other_load_cores"] = round(result["other_cpu_s"] / (t_end - t0), 2)
            result["redis_scripts_per_msg"] = round(result["redis_scripts"] / n, 2)
            result.update(contender.verify(ctx, ns, n))
        except Exception as exc:  # one failed run is reported, the others go on
            result["error"] = f"{type(exc).__name__}: {exc}"
            if sampler is not None:
                sampler.stop()
        finally:
            for proc in procs:
                stop_tree(proc)
            if not result["ok"]:
                result["log_tail"] = _log_tail(log_path)
            contender.cleanup(ctx, ns)
    return result


# ---------------------------------------------------------------- latency, priority


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; ``inf`` entries (never arrived) sort last."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _summary(latencies: list[float]) -> dict[str, Any]:
    finite = [v for v in latencies if v != float("inf")]

    def ms(value: float) -> float | None:
        # None: not measured, or above every arrival (jobs that never arrived count as
        # infinitely late, so a percentile that reaches them is unbounded)
        return round(value * 1000, 1) if math.isfinite(value) else None

    return {
        "sent": len(latencies),
        "arrived": len(finite),
        "never_arrived": len(latencies) - len(finite),
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies)) if latencies else None,
        "mean_ms": ms(statistics.fmean(finite)) if finite else None,
    }


class Paced(threading.Thread):
    """Calls ``send()`` ``rate`` times a second for ``seconds`` (an open-loop schedule:
    a late call does not move the later ones), recording id -> time before the call."""

    def __init__(self, send: Callable[[], str], rate: float, seconds: float) -> None:
        super().__init__(daemon=True, name="paced-producer")
        self.send, self.rate, self.seconds = send, rate, seconds
        self.sent: dict[str, float] = {}
        self.error: BaseException | None = None
        self.late = 0
        self.started_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self.started_at = start = time.time()
            for k in range(round(self.rate * self.seconds)):
                if self.stop.is_set():
                    return
                due = start + k / self.rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.005:
                    self.late += 1
                now = time.time()
                self.sent[self.send()] = now
        except BaseException as exc:  # reported by the phase
            self.error = exc


def _latencies(sent: dict[str, float], arrived: dict[str, float]) -> list[float]:
    return [arrived[i] - t if i in arrived else float("inf") for i, t in sent.items()]


def _arrived(sink: Sink, since: int) -> dict[str, float]:
    with sink.arrivals.cond:
        return {ref: when for when, ref in sink.arrivals.refs[since:]}


def _wait_refs(sink: Sink, since: int, refs: set[str], deadline: float) -> None:
    while time.time() < deadline:
        if refs <= _arrived(sink, since).keys():
            return
        time.sleep(0.05)


def _settle(sampler: TreeSampler, limit: float) -> float:
    """Wait until the workers are idle (< 5 % of a core over 0.5 s), at most ``limit``."""
    began = time.time()
    last = sampler.sample()
    while time.time() - began < limit:
        time.sleep(0.5)
        now = sampler.sample()
        if now - last < 0.025:
            break
        last = now
    return time.time() - began


def _drive(paced: Paced, deadline: float) -> None:
    """Run the paced producer to its end (within ``deadline``)."""
    paced.start()
    paced.join(timeout=max(0.0, deadline - time.time()))
    if paced.is_alive():
        raise TimeoutError("the paced producer did not finish in time")
    if paced.error is not None:
        raise RuntimeError(f"producer: {paced.error!r}")


@dataclass
class _Running:
    """What a phase has started, stopped in reverse order whatever happens."""

    procs: list[Any] = field(default_factory=list)
    sampler: TreeSampler | None = None
    paced: Paced | None = None

    def stop(self) -> None:
        if self.paced is not None:
            self.paced.stop.set()
            self.paced.join(timeout=5)
        if self.sampler is not None:
            self.sampler.stop()
        for proc in self.procs:
            stop_tree(proc)


def latency_run(
    ctx: Context, who: str, rate: float, seconds: float, bound: float
) -> dict[str, Any]:
    """A steady ``rate`` for ``seconds`` into idle workers; enqueue -> accepted per job."""
    sink = ctx.latency_sink
    assert sink is not None
    contender = MAILWORKER if who == "mailworker" else NAIVE
    ns = namespace(f"latency-{who}")
    log_path = ctx.workdir / f"{ns}.log"
    result: dict[str, Any] = {
        "scenario": "latency", "contender": who, "rate": rate, "seconds": seconds,
        "ok": False,
    }  # fmt: skip
    running = _Running()
    deadline = time.time() + bound
    with log_path.open("wb") as log:
        try:
            warm = 2 * ctx.processes * ctx.threads
            if who == "mailworker":
                write_config(ctx, ns, sink)
                prod = producer(ctx, ns)
                since = len(sink.arrivals.refs)
                warm_ids = set(
                    enqueue_single(prod, [notification() for _ in range(warm)])
                )

                def send() -> str:
                    return str(prod.enqueue(notification()))

            else:
                since = len(sink.arrivals.refs)
                warm_ids = {secrets.token_hex(16) for _ in range(warm)}
                NAIVE.enqueue(ctx, ns, sorted(warm_ids))

                def send() -> str:
                    ref = secrets.token_hex(16)
                    NAIVE.enqueue(ctx, ns, [ref])
                    return ref

            if ctx.quiet_limit > 0:
                result.update(wait_quiet(ctx, ctx.quiet_limit))
            running.procs = contender.start(ctx, ns, sink, log)
            running.sampler = sampler = TreeSampler([p.pid for p in running.procs])
            sampler.start()
            _wait_refs(sink, since, warm_ids, min(deadline, time.time() + 60))
            if not warm_ids <= _arrived(sink, since).keys():
                raise TimeoutError("the warm-up messages did not all arrive")
            result["settle_s"] = round(_settle(sampler, 10), 2)
            since = len(sink.arrivals.refs)
            cpu0 = sampler.sample()
            infra = _Infra(ctx, sink)
            running.paced = paced = Paced(send, rate, seconds)
            _drive(paced, deadline)
            _wait_refs(sink, since, set(paced.sent), min(deadline, time.time() + 15))
            cpu = sampler.stop() - cpu0
            elapsed = max(paced.sent.values()) - paced.started_at
            latencies = _latencies(paced.sent, _arrived(sink, since))
            rss, _ = sampler.peak_rss()
            result.update(
                ok=True,
                achieved_rate=round((len(paced.sent) - 1) / max(elapsed, 1e-6), 1),
                late_sends=paced.late,
                cpu_us_per_msg=round(cpu / max(len(paced.sent), 1) * 1e6),
                peak_rss_mb=round(rss / 2**20, 1),
                **_summary(latencies),
                **infra.delta(sampler),
            )
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            running.stop()
            if not result["ok"]:
                result["log_tail"] = _log_tail(log_path)
            contender.cleanup(ctx, ns)
    return result


def priority_run(
    ctx: Context,
    bulk_n: int,
    rate: float,
    seconds: float,
    bound: float,
    *,
    high_workers: int = 0,
) -> dict[str, Any]:
    """``bulk_n`` bulk-priority jobs pre-enqueued (the bulk path when there is one); from
    the first accepted bulk message, high-priority single jobs at ``rate`` for ``seconds``
    while the bulk send drains: their enqueue -> accepted.

    With a throughput sink, the bulk jobs go to it (pinned to a second connection,
    ``sender = "bulk"``) and the high jobs to the recording sink: the aiosmtpd sink alone
    takes only ~1,400 msg/s, and its own queue would be measured instead of the workers.
    """
    sink = ctx.latency_sink
    assert sink is not None
    bulk_sink = ctx.throughput_sink
    bulk_arrivals = (bulk_sink or sink).arrivals
    bulk_since = bulk_arrivals.count
    ns = namespace("priority")
    log_path = ctx.workdir / f"{ns}.log"
    result: dict[str, Any] = {
        "scenario": "priority", "bulk": bulk_n, "rate": rate, "seconds": seconds,
        "ok": False,
    }  # fmt: skip
    running = _Running()
    deadline = time.time() + bound
    with log_path.open("wb") as log:
        try:
            write_config(ctx, ns, sink, bulk_sink)
            prod = producer(ctx, ns)
            began = time.time()
            pin = "bulk" if bulk_sink else None
            enqueue_bulk(prod, [notification("bulk", pin) for _ in range(bulk_n)])
            result["bulk_sink"] = bulk_sink.kind if bulk_sink else sink.kind
            result["enqueue_s"] = round(time.time() - began, 2)
            result["bulk_path"] = bulk_path_exists()
            if ctx.quiet_limit > 0:
                result.update(wait_quiet(ctx, ctx.quiet_limit))
            since = len(sink.arrivals.refs)
            t0 = time.time()
            running.procs = MAILWORKER.start(ctx, ns, sink, log)
            if high_workers:
                argv = [ctx.mailworker, "worker", "-p", str(high_workers), "-t", "2"]
                argv += ["-Q", "high", "--poll-interval", str(ctx.poll_ms)]
                env = Mailworker.env(ctx, ns)
                running.procs.append(spawn(argv, env=env, stdout=log, cwd=ctx.workdir))
                result["high_workers"] = " ".join(["mailworker", *argv[1:]])
            running.sampler = sampler = TreeSampler([p.pid for p in running.procs])
            sampler.start()
            while bulk_arrivals.count == bulk_since:
                if time.time() > deadline:
                    raise TimeoutError("no bulk message arrived")
                time.sleep(0.01)
            running.paced = paced = Paced(
                lambda: str(prod.enqueue(notification("high"))), rate, seconds
            )
            _drive(paced, deadline)
            high = set(paced.sent)
            _wait_refs(sink, since, high, min(deadline, time.time() + 15))
            # let the bulk send finish (60 s at most), to report how long it drained
            bulk_arrivals.wait_for(
                bulk_since + bulk_n,
                max(0.0, min(deadline, time.time() + 60) - time.time()),
            )
            sampler.stop()
            arrived = _arrived(sink, since)
            if bulk_sink is None:
                bulk_times = sorted(t for ref, t in arrived.items() if ref not in high)
            else:
                with bulk_arrivals.cond:
                    updates = [(t, c) for t, c in bulk_arrivals.times if c > bulk_since]
                bulk_times = [t for t, _ in updates]
                bulk_count = (updates[-1][1] - bulk_since) if updates else 0
            bulk_done = bulk_arrivals.count - bulk_since >= bulk_n
            bulk_end = bulk_arrivals.time_of(bulk_since + bulk_n) if bulk_done else None
            bulk_end = bulk_end or float("inf")
            latencies = _latencies(paced.sent, arrived)
            during = [
                lat
                for sent_at, lat in zip(paced.sent.values(), latencies, strict=True)
                if sent_at < bulk_end
            ]
            rss, _ = sampler.peak_rss()
            result.update(
                ok=True,
                high=_summary(latencies),
                high_while_bulk_drained=_summary(during),
                bulk_arrived=bulk_count if bulk_sink else len(bulk_times),
                bulk_drain_s=round(bulk_times[-1] - bulk_times[0], 2)
                if bulk_times
                else None,
                bulk_msg_s=round(
                    (bulk_count if bulk_sink else len(bulk_times))
                    / (bulk_times[-1] - t0),
                    1,
                )
                if bulk_times
                else None,
                high_window_s=round(max(paced.sent.values()) - paced.started_at, 2),
                bulk_ended_after_high_start_s=round(bulk_end - paced.started_at, 2)
                if bulk_end != float("inf")
                else None,
                peak_rss_mb=round(rss / 2**20, 1),
            )
            states = wait_sent(ctx.client(), ns, bulk_n + len(high), timeout=10)
            result["states"] = states
            result["delivered_by_actor"] = actors_in_log(log_path)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            running.stop()
            if not result["ok"]:
                result["log_tail"] = _log_tail(log_path)
            MAILWORKER.cleanup(ctx, ns)
    return result
