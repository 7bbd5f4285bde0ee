"""What an inbound message is and does: classify it, tie a bounce to its job, record it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from worker.broker.envelope import is_job_id
from worker.clock import iso_millis
from worker.inbound.classify import BounceReport, Classification, classify
from worker.inbound.model import Handled, Received
from worker.inbound.returnpath import ReturnPath, Token
from worker.inbound.store import InboundStore, JobView, Plan
from worker.logging import show_address
from worker.metrics.recorder import recorder

if TYPE_CHECKING:
    from worker.actions.replies import ActionReplies

__all__ = ["Inbound"]

log = structlog.get_logger("mailworker.inbound")


class Inbound:
    """The handler every source hands its messages to (``worker.inbound.model.Sink``).

    Args:
        store: where records are written.
        return_path: the signed return path ``[bounces]`` configures, if any.
        smtp_services: the names of the SMTP connections, whose jobs carry that
            return path: a bounce for one of them must come back to it, signed.
        actions: handles replies to e-mail action keys (None: actions are off).
    """

    def __init__(
        self,
        store: InboundStore,
        *,
        return_path: ReturnPath | None = None,
        smtp_services: frozenset[str] = frozenset(),
        actions: ActionReplies | None = None,
    ) -> None:
        self._store = store
        self._actions = actions
        self._return_path = return_path
        self._smtp_services = smtp_services

    def handle(
        self, received: Received, found: Classification | None = None
    ) -> Handled:
        """Record what ``received`` is and does, once, and return that.

        Args:
            received: the message.
            found: its classification, when the source has read it already.

        Raises:
            InboundUnavailableError: nothing was recorded; the source tries again.
        """
        if found is None:
            found = classify(received.raw)
        if self._actions is not None and self._actions.wants(found, received):
            handled = self._actions.handle(found, received)
        else:
            handled = self._store.record(
                found.key,
                received.source,
                self._job_id(found, received),
                lambda job: self._plan(found, received, job),
            )
        if not handled.duplicate:
            recorder().inbound(handled.kind, handled.outcome, handled.reason)
        log.info(
            "inbound_handled",
            source=received.source,
            kind=handled.kind,
            outcome=handled.outcome,
            reason=handled.reason,
            job_id=handled.job_id,
            duplicate=handled.duplicate,
        )
        return handled

    def inspect(self, received: Received) -> Plan:
        """What ``received`` would do, read against Redis but written nowhere.

        Raises:
            InboundUnavailableError: Redis did not answer.
        """
        found = classify(received.raw)
        if self._actions is not None and self._actions.wants(found, received):
            return Plan(self._actions.inspect(found, received))
        job_id = self._job_id(found, received)
        job = self._store.job(job_id) if job_id is not None else None
        return self._plan(found, received, job)

    def _token(self, found: Classification, received: Received) -> Token | None:
        """The return-path token the bounce came back to, if any."""
        if self._return_path is None:
            return None
        for address in (*received.rcpt_to, *found.addressed_to):
            token = self._return_path.token_of(address)
            if token is not None:
                return token
        return None

    def _job_id(self, found: Classification, received: Received) -> str | None:
        """The job a bounce is about, or None (not a bounce, or none of ours)."""
        if found.unparseable or found.kind != "bounce":
            return None
        token = self._token(found, received)
        return _job_of(found, token.job_id if token is not None else None)

    def _plan(
        self, found: Classification, received: Received, job: JobView | None
    ) -> Plan:
        def done(
            kind: str, outcome: str, reason: str, job_id: str | None = None
        ) -> Plan:
            return Plan(
                Handled(
                    key=found.key,
                    kind=kind,  # type: ignore[arg-type]
                    outcome=outcome,  # type: ignore[arg-type]
                    reason=reason,
                    job_id=job_id,
                    message_id=found.message_id,
                )
            )

        if found.unparseable:
            return done("other", "failed", f"unparseable: {found.reason}")
        if found.kind == "bounce":
            return self._bounce(found, received, job, done)
        if found.kind == "auto_reply":
            return done("auto_reply", "ignored", found.reason)
        if received.mail_from == "":
            return done("auto_reply", "ignored", "null envelope sender")
        return done("other", "failed", "not a bounce or an auto-reply of ours")

    def _bounce(
        self,
        found: Classification,
        received: Received,
        job: JobView | None,
        done: Callable[..., Plan],
    ) -> Plan:
        token = self._token(found, received)
        job_id = _job_of(found, token.job_id if token is not None else None)
        if job_id is None:
            return done("bounce", "failed", "bounce for no message of ours")
        if token is not None:
            assert self._return_path is not None
            if not self._return_path.verifies(token, job_id):
                return done(
                    "other", "failed", "bounce whose return-path token does not verify"
                )
        if job is None:
            return done("bounce", "failed", f"job {job_id} is unknown or expired")
        signed_path = (
            self._return_path is not None and job.service in self._smtp_services
        )
        if token is None and signed_path:
            return done(
                "other",
                "failed",
                "unsigned bounce for a job sent with the signed return path",
            )
        return _apply(found.reports, job_id, job, done)


def _job_of(found: Classification, from_token: str | None) -> str | None:
    """The job a bounce is about: from the token, the quoted header, or Message-ID."""
    if from_token is not None:
        return from_token if is_job_id(from_token) else None
    if found.original_job_id and is_job_id(found.original_job_id):
        return found.original_job_id
    mid = found.original_message_id
    if mid:
        local = mid.strip().strip("<>").rpartition("@")[0]
        if is_job_id(local):
            return local
    return None


def _apply(
    reports: tuple[BounceReport, ...],
    job_id: str,
    job: JobView,
    done: Callable[..., Plan],
) -> Plan:
    """Mark the job's bounced recipients and note delays: the plan the store writes."""
    recipients = [r.copy() for r in job.recipients]
    index = {r["address"].lower(): i for i, r in enumerate(recipients)}
    bounced: list[BounceReport] = []
    delayed: list[BounceReport] = []
    seen = False
    for report in reports:
        i = index.get(report.address.lower())
        if i is None:
            continue
        seen = True
        if recipients[i].get("state") == "bounced":
            continue  # a second report of the same failure
        (bounced if report.action == "failed" else delayed).append(report)
    if not seen:
        return done(
            "bounce", "failed", f"the bounce names no recipient of job {job_id}"
        )
    if not bounced and not delayed:
        return done("bounce", "ignored", "its recipients had bounced already", job_id)
    plan = done(
        "bounce",
        "bounced" if bounced else "delayed",
        ", ".join(f"{show_address(r.address)} {r.code}" for r in bounced + delayed),
        job_id,
    )
    for report in bounced:
        i = index[report.address.lower()]
        recipients[i].update(
            {"state": "bounced", "code": report.code, "message": report.message}
        )
        data = {"address": recipients[i]["address"], "code": report.code}
        plan.events.append({**data, "message": report.message})
        plan.history.append(
            {"at": iso_millis(), "event": "bounced", **data, "message": report.message}
        )
        if report.code.startswith("5."):
            plan.suppress.append((recipients[i]["address"], f"bounced {report.code}"))
    for report in delayed:
        plan.history.append(
            {
                "at": iso_millis(),
                "event": "delayed",
                "address": recipients[index[report.address.lower()]]["address"],
                "code": report.code,
                "message": report.message,
            }
        )
    if bounced:
        plan.recipients = recipients
    return plan
