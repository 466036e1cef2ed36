"""functional_llm: Transformer language models in PyTorch as pure functions over pytrees.

import functional_llm as fl
model = fl.models.GPT(fl.models.GPTConfig(vocab_size=65, d_model=128, n_layers=4, n_heads=4))
params = model.init(fl.random.key(0))
logits = model.apply(params, tokens)
"""

from functional_llm import (
    checkpoint,
    data,
    finetune,
    generate,
    init,
    interop,
    lora,
    losses,
    metrics,
    models,
    nn,
    optim,
    parallel,
    random,
    testing,
    train,
    tree,
)
from functional_llm.interop import torch_nn

__version__ = "0.1.0"
__all__ = [
    "checkpoint",
    "data",
    "finetune",
    "generate",
    "init",
    "interop",
    "lora",
    "losses",
    "metrics",
    "models",
    "nn",
    "optim",
    "parallel",
    "random",
    "testing",
    "torch_nn",
    "train",
    "tree",
]
