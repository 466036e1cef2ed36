"""Pure layers: ``init(key) -> params``, ``apply(params, ...)``, ``axes()``."""

from functional_llm.nn import taps
from functional_llm.nn.attention import MultiHeadAttention, causal_mask, key_padding_mask
from functional_llm.nn.blocks import Block, DecoderBlock
from functional_llm.nn.dropout import Dropout, dropout, inference
from functional_llm.nn.embedding import Embedding
from functional_llm.nn.linear import Linear
from functional_llm.nn.mlp import ACTIVATIONS, MLP
from functional_llm.nn.module import Layer, check_tree, eval_shape
from functional_llm.nn.norm import LayerNorm, RMSNorm, make_norm
from functional_llm.nn.pointer import Pointer
from functional_llm.nn.positions import RopeScaling, positions_like, rope, sinusoidal
from functional_llm.nn.remat import remat
from functional_llm.nn.stacks import Decoder, EncoderDecoder, Stack

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Block",
    "Decoder",
    "DecoderBlock",
    "Dropout",
    "Embedding",
    "EncoderDecoder",
    "Layer",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "Pointer",
    "RMSNorm",
    "RopeScaling",
    "Stack",
    "causal_mask",
    "check_tree",
    "dropout",
    "eval_shape",
    "inference",
    "key_padding_mask",
    "make_norm",
    "positions_like",
    "remat",
    "rope",
    "sinusoidal",
    "taps",
]
