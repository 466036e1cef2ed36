"""Interpretability as pure functions: attribution of scores to inputs, and the logit lens."""

from functional_llm.interpret.attribution import (
    Attribution,
    attention_rollout,
    gpt_token_attributions,
    gradient_x_input,
    integrated_gradients,
)
from functional_llm.interpret.lens import layer_states, logit_lens

__all__ = [
    "Attribution",
    "attention_rollout",
    "gpt_token_attributions",
    "gradient_x_input",
    "integrated_gradients",
    "layer_states",
    "logit_lens",
]
