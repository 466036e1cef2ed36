"""Parallel text for translation and summarisation: readers, gettext catalogs, and the
encoder-decoder batch with its teacher-forcing shift.

    pairs = read_parallel("train.tsv")                     # [(source, target), ...]
    pairs = read_parallel("de/LC_MESSAGES/coreutils.mo")   # English msgid -> German msgstr
    batch = seq2seq_batch([(src_ids, tgt_ids), ...], pad_id=0, bos_id=1, eos_id=2)

Formats, by suffix: ``.tsv`` (``source<TAB>target`` per line, no header), ``.jsonl`` (one
object per line with ``source`` and ``target``, or the fields named), and gettext catalogs:
``.po`` (text) and compiled ``.mo`` (binary, the GNU layout that the standard library's
``gettext`` reads). A catalog gives the pairs that have a translation; its header entry,
untranslated and fuzzy entries are skipped, and a plural entry gives its singular forms.
Errors name the file and the line (or the entry).

The batch for :func:`functional_llm.losses.seq2seq`, with ``y`` a target's ids::

    tgt_in  = [BOS] y          tgt_out = y [EOS]          (IGNORE where tgt_in is padding)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_llm.data.reading import DataError, field, read_jsonl, read_text
from functional_llm.types import IGNORE

__all__ = ["read_catalog", "read_parallel", "seq2seq_batch"]

Pair = tuple[str, str]


def read_parallel(
    path: str | os.PathLike, *, source: str = "source", target: str = "target"
) -> list[Pair]:
    """``(source, target)`` pairs from a ``.tsv``, ``.jsonl``, ``.po`` or ``.mo`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".po", ".mo"):
        return read_catalog(path)
    if suffix == ".tsv":
        pairs = []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            columns = line.split("\t")
            if len(columns) != 2:
                raise DataError(f"{path}:{number}: expected 'source<TAB>target', got "
                                f"{len(columns)} column(s)")  # fmt: skip
            pairs.append((columns[0], columns[1]))
    elif suffix == ".jsonl":
        pairs = [
            (field(row, source, f"{path}:{n}", str), field(row, target, f"{path}:{n}", str))
            for n, row in read_jsonl(path)
        ]
    else:
        raise DataError(f"{path}: expected a .tsv, .jsonl, .po or .mo file")
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def read_catalog(path: str | os.PathLike) -> list[Pair]:
    """``(msgid, msgstr)`` for every translated entry of a ``.po`` or ``.mo`` catalog."""
    path = Path(path)
    entries = _read_mo(path) if path.suffix.lower() == ".mo" else _read_po(path)
    return [(source, target) for source, target in entries if source and target]


def _read_mo(path: Path) -> list[Pair]:
    """The GNU ``.mo`` layout: a magic number, then two tables of (length, offset) for the
    originals and the translations, the strings NUL-separated for plurals and
    ``context\\x04msgid`` for contexts; the charset comes from the header entry."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    if len(data) < 20:
        raise DataError(f"{path}: not a .mo catalog (too short)")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise DataError(f"{path}: not a .mo catalog (magic number {magic:#x})")
    _, count, originals, translations = struct.unpack(order + "4I", data[4:20])
    raw = []
    try:
        for i in range(count):
            (n_o, o_o), (n_t, o_t) = (
                struct.unpack(order + "2I", data[table + 8 * i : table + 8 * i + 8])
                for table in (originals, translations)
            )
            if o_o + n_o > len(data) or o_t + n_t > len(data):
                raise struct.error("a string runs past the end of the file")
            raw.append((data[o_o : o_o + n_o], data[o_t : o_t + n_t]))
    except struct.error as err:
        raise DataError(f"{path}: a damaged .mo catalog ({err})") from None
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            for line in msgstr.decode("ascii", "replace").splitlines():
                if line.lower().startswith("content-type:") and "charset=" in line:
                    charset = line.split("charset=")[1].strip() or "utf-8"
    try:
        return [(_singular(k.decode(charset)), _singular(v.decode(charset))) for k, v in raw]
    except (UnicodeDecodeError, LookupError) as err:
        raise DataError(f"{path}: its strings are not {charset} ({err})") from None


def _singular(text: str) -> str:
    """The singular form of a plural entry, without a message context."""
    return text.split("\x00")[0].split("\x04")[-1]


def _read_po(path: Path) -> list[Pair]:
    """A ``.po`` file's entries: ``msgid``/``msgstr`` (``msgstr[0]`` for plurals) with their
    continuation lines; fuzzy entries and obsolete (``#~``) ones are left out."""
    entries: list[Pair] = []
    current: dict[str, Any] = {}
    key = None
    fuzzy = False

    def finish() -> None:
        nonlocal current, fuzzy
        if "msgid" in current and not fuzzy:
            entries.append((current["msgid"], current.get("msgstr", "")))
        current, fuzzy = {}, False

    for number, line in enumerate(read_text(path).splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            finish()
            key = None
        elif stripped.startswith("#,") and "fuzzy" in stripped:
            fuzzy = True
        elif stripped.startswith("#"):
            continue
        elif stripped.startswith('"'):
            if key is None:
                raise DataError(f"{path}:{number}: a string continues no msgid or msgstr")
            current[key] += _unquote(path, number, stripped)
        else:
            word, _, rest = stripped.partition(" ")
            if word == "msgid" and "msgid" in current:
                finish()
            key = {"msgstr[0]": "msgstr"}.get(word, word)
            if key in ("msgid", "msgstr"):
                current[key] = _unquote(path, number, rest.strip())
            elif word in ("msgctxt", "msgid_plural") or word.startswith("msgstr["):
                key, current[word] = word, _unquote(path, number, rest.strip())
            else:
                raise DataError(f"{path}:{number}: unexpected {word!r} in a .po file")
    finish()
    return entries


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v"}  # fmt: skip


def _unquote(path: Path, number: int, text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise DataError(f"{path}:{number}: expected a quoted string, got {text!r}")
    out, body, i = [], text[1:-1], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def seq2seq_batch(
    examples: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_source: int | None = None,
    max_target: int | None = None,
) -> dict[str, torch.Tensor]:
    """``src``/``src_valid`` ``(B, S)`` and ``tgt_in``/``tgt_out``/``tgt_valid`` ``(B, T)``
    from ``(source ids, target ids)`` pairs, each side padded on the right to its own width.
    Sources are cut to ``max_source`` tokens, targets to ``max_target - 1`` (so that BOS or
    EOS still fits)."""
    if not examples:
        raise ValueError("seq2seq_batch: no examples")
    if max_target is not None and max_target < 2:
        raise ValueError(f"seq2seq_batch: max_target must be >= 2, got {max_target}")
    sources = [list(s)[:max_source] for s, _ in examples]
    targets = [list(t)[: None if max_target is None else max_target - 1] for _, t in examples]
    if any(len(s) == 0 for s in sources):
        raise ValueError("seq2seq_batch: a source has no tokens")
    width_s, width_t = max(map(len, sources)), max(map(len, targets)) + 1
    batch = len(examples)
    src = torch.full((batch, width_s), pad_id, dtype=torch.int64)
    tgt_in = torch.full((batch, width_t), pad_id, dtype=torch.int64)
    tgt_out = torch.full((batch, width_t), IGNORE, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
        src[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        tgt_in[i, : len(t) + 1] = torch.tensor([bos_id, *t], dtype=torch.int64)
        tgt_out[i, : len(t) + 1] = torch.tensor([*t, eos_id], dtype=torch.int64)
    lengths_s = torch.tensor([len(s) for s in sources])[:, None]
    lengths_t = torch.tensor([len(t) + 1 for t in targets])[:, None]
    return {
        "src": src,
        "src_valid": torch.arange(width_s)[None, :] < lengths_s,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_valid": torch.arange(width_t)[None, :] < lengths_t,
    }
