"""Atomic file writes: a file is either its old self or its complete new self, never half.

``with atomic_path(path) as tmp:`` hands out a path inside a private temporary directory
beside ``path`` (``.<name>.<host>-<pid>.<random>.tmp``); whatever is written there is flushed
to disk and renamed over ``path`` when the block ends (the rename is atomic on POSIX), then the
directory entry is flushed too. If the block raises, the temporary directory is removed and
``path`` is untouched. Writers that make temporaries of their own beside the file they are
given (safetensors does) make them inside that private directory, too.

A process killed midway leaves its temporary directory behind, never a damaged ``path``.
:func:`remove_stale` deletes such leftovers of dead processes (a directory's owner, by the
host and pid in its name, must be gone); a :class:`functional_llm.checkpoint.Checkpointer`
calls it when it opens its directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "remove_stale", "write_atomic"]

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
# .<name>.<host>-<pid>.<random>.tmp, and the leftovers of earlier versions: our temporary files
# (.<name>.<random>.tmp) and safetensors' own (.tmp<6 characters>), written beside the target.
_OURS = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; it becomes ``path`` atomically when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f".{path.name}.{_HOST}-{os.getpid()}."
    private = Path(tempfile.mkdtemp(prefix=owner, suffix=".tmp", dir=path.parent))
    tmp = private / path.name
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    _fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writers left in ``directory``; returns them.

    A temporary is removed when the process named in it (host and pid) is this one or no longer
    runs on this host; temporaries of live processes and of other hosts stay. Leftovers of
    earlier versions, which name no process, are removed when untouched for a minute."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        ours = _OURS.match(entry.name)
        if ours:
            stale = ours["host"] == _HOST and not _alive(int(ours["pid"]))
        else:
            stale = bool(_LEGACY.match(entry.name)) and _age(entry) > 60
        if stale:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in progress when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _age(entry: Path) -> float:
    try:
        return time.time() - entry.stat().st_mtime
    except OSError:
        return 0.0


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
