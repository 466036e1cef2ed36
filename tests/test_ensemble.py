"""Ensembles as one vmapped step: N members equal N separate runs step for step (each with its
own dropout keys, learning rate and batch), compiled once, checkpointed whole; members that
do not match are refused by name."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import functional_llm as fl
from functional_llm import checkpoint, ensemble, losses, optim, random, train
from functional_llm.testing import assert_trees_close

# No biases: a key bias has an exactly zero gradient (softmax ignores a shift shared by all
# keys), so Adam would turn rounding noise of order 1e-9 into steps of the learning rate, in
# whichever direction the noise points, and no two evaluation orders would agree on them.
CFG = fl.models.GPTConfig(vocab_size=37, max_seq_len=16, d_model=32, n_layers=2, n_heads=4,
                          dropout=0.1, bias=False)  # fmt: skip
MODEL = fl.models.GPT(CFG)
LRS = [3e-4, 1e-3, 3e-3]


def _setup(n: int = 3) -> tuple:
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
    step = train.make_step(losses.next_token(MODEL), opt, clip_norm=1.0, grad_method="func")
    keys = random.split(random.key(0), n)
    states = ensemble.set_hyperparams(
        ensemble.init_states(MODEL.init, opt, keys), learning_rate=LRS[:n]
    )
    return opt, step, keys, states


def _batch(seed: int, lead: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    tokens = random.randint(random.key(seed), (*lead, 4, 17), 0, 37)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}


def _alone(opt, step, key, lr: float, batches) -> tuple[list, train.TrainState]:
    """Member ``key``'s run on its own, as a user would start it."""
    k_init, k_run = random.split(key)
    state = train.init_state(MODEL.init(k_init), opt, k_run)
    hyper = {**state.opt_state.hyperparams, "learning_rate": torch.tensor(lr)}
    state = state._replace(opt_state=state.opt_state._replace(hyperparams=hyper))
    seen = []
    for b in batches:
        state, m = step(state, b)
        seen.append(m["loss"])
    return seen, state


@pytest.mark.parametrize("shared", [True, False])
def test_a_vmapped_ensemble_equals_separate_runs_step_for_step(shared: bool) -> None:
    opt, step, keys, states = _setup()
    batches = [_batch(s, () if shared else (3,)) for s in range(3)]
    members_step = ensemble.make_step(step, shared_batch=shared)
    stacked_losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-example fallback loop (e.g. SDPA's) under vmap
        for b in batches:
            states, metrics = members_step(states, b)
            stacked_losses.append(metrics["loss"])
    assert metrics["learning_rate"].tolist() == pytest.approx(LRS)
    for i, key in enumerate(keys):
        own = [b if shared else {k: v[i] for k, v in b.items()} for b in batches]
        seen, alone = _alone(opt, step, key, LRS[i], own)
        torch.testing.assert_close(torch.stack([x[i] for x in stacked_losses]), torch.stack(seen),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        assert_trees_close(ensemble.index(states, i).params, alone.params, rtol=1e-5, atol=1e-6)
    losses_now = stacked_losses[-1]
    assert len(set(losses_now.tolist())) == 3  # the members really differ


@pytest.mark.slow  # an inductor compile of the vmapped step (about a minute)
def test_the_ensemble_step_compiles_once() -> None:
    _, step, _, states = _setup()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    eager_step = ensemble.make_step(step)
    compiled = fl.train.compile(eager_step, backend=counter)
    eager = states
    for s in range(3):
        eager, want = eager_step(eager, _batch(s))
        states, got = compiled(states, _batch(s))
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-5)
    assert_trees_close(states.params, eager.params, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_stack_index_unstack_and_checkpoint_round_trip(tmp_path: Path) -> None:
    _, _, _, states = _setup()
    assert ensemble.members(states) == 3
    parts = ensemble.unstack(states)
    assert_trees_close(ensemble.stack(parts), states, rtol=0, atol=0)
    checkpoint.save(tmp_path / "ensemble.safetensors", states)
    back = checkpoint.load(tmp_path / "ensemble.safetensors", like=states)
    fl.testing.assert_trees_equal(back, states)
    with pytest.raises(IndexError, match="member 3 of an ensemble of 3"):
        ensemble.index(states, 3)


def test_mismatched_members_and_hyperparameters_are_clear_errors() -> None:
    _, _, _, states = _setup()
    small = fl.models.GPT(fl.models.GPTConfig(**{**CFG.__dict__, "d_model": 16}))
    with pytest.raises(ValueError, match=r"member 1's blocks.0.attn.k.w is \(16, 4, 4\)"):
        ensemble.stack([MODEL.init(random.key(0)), small.init(random.key(0))])
    untied = fl.models.GPT(fl.models.GPTConfig(**{**CFG.__dict__, "tie_embeddings": False}))
    with pytest.raises(ValueError, match=r"in structure: missing \[\], extra \['unembed.w'\]"):
        ensemble.stack([MODEL.init(random.key(0)), untied.init(random.key(0))])
    with pytest.raises(ValueError, match=r"learning_rate has \(2,\) values for 3 members"):
        ensemble.set_hyperparams(states, learning_rate=[1e-3, 1e-4])
    with pytest.raises(KeyError, match=r"\['momentum'\] are not injected"):
        ensemble.set_hyperparams(states, momentum=[0.9, 0.9, 0.9])
    plain = ensemble.init_states(MODEL.init, optim.adamw(1e-3), random.split(random.key(0), 2))
    with pytest.raises(ValueError, match="injects no hyperparameters"):
        ensemble.set_hyperparams(plain, learning_rate=[1e-3, 1e-4])
