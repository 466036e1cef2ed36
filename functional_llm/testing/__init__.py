"""A property-testing kit for models and optimizers, yours and the library's.

* **Assertions** on pytrees whose failures name each differing leaf by path
  (:func:`assert_trees_close`, :func:`assert_trees_equal`).
* **Strategies** (hypothesis): :func:`keys`, tiny configs of every family (:func:`gpt_configs`,
  :func:`bert_configs`, :func:`transformer_configs`), :func:`params_of`, padded
  :func:`token_batches`, :func:`adamw_hyperparams`.
* **Checks** of the properties every model and optimizer here has: causality, padding
  invariance, batch independence, eager = vmapped (= compiled), gradients against float64
  finite differences, optimizer purity and state round trip through a checkpoint.

    from functional_llm import testing

    @hypothesis.given(cfg=testing.gpt_configs(), key=testing.keys())
    def test_my_model_is_causal(cfg, key):
        model = MyModel(cfg)
        params = model.init(key)
        tokens = fl.random.randint(key, (2, cfg.max_seq_len), 0, cfg.vocab_size)
        testing.check_causal(lambda t: model.apply(params, t), tokens, cfg.vocab_size)
"""

from functional_llm.testing.checks import (
    check_batch_independence,
    check_causal,
    check_gradients,
    check_optimizer_pure,
    check_padding_invariance,
    check_state_round_trip,
    check_transforms_agree,
)
from functional_llm.testing.strategies import (
    adamw_hyperparams,
    bert_configs,
    gpt_configs,
    keys,
    params_of,
    token_batches,
    transformer_configs,
)
from functional_llm.testing.trees import assert_trees_close, assert_trees_equal

__all__ = [
    "adamw_hyperparams",
    "assert_trees_close",
    "assert_trees_equal",
    "bert_configs",
    "check_batch_independence",
    "check_causal",
    "check_gradients",
    "check_optimizer_pure",
    "check_padding_invariance",
    "check_state_round_trip",
    "check_transforms_agree",
    "gpt_configs",
    "keys",
    "params_of",
    "token_batches",
    "transformer_configs",
]
