"""Interpretability as pure functions: intermediates and patching through the layers' taps,
attribution of scores to inputs, the logit and tuned lenses, and pictures of them."""

from functional_llm.interpret import pictures
from functional_llm.interpret.attribution import (
    Attribution,
    attention_rollout,
    gradient_x_input,
    integrated_gradients,
    log_prob,
    token_attributions,
)
from functional_llm.interpret.intermediates import (
    attention_weights,
    check_layer,
    hidden_states,
    layers,
    n_layers,
    patch,
    stack_path,
)
from functional_llm.interpret.lens import (
    fit_tuned_lens,
    init_tuned_lens,
    logit_lens,
    readout,
    tuned_lens,
)
from functional_llm.nn.taps import PatchError, capture

__all__ = [
    "Attribution",
    "PatchError",
    "attention_rollout",
    "attention_weights",
    "capture",
    "check_layer",
    "fit_tuned_lens",
    "gradient_x_input",
    "hidden_states",
    "init_tuned_lens",
    "integrated_gradients",
    "layers",
    "log_prob",
    "logit_lens",
    "n_layers",
    "patch",
    "pictures",
    "readout",
    "stack_path",
    "token_attributions",
    "tuned_lens",
]
