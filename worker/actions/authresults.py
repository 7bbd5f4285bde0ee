"""Whether a reply's sender is authenticated: ``Authentication-Results`` (RFC 8601).

Only fields whose authserv-id is trusted count, and of those the topmost (the one the
receiving server added last; RFC 8601 §5). A DMARC pass for the From domain, or a DKIM
pass whose signing domain is aligned with it, proves the sender.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

__all__ = ["Proof", "proof"]

Proof = Literal["pass", "fail", "absent"]
_COMMENT = re.compile(r"\([^()]*\)")
_RESULT = re.compile(
    r"^\s*([a-z0-9_-]+)\s*=\s*([a-z0-9_-]+)(.*)$", re.IGNORECASE | re.DOTALL
)
_PROPERTY = re.compile(r"([a-z0-9_-]+\.[a-z0-9_-]+)\s*=\s*(\"[^\"]*\"|[^\s;]+)", re.I)


def _results(value: str) -> tuple[str, list[tuple[str, str, dict[str, str]]]]:
    """The authserv-id and each (method, result, properties) of one field."""
    for _ in range(3):  # nested comments, a level at a time
        value = _COMMENT.sub(" ", value)
    head, *infos = value.split(";")
    words = head.split()
    authserv = words[0].lower() if words else ""
    if "=" in authserv:  # Exchange Online writes no authserv-id: a result comes first
        authserv, infos = "", [head, *infos]
    results = []
    for info in infos:
        match = _RESULT.match(info)
        if match is None:
            continue
        props = {
            k.lower(): v.strip('"').lower() for k, v in _PROPERTY.findall(match[3])
        }
        results.append((match[1].lower(), match[2].lower(), props))
    return authserv, results


def _aligned(domain: str, other: str) -> bool:
    """Relaxed alignment: the same domain, or one a subdomain of the other."""
    other = other.rpartition("@")[2].strip(".")
    return bool(other) and (
        domain == other or domain.endswith("." + other) or other.endswith("." + domain)
    )


def proof(fields: Sequence[str], trusted: Sequence[str] | None, sender: str) -> Proof:
    """What the topmost trusted ``Authentication-Results`` says of ``sender``.

    Args:
        fields: every Authentication-Results value, topmost first.
        trusted: the authserv-ids whose fields count (``trusted_authserv_ids``); None
            for a mailbox's own copy (Exchange Online): the topmost field, whatever its
            id, and there ``compauth=pass`` counts too.
        sender: the From address.

    Returns:
        ``pass`` (DMARC pass for the From domain; without a DMARC result, an aligned
        DKIM pass), ``fail`` (a trusted field that shows neither) or ``absent`` (no
        trusted field).
    """
    domain = sender.rpartition("@")[2].lower()
    for value in fields:
        authserv, results = _results(value)
        if trusted is not None and authserv not in trusted:
            continue
        if trusted is None and any(
            m == "compauth" and r == "pass" for m, r, _ in results
        ):
            return "pass"
        dmarc = [(r, p) for m, r, p in results if m == "dmarc"]
        if dmarc:  # DMARC's verdict decides when the server gave one
            passed = any(
                r == "pass" and _aligned(domain, p.get("header.from", domain))
                for r, p in dmarc
            )
            return "pass" if passed else "fail"
        for method, result, props in results:
            signer = props.get("header.d") or props.get("header.i", "")
            if method == "dkim" and result == "pass" and _aligned(domain, signer):
                return "pass"
        return "fail"
    return "absent"
