"""Model compression as transformations of the param pytree: weight-only quantisation
(:mod:`.quantize`), pruning (:mod:`.prune`) and distillation (:mod:`.distill`)."""

from functional_llm.compress.distill import distill, kl_divergence
from functional_llm.compress.prune import (
    apply_masks,
    head_importance,
    keep_pruned,
    magnitude_masks,
    neuron_importance,
    prune_heads,
    prune_neurons,
    sparsity_at,
)
from functional_llm.compress.quantize import (
    DEFAULT_TARGETS,
    Int4Weight,
    Int8Weight,
    dequantize,
    quantize,
)

__all__ = [
    "DEFAULT_TARGETS",
    "Int4Weight",
    "Int8Weight",
    "apply_masks",
    "dequantize",
    "distill",
    "head_importance",
    "keep_pruned",
    "kl_divergence",
    "magnitude_masks",
    "neuron_importance",
    "prune_heads",
    "prune_neurons",
    "quantize",
    "sparsity_at",
]
