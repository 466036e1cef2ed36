"""functional_llm: Transformer language models in PyTorch as pure functions over pytrees.

import functional_llm as fl
model = fl.models.GPT(fl.models.GPTConfig(vocab_size=65, d_model=128, n_layers=4, n_heads=4))
params = model.init(fl.random.key(0))
logits = model.apply(params, tokens)

The submodules load on first use (``fl.parallel`` brings in ``torch.distributed``, ``fl.data``
the tokenizers), so ``import functional_llm`` costs little more than ``import torch`` and
changes no global setting of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from functional_llm import (
        allocator,
        checkpoint,
        compress,
        curvature,
        data,
        ensemble,
        export,
        finetune,
        generate,
        init,
        interop,
        interpret,
        lora,
        losses,
        metrics,
        models,
        nn,
        optim,
        parallel,
        privacy,
        random,
        runs,
        testing,
        train,
        tree,
    )
    from functional_llm.interop import torch_nn

__version__ = "0.1.0"
__all__ = [
    "allocator",
    "checkpoint",
    "compress",
    "curvature",
    "data",
    "ensemble",
    "export",
    "finetune",
    "generate",
    "init",
    "interop",
    "interpret",
    "lora",
    "losses",
    "metrics",
    "models",
    "nn",
    "optim",
    "parallel",
    "privacy",
    "random",
    "runs",
    "testing",
    "torch_nn",
    "train",
    "tree",
]
_MODULES = {name: f"functional_llm.{name}" for name in __all__}
_MODULES["torch_nn"] = "functional_llm.interop.torch_nn"


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'functional_llm' has no attribute {name!r}")
    module = importlib.import_module(_MODULES[name])
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
