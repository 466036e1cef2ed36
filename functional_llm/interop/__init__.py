"""Bridges to other libraries' modules and weights."""

from functional_llm.interop import torch_nn

__all__ = ["torch_nn"]
