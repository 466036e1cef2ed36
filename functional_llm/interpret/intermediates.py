"""Every family's intermediates from one forward pass, through the layers' taps
(:mod:`functional_llm.nn.taps`): no model code changes and ``apply`` keeps its return type.

``model`` is any of the library's models (GPT, BERT, the encoder-decoder ``Transformer``, a task
head on a backbone) and ``*inputs, **kwargs`` are what its ``apply`` takes. A model has one
stack of blocks (``blocks``; a head's is ``backbone.blocks``) or two (``encoder.blocks`` and
``decoder.blocks``); ``stack`` picks one by its path (by default the only one, or the decoder).

    out, acts = fl.interpret.capture(model.apply, params, tokens)   # every site
    states = hidden_states(model, params, tokens)    # [input of block 0, output of each block]
    maps = attention_weights(model, params, tokens)  # per layer (..., heads, T, S)
    out = patch(model, params, {"blocks.1.output": states[2]}, tokens)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from functional_llm.nn.taps import Patch, capture

__all__ = [
    "attention_weights",
    "check_layer",
    "hidden_states",
    "layers",
    "n_layers",
    "patch",
    "stack_path",
]


def layers(acts: Mapping[str, torch.Tensor], pattern: str) -> list[torch.Tensor]:
    """The values of the sites matching ``pattern`` with one ``*`` standing for the layer
    index (``"blocks.*.attn.weights"``), in layer order."""
    regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    found = sorted((int(m.group(1)), v) for k, v in acts.items() if (m := regex.match(k)))
    return [v for _, v in found]


def stack_path(params: Any, stack: str | None = None) -> str:
    """The path of the params that hold a stack's ``blocks`` (``""`` for a GPT or BERT,
    ``"decoder"``/``"encoder"`` for the encoder-decoder, ``"backbone"`` for a task head)."""
    found = sorted(_stacks(params, ""))
    if stack is not None:
        if stack not in found:
            raise ValueError(f"stack {stack!r} is not in the params; their stacks are {found}")
        return stack
    if len(found) == 1:
        return found[0]
    decoders = [p for p in found if p.split(".")[-1] == "decoder"]
    if len(decoders) == 1:
        return decoders[0]
    raise ValueError(f"the params hold several stacks {found}: pass stack= one of them")


def _stacks(params: Any, path: str) -> list[str]:
    if not isinstance(params, Mapping):
        return []
    here = [path] if isinstance(params.get("blocks"), list) else []
    below = (_stacks(v, f"{path}.{k}" if path else str(k)) for k, v in params.items())
    return here + [p for paths in below for p in paths]


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def n_layers(params: Any, stack: str | None = None) -> int:
    """How many blocks the chosen stack has."""
    node = params
    for part in filter(None, stack_path(params, stack).split(".")):
        node = node[part]
    return len(node["blocks"])


def check_layer(params: Any, layer: int, stack: str | None = None) -> int:
    """``layer`` as a non-negative index into the stack's blocks, or a clear error."""
    n = n_layers(params, stack)
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range: the stack has {n} blocks (0..{n - 1})")
    return layer % n


def hidden_states(
    model: Any, params: Any, *inputs: Any, stack: str | None = None, **kwargs: Any
) -> list[torch.Tensor]:
    """The residual stream of a stack: the first block's input, then each block's output,
    ``n_layers + 1`` tensors ``(..., T, d_model)`` (without the stack's final norm, as the
    logit lens reads them)."""
    at = _prefix(stack_path(params, stack))
    only = (f"{at}blocks.0.input", f"{at}blocks.*.output")
    _, acts = capture(model.apply, params, *inputs, only=only, **kwargs)
    return [acts[f"{at}blocks.0.input"], *layers(acts, f"{at}blocks.*.output")]


def attention_weights(
    model: Any,
    params: Any,
    *inputs: Any,
    stack: str | None = None,
    kind: str = "attn",
    **kwargs: Any,
) -> list[torch.Tensor]:
    """Each block's attention probabilities ``(..., heads, T, S)``: self-attention
    (``kind="attn"``) or a decoder's cross-attention (``kind="cross"``)."""
    if kind not in ("attn", "cross"):
        raise ValueError(f"kind must be 'attn' or 'cross', got {kind!r}")
    pattern = f"{_prefix(stack_path(params, stack))}blocks.*.{kind}.weights"
    _, acts = capture(model.apply, params, *inputs, only=pattern, **kwargs)
    return layers(acts, pattern)


def patch(
    model: Any, params: Any, patches: Mapping[str, Patch], *inputs: Any, **kwargs: Any
) -> Any:
    """``model.apply(params, *inputs, **kwargs)`` with the named sites replaced (a tensor, or a
    function of the site's value): activation patching and ablation as a pure function."""
    out, _ = capture(model.apply, params, *inputs, only=(), patch=patches, **kwargs)
    return out
