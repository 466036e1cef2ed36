"""Export to portable programs: ``torch.export``, an AOTInductor package and ONNX.

A pure function ``fn(params, *inputs)`` becomes a ``torch.export.ExportedProgram`` whose
inputs are the tensors ``inputs`` (``params_as="constants"``: the params are baked in as the
program's buffers, as a deployed model wants) or ``(params, *inputs)`` (``params_as="inputs"``:
one program serves any params of the same shapes). Axes named in ``dynamic`` take any size;
the same name is the same size (``{0: "batch", 1: "length"}`` on tokens and their mask).

    ep = export_model(model, params)                    # logits for (tokens, valid), any B, T
    aot_package(ep, "model.pt2")                        # C++-compiled; runs without this library
    to_onnx(ep, "model.onnx")                           # for onnxruntime and other runtimes
    start, step = export_decoding(model, params, max_len=128)   # prefill/encode and one step

A package is loaded with ``torch._inductor.aoti_load_package(path)`` and called with the
program's inputs; nothing of functional_llm is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import optree
import torch
from torch.export import Dim, ExportedProgram

from functional_llm import tree
from functional_llm.files import atomic_path
from functional_llm.generate.cache import KVCache, decode_step, encode, init_cache, prefill

__all__ = [
    "DecodingPrograms",
    "aot_package",
    "export",
    "export_decoding",
    "export_model",
    "signature",
    "to_onnx",
]

ParamsAs = Literal["constants", "inputs"]
DimSpec = Mapping[int, "str | Dim"] | None


class _Program(torch.nn.Module):
    """``fn`` as a module: params as buffers (constants) or as its first input."""

    def __init__(self, fn: Callable[..., Any], params: Any, params_as: ParamsAs) -> None:
        super().__init__()
        self.fn, self.params_as, self.spec = fn, params_as, tree.structure(params)
        self.buffer_names: list[str] = []
        if params_as == "constants":
            for i, (path, leaf) in enumerate(tree.flatten(params).items()):
                self.buffer_names.append(f"p{i}_{path.replace('.', '_')}")
                self.register_buffer(self.buffer_names[-1], leaf.detach())

    def forward(self, *args: Any) -> Any:
        if self.params_as == "inputs":
            return self.fn(*args)
        leaves = [getattr(self, name) for name in self.buffer_names]
        return self.fn(optree.tree_unflatten(self.spec, leaves), *args)


def export(
    fn: Callable[..., Any],
    params: Any,
    *inputs: Any,
    dynamic: Sequence[Any] | None = None,
    params_as: ParamsAs = "constants",
    limits: Mapping[str, int] | None = None,
) -> ExportedProgram:
    """``fn(params, *inputs)`` exported. ``dynamic[i]`` gives input ``i``'s dynamic axes,
    ``{axis: name}`` for a tensor or a pytree of those for a pytree input (None: static);
    ``limits`` caps a named size (``{"length": max_seq_len}``). Examples of a dynamic axis
    should have size >= 2 (torch.export specialises sizes 0 and 1)."""
    if params_as not in ("constants", "inputs"):
        raise ValueError(f"params_as must be 'constants' or 'inputs', got {params_as!r}")
    dims: dict[str, Dim] = {}

    def resolve(spec: DimSpec) -> dict[int, Dim] | None:
        if spec is None:
            return None
        out = {}
        for axis, d in spec.items():
            if isinstance(d, str):
                if d not in dims:
                    limit = (limits or {}).get(d)
                    dims[d] = Dim(d) if limit is None else Dim(d, max=limit)
                d = dims[d]
            out[axis] = d
        return out

    specs: list[Any] = [None] * len(inputs) if dynamic is None else list(dynamic)
    if len(specs) != len(inputs):
        raise ValueError(f"dynamic has {len(specs)} entries for {len(inputs)} inputs")
    is_spec = lambda x: x is None or isinstance(x, Mapping)  # noqa: E731
    shapes = [optree.tree_map(resolve, s, is_leaf=is_spec, none_is_leaf=True) for s in specs]
    args: tuple[Any, ...] = inputs
    if params_as == "inputs":
        args = (params, *inputs)
        shapes = [optree.tree_map(lambda _: None, params, none_is_leaf=True), *shapes]
    program = _Program(fn, params, params_as)
    return torch.export.export(program, args, dynamic_shapes={"args": tuple(shapes)})


def signature(
    model: Any, batch: int, length: int, device: torch.device | str = "cpu"
) -> tuple[Callable[..., Any], list[str], tuple]:
    """``model.apply`` as ``fn(params, *tensors)``, the tensors' names, and examples of them
    on ``device`` (random ids, ``valid`` all True): what :func:`export_model` exports, for a
    GPT, a BERT, a head on either, or the encoder-decoder."""
    c = getattr(model, "backbone", model).config
    g = torch.Generator().manual_seed(0)
    ids = lambda vocab: torch.randint(0, vocab, (batch, length), generator=g).to(device)  # noqa: E731
    ones = torch.ones(
        batch, length, dtype=torch.bool, device=device
    )  # (one tensor per input: aliased
    if hasattr(model, "core"):  # the encoder-decoder   # inputs would share their sizes)
        fn = lambda p, src, tgt, sv, tv: model.apply(p, src, tgt, src_valid=sv, tgt_valid=tv)  # noqa: E731
        example = (ids(c.src_vocab_size), ids(c.tgt_vocab_size), ones, ones.clone())
        return fn, ["src", "tgt", "src_valid", "tgt_valid"], example
    if hasattr(c, "type_vocab_size"):  # BERT
        fn = lambda p, tokens, types, valid: model.apply(p, tokens, types, valid=valid)  # noqa: E731
        return fn, ["tokens", "token_types", "valid"], (ids(c.vocab_size), ids(2), ones)
    fn = lambda p, tokens, valid: model.apply(p, tokens, valid=valid)  # noqa: E731
    return fn, ["tokens", "valid"], (ids(c.vocab_size), ones)


def export_model(
    model: Any,
    params: Any,
    *,
    params_as: ParamsAs = "constants",
    example_batch: int = 2,
    example_length: int = 8,
) -> ExportedProgram:
    """``model.apply`` exported with dynamic batch and lengths, on the params' device: the
    inputs are ``(tokens,
    valid)`` for GPT and the task heads, ``(tokens, token_types, valid)`` for BERT and ``(src,
    tgt, src_valid, tgt_valid)`` for the encoder-decoder (source and target lengths apart)."""
    limit = getattr(model, "backbone", model).config.max_seq_len
    where = tree.leaves(params)[0].device
    fn, names, example = signature(model, example_batch, min(example_length, limit), where)
    dynamic = [{0: "batch", 1: "tgt_length" if n.startswith("tgt") else "length"} for n in names]
    limits = {"length": limit, "tgt_length": limit}
    return export(fn, params, *example, dynamic=dynamic, params_as=params_as, limits=limits)


class DecodingPrograms(NamedTuple):
    """``start``: ``(tokens, valid) -> (logits, cache)`` (prefill) for a decoder-only model,
    ``(src, src_valid) -> cache`` (encode) for an encoder-decoder one; ``step``: ``(cache,
    tokens (B, 1)) -> (logits (B, 1, vocab), cache)``. Batch and prompt or source length are
    dynamic; the cache holds ``max_len`` slots."""

    start: ExportedProgram
    step: ExportedProgram


def export_decoding(
    model: Any, params: Any, *, max_len: int, params_as: ParamsAs = "constants"
) -> DecodingPrograms:
    """The decoding engine's two functions exported (:mod:`functional_llm.generate.cache`)."""
    batch, length = 2, min(4, max_len)
    seq2seq = hasattr(model, "core")
    where = tree.leaves(params)[0].device
    _, _, (ids, *_) = signature(model, batch, length, where)
    ones = torch.ones(batch, length, dtype=torch.bool, device=where)
    pad_dims = {0: "batch", 1: "length"}
    if seq2seq:
        start = export(
            lambda p, src, valid: encode(model, p, src, valid, max_len=max_len),
            params, ids, ones, dynamic=[pad_dims, pad_dims], params_as=params_as,
            limits={"length": model.config.max_seq_len},
        )  # fmt: skip
        cache = encode(model, params, ids, ones, max_len=max_len)
    else:
        start = export(
            lambda p, tokens, valid: prefill(model, p, tokens, valid, max_len=max_len),
            params, ids, ones, dynamic=[pad_dims, pad_dims], params_as=params_as,
            limits={"length": max_len},
        )  # fmt: skip
        cache = init_cache(model, batch, max_len, where)
    no_index: Any = cache._replace(index=None)
    rows: Any = optree.tree_map(lambda _: {0: "batch"}, no_index)
    cache_dims = cast(KVCache, rows)._replace(index=None)  # every leaf has rows but the index
    if seq2seq:
        source = {0: "batch", 2: "length"}
        cache_dims = cache_dims._replace(
            memory_k=tuple(source for _ in cache.memory_k),
            memory_v=tuple(source for _ in cache.memory_v),
            memory_valid={0: "batch", 1: "length"},
            copy=tuple({0: "batch", 1: "length"} for _ in cache.copy),
        )
    token = ids[:, :1]
    step = export(
        lambda p, cache, tokens: decode_step(model, p, cache, tokens, last_only=True),
        params, cache, token, dynamic=[cache_dims, {0: "batch"}], params_as=params_as,
        limits={"length": model.config.max_seq_len},
    )  # fmt: skip
    return DecodingPrograms(start, step)


def aot_package(program: ExportedProgram, path: str | os.PathLike) -> Path:
    """Compile ``program`` ahead of time with AOTInductor into a ``.pt2`` package, written
    atomically. Load it with ``torch._inductor.aoti_load_package(path)``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    return path


def to_onnx(program: ExportedProgram, path: str | os.PathLike) -> Path:
    """``program`` as an ONNX model (``torch.onnx.export(dynamo=True)``; needs the ``onnx``
    and ``onnxscript`` packages), written atomically, its dynamic axes kept."""
    path = Path(path)
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    if onnx_program is None:  # pragma: no cover (only without dynamo=True)
        raise RuntimeError("torch.onnx.export returned nothing")
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)  # one file (models under 2 GB)
    return path
