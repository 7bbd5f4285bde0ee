"""The folders a Graph source uses: well-known names as they are, others by display name.

A display name is looked up among the folders at the top of the mailbox
(``msgFolderRoot``); the processed and failed folders are created there when missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from settings import InboundSource
from worker.inbound.graph_client import GraphMailbox, GraphMailboxError

__all__ = ["WELL_KNOWN_FOLDERS", "Folders", "resolve_folders"]

log = structlog.get_logger("mailworker.inbound.graph")

# Graph's well-known folder names: used in paths and as move destinations as they are.
WELL_KNOWN_FOLDERS = frozenset(
    {"archive", "clutter", "conflicts", "conversationhistory", "deleteditems"}
    | {"drafts", "inbox", "junkemail", "localfailures", "msgfolderroot", "outbox"}
    | {"recoverableitemsdeletions", "scheduled", "searchfolders", "sentitems"}
    | {"serverfailures", "syncissues"}
)


@dataclass(frozen=True, slots=True)
class Folders:
    """The ids (or well-known names) of the folder read and the two moved to."""

    source: str
    processed: str
    failed: str


def resolve_folders(api: GraphMailbox, config: InboundSource) -> Folders:
    """The source's folders, creating the processed and failed folders when missing.

    Raises:
        GraphMailboxError: the folder read does not exist, or a call failed.
    """
    return Folders(
        _folder_id(api, config, config.folder, create=False),
        _folder_id(api, config, config.processed_folder, create=True),
        _folder_id(api, config, config.failed_folder, create=True),
    )


def _folder_id(
    api: GraphMailbox, config: InboundSource, name: str, *, create: bool
) -> str:
    if name.lower() in WELL_KNOWN_FOLDERS:
        return name.lower()
    found = _find(api, name)
    if found is not None:
        return found
    if not create:
        raise GraphMailboxError(f"no folder {name!r} at the top of {config.mailbox}")
    try:
        created = api.post("/mailFolders", {"displayName": name})
    except GraphMailboxError as exc:
        if exc.status != 409:  # 409: another process created it just now
            raise
        return _folder_id(api, config, name, create=False)
    log.info("inbound_folder_created", source=config.name, folder=name)
    return str(created["id"])


def _find(api: GraphMailbox, name: str) -> str | None:
    escaped = name.replace("'", "''")  # OData doubles a quote inside a string
    found = api.get(
        "/mailFolders",
        params={"$filter": f"displayName eq '{escaped}'", "$select": "id"},
    )
    values = found.get("value") if isinstance(found, dict) else None
    return str(values[0]["id"]) if values else None
