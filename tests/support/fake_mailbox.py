"""In-memory Exchange mailboxes for the Graph stand-in: folders, messages, delta, move.

``FakeMicrosoft`` routes ``/v1.0/users/{mailbox}/...`` here (see its docstring for the
paths). This module knows nothing of HTTP: it keeps the mailboxes, the delta tokens and
the request log, and answers ``(status, headers, body)`` for one parsed request.

Deliberate choices, so tests catch a client that forgets them:
- Every mailbox call must send ``Prefer: IdType="ImmutableId"``. Without it the fake
  refuses with 400 ``FakeImmutableIdRequired`` (real Graph would answer ids that change
  on a move).
- Ids are immutable: a moved message keeps its id, as Graph's immutable ids do.
- ``@odata.nextLink`` and ``@odata.deltaLink`` are written in Graph's
  ``mailFolders('ID')`` form, so a client must follow them as opaque URLs.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
import urllib.parse
from typing import Any

# Graph's well-known folder names (mailFolder resource); the fake creates these.
WELL_KNOWN = (
    "msgfolderroot",
    "inbox",
    "drafts",
    "sentitems",
    "deleteditems",
    "junkemail",
    "archive",
    "outbox",
)
_DISPLAY = {
    "msgfolderroot": "Top of Information Store",
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "junkemail": "Junk Email",
    "archive": "Archive",
    "outbox": "Outbox",
}
DEFAULT_PAGE = 10  # Graph's default page size for messages
_FILTER = re.compile(r"^\s*displayName\s+eq\s+'((?:[^']|'')*)'\s*$", re.IGNORECASE)
_IMMUTABLE = re.compile(r'(^|[,;\s])IdType\s*=\s*"?ImmutableId"?', re.IGNORECASE)

Reply = tuple[int, dict[str, str] | None, Any]


def _graph_error(code: str, message: str) -> dict[str, Any]:
    from tests.support.fake_microsoft import graph_error

    return graph_error(code, message)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24)


@dataclasses.dataclass
class Folder:
    """One mail folder."""

    id: str
    name: str
    parent_id: str | None
    well_known: str | None = None

    def json(self, mailbox: Mailbox) -> dict[str, Any]:
        count = sum(1 for m in mailbox.messages.values() if m.folder_id == self.id)
        return {
            "id": self.id,
            "displayName": self.name,
            "parentFolderId": self.parent_id,
            "childFolderCount": sum(
                1 for f in mailbox.folders.values() if f.parent_id == self.id
            ),
            "unreadItemCount": count,
            "totalItemCount": count,
            "isHidden": False,
        }


@dataclasses.dataclass
class StoredMessage:
    """One message: its raw MIME and where it is."""

    id: str
    raw: bytes
    folder_id: str
    # folders the message has been in (delta reports it removed from those)
    been_in: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class MailboxRequest:
    """One request to a mailbox endpoint, as the fake saw it."""

    mailbox: str
    method: str
    op: str  # folders.list, folders.get, folders.create, delta, mime, move, unknown
    path: str
    query: dict[str, str]
    status: int
    immutable_ids: bool
    at: float  # time.monotonic() when it arrived


@dataclasses.dataclass
class _Injection:
    status: int
    count: int
    op: str | None
    retry_after: float | None
    code: str | None


@dataclasses.dataclass
class _Page:
    mailbox: str
    folder_id: str
    items: list[dict[str, Any]]
    seq: int
    top: int


class Mailbox:
    """One user's mailbox: folders, messages and the change log delta reads."""

    def __init__(self, address: str, lock: threading.RLock) -> None:
        self.address = address
        # The server's lock: tests call add/contents while requests are served.
        self.lock = lock
        self.folders: dict[str, Folder] = {}
        self.messages: dict[str, StoredMessage] = {}
        self.seq = 0
        # message id -> seq of its last change
        self.changed: dict[str, int] = {}
        root = Folder(
            _new_id("AQMkFold"), _DISPLAY["msgfolderroot"], None, "msgfolderroot"
        )
        self.folders[root.id] = root
        for name in WELL_KNOWN[1:]:
            folder = Folder(_new_id("AQMkFold"), _DISPLAY[name], root.id, name)
            self.folders[folder.id] = folder

    @property
    def root(self) -> Folder:
        return self.folder("msgfolderroot")

    def find(self, ref: str) -> Folder | None:
        """A folder by id or well-known name (case-insensitive), else None."""
        if ref in self.folders:
            return self.folders[ref]
        for folder in self.folders.values():
            if folder.well_known == ref.lower():
                return folder
        return None

    def folder(self, ref: str) -> Folder:
        """A folder by id, well-known name or top-level display name."""
        found = self.find(ref) or next(
            (f for f in self.children(self.root.id) if f.name.lower() == ref.lower()),
            None,
        )
        if found is None:
            raise KeyError(f"no folder {ref!r} in {self.address}")
        return found

    def children(self, parent_id: str) -> list[Folder]:
        return [f for f in self.folders.values() if f.parent_id == parent_id]

    def create_folder(self, name: str, parent_id: str | None = None) -> Folder:
        with self.lock:
            parent = parent_id or self.root.id
            folder = Folder(_new_id("AQMkFold"), name, parent)
            self.folders[folder.id] = folder
            return folder

    def add(self, raw: bytes, folder: str = "inbox") -> str:
        """Deliver ``raw`` into ``folder``; return its (immutable) id."""
        with self.lock:
            target = self.folder(folder)
            message = StoredMessage(_new_id("AAkALgMsg"), raw, target.id, {target.id})
            self.messages[message.id] = message
            self._touch(message.id)
            return message.id

    def move(self, message_id: str, destination: Folder) -> StoredMessage:
        message = self.messages[message_id]
        message.folder_id = destination.id
        message.been_in.add(destination.id)
        self._touch(message_id)
        return message

    def contents(self, folder: str) -> list[bytes]:
        """The raw messages in a folder, oldest first ([] when there is no such folder)."""
        with self.lock:
            try:
                target = self.folder(folder)
            except KeyError:
                return []
            return [m.raw for m in self.messages.values() if m.folder_id == target.id]

    def _touch(self, message_id: str) -> None:
        self.seq += 1
        self.changed[message_id] = self.seq

    def delta(self, folder_id: str, since: int | None) -> list[dict[str, Any]]:
        """What changed in a folder after ``since`` (None: everything in it now)."""
        items: list[dict[str, Any]] = []
        for message_id, seq in sorted(self.changed.items(), key=lambda kv: kv[1]):
            message = self.messages[message_id]
            if since is not None and seq <= since:
                continue
            if message.folder_id == folder_id:
                items.append(_message_json(message))
            elif since is not None and folder_id in message.been_in:
                items.append({"id": message_id, "@removed": {"reason": "deleted"}})
        return items


def _message_json(message: StoredMessage) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.message",
        "@odata.etag": f'W/"{secrets.token_hex(8)}"',
        "id": message.id,
    }


class FakeMailboxes:
    """The mailboxes of the tenant, their delta tokens, the request log, injected faults."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.boxes: dict[str, Mailbox] = {}
        self.log: list[MailboxRequest] = []
        self.delay = 0.0  # seconds each mailbox request takes (concurrency tests)
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self._injections: list[_Injection] = []
        self._deltas: dict[str, tuple[str, str, int]] = {}  # token -> box, folder, seq
        self._pages: dict[str, _Page] = {}  # skiptoken -> rest of a delta round
        self._expired: set[str] = set()
        self._expiry_reply: tuple[int, str] = (410, "SyncStateNotFound")

    # ------------------------------------------------------------ controls

    def mailbox(self, address: str) -> Mailbox:
        """The mailbox of ``address``, created (with the well-known folders) if new."""
        with self.lock:
            key = address.lower()
            if key not in self.boxes:
                self.boxes[key] = Mailbox(address, self.lock)
            return self.boxes[key]

    def inject(
        self,
        status: int,
        *,
        count: int = 1,
        op: str | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        """Answer the next ``count`` mailbox requests (of ``op``, else any) with ``status``."""
        with self.lock:
            self._injections.append(_Injection(status, count, op, retry_after, code))

    def expire_delta_tokens(
        self, *, status: int = 410, code: str = "SyncStateNotFound"
    ) -> None:
        """Every delta and skip token issued so far is refused with ``status``/``code``."""
        with self.lock:
            self._expired.update(self._deltas)
            self._expired.update(self._pages)
            self._expiry_reply = (status, code)

    def requests(self, op: str | None = None) -> list[MailboxRequest]:
        with self.lock:
            return [r for r in self.log if op is None or r.op == op]

    # ------------------------------------------------------------ requests

    def begin(self, mailbox: str) -> None:
        with self.lock:
            n = self.in_flight.get(mailbox, 0) + 1
            self.in_flight[mailbox] = n
            self.max_in_flight[mailbox] = max(self.max_in_flight.get(mailbox, 0), n)

    def end(self, mailbox: str) -> None:
        with self.lock:
            self.in_flight[mailbox] -= 1

    def record(self, request: MailboxRequest) -> None:
        with self.lock:
            self.log.append(request)

    def injected(self, op: str) -> Reply | None:
        """The reply of the first injection that matches ``op``, spending one of it."""
        with self.lock:
            for injection in self._injections:
                if injection.count > 0 and injection.op in (None, op):
                    injection.count -= 1
                    return _injected_reply(injection)
        return None

    @staticmethod
    def immutable(prefer: str) -> bool:
        return any(_IMMUTABLE.search(value) for value in prefer.split(","))

    def answer(
        self,
        base: str,
        method: str,
        mailbox: str,
        route: list[str],
        query: dict[str, str],
        body: Any,
    ) -> Reply:
        """Answer one authenticated mailbox request (``route``: the path after the user)."""
        with self.lock:
            box = self.boxes.get(mailbox.lower())
            if box is None:
                return (
                    404,
                    None,
                    _graph_error(
                        "ErrorInvalidUser",
                        f"The requested user '{mailbox}' is invalid.",
                    ),
                )
            return _route(self, base, box, method, route, query, body)

    # ------------------------------------------------------------ delta

    def delta(
        self, base: str, box: Mailbox, folder: Folder, query: dict[str, str]
    ) -> Reply:
        if "$skiptoken" in query:
            return self._next_page(base, query["$skiptoken"])
        since: int | None = None
        if "$deltatoken" in query:
            token = query["$deltatoken"]
            if token in self._expired or token not in self._deltas:
                return self._expired_reply()
            _, _, since = self._deltas[token]
        try:
            top = int(query.get("$top", DEFAULT_PAGE))
        except ValueError:
            top = -1
        if not 1 <= top <= 1000:
            return (
                400,
                None,
                _graph_error(
                    "ErrorInvalidArgument", "The value of $top must be 1 to 1000."
                ),
            )
        page = _Page(box.address, folder.id, box.delta(folder.id, since), box.seq, top)
        return self._serve(base, page)

    def _next_page(self, base: str, token: str) -> Reply:
        page = self._pages.pop(token, None)
        if page is None or token in self._expired:
            return self._expired_reply()
        return self._serve(base, page)

    def _serve(self, base: str, page: _Page) -> Reply:
        head, rest = page.items[: page.top], page.items[page.top :]
        link = (
            f"{base}/v1.0/users/{urllib.parse.quote(page.mailbox)}"
            f"/mailFolders('{page.folder_id}')/messages/delta"
        )
        body: dict[str, Any] = {
            "@odata.context": f"{base}/v1.0/$metadata#Collection(message)",
            "value": head,
        }
        token = secrets.token_urlsafe(24)
        if rest:
            self._pages[token] = dataclasses.replace(page, items=rest)
            body["@odata.nextLink"] = f"{link}?$skiptoken={token}"
        else:
            self._deltas[token] = (page.mailbox, page.folder_id, page.seq)
            body["@odata.deltaLink"] = f"{link}?$deltatoken={token}"
        return 200, None, body

    def _expired_reply(self) -> Reply:
        status, code = self._expiry_reply
        return (
            status,
            None,
            _graph_error(
                code, "The sync state generation is not found. Resync is required."
            ),
        )


def _injected_reply(injection: _Injection) -> Reply:
    codes = {
        429: (
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
        ),
        503: ("ServiceNotAvailable", "The service is temporarily unavailable."),
    }
    code, text = codes.get(injection.status, ("UnknownError", "An error occurred."))
    headers = (
        {"Retry-After": f"{injection.retry_after:g}"}
        if injection.retry_after is not None
        else None
    )
    return injection.status, headers, _graph_error(injection.code or code, text)


def _not_found(what: str) -> Reply:
    return (
        404,
        None,
        _graph_error(
            "ErrorItemNotFound",
            f"The specified object was not found in the store. ({what})",
        ),
    )


def op_of(method: str, route: list[str]) -> str:
    """The operation a mailbox route names (for the request log and injections)."""
    head = [part.lower() for part in route]
    if head[:1] == ["mailfolders"]:
        if len(head) == 1:
            return "folders.create" if method == "POST" else "folders.list"
        if len(head) == 2:
            return "folders.get"
        if head[2:] == ["messages", "delta"]:
            return "delta"
    if head[:1] == ["messages"] and len(head) == 3:
        if head[2] == "$value" and method == "GET":
            return "mime"
        if head[2] == "move" and method == "POST":
            return "move"
    return "unknown"


def _route(
    fake: FakeMailboxes,
    base: str,
    box: Mailbox,
    method: str,
    route: list[str],
    query: dict[str, str],
    body: Any,
) -> Reply:
    op = op_of(method, route)
    if op == "folders.list":
        return _list_folders(box, query)
    if op == "folders.create":
        return _create_folder(box, body)
    if op in ("folders.get", "delta"):
        folder = box.find(route[1])
        if folder is None:
            return _not_found(f"folder {route[1]}")
        if op == "folders.get":
            return 200, None, folder.json(box)
        return fake.delta(base, box, folder, query)
    if op in ("mime", "move"):
        message = box.messages.get(route[1])
        if message is None:
            return _not_found(f"message {route[1]}")
        if op == "mime":
            return 200, {"Content-Type": "text/plain"}, message.raw
        return _move(box, message, body)
    return (
        400,
        None,
        _graph_error("BadRequest", f"Unsupported request {method} /{'/'.join(route)}."),
    )


def _list_folders(box: Mailbox, query: dict[str, str]) -> Reply:
    folders = box.children(box.root.id)
    if "$filter" in query:
        match = _FILTER.match(query["$filter"])
        if match is None:
            return (
                400,
                None,
                _graph_error(
                    "BadRequest", "The fake only filters on displayName eq '...'."
                ),
            )
        name = match.group(1).replace("''", "'").lower()
        folders = [f for f in folders if f.name.lower() == name]
    return 200, None, {"value": [f.json(box) for f in folders]}


def _create_folder(box: Mailbox, body: Any) -> Reply:
    name = body.get("displayName") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        return (
            400,
            None,
            _graph_error("ErrorInvalidParameter", "displayName is required."),
        )
    if any(f.name.lower() == name.lower() for f in box.children(box.root.id)):
        return (
            409,
            None,
            _graph_error(
                "ErrorFolderExists", "A folder with the specified name already exists."
            ),
        )
    return 201, None, box.create_folder(name).json(box)


def _move(box: Mailbox, message: StoredMessage, body: Any) -> Reply:
    target = body.get("destinationId") if isinstance(body, dict) else None
    folder = box.find(target) if isinstance(target, str) else None
    if folder is None:
        return _not_found(f"destination {target}")
    moved = box.move(message.id, folder)
    reply = _message_json(moved)
    reply["parentFolderId"] = folder.id
    return 201, None, reply
