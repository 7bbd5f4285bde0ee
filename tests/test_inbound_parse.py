"""Hostile and broken inbound mail: limits named, nothing raised, the parser's view kept."""

from __future__ import annotations

import random
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pytest

from worker.inbound.classify import classify
from worker.inbound.parse import _split_multipart
from worker.inbound.structure import structure_problem

SAMPLES = Path(__file__).parent / "samples" / "bounces"


def many_parts(count: int) -> bytes:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n"
    parts = b"".join(part % i for i in range(count))
    head = b"From: a@example.org\r\nMessage-ID: <many@example.org>\r\n"
    return (
        head
        + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + parts
        + b"--b--\r\n"
    )


def rfc822_chain(depth: int) -> bytes:
    head = b"From: a@example.org\r\nMessage-ID: <deep@example.org>\r\n"
    return (
        head
        + b"Content-Type: message/rfc822\r\n\r\n" * depth
        + b"Subject: in\r\n\r\nhi\r\n"
    )


def multipart_chain(depth: int) -> bytes:
    levels = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    head = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    return head + levels + b"--b%d\r\n\r\nleaf\r\n" % depth


def digest_chain(depth: int) -> bytes:
    """Digest parts are messages by default: two levels a digest, no Content-Type needed."""
    levels = b"".join(
        b"--d%d\r\n\r\nContent-Type: multipart/digest; boundary=d%d\r\n\r\n"
        % (i, i + 1)
        for i in range(depth)
    )
    head = b"From: a@example.org\r\nContent-Type: multipart/digest; boundary=d0\r\n\r\n"
    return head + levels + b"--d%d\r\n\r\nSubject: x\r\n\r\nleaf\r\n" % depth


def test_ten_thousand_parts_are_unparseable_before_parsing():
    """10,000 parts: the scan names the limit, and classify says so without raising."""
    raw = many_parts(10_000)
    assert (
        structure_problem(raw, max_parts=1000, max_depth=10)
        == "more than 1000 MIME parts"
    )
    result = classify(raw)
    assert (result.kind, result.unparseable) == ("other", True)
    assert result.reason == "more than 1000 MIME parts"
    # The top-level header is still read: the key is the Message-ID.
    assert result.key == "<many@example.org>" and result.sender == "a@example.org"


def test_the_part_limit_counts_the_message_itself():
    """999 parts and the multipart make 1000 entities, which is allowed, and one more is not."""
    assert not classify(many_parts(999)).unparseable
    assert classify(many_parts(1000)).reason == "more than 1000 MIME parts"
    assert classify(many_parts(12), max_parts=10).reason == "more than 10 MIME parts"


@pytest.mark.parametrize(
    "build",
    [rfc822_chain, multipart_chain, digest_chain],
    ids=["rfc822", "multipart", "digest"],
)
def test_a_chain_5000_deep_is_unparseable_without_recursion(build):
    """A zip-bomb-like chain is stopped by the scan: no RecursionError, no quadratic parse."""
    raw = build(5000)
    assert (
        structure_problem(raw, max_parts=1000, max_depth=10) == "nested deeper than 10"
    )
    result = classify(raw)
    assert (result.unparseable, result.reason) == (True, "nested deeper than 10")


def test_the_depth_limit_is_exact():
    """Depth 10 is allowed, 11 is not, and max_depth is honoured."""
    assert not classify(rfc822_chain(10)).unparseable
    assert classify(rfc822_chain(11)).reason == "nested deeper than 10"
    assert classify(multipart_chain(3), max_depth=2).reason == "nested deeper than 2"


def _random_entity(rng: random.Random, depth: int, lines: list[str]) -> None:
    """Append a random, often malformed, MIME entity (headers and body) to ``lines``."""
    kind = rng.choice(
        ["leaf", "leaf", "multipart", "digest", "rfc822"] if depth < 5 else ["leaf"]
    )
    if kind == "leaf":
        if rng.random() < 0.7:
            lines.append("Content-Type: text/plain")
        lines += ["", "text", "--not-a-boundary"]
        return
    if kind == "rfc822":
        lines += ["Content-Type: message/rfc822", ""]
        _random_entity(rng, depth + 1, lines)
        return
    boundary = f"b{rng.randrange(6)}"  # collisions with outer boundaries on purpose
    subtype = "digest" if kind == "digest" else "mixed"
    if rng.random() < 0.5:
        lines += [f"Content-Type: multipart/{subtype};", f'\tboundary="{boundary}"', ""]
    else:
        lines += [
            f"Content-Type: multipart/{subtype}; boundary={boundary}",
            "",
            "preamble",
        ]
    for _ in range(rng.randrange(4)):
        lines.append(f"--{boundary}" + rng.choice(["", " ", "\t"]))
        if rng.random() < 0.15:
            lines.append(f"--{boundary}")  # a repeated delimiter opens no part
        if subtype == "digest" and rng.random() < 0.5:
            lines.append("")  # no Content-Type: a digest part is a message
        _random_entity(rng, depth + 1, lines)
    if rng.random() < 0.8:
        lines += [f"--{boundary}--", "epilogue"]


def _measured(raw: bytes) -> tuple[int, int]:
    """Entities and depth of the stdlib's own parse: the reference for the scan."""
    count, deepest, stack = (
        0,
        0,
        [(BytesParser(policy=policy.compat32).parsebytes(raw), 0)],
    )
    while stack:
        part, depth = stack.pop()
        count, deepest = count + 1, max(deepest, depth)
        payload = part.get_payload()
        if (
            isinstance(payload, list)
            and part.get_content_type() != "message/delivery-status"
        ):
            stack += [(p, depth + 1) for p in payload if isinstance(p, Message)]
    return count, deepest


def test_the_scan_agrees_with_the_stdlib_parser_on_random_structures():
    """On 400 random (often broken) trees the scan counts what the parser builds, exactly."""
    rng = random.Random(20261202)
    for _ in range(400):
        lines = ["From: a@example.org"]
        _random_entity(rng, 0, lines)
        raw = "\n".join(lines).encode()
        count, depth = _measured(raw)
        assert structure_problem(raw, max_parts=count, max_depth=depth) is None, raw
        too_many = structure_problem(raw, max_parts=count - 1, max_depth=depth)
        assert too_many == f"more than {count - 1} MIME parts", raw
        if depth:
            too_deep = structure_problem(raw, max_parts=count, max_depth=depth - 1)
            assert too_deep == f"nested deeper than {depth - 1}", raw


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 1000,
        b"just a body line without any header\n",
        bytes(range(256)) * 40,
    ],
    ids=["empty", "nul", "no-header", "binary"],
)
def test_a_message_without_a_header_is_unparseable(raw):
    """No header fields at all: unparseable, keyed by its digest."""
    result = classify(raw)
    assert (result.kind, result.unparseable, result.reason) == (
        "other",
        True,
        "no header fields",
    )
    assert result.key.startswith("sha256:")


@pytest.mark.parametrize(
    "raw",
    [
        # declared multipart, boundary never used; close boundary missing; boundary empty
        b"From: a@x\nContent-Type: multipart/mixed; boundary=zz\n\nno parts here\n",
        b"From: a@x\nContent-Type: multipart/mixed; boundary=zz\n\n--zz\n\nopen\n--zz\n\nx",
        b'From: a@x\nContent-Type: multipart/mixed; boundary=""\n\n--\n\nx\n----\n',
        b"From: a@x\nContent-Type: multipart/mixed\n\n--zz\n\nno boundary parameter\n",
        b"From: a@x\nContent-Type: multipart/report; report-type=delivery-status\n\n--x\n",
        b"From: a@x\nContent-Type: ;;;\x00;boundary*=''%ZZ\n\nbody",
        b"From: a@x\nContent-Type: multipart/mixed; boundary*0*=us-ascii''a%\n\nx",
        b"From: a@x\nContent-Transfer-Encoding: base64\n\n!!!not base64===\n",
        b"From: a@x\nContent-Transfer-Encoding: x-uuencode\n\nbegin 644 f\n#garbage\nend\n",
        b"\nFrom: a@x\n\nheader after a blank line",
        b"From: a@x\x00\x00\nSubject: \xff\xfe\x00nul\nTo: \x00@\x00\n\n\x00body\x00",
        b"From: =?utf-8?b?!!!?= <a@x>\nSubject: =?x-unknown?q?abc?= =?utf-8?b?####?=\n\nx",
        b"From a@x Mon Dec  2 09:00:00 2026\nFrom: a@x\n\nmbox envelope line",
        # a leaf's get_payload() decodes 8-bit text by its charset: NUL in it raises
        b"From: a@x\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
        b'Content-Type: text/plain; charset="utf\x00-8"\n\n\xff\xfe 8-bit\n--b--\n',
        b"Message-ID: " + b"<" * 5000 + b"\nFrom: " + b"<>," * 20000 + b"\n\nx",
    ],
)
def test_malformed_messages_get_an_answer_and_never_raise(raw):
    """Broken boundaries, garbage parameters and encodings, NUL bytes: classified, not raised."""
    result = classify(raw)
    assert result.kind in ("other", "auto_reply", "bounce")
    assert isinstance(result.key, str) and result.key
    assert not result.reason.startswith("unreadable"), result.reason


def test_undecodable_charsets_are_decoded_with_replacement():
    """An unknown charset, a non-text codec, invalid UTF-8: text is read with replacements."""
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\nX-Failed-Recipients: a@example.net\n"
        b"Subject: =?x-no-such-charset?q?Mail_failed?= =?base64?q?x?=\n"
        b"Content-Type: text/plain; charset=utf-8\n\n"
        b"\xff\xfe invalid \xc3 utf-8\n\n  a@example.net\n    550 5.1.1 unknown user \xff\n"
    )
    result = classify(raw)
    assert result.subject.startswith("Mail failed")
    assert [(r.address, r.code) for r in result.reports] == [("a@example.net", "5.1.1")]
    assert "\ufffd" in result.reports[0].message
    for charset in (b"x-unknown", b"base64", b"zlib_codec", b"utf-7"):
        raw = (
            b"From: a@x\nContent-Type: text/plain; charset="
            + charset
            + b"\n\n\xff\xfe+ZZ-\n"
        )
        assert not classify(raw).unparseable


def test_a_huge_header_field_is_unparseable_and_named():
    """One field over 100 KB: unparseable, the reason names the limit and the field."""
    raw = b"From: a@x\nX-Huge: " + b"a" * 200_000 + b"\n\nbody"
    result = classify(raw)
    assert result.unparseable
    assert result.reason == "a header field longer than 102400 bytes (X-Huge)"


def test_too_many_header_fields_are_unparseable():
    """5,000 header fields: unparseable, named."""
    raw = b"From: a@x\n" + b"X-Field: 1\n" * 5000 + b"\nbody"
    assert classify(raw).reason == "more than 1000 header fields"


def test_a_long_but_allowed_header_is_read():
    """A 60 KB References field (within the limit) is read whole."""
    ids = "".join(f" <r{i}@example.org>" for i in range(3000))
    result = classify(f"From: a@x\nReferences:{ids}\n\nbody".encode())
    assert not result.unparseable and len(result.references) == 3000


def test_inputs_that_are_not_bytes_get_an_answer():
    """A str or None is unparseable with a reason, and a bytearray is read like bytes."""
    assert classify("From: a@x\n\nbody").reason == "not bytes (str)"  # type: ignore[arg-type]
    assert classify(None).reason == "not bytes (NoneType)"  # type: ignore[arg-type]
    raw = bytearray(b"From: a@x\nMessage-ID: <a@x>\n\nb")
    assert classify(raw).key == "<a@x>"  # type: ignore[arg-type]


def _mutations(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 8)):
        op, at = rng.randrange(4), rng.randrange(len(data) + 1)
        if op == 0:
            data[at:at] = rng.choice(
                [b"\x00", b"\xff", b"--", b"\n\n", b"=?", b";", b"<"]
            )
        elif op == 1:
            del data[at : at + rng.randrange(1, 200)]
        elif op == 2 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        else:
            data[at:at] = data[rng.randrange(len(data) + 1) :][: rng.randrange(300)]
    return bytes(data)


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.eml")), ids=lambda p: p.stem)
def test_mutated_samples_never_raise(path):
    """500 random mutations of each sample (bytes flipped, cut, repeated): always an answer."""
    rng = random.Random(path.stem)
    raw = path.read_bytes()
    for _ in range(500):
        result = classify(_mutations(rng, raw))
        assert result.kind in ("bounce", "auto_reply", "other")
        assert not result.reason.startswith("unreadable"), result.reason


def _tree(message: Message) -> list[object]:
    """Everything of a parsed tree the classifier can see, entity by entity."""
    return [
        (
            part.get_content_type(),
            list(part.raw_items()),
            part.get_payload() if not part.is_multipart() else None,
            part.preamble,
            part.epilogue,
            [type(d).__name__ for d in part.defects],
        )
        for part in message.walk()
    ]


def _agrees(raw: bytes) -> bool:
    """Whether the part-by-part parse was used for ``raw``; when it was, it must agree."""
    fast = _split_multipart(raw)
    if fast is None:
        return False
    slow = BytesParser(policy=policy.compat32).parsebytes(raw)
    assert _tree(fast) == _tree(slow), raw
    assert _flat(fast) == _flat(slow), raw
    return True


def _flat(message: Message) -> bytes | str:
    """The tree written out again, or the name of the error writing it raises."""
    try:
        return message.as_bytes()
    except Exception as exc:  # 8-bit garbage the generator cannot encode
        return type(exc).__name__


def test_the_part_by_part_parse_builds_the_stdlib_parsers_tree():
    """Samples, their mutations and random trees (LF and CRLF): the same tree, or none."""
    rng = random.Random(20261203)
    used = total = 0
    samples = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml"))]
    corpus = samples + [_mutations(rng, raw) for raw in samples for _ in range(100)]
    for _ in range(400):
        lines = ["From: a@example.org"]
        _random_entity(rng, 0, lines)
        corpus += ["\n".join(lines).encode(), "\r\n".join(lines).encode()]
    for raw in corpus:
        total += 1
        used += _agrees(raw)
    # It must be the common path for what it is for, or this test proves nothing.
    assert used > total // 10, (used, total)
    dsns = ("postfix-user-unknown", "gmail-no-such-user", "o365-recipient-not-found")
    assert all(_agrees((SAMPLES / f"{name}.eml").read_bytes()) for name in dsns)
