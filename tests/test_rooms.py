"""The rooms of the code base import only downwards, and Dramatiq's internals stay in one.

Imports go ``settings ← common ← producers ← worker``. Only ``worker/broker/`` spells
Dramatiq's private key names or subclasses its private classes; ``common/keys.py``
names the queue list and message hash, which producers write (the wire format).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["settings", "common", "producers", "worker"]
# The key spellings and private names only worker/broker/ may use.
DRAMATIQ_INTERNALS = re.compile(
    r"__acks__|__heartbeats__|\.DQ\b|\.XQ\b|_RedisConsumer|\.msgs\b"
)


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """The top-level packages of ours a module imports (at import time or lazily)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & set(ORDER)


@pytest.mark.parametrize("package", ORDER)
def test_a_room_imports_only_the_rooms_below_it(package):
    """No module imports a room above its own."""
    allowed = set(ORDER[: ORDER.index(package) + 1])
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imported(path) - allowed)
        for path in _modules(package)
        if _imported(path) - allowed
    }
    assert wrong == {}


def test_only_worker_broker_knows_dramatiqs_internals():
    """Outside ``worker/broker/`` no module spells Dramatiq's private key names or
    classes (``common/keys.py`` may name the message hash: producers write it)."""
    broker = ROOT / "worker" / "broker"
    allowed = {ROOT / "common" / "keys.py"}
    found = {}
    for package in ORDER:
        for path in _modules(package):
            if broker in path.parents or path in allowed:
                continue
            hits = DRAMATIQ_INTERNALS.findall(path.read_text())
            if hits:
                found[str(path.relative_to(ROOT))] = sorted(set(hits))
    assert found == {}


def test_every_package_has_an_init():
    """``worker/`` and its subfolders of code are regular packages, not namespace
    packages (a folder of data only, such as templates, is package data)."""
    missing = [
        str(folder.relative_to(ROOT))
        for package in ORDER
        for folder in [ROOT / package, *(ROOT / package).rglob("*")]
        if folder.is_dir()
        and folder.name != "__pycache__"
        and any(folder.rglob("*.py"))
        and not (folder / "__init__.py").exists()
    ]
    assert missing == []
