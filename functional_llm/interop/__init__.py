"""Bridges to other libraries' modules and weights: ``torch_nn`` (``torch.nn`` layers) and
``hf`` (Hugging Face model folders)."""

from functional_llm.interop import hf, torch_nn

__all__ = ["hf", "torch_nn"]
