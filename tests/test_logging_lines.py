"""The JSON log stream (`worker.logging._Lines`): one write a line, or, in
`together()`, a thread's lines written in whole-line pieces of at most 4 KB."""

from __future__ import annotations

import threading

from worker.logging import _PIPE_BUF, _Lines


class Raw:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def _line(i: int) -> bytes:
    return b'{"event": "delivery_succeeded", "n": %d, "pad": "%s"}\n' % (i, b"x" * 150)


def test_outside_together_each_line_is_written_at_once():
    raw = Raw()
    lines = _Lines(raw)
    lines.write(_line(1))
    lines.write(_line(2))
    assert raw.writes == [_line(1), _line(2)]


def test_together_writes_whole_lines_in_pieces_of_at_most_pipe_buf():
    raw = Raw()
    lines = _Lines(raw)
    sent = [_line(i) for i in range(100)]
    with lines.together():
        for data in sent:
            lines.write(data)
        held = b"".join(raw.writes)
        assert len(b"".join(sent)) - len(held) <= _PIPE_BUF  # little is held back
    assert b"".join(raw.writes) == b"".join(sent)  # all of it, in order
    assert len(raw.writes) < len(sent) / 10
    for piece in raw.writes:
        assert len(piece) <= _PIPE_BUF
        assert piece.endswith(b"\n")


def test_another_threads_lines_are_not_held():
    raw = Raw()
    lines = _Lines(raw)
    with lines.together():
        lines.write(_line(1))
        other = threading.Thread(target=lines.write, args=(_line(2),))
        other.start()
        other.join()
        assert raw.writes == [_line(2)]
    assert raw.writes == [_line(2), _line(1)]


def test_a_line_longer_than_pipe_buf_is_written_alone():
    raw = Raw()
    lines = _Lines(raw)
    long = b"{" + b"y" * (2 * _PIPE_BUF) + b"}\n"
    with lines.together():
        lines.write(_line(1))
        lines.write(long)
        lines.write(_line(2))
    assert raw.writes == [_line(1), long, _line(2)]


class Broken(Raw):
    """A stream whose reader went away (``mailworker worker | tee`` killed first)."""

    def write(self, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_stream_that_cannot_take_a_line_never_raises():
    """A log line that cannot be written is dropped and counted: raised, it would break
    off a job after its send, lose its record and have it sent again."""
    lines = _Lines(Broken())
    lines.write(_line(1))
    with lines.together():
        for i in range(40):  # past one 4 KB piece
            lines.write(_line(i))
    assert lines.lost == 41
