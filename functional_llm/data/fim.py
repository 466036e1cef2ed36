"""Fill-in-the-middle (Bavarian et al. 2022): a document cut into prefix, middle and suffix is
trained in prefix-suffix-middle (PSM) order, so that a left-to-right model learns to write a
middle that joins a given prefix to a given suffix.

    <PRE> prefix <SUF> suffix <MID> middle <EOM>

The four sentinels are ids after the tokenizer's vocabulary (:class:`FIM`: ``V .. V + 3``),
so no text can forge them. :func:`FIM.transform` cuts a sequence at two points drawn uniformly
(a pure function of a key), with probability ``rate``, and otherwise keeps it as it is;
:func:`FIM.restore` is its inverse. :func:`FIM.windows` does it to training windows. To infill, give
the model :meth:`FIM.prompt` ``(prefix, suffix)`` and read its output up to ``<EOM>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functional_llm import random
from functional_llm.types import Key

__all__ = ["FIM", "SENTINELS"]

SENTINELS = ("prefix", "suffix", "middle", "end")


@dataclass(frozen=True)
class FIM:
    """Fill-in-the-middle sentinels after a vocabulary of ``base`` ids; the model reads
    ``vocab_size = base + 4`` ids."""

    base: int

    @property
    def vocab_size(self) -> int:
        return self.base + len(SENTINELS)

    def id(self, sentinel: str) -> int:
        return self.base + SENTINELS.index(sentinel)

    def _psm(
        self, prefix: torch.Tensor, middle: torch.Tensor, suffix: torch.Tensor
    ) -> torch.Tensor:
        s = [torch.tensor([self.id(n)], dtype=prefix.dtype, device=prefix.device)
             for n in SENTINELS]  # fmt: skip
        return torch.cat([s[0], prefix, s[1], suffix, s[2], middle, s[3]])

    def transform(self, key: Key, ids: torch.Tensor, rate: float) -> torch.Tensor:
        """``ids: (n,)`` in PSM order with probability ``rate`` (``n + 4`` ids), cut at two
        uniform points; otherwise ``ids`` as they are."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"FIM rate must be in [0, 1], got {rate}")
        if ids.ndim != 1:
            raise ValueError(f"FIM.transform: ids must be 1-D, got shape {tuple(ids.shape)}")
        k_use, k_cut = random.split(key)
        if not bool(random.bernoulli(k_use, rate, ())):
            return ids
        a, b = sorted(random.randint(k_cut, (2,), 0, len(ids) + 1).tolist())
        return self._psm(ids[:a], ids[a:b], ids[b:])

    def restore(self, ids: torch.Tensor) -> torch.Tensor:
        """The document of a PSM sequence (``ids`` without sentinels are returned as they are):
        the inverse of :meth:`transform`."""
        marks = [int(i) for i in ids if int(i) >= self.base]
        if not marks:
            return ids
        if marks != [self.id(n) for n in SENTINELS] or int(ids[0]) != self.id("prefix"):
            raise ValueError("FIM.restore: not a <PRE> .. <SUF> .. <MID> .. <EOM> sequence")
        at = {n: int((ids == self.id(n)).nonzero()[0]) for n in SENTINELS}
        prefix = ids[1 : at["suffix"]]
        suffix = ids[at["suffix"] + 1 : at["middle"]]
        middle = ids[at["middle"] + 1 : at["end"]]
        return torch.cat([prefix, middle, suffix])

    def windows(self, key: Key, batch: dict[str, torch.Tensor], rate: float) -> dict:
        """A batch of ``inputs``/``targets`` windows (``targets`` = ``inputs`` shifted by one)
        with each row, with probability ``rate``, rewritten to the same ``T + 1`` tokens:
        its first ``L`` tokens in PSM order (``L`` uniform in ``1 .. T - 3``), then the tokens
        that followed them. ``<EOM>`` so lands anywhere in the window, followed by ordinary
        text, and the middle's length is not the window's leftover (a model trained with
        every PSM sequence ending at the window's end learns to fill the window, never to
        stop). Row ``r`` uses ``fold_in(key, r)``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"FIM rate must be in [0, 1], got {rate}")
        tokens = torch.cat([batch["inputs"], batch["targets"][:, -1:]], dim=1)
        room = tokens.shape[1] - len(SENTINELS)
        if room < 1:
            raise ValueError(f"FIM.windows: windows of {tokens.shape[1]} tokens leave no room")
        rows = []
        for r, row in enumerate(tokens):
            k_use, k_len, k_cut = random.split(random.fold_in(key, r), 3)
            if not bool(random.bernoulli(k_use, rate, ())):
                rows.append(row)
                continue
            n = int(random.randint(k_len, (), 1, room + 1))
            rows.append(torch.cat([self.transform(k_cut, row[:n], 1.0), row[n:room]]))
        out = torch.stack(rows)
        return {**batch, "inputs": out[:, :-1], "targets": out[:, 1:]}

    def prompt(self, prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        """``<PRE> prefix <SUF> suffix <MID>``: the model continues with the middle and
        ``<EOM>``."""
        return self._psm(prefix, prefix[:0], suffix)[:-1]
