"""IMAP mailbox names as command arguments: modified UTF-7 (RFC 3501 5.1.3), quoted."""

from __future__ import annotations

import base64

__all__ = ["mailbox_argument", "modified_utf7"]


def modified_utf7(name: str) -> str:
    """``name`` in IMAP's modified UTF-7: printable ASCII as is, ``&`` as ``&-``.

    Other characters go as ``&`` + base64 of their UTF-16BE (``,`` for ``/``) + ``-``.
    """
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            data = base64.b64encode("".join(run).encode("utf-16-be")).decode()
            out.append("&" + data.rstrip("=").replace("/", ",") + "-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


def mailbox_argument(name: str) -> str:
    """``name`` encoded and quoted, ready for SELECT, CREATE, MOVE or COPY."""
    encoded = modified_utf7(name).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'
