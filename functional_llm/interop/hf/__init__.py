"""Hugging Face model folders in and out: ``load(path) -> (model, params)`` and
``save(model, params, path)``.

Supported: GPT-2 and Llama (as :class:`~functional_llm.models.GPT`), BERT with its
pretraining heads (:class:`~functional_llm.models.BERT`) and Marian
(:class:`~functional_llm.models.Transformer`).
Each family's config mapping and parameter-name table is in one module (``decoder``, ``bert``,
``marian``); a config field we cannot honour is refused by name instead of loading a model that
is subtly different, and a missing, extra or misshapen tensor is named. Only safetensors files
are read; ``transformers`` is not needed to load or save (it is the reference in the tests).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from functional_llm.interop.hf.bert import BERT_FAMILY
from functional_llm.interop.hf.decoder import GPT2, LLAMA
from functional_llm.interop.hf.family import Family
from functional_llm.interop.hf.files import read_config, read_tensors, write_folder
from functional_llm.interop.hf.mapping import MappingError, from_hf, to_hf
from functional_llm.interop.hf.marian import MARIAN, marian_positions
from functional_llm.models import BERT, GPT, Transformer

__all__ = ["FAMILIES", "MappingError", "family_of", "load", "marian_positions", "save"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, LLAMA, BERT_FAMILY, MARIAN)}


def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """The model a Hugging Face folder describes and its params (on the CPU), in ``dtype`` or
    the checkpoint's own floating dtype."""
    hf = read_config(path)
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise MappingError(
            f"{Path(path) / 'config.json'}: model_type {kind!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[kind]
    tensors = read_tensors(path)
    if tensors and not any(name.startswith(family.prefix) for name in tensors):
        tensors = {family.prefix + name: t for name, t in tensors.items()}  # a bare base model
    tensors = family.untie(tensors, hf)
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = dtype or (floating[0] if floating else torch.float32)
    config = family.config_from_hf(hf)
    config = dataclasses.replace(config, dtype=dtype)
    model = family.make_model(config)
    params = from_hf(
        model,
        family.rules(config),
        tensors,
        ignore=family.ignored(tensors),
        source=str(path),
        dtype=dtype,
    )
    return model, params


def family_of(model: Any) -> Family:
    """The Hugging Face family that ``model`` is saved as."""
    if isinstance(model, GPT):
        return LLAMA if model.config.positions == "rope" else GPT2
    if isinstance(model, BERT):
        return BERT_FAMILY
    if isinstance(model, Transformer):
        return MARIAN
    raise MappingError(f"no Hugging Face family for a {type(model).__name__}")


def save(
    model: Any, params: Any, path: str | os.PathLike, *, overwrite: bool = False, **fields: Any
) -> Path:
    """Write a folder that ``transformers``' ``from_pretrained`` loads: ``config.json`` (the
    model's config mapped to the family's, plus any ``fields``, e.g. ``eos_token_id``) and
    ``model.safetensors``. Refuses a config the family cannot express, naming the field."""
    family = family_of(model)
    config = family.config_to_hf(model.config)
    tensors, tied = family.tie(to_hf(model, family.rules(model.config), params), model.config)
    dtypes = {t.dtype for t in tensors.values()}
    config |= tied | {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32",
        **fields,
    }
    return write_folder(path, config, tensors, overwrite=overwrite)
