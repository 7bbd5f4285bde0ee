"""Write mailworker.toml files from dicts, as an operator would write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and key != "integrated_services":
            tables.append(f"[{key}]")
            tables += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif key == "integrated_services":
            for name, svc in value.items():
                tables.append(f"[integrated_services.{name}]")
                tables += [f"{k} = {toml_value(v)}" for k, v in svc.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for entry in value:
                tables.append(f"[[{key}]]")
                tables += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path
