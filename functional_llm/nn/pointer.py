"""The pointer-generator's copy head: a decoder that can copy source tokens as well as generate
them (See, Liu and Manning, "Get To The Point", ACL 2017; Gu et al., "CopyNet", ACL 2016).

With decoder states ``h_t``, the encoder's memory ``m_s`` and the source ids ``x_s`` (one
vocabulary for both sides)::

    a_t,s = softmax_s((W_q h_t) . (W_k m_s) / sqrt(d))     attention over the real source tokens
    g_t   = sigmoid(w_g . h_t + b_g)                        the probability of copying
    p(y)  = (1 - g_t) softmax(logits_t)[y] + g_t sum_{s: x_s = y} a_t,s

A token that the output layer never learnt to produce (a name, a number, a format specifier
seen once) can still come out, with the weight the attention gives to where it stands in the
source. :meth:`Pointer.apply` returns ``log p``: a normalised distribution, which ``log_softmax``
leaves unchanged, so cross-entropy, label smoothing, greedy, sampling and beam search use it
where they would use logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from functional_llm.nn.linear import Linear
from functional_llm.nn.module import Layer, Params, axes_of, init_all

__all__ = ["Pointer"]


@dataclass(frozen=True, kw_only=True)
class Pointer(Layer):
    """Params: ``query`` and ``key`` (``d_model x d_model``, no bias) of the copy attention,
    and ``gate`` (``d_model -> 1``) of the copy probability."""

    d_model: int
    dtype: torch.dtype = torch.float32

    def _parts(self) -> dict[str, Linear]:
        d = self.d_model
        square = lambda: Linear(  # noqa: E731
            in_dims=d, out_dims=d, bias=False, in_axes=("embed",), out_axes=(None,),
            dtype=self.dtype,
        )  # fmt: skip
        gate = Linear(in_dims=d, out_dims=1, in_axes=("embed",), out_axes=(None,), dtype=self.dtype)
        return {"query": square(), "key": square(), "gate": gate}

    def init(self, key: torch.Tensor) -> Params:
        return init_all(self._parts(), key)

    def axes(self) -> Params:
        return axes_of(self._parts())

    def keys(self, params: Params, memory: torch.Tensor) -> torch.Tensor:
        """``W_k m``: the copy attention's keys ``(..., S, d_model)`` (a decoding cache computes
        them once per source)."""
        return self._parts()["key"].apply(params["key"], memory)

    def apply(
        self,
        params: Params,
        logits: torch.Tensor,
        h: torch.Tensor,
        keys: torch.Tensor,
        src: torch.Tensor,
        src_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log p (..., T, V)`` from the output layer's ``logits (..., T, V)``, the decoder
        states ``h (..., T, d)``, the :meth:`keys` of the memory ``(..., S, d)`` and the source
        ids ``src (..., S)`` (padding where ``src_valid`` is False). It is computed in float32
        at least; a source token's copy probability is floored at the dtype's smallest normal
        number before the log (the gradient of ``log 0`` would be NaN)."""
        parts, work = self._parts(), torch.promote_types(logits.dtype, torch.float32)
        q = parts["query"].apply(params["query"], h)
        scores = (q @ keys.transpose(-1, -2)).to(work) / math.sqrt(self.d_model)  # (..., T, S)
        if src_valid is not None:
            scores = scores.masked_fill(~src_valid[..., None, :].bool(), float("-inf"))
        attention = scores.softmax(-1)
        # Only the source's tokens gain copy mass: a_t,s summed over the positions holding the
        # same token as s, which is the same at every position holding it.
        same = src[..., :, None] == src[..., None, :]  # (..., S, S)
        copied = (attention @ same.to(work)).clamp_min(torch.finfo(work).tiny)  # (..., T, S)
        z = parts["gate"].apply(params["gate"], h).to(work)  # (..., T, 1): the copy logit
        generate = logits.to(work).log_softmax(-1) + F.logsigmoid(-z)  # (..., T, V)
        index = src[..., None, :].expand(copied.shape)
        mixed = torch.logaddexp(generate.gather(-1, index), copied.log() + F.logsigmoid(z))
        # A token at several positions is written once per position, all with one value; the
        # gradient goes through its first position only, or it would count once per copy.
        first = ~(same & torch.ones_like(same).tril(-1)).any(-1)  # (..., S)
        mixed = torch.where(first[..., None, :], mixed, mixed.detach())
        return generate.scatter(-1, index, mixed).to(logits.dtype)
