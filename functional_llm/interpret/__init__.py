"""Interpretability as pure functions: attribution of scores to inputs."""

from functional_llm.interpret.attribution import (
    Attribution,
    attention_rollout,
    gpt_token_attributions,
    gradient_x_input,
    integrated_gradients,
)

__all__ = [
    "Attribution",
    "attention_rollout",
    "gpt_token_attributions",
    "gradient_x_input",
    "integrated_gradients",
]
