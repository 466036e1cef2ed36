"""Checkpoints of any state pytree: safetensors plus a JSON manifest, written atomically.

One checkpoint is one ``.safetensors`` file. Tensors are stored under their dotted paths
(``params.blocks.0.attn.q.w``; a dot or backslash inside a key is escaped, so no two paths
share a name); the header's metadata holds a JSON manifest with the library and torch
versions, every leaf's key path (dict keys as strings, positions as ints), the tree's
non-tensor leaves (ints, floats, strings, bools, ``None``), a CRC-32 of every tensor's bytes,
whether every floating tensor is finite, and whatever the caller adds (the config, the data
position, the tokenizer).

* **Loading never executes code.** safetensors is a header plus raw bytes, and the manifest is
  JSON; no pickle is involved anywhere (a ``torch.save`` file is rejected, not unpickled).
* **Atomic.** The file is written inside a private temporary folder beside the target,
  flushed to disk, then renamed over the target: a crash at any moment leaves the previous
  checkpoint whole, and the next :class:`Checkpointer` removes what the crash left.
* **Checked.** A truncated or corrupted file, a tensor whose bytes fail their checksum
  (:class:`DamagedCheckpoint`), or a checkpoint that does not fit the ``like`` tree (a missing
  path, another shape or dtype) raises :class:`CheckpointError` naming the file, the path and
  both values.

``save(path, tree, metadata)`` / ``load(path, like)`` / ``metadata(path)`` handle one file;
:class:`Checkpointer` keeps numbered checkpoints of a run in a directory (``latest``, ``keep``,
``restore``). Sharded (DTensor) state is saved with :mod:`functional_llm.parallel.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import optree
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from functional_llm import tree
from functional_llm.files import atomic_path, remove_stale

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DamagedCheckpoint",
    "Restored",
    "config_from_dict",
    "config_to_dict",
    "load",
    "metadata",
    "save",
]

FORMAT = "functional_llm.checkpoint/1"
_VALUES = (int, float, str, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or does not fit the requested tree."""


class DamagedCheckpoint(CheckpointError):
    """A file that is not an intact checkpoint: truncated, corrupted, or another format."""


def _crc(x: torch.Tensor) -> int:
    data = memoryview(x.reshape(-1).view(torch.uint8).numpy())  # pyright: ignore[reportArgumentType]
    return zlib.crc32(data)  # (an ndarray is a buffer; numpy's stub does not say so)


def save(path: str | os.PathLike, state: Any, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (a pytree of tensors and plain values) to ``path`` atomically.

    ``metadata`` must be JSON-serialisable (use :func:`config_to_dict` for configs). Dict keys
    must be strings; any string works, dots included (``{"a.b": x, "a": {"b": y}}`` keeps both).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    seen: set[int] = set()
    key_paths = _key_paths(state)
    entries = {_name(keys): leaf for keys, leaf in key_paths}
    for name, leaf in entries.items():
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        elif isinstance(leaf, _VALUES):
            values[name] = leaf
        else:
            kind = type(leaf).__name__
            raise TypeError(
                f"checkpoint.save: leaf {name!r} is a {kind}; only tensors, numbers, "
                "strings and bools are stored"
            )
    manifest = {
        "format": FORMAT,
        "library": _library_version(),
        "torch": torch.__version__,
        "paths": list(entries),
        "keys": [keys for keys, _ in key_paths],
        "values": values,
        "crc32": {name: _crc(t) for name, t in tensors.items()},
        "finite": all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point()),
        "metadata": metadata or {},
    }
    try:
        header = {"manifest": json.dumps(manifest)}  # (Python's JSON: inf and nan round-trip)
    except TypeError as err:
        raise TypeError(f"checkpoint.save: metadata must be JSON-serialisable: {err}") from None
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def _key_paths(state: Any) -> list[tuple[list[str | int], Any]]:
    """Every leaf with its path as a list: dict keys as strings, sequence positions as ints."""
    leaves, accessors = optree.tree_leaves(state), optree.tree_accessors(state)
    out = []
    for leaf, accessor in zip(leaves, accessors, strict=True):
        keys: list[str | int] = []
        for entry in accessor:
            if isinstance(entry, optree.MappingEntry):
                if not isinstance(entry.entry, str):
                    raise TypeError(
                        f"checkpoint.save: dict keys must be strings; {keys} holds the key "
                        f"{entry.entry!r} ({type(entry.entry).__name__})"
                    )
                keys.append(entry.entry)
            else:
                keys.append(int(entry.entry))
        out.append((keys, leaf))
    return out


def _name(keys: list[str | int]) -> str:
    """The tensor's name in the file: the dotted path, with dots and backslashes inside keys
    escaped so that distinct paths never share a name (``a\\.b`` is the key ``"a.b"``)."""
    name = ".".join(str(k).replace("\\", "\\\\").replace(".", "\\.") for k in keys)
    return "\\" + name if name == "__metadata__" else name  # safetensors reserves that one


def _entries(state: Any) -> dict[str, Any]:
    return {_name(keys): leaf for keys, leaf in _key_paths(state)}


def _manifest(path: Path) -> tuple[dict[str, Any], list[str]]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header, names = f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedCheckpoint(
            f"{path} is not a readable safetensors checkpoint (truncated, corrupted, or another "
            f"format such as a pickle, which is never loaded): {err}"
        ) from None
    try:
        manifest = json.loads(header["manifest"])
        assert manifest["format"] == FORMAT
    except (KeyError, AssertionError, json.JSONDecodeError, TypeError):
        raise DamagedCheckpoint(f"{path} has no {FORMAT} manifest") from None
    return manifest, names


def metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest's user metadata, plus ``library`` and ``torch`` versions and ``finite``
    (whether every floating tensor was finite when saved), without reading any tensor."""
    manifest, _ = _manifest(Path(path))
    versions = {"library": manifest["library"], "torch": manifest["torch"]}
    return {**manifest["metadata"], **versions, "finite": manifest.get("finite", True)}


def load(
    path: str | os.PathLike,
    like: Any = None,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> Any:
    """Read a checkpoint back.

    With ``like`` (a tree of the expected structure: e.g. a freshly initialised state) the result
    has exactly that structure, and every tensor must match its shape and dtype. Without it, the
    result is nested dicts and lists rebuilt from the paths. ``verify`` checks every tensor's
    CRC-32.
    """
    path = Path(path)
    manifest, names = _manifest(path)
    flat: dict[str, Any] = dict(manifest["values"])
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in names:
                flat[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DamagedCheckpoint(f"{path}: a tensor cannot be read ({err})") from None
    if verify:
        bad = [n for n in names if _crc(flat[n].to("cpu")) != manifest["crc32"].get(n)]
        if bad:
            raise DamagedCheckpoint(f"{path}: checksum mismatch (corrupted data) in {bad}")
    ordered = {name: flat[name] for name in manifest["paths"]}
    if like is None:
        if "keys" not in manifest:  # written before keys were recorded: dotted paths only
            return tree.unflatten(ordered)
        return _rebuild(list(zip(manifest["keys"], ordered.values(), strict=True)))
    want = _entries(like)
    _check_fits(path, ordered, want)
    return optree.tree_unflatten(tree.structure(like), [ordered[name] for name in want])


def _rebuild(entries: list[tuple[list[str | int], Any]]) -> Any:
    """Nested dicts (string keys) and lists (int positions) from ``(keys, leaf)`` pairs."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    children: dict[str | int, list] = {}
    for keys, leaf in entries:
        children.setdefault(keys[0], []).append((keys[1:], leaf))
    built = {k: _rebuild(v) for k, v in children.items()}
    if all(isinstance(k, int) for k in built):
        return [built[i] for i in sorted(built)]  # type: ignore[index]
    return built


def _check_fits(path: Path, got: dict[str, Any], want: dict[str, Any]) -> None:
    problems = [f"{n}: missing from the checkpoint" for n in want if n not in got]
    problems += [f"{n}: in the checkpoint but not in `like`" for n in got if n not in want]
    for name in want.keys() & got.keys():
        a, b = got[name], want[name]
        if isinstance(b, torch.Tensor) != isinstance(a, torch.Tensor):
            problems.append(f"{name}: expected {type(b).__name__}, found {type(a).__name__}")
        elif isinstance(b, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            problems.append(
                f"{name}: expected {tuple(b.shape)} {b.dtype}, found {tuple(a.shape)} {a.dtype}"
            )
    if problems:
        raise CheckpointError(
            f"{path} does not fit the requested tree:\n  " + "\n  ".join(sorted(problems))
        )


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as JSON-ready data (dtypes as their names)."""
    fields = dataclasses.asdict(config)
    return {
        k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
        for k, v in fields.items()
    }


def config_from_dict(cls: type, fields: dict[str, Any]) -> Any:
    """The inverse of :func:`config_to_dict`; the config validates itself as usual."""
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    converted = {
        k: getattr(torch, v) if "dtype" in str(hints.get(k, "")) and isinstance(v, str) else v
        for k, v in fields.items()
    }
    return cls(**converted)


def _library_version() -> str:
    from functional_llm import __version__

    return __version__


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` found: the step, the state, the newer checkpoints it
    passed over (each with the reason: damaged, or holding non-finite values), and the
    checkpoint's metadata."""

    step: int
    state: Any
    skipped: list[tuple[Path, str]]
    metadata: dict[str, Any]


class Checkpointer:
    """Numbered checkpoints of one run in a directory: ``step_00000100.safetensors``.

    ``save(step, state, metadata)`` writes one (atomically); ``latest()`` is the newest step or
    ``None``; ``load(like, step=None)`` reads the newest (or the given) step, and ``restore``
    the newest intact one.

    Each checkpoint records the ``run`` it belongs to (a fresh id unless given; a resumed run
    passes the id :meth:`restore` returns). Rotation keeps the ``keep`` newest checkpoints
    *of this run* and never deletes another run's files, nor this run's newest checkpoint
    whose floating tensors are all finite (a diverged run cannot rotate away its last good
    state). Opening the directory removes temporaries that killed saves left behind.
    """

    _NAME = re.compile(r"^step_(\d+)\.safetensors$")

    def __init__(
        self, directory: str | os.PathLike, keep: int | None = 3, *, run: str | None = None
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer.keep must be >= 1 or None, got {keep}")
        self.directory, self.keep = Path(directory), keep
        self.run = run or uuid.uuid4().hex[:12]
        remove_stale(self.directory)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.safetensors"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (self._NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> Path:
        path = save(self.path(step), state, {**(metadata or {}), "step": step, "run": self.run})
        if self.keep is not None:
            self._rotate()
        return path

    def _rotate(self) -> None:
        assert self.keep is not None
        own: list[tuple[int, bool]] = []  # (step, finite) of this run's intact checkpoints
        for step in self.steps():
            try:
                meta = metadata(self.path(step))
            except CheckpointError:
                continue  # a damaged file is nobody's to delete silently
            if meta.get("run") == self.run:
                own.append((step, meta["finite"]))
        finite = [step for step, ok in own if ok]
        protected = {s for s, _ in own[-self.keep :]} | set(finite[-1:])
        for step, _ in own:
            if step not in protected:
                self.path(step).unlink(missing_ok=True)

    def load(self, like: Any = None, step: int | None = None) -> Any:
        step = self.latest() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        return load(self.path(step), like)

    def restore(self, like: Any = None, *, finite: bool = True) -> Restored | None:
        """The newest checkpoint that reads back intact (and, with ``finite``, holds only
        finite floats), or ``None`` when the directory has none. Damaged newer ones are passed
        over and listed in ``skipped``; a checkpoint that does not fit ``like`` is an error,
        not skipped (the run's configuration changed). ``like`` may be a function of the
        checkpoint's metadata that returns the template (when the template depends on what
        the run saved: its tokenizer, its config). From then on this checkpointer saves under
        the restored checkpoint's run id."""
        skipped: list[tuple[Path, str]] = []
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                meta = metadata(path)
                if finite and not meta["finite"]:
                    skipped.append((path, "it holds non-finite values"))
                    continue
                state = load(path, like(meta) if callable(like) else like)
            except DamagedCheckpoint as err:
                skipped.append((path, str(err)))
                continue
            self.run = meta.get("run", self.run)
            return Restored(step, state, skipped, meta)
        if skipped:
            reasons = "\n  ".join(f"{p.name}: {why}" for p, why in skipped)
            raise CheckpointError(f"no usable checkpoint in {self.directory}:\n  {reasons}")
        return None
