"""What our processes count: one ``Recorder`` per process, called where an outcome is known.

The recorder is process-wide, as ``prometheus_client``'s samples are: ``install`` makes
it once the multi-process directory is set (``worker.metrics.directory.prepare``), and
code that knows an outcome calls ``recorder()``. Until one is installed (tests that
build a worker in-process, ``[metrics] enabled = false``) it is the ``Recorder`` that
records nothing, and no metric exists.

Each outcome is counted once, where it is decided: a job's attempt in
``JobHandler.finish`` (a bulk message's jobs each pass there), a dead letter where it
is written, a token where MSAL answers, an inbound message once recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "STAGE_BUCKETS", "Recorder", "install", "recorder"]

# Enqueue → accepted by a server: from a fraction of a second to a day of retries.
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400,
)  # fmt: skip
# One SMTP step (connect, TLS, AUTH, one transaction).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Recorder:
    """Records nothing: the recorder of a process without metrics.

    ``Recorder.live()`` builds the one that does. Every method is cheap and never raises.
    """

    enabled = False

    def enqueued(self, priority: str, count: int = 1, *, source: str) -> None:
        """``count`` jobs of ``priority`` were enqueued by one of our processes."""

    def attempt(
        self, failures: list[tuple[str, str]], skips: list[tuple[str, str]]
    ) -> None:
        """One attempt's failed tries (service, error class) and skipped services."""

    def delivered(self, service: str, queue: str, latency: float) -> None:
        """A job was accepted by ``service``, ``latency`` seconds after it was enqueued."""

    def retried(self, error_class: str) -> None:
        """A job goes back to the broker for another attempt."""

    def waited(self, reason: str) -> None:
        """A job waits for a budget or a breaker (not an attempt)."""

    def dead(self, reason: str, count: int = 1) -> None:
        """``count`` dead letters were written for ``reason``."""

    def token(self, integrated_service: str, *, source: str, outcome: str) -> None:
        """A token was asked of MSAL: ``source`` cache or identity_provider."""

    def inbound(self, kind: str, outcome: str, reason: str) -> None:
        """An inbound message was recorded (a bounce, an action reply, ...)."""

    def smtp_stage(self, service: str, stage: str, seconds: float) -> None:
        """One step of an SMTP session took ``seconds``."""

    def in_progress(self, queue: str, change: int) -> None:
        """A broker message began (+1) or ended (-1) in this process."""

    def threads(self, count: int) -> None:
        """This worker process runs ``count`` worker threads."""

    @staticmethod
    def live() -> Recorder:
        """The recorder that records, through ``prometheus_client``."""
        return _Live()


class _Live(Recorder):
    """Counts into ``prometheus_client`` metrics (README, "Metrics", lists them)."""

    enabled = True

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # Not in prometheus_client's default registry: /metrics reads the files.
        none: Any = None
        # (metric id, label values) → child; a label set is never removed.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._enqueued: Counter = Counter(
            "mailworker_jobs_enqueued",
            "Jobs enqueued by our processes.",
            ["priority", "source"],
            registry=none,
        )
        self._delivered: Counter = Counter(
            "mailworker_deliveries",
            "Jobs accepted by a service.",
            ["service"],
            registry=none,
        )
        self._failures: Counter = Counter(
            "mailworker_delivery_failures",
            "Failed attempts of a job at a service, by error class (docs/design.md §5).",
            ["service", "error_class"],
            registry=none,
        )
        self._skips: Counter = Counter(
            "mailworker_service_skips",
            "Services passed over for a job: budget spent or breaker open.",
            ["service", "reason"],
            registry=none,
        )
        self._retries: Counter = Counter(
            "mailworker_job_retries",
            "Jobs put back for another attempt, by the last error's class.",
            ["error_class"],
            registry=none,
        )
        self._waits: Counter = Counter(
            "mailworker_job_waits",
            "Jobs put back to wait for a budget or a breaker (not an attempt).",
            ["reason"],
            registry=none,
        )
        self._dead: Counter = Counter(
            "mailworker_dead_letters",
            "Dead letters written, by reason.",
            ["reason"],
            registry=none,
        )
        self._latency: Histogram = Histogram(
            "mailworker_delivery_latency_seconds",
            "From a job's enqueue to its acceptance by a service.",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=none,
        )
        self._tokens: Counter = Counter(
            "mailworker_token_acquisitions",
            "OAuth tokens asked of MSAL.",
            ["integrated_service", "source", "outcome"],
            registry=none,
        )
        self._inbound: Counter = Counter(
            "mailworker_inbound_messages",
            "Inbound messages recorded, by kind and outcome.",
            ["kind", "outcome"],
            registry=none,
        )
        self._bounces: Counter = Counter(
            "mailworker_bounces",
            "Bounces recorded, by outcome.",
            ["outcome"],
            registry=none,
        )
        self._actions: Counter = Counter(
            "mailworker_action_replies",
            "Replies to e-mail actions, by outcome and reason.",
            ["outcome", "reason"],
            registry=none,
        )
        self._stages: Histogram = Histogram(
            "mailworker_smtp_stage_seconds",
            "SMTP steps: connect, tls, auth (per session), data (per transaction).",
            ["service", "stage"],
            buckets=STAGE_BUCKETS,
            registry=none,
        )
        self._in_progress: Gauge = Gauge(
            "mailworker_messages_in_progress",
            "Broker messages being worked on, in live processes.",
            ["queue"],
            multiprocess_mode="livesum",
            registry=none,
        )
        self._threads: Gauge = Gauge(
            "mailworker_worker_threads",
            "Worker threads of live worker processes.",
            multiprocess_mode="livesum",
            registry=none,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: a job's path calls it often."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def enqueued(self, priority: str, count: int = 1, *, source: str) -> None:
        self._child(self._enqueued, priority, source).inc(count)

    def attempt(
        self, failures: list[tuple[str, str]], skips: list[tuple[str, str]]
    ) -> None:
        for service, error_class in failures:
            self._child(self._failures, service, error_class).inc()
        for service, reason in skips:
            self._child(self._skips, service, reason).inc()

    def delivered(self, service: str, queue: str, latency: float) -> None:
        self._child(self._delivered, service).inc()
        self._child(self._latency, queue).observe(max(0.0, latency))

    def retried(self, error_class: str) -> None:
        self._child(self._retries, error_class).inc()

    def waited(self, reason: str) -> None:
        self._child(self._waits, reason).inc()

    def dead(self, reason: str, count: int = 1) -> None:
        self._child(self._dead, reason).inc(count)

    def token(self, integrated_service: str, *, source: str, outcome: str) -> None:
        self._child(self._tokens, integrated_service, source, outcome).inc()

    def inbound(self, kind: str, outcome: str, reason: str) -> None:
        self._child(self._inbound, kind, outcome).inc()
        if kind == "bounce":
            self._child(self._bounces, outcome).inc()
        elif kind == "action":
            self._child(self._actions, outcome, reason or "none").inc()

    def smtp_stage(self, service: str, stage: str, seconds: float) -> None:
        self._child(self._stages, service, stage).observe(seconds)

    def in_progress(self, queue: str, change: int) -> None:
        self._child(self._in_progress, queue).inc(change)

    def threads(self, count: int) -> None:
        self._threads.set(count)


_current: Recorder = Recorder()


def recorder() -> Recorder:
    """This process's recorder (one that records nothing until ``install``)."""
    return _current


def install(new: Recorder) -> Recorder:
    """Make ``new`` this process's recorder and return it."""
    global _current
    _current = new
    return new
