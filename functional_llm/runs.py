"""Run directories that never lose what they hold: an output folder guarded against a second
run, a metrics log that survives resumes, and interrupts that end in a checkpoint.

A training script opens its output folder with :func:`prepare`, logs with :class:`MetricsLog`
and wraps its loop in :func:`interruptible`::

    runs.prepare(out, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
    restored = ckpts.restore(like)                   # None: nothing to resume
    log = runs.MetricsLog(out / "metrics.jsonl", keep=restored and restored.state["records"])
    with runs.interruptible() as stop:
        for t in ...:
            state, metrics = step(state, batch)
            if stop:                                 # Ctrl-C or SIGTERM: finish cleanly
                ckpts.save(t, ...); raise SystemExit(stop.exit_code)

* **A fresh run never writes into an earlier one.** :func:`prepare` refuses a folder that
  holds files unless the run resumes (continuing what is there) or ``overwrite`` is asked
  for, which removes the run's own outputs only (``outputs``), nothing else in the folder.
* **Metrics are strict JSON Lines** (a non-finite number is written as ``null``), and a
  resumed run keeps exactly the records written before the checkpoint it resumes from
  (their count travels in the checkpoint), then appends: no lost history, no duplicated
  steps, and a plot of the whole run.
* **Interrupts finish the step.** Inside :func:`interruptible`, SIGINT (Ctrl-C) and SIGTERM
  (a preempted job) set a flag instead of raising in the middle of an update; the loop checks
  it after each step, saves and exits with the conventional code (130, 143). A second Ctrl-C
  raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from functional_llm.files import atomic_path, remove_stale

__all__ = ["MetricsLog", "RunDirError", "Stop", "interruptible", "prepare", "strict_json"]


class RunDirError(ValueError):
    """An output folder that this run may not write into as asked."""


def prepare(
    out: str | os.PathLike, *, resume: bool, overwrite: bool, outputs: Iterable[str]
) -> Path:
    """Make ``out`` ready for a run and return it.

    A fresh run (``resume=False``) needs an absent or empty folder; with ``overwrite`` the
    names in ``outputs`` (files or folders the run writes) are removed first and anything
    else stays. A resumed run takes the folder as it is. Either way, temporaries that killed
    writers left in it are removed (:func:`functional_llm.files.remove_stale`)."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the folder; --overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not resume:
        if not overwrite:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise RunDirError(
                f"{out} already holds a run ({shown}); pass --resume to continue it, "
                "--overwrite to replace it, or another --out-dir"
            )
        for name in set(outputs) & set(present):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # temporaries of a killed run's writes (tokenizer, metrics, models)
    return out


def strict_json(entry: dict[str, Any]) -> str:
    """``entry`` as one line of strict JSON: non-finite floats become ``null``."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(entry), allow_nan=False)


class MetricsLog:
    """A JSON Lines metrics file and the records in it (``records``, for plots).

    ``keep=None`` starts a new file. ``keep=n`` continues one: its first ``n`` records are
    kept (the count a checkpoint recorded when it was written; a partly written last line of a
    killed run is dropped) and everything after them is removed before appending, so the file
    reads as if the run had never stopped."""

    def __init__(self, path: str | os.PathLike, *, keep: int | None = None) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if keep is not None and self.path.exists():
            self.records = _read(self.path)[:keep]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(strict_json(r) + "\n" for r in self.records), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def record(self, entry: dict[str, Any]) -> None:
        self.records.append(entry)
        self._file.write(strict_json(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the torn last line of a killed writer
    return records


class Stop:
    """Truthy once a stop was asked for; ``signal`` names it and ``exit_code`` is the shell's
    convention for it (128 + the signal number)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.exit_code = 1

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def interruptible(
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[Stop]:
    """Turn ``signals`` into a :class:`Stop` flag for the duration of the block (the previous
    handlers come back after it). Outside the main thread signals cannot be caught, and the
    flag simply never rises."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(number: int, frame: Any) -> None:
        if stop and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        stop.signal, stop.exit_code = signal.Signals(number).name, 128 + number

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
