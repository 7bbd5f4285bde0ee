"""The MIME structure of raw mail measured before parsing: entities counted, nesting depth.

The stdlib's feed parser recurses once per nested entity and checks every line against
every open boundary, so a deep chain of ``message/rfc822`` parts ends in a
``RecursionError`` after seconds of quadratic work, and 10,000 parts take seconds to
build. The scan here replays the parser's decisions on the raw lines instead (which line
is a header, a delimiter, where a nested message starts) and builds no parts.
"""

from __future__ import annotations

import re
from email.message import Message

__all__ = ["content_type", "structure_problem", "subparts", "tree_problem"]

_CONTAINER = re.compile(
    rb"content-type:[ \t\r\n]*(?:multipart|message)/", re.IGNORECASE
)
_DIGEST = re.compile(rb"digest", re.IGNORECASE)
# What the feed parser takes for a header line (its `headerRE`).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")


def content_type(part: Message) -> str:
    """``part``'s content type, lower case (compat32 falls back to text/plain on garbage)."""
    try:
        return part.get_content_type()
    except Exception:  # a value compat32 cannot split: the parser read it as text/plain
        return "text/plain"


def subparts(part: Message) -> list[Message]:
    """The entities directly inside ``part`` (a multipart's parts, a message/* message)."""
    if not part.is_multipart():
        # get_payload() of a leaf decodes 8-bit text by its charset, which can raise.
        return []
    return [p for p in part.get_payload() if isinstance(p, Message)]


def structure_problem(raw: bytes, *, max_parts: int, max_depth: int) -> str | None:
    """The limit ``raw``'s MIME structure goes past, or None, read without parsing.

    Linear in ``raw``: the feed parser's decisions are replayed line by line, and the
    scan stops at the first limit passed.

    Args:
        raw: the whole message.
        max_parts: the most MIME entities allowed, the message itself included.
        max_depth: the deepest nesting allowed (the top-level message is depth 0).

    Returns:
        ``more than N MIME parts``, ``nested deeper than N``, or None.
    """
    # Cheap bounds first: every part needs a line starting with "--" or a container's
    # Content-Type, and every level of nesting a container (two levels for a digest,
    # whose parts are messages by default).
    containers = sum(1 for _ in _CONTAINER.finditer(raw))
    delimiters = raw.count(b"\n--") + raw.count(b"\r--") + 1
    nesting = containers * (2 if _DIGEST.search(raw) else 1)
    if 1 + delimiters + containers <= max_parts and nesting <= max_depth:
        return None
    return _Scan(max_parts, max_depth).run(raw)


def tree_problem(message: Message, *, max_parts: int, max_depth: int) -> str | None:
    """The limit a parsed message goes past, or None: the scan's check, done on the tree."""
    count = 0
    stack = [(message, 0)]
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > max_parts:
            return f"more than {max_parts} MIME parts"
        if depth > max_depth:
            return f"nested deeper than {max_depth}"
        # The header blocks of a delivery status are fields, not MIME parts.
        if content_type(part) != "message/delivery-status":
            stack.extend((child, depth + 1) for child in subparts(part))
    return None


class _Scan:
    """The feed parser's decisions replayed line by line, counting entities and depth.

    The stack holds one frame per open container: a multipart's delimiter (None for a
    message/* part) and whether it is a digest. It never grows past ``max_depth + 1``.
    """

    def __init__(self, max_parts: int, max_depth: int) -> None:
        self.max_parts, self.max_depth = max_parts, max_depth
        self.stack: list[tuple[bytes | None, bool]] = []
        self.parts = 1
        self.in_header = True
        self.fresh = False  # just after a delimiter: a repeated one opens no part
        self.digest_child = False
        self.ctype: list[bytes] | None = None
        self.folding = False

    def run(self, raw: bytes) -> str | None:
        """The first limit passed, or None."""
        if self.parts > self.max_parts:
            return f"more than {self.max_parts} MIME parts"
        for line in raw.splitlines():
            hit = self._delimiter(line) if self.stack and line[:2] == b"--" else None
            if hit is not None:
                problem = self._boundary(*hit)
            elif self.in_header:
                problem = self._header_line(line)
            else:
                continue
            if problem:
                return problem
        return None

    def _delimiter(self, line: bytes) -> tuple[int, bool] | None:
        """(frame index, closing) when ``line`` is a delimiter of an open multipart.

        The outermost match wins: the parser checks the enclosing boundaries before a
        multipart's own, so a nested multipart that reuses one ends there.
        """
        for index in range(len(self.stack)):
            delimiter = self.stack[index][0]
            if delimiter is not None and line.startswith(delimiter):
                rest = line[len(delimiter) :].rstrip(b" \t")
                if rest in (b"", b"--"):
                    return index, rest == b"--"
        return None

    def _boundary(self, index: int, closing: bool) -> str | None:
        if self.fresh and index == len(self.stack) - 1:
            return None
        del self.stack[index + 1 :]
        if closing:
            del self.stack[index]
            self.in_header = self.fresh = False
            return None
        return self._open(digest_child=self.stack[index][1])

    def _open(self, *, digest_child: bool) -> str | None:
        """A new entity starts inside the innermost frame."""
        self.parts += 1
        if self.parts > self.max_parts:
            return f"more than {self.max_parts} MIME parts"
        if len(self.stack) > self.max_depth:
            return f"nested deeper than {self.max_depth}"
        self.in_header, self.fresh, self.folding = True, True, False
        self.digest_child, self.ctype = digest_child, None
        return None

    def _header_line(self, line: bytes) -> str | None:
        if line and _HEADER_LINE.match(line):
            self.fresh = False
            if line[:1] in (b" ", b"\t"):
                if self.folding and self.ctype is not None:
                    self.ctype.append(line)
                return None
            name = line.split(b":", 1)[0].strip().lower()
            self.folding = name == b"content-type" and self.ctype is None
            if self.folding:
                self.ctype = [line.split(b":", 1)[1]]
            return None
        return self._body()

    def _body(self) -> str | None:
        """The header ended: what the parser reads next depends on the content type."""
        self.in_header = self.fresh = False
        # The stdlib's own functions decide, on a part holding just this Content-Type.
        probe = Message()
        if self.digest_child:
            probe.set_default_type("message/rfc822")
        if self.ctype is not None:
            probe["Content-Type"] = b"".join(self.ctype).decode(
                "ascii", "surrogateescape"
            )
        ctype = content_type(probe)
        if ctype.startswith("message/") and ctype != "message/delivery-status":
            self.stack.append((None, False))
            return self._open(digest_child=False)
        if ctype.startswith("multipart/"):
            try:
                boundary = probe.get_boundary()
            except Exception:  # unreadable parameters: the parser would fail too
                boundary = None
            if boundary is not None:
                delimiter = ("--" + boundary).encode("ascii", "surrogateescape")
                self.stack.append((delimiter, ctype == "multipart/digest"))
        return None
