"""The ``kind = "graph"`` inbound source: an Office 365 folder read with delta queries.

Each poll asks Graph what changed in the folder since the stored delta link, hands every
message still there to the sink, and moves it to ``processed_folder`` or
``failed_folder``. The link is stored only when every message of the round was moved,
so one that was recorded but not moved (a failed move, a crash) comes back at the next
poll, and the sink sees it again as a duplicate.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal
from urllib.parse import quote

import orjson
import redis
import structlog

from settings import ConfigError, InboundSource, IntegratedService
from worker.inbound.graph_client import (
    MAX_CONCURRENT_REQUESTS,
    DeltaResetError,
    GraphMailbox,
    GraphMailboxError,
    StoppedError,
)
from worker.inbound.graph_folders import Folders, resolve_folders
from worker.inbound.model import InboundUnavailableError, Received, Sink
from worker.limits import Slots
from worker.transports.oauth import HttpClient, TokenProvider

__all__ = ["GraphSource"]

log = structlog.get_logger("mailworker.inbound.graph")

_TIMEOUT = 30.0
_MAX_PAGES = 10_000  # a guard against a server that never ends a round

# What became of one message: moved out of the folder, gone already, or left in it.
_Fate = Literal["moved", "gone", "left"]


class GraphSource:
    """Reads one mailbox folder over Microsoft Graph and moves what it handled.

    Args:
        config: the ``[[inbound]]`` section (``kind = "graph"``).
        sink: where messages go (``worker.inbound.handler.Inbound``).
        tokens: the integrated service's token provider (shared with sending).
        service: the integrated service's settings (Graph endpoint, TLS trust).
        client: Redis, for the delta link and the mailbox's concurrency slots.
        namespace: the key prefix.
        http: the HTTP client (default: one with the service's ``ca_bundle``).
        page_size: messages per delta page (Graph's ``$top``).
        concurrency: messages handled at once by this source; the slots keep every
            process together at 4 requests to the mailbox.
        retries: how many times a 429/503 is waited out per request.

    Raises:
        ConfigError: the section is not of kind "graph".
    """

    def __init__(
        self,
        config: InboundSource,
        *,
        sink: Sink,
        tokens: TokenProvider,
        service: IntegratedService,
        client: redis.Redis,
        namespace: str,
        http: HttpClient | None = None,
        page_size: int = 50,
        concurrency: int = MAX_CONCURRENT_REQUESTS,
        retries: int = 3,
    ) -> None:
        if config.kind != "graph":
            raise ConfigError(f"inbound.{config.name}.kind", "must be 'graph' here")
        self.name = config.name
        self.config = config
        self._sink = sink
        self._redis = client
        self._page_size = page_size
        self._concurrency = max(1, concurrency)
        self._delta_key = f"{namespace}:inbound:{config.name}:delta"
        self._stop = threading.Event()
        self._folders: Folders | None = None
        # Seconds the next poll waits beyond poll_interval (a long Retry-After).
        self._backoff = 0.0
        verify: str | bool = str(service.ca_bundle) if service.ca_bundle else True
        self._own_http = http is None
        self.api = GraphMailbox(
            config.mailbox,
            service=config.integrated_service,
            graph_endpoint=service.graph_endpoint,
            tokens=tokens,
            http=http or HttpClient(verify=verify, timeout=_TIMEOUT),
            slots=Slots(
                client,
                f"{namespace}:inbound:{config.mailbox.lower()}:slots",
                limit=MAX_CONCURRENT_REQUESTS,
                lease=2 * _TIMEOUT + 10,
            ),
            timeout=_TIMEOUT,
            retries=retries,
            wait=lambda seconds: self._stop.wait(seconds),
        )

    def __repr__(self) -> str:
        return f"GraphSource({self.name!r}, {self.config.mailbox})"

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set. Errors are logged and the next poll retries."""
        self._stop = stop
        try:
            while not stop.is_set():
                try:
                    self.poll_once()
                except Exception as exc:  # a bug must not end the source: log, go on
                    log.exception(
                        "inbound_poll_failed",
                        source=self.name,
                        error_type=type(exc).__name__,
                    )
                stop.wait(max(self.config.poll_interval, self._backoff))
        finally:
            if self._own_http:
                self.api.close()

    def poll_once(self) -> int:
        """One round: changes since the stored link, each message handled and moved.

        Returns:
            How many messages were moved out of the folder.
        """
        self._backoff = 0.0
        try:
            return self._round()
        except StoppedError:
            return 0
        except GraphMailboxError as exc:
            self._backoff = exc.retry_after or 0.0
            log.warning(
                "inbound_poll_failed",
                source=self.name,
                error_type=type(exc).__name__,
                http_status=exc.status,
                error=str(exc),
            )
            return 0
        except redis.RedisError as exc:
            log.warning(
                "inbound_poll_failed", source=self.name, error_type=type(exc).__name__
            )
            return 0

    def _round(self) -> int:
        if self._folders is None:
            self._folders = resolve_folders(self.api, self.config)
        folders = self._folders
        ids, link = self._changes(folders.source)
        fates = self._take_all(ids, folders)
        if link is not None and "left" not in fates:
            self._store_link(folders.source, link)
        return fates.count("moved")

    # ------------------------------------------------------------ delta

    def _changes(self, folder: str) -> tuple[list[str], str | None]:
        link = self._stored_link(folder)
        try:
            return self._walk(folder, link)
        except DeltaResetError as exc:
            if link is None:
                raise
            log.warning(
                "inbound_delta_reset",
                source=self.name,
                http_status=exc.status,
                code=exc.code,
            )
            self._redis.delete(self._delta_key)
            return self._walk(folder, None)

    def _walk(self, folder: str, link: str | None) -> tuple[list[str], str | None]:
        """Follow a round's pages; return the ids still in the folder and the new link."""
        params: dict[str, str] | None = None
        target = link
        if target is None:
            target = f"/mailFolders/{quote(folder, safe='')}/messages/delta"
            params = {"$select": "id", "$top": str(self._page_size)}
        pending: dict[str, None] = {}  # ordered, without repeats
        for _ in range(_MAX_PAGES):
            page = self.api.get(target, params=params)
            for item in page.get("value", []):
                if "@removed" in item:  # moved away or deleted: nothing to do
                    pending.pop(item["id"], None)
                else:
                    pending[item["id"]] = None
            next_link = page.get("@odata.nextLink")
            if next_link is None:
                return list(pending), page.get("@odata.deltaLink")
            target, params = next_link, None
        raise GraphMailboxError(f"delta did not end after {_MAX_PAGES} pages")

    def _stored_link(self, folder: str) -> str | None:
        stored = self._redis.get(self._delta_key)
        if stored is None:
            return None
        try:
            value = orjson.loads(stored)
        except orjson.JSONDecodeError:
            return None  # not ours to read: start afresh
        # A link for another mailbox or folder (the configuration changed) is no use.
        if not isinstance(value, dict) or value.get("scope") != self._scope(folder):
            return None
        return str(value["link"])

    def _store_link(self, folder: str, link: str) -> None:
        value = {"scope": self._scope(folder), "link": link}
        self._redis.set(self._delta_key, orjson.dumps(value))

    def _scope(self, folder: str) -> str:
        return f"{self.config.mailbox.lower()}/{folder}"

    # ------------------------------------------------------------ messages

    def _take_all(self, ids: list[str], folders: Folders) -> list[_Fate]:
        if len(ids) <= 1:
            return [self._take(i, folders) for i in ids]
        workers = min(self._concurrency, len(ids))
        with ThreadPoolExecutor(
            workers, thread_name_prefix=f"inbound-{self.name}"
        ) as pool:
            return list(pool.map(lambda i: self._take(i, folders), ids))

    def _take(self, graph_id: str, folders: Folders) -> _Fate:
        """Fetch, hand over and move one message."""
        if self._stop.is_set():
            return "left"
        path = f"/messages/{quote(graph_id, safe='')}"
        try:
            raw = self.api.get_bytes(f"{path}/$value")
        except GraphMailboxError as exc:
            if exc.status == 404:  # immutable ids survive moves: it was deleted
                return "gone"
            return self._left("mime", exc)
        except redis.RedisError as exc:
            return self._left("mime", exc)
        try:
            handled = self._sink.handle(Received(raw=raw, source=self.name))
        except InboundUnavailableError as exc:
            return self._left("handle", exc)
        destination = folders.failed if handled.failed else folders.processed
        try:
            self.api.post(f"{path}/move", {"destinationId": destination})
        except (GraphMailboxError, redis.RedisError) as exc:
            if isinstance(exc, GraphMailboxError) and exc.status == 404:
                self._folders = None  # the destination may be gone: resolve anew
            return self._left("move", exc)
        log.info(
            "inbound_message_moved",
            source=self.name,
            message_id=handled.message_id,
            kind=handled.kind,
            outcome=handled.outcome,
            duplicate=handled.duplicate,
            folder="failed" if handled.failed else "processed",
        )
        return "moved"

    def _left(self, step: str, exc: Exception) -> _Fate:
        if isinstance(exc, StoppedError):
            return "left"
        log.warning(
            "inbound_message_left",
            source=self.name,
            step=step,
            error_type=type(exc).__name__,
            http_status=getattr(exc, "status", None),
            error=str(exc),
        )
        return "left"
