"""Reading data files with errors that name the file and the line, item or field at fault.

Every reader of ``functional_llm.data`` goes through these, so a user who points a script at
the wrong file reads one sentence saying which file and where, never a bare ``KeyError`` or
a ``UnicodeDecodeError`` without a path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DataError", "field", "read_json", "read_jsonl", "read_text"]


class DataError(ValueError):
    """A data file that cannot be used: missing, not UTF-8, empty, malformed, inconsistent."""


def read_text(path: str | os.PathLike, *, allow_empty: bool = False) -> str:
    """The file's text, decoded as UTF-8; an empty (or all-whitespace) file is an error unless
    ``allow_empty``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, not a file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
            "convert the file to UTF-8"
        ) from None
    if not allow_empty and not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def read_json(path: str | os.PathLike) -> Any:
    """The file's JSON value; a truncated or malformed file names the line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON Lines file."""
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def field(item: Any, name: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """``item[name]``, which must exist and be a ``kind``; ``where`` names the item (e.g.
    ``"train.json: data[0].paragraphs[2]"``) in the error."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object, got {type(item).__name__}")
    if name not in item:
        raise DataError(f"{where}: no {name!r} field (fields: {sorted(item)})")
    value = item[name]
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}.{name}: expected {expected}, got {type(value).__name__}")
    return value
