"""Model compression as transformations of the param pytree: weight-only quantisation
(:mod:`.quantize`), pruning (:mod:`.prune`) and distillation (:mod:`.distill`)."""

from functional_llm.compress.quantize import (
    DEFAULT_TARGETS,
    Int4Weight,
    Int8Weight,
    dequantize,
    quantize,
)

__all__ = ["DEFAULT_TARGETS", "Int4Weight", "Int8Weight", "dequantize", "quantize"]
