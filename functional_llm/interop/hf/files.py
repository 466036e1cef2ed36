"""A Hugging Face model folder on disk: ``config.json`` and safetensors weights, one file or
sharded with ``model.safetensors.index.json``. Nothing here unpickles: a folder that only has
``pytorch_model.bin`` (a pickle, which can run code when loaded) is refused with a way out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from functional_llm.data.reading import read_json
from functional_llm.files import atomic_path, write_atomic
from functional_llm.interop.hf.mapping import MappingError

__all__ = ["read_config", "read_tensors", "write_folder"]

WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not (folder / CONFIG).exists():
        raise MappingError(f"{folder}: no {CONFIG}; a Hugging Face model folder has one")
    config = read_json(folder / CONFIG)
    if not isinstance(config, dict):
        raise MappingError(f"{folder / CONFIG}: expected a JSON object")
    return config


def read_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by name."""
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).exists():
        weight_map = read_json(folder / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MappingError(f"{folder / INDEX}: no 'weight_map' object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise MappingError(f"{folder / INDEX} names shard(s) that are not there: {absent}")
    else:
        pickles = [name for name in _PICKLES if (folder / name).exists()]
        if pickles:
            raise MappingError(
                f"{folder} holds only {pickles[0]}, a pickle; functional_llm never unpickles "
                "(loading one can run any code). In an environment you trust, convert it once "
                "with transformers: AutoModel.from_pretrained(folder).save_pretrained(out)"
            )
        raise MappingError(f"{folder}: no {WEIGHTS} and no {INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in tensors:
                    raise MappingError(f"{file}: tensor {name} is in more than one shard")
                tensors[name] = f.get_tensor(name)
    return tensors


def write_folder(
    folder: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` and ``model.safetensors``, each atomically. A folder that already
    holds files is refused unless ``overwrite``; then an old shard index (which would shadow the
    new single file) is removed."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass overwrite=True to replace its model")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: v.to("cpu") for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    if (folder / INDEX).exists():
        (folder / INDEX).unlink()
    write_atomic(folder / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder
