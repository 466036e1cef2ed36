"""Exported programs equal eager: ``torch.export`` (params as constants and as inputs) for every
family on drawn batch sizes and lengths other than the example's, the exported decoding start
and step against the eager cache, an AOTInductor package run by a script that never imports
functional_llm, and ONNX through onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import functional_llm as fl
from functional_llm import export as ex
from functional_llm.generate import cache as kv

M = fl.models
MAX = 24
ZOO = {
    "gpt2": lambda: M.GPT(
        M.GPTConfig.gpt2(vocab_size=97, max_seq_len=MAX, d_model=32, n_layers=2, n_heads=4)
    ),
    "llama": lambda: M.GPT(
        M.GPTConfig.llama(
            vocab_size=97, max_seq_len=MAX, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2
        )
    ),
    "bert": lambda: M.BERT(
        M.BERTConfig(
            vocab_size=97, max_seq_len=MAX, d_model=32, n_layers=2, n_heads=4, d_ff=48, dropout=0
        )
    ),
    "seq2seq": lambda: M.Transformer(
        M.TransformerConfig(
            src_vocab_size=97,
            tgt_vocab_size=89,
            d_model=32,
            nhead=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=48,
            max_seq_len=MAX,
            dropout=0.0,
        )
    ),
    "copy": lambda: M.Transformer(  # the seq2seq model on one vocabulary, with a copy head
        dataclasses.replace(ZOO["seq2seq"]().config, src_vocab_size=89, copy_source=True)
    ),
    "classifier": lambda: M.SequenceClassifier(ZOO["llama"](), num_labels=3),
}


def _inputs(model: Any, b: int, t: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random inputs of batch ``b`` and length ``t`` with right padding (a target of length
    ``max(1, t // 2)`` for the encoder-decoder)."""
    g = torch.Generator().manual_seed(seed)
    _, names, _ = ex.signature(model, b, t)
    out = []
    for name in names:
        length = max(1, t // 2) if name.startswith("tgt") else t
        if "valid" in name:
            n = torch.randint(1, length + 1, (b,), generator=g)
            out.append(torch.arange(length) < n[:, None])
        else:
            vocab = 2 if name == "token_types" else 89
            out.append(torch.randint(0, vocab, (b, length), generator=g))
    return tuple(out)


def _flat(x: Any) -> torch.Tensor:
    return torch.cat([t.flatten() for t in fl.tree.leaves(x)])


@pytest.fixture(scope="module", params=list(ZOO))
def exported(request: pytest.FixtureRequest) -> Any:
    model = ZOO[request.param]()
    params = model.init(fl.random.key(0))
    as_constants = ex.export_model(model, params)
    as_inputs = ex.export_model(model, params, params_as="inputs")
    return model, params, as_constants.module(), as_inputs.module()


@settings(max_examples=5, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, MAX), seed=st.integers(0, 2**16))
def test_exported_model_equals_eager(exported: Any, b: int, t: int, seed: int) -> None:
    model, params, constants, inputs = exported
    x = _inputs(model, b, t, seed)
    fn, _, _ = ex.signature(model, b, t)
    want = _flat(fn(params, *x))
    torch.testing.assert_close(_flat(constants(*x)), want, rtol=1e-5, atol=1e-5)
    other = model.init(fl.random.key(seed))  # params as inputs: any params of that shape
    torch.testing.assert_close(_flat(inputs(other, *x)), _flat(fn(other, *x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "seq2seq", "copy"])
def test_exported_decoding_equals_the_eager_cache(name: str) -> None:
    model = ZOO[name]()
    params = model.init(fl.random.key(1))
    start, step = ex.export_decoding(model, params, max_len=12)
    start, step = start.module(), step.module()
    x = torch.randint(0, 89, (3, 5))
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, :2] = False  # a left-padded prompt
    if name != "llama":
        cache, ref = start(x, valid), kv.encode(model, params, x, valid, max_len=12)
        tokens = torch.zeros(3, 1, dtype=torch.long)
    else:
        (logits, cache), (want, ref) = (
            start(x, valid),
            kv.prefill(model, params, x, valid, max_len=12),
        )
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        tokens = want[:, -1:].argmax(-1)
    for _ in range(6):
        (logits, cache), (want, ref) = (
            step(cache, tokens),
            kv.decode_step(model, params, ref, tokens),
        )
        torch.testing.assert_close(logits, want[:, -1:], rtol=1e-5, atol=1e-5)
        tokens = want[:, -1:].argmax(-1)


STANDALONE = """
import json, sys
import torch
from safetensors.torch import load_file
runner = torch._inductor.aoti_load_package(sys.argv[1])
data = load_file(sys.argv[2])
got = runner(data["tokens"], data["valid"])
error = float((got - data["logits"]).abs().max())
print(json.dumps({"error": error, "imported": "functional_llm" in sys.modules}))
"""


def test_an_aot_package_runs_without_the_library(tmp_path: Path) -> None:
    model = ZOO["llama"]()
    params = model.init(fl.random.key(2))
    package = ex.aot_package(ex.export_model(model, params), tmp_path / "model.pt2")
    tokens, valid = _inputs(model, 3, 17, seed=3)  # neither the example's batch nor length
    logits = model.apply(params, tokens, valid=valid)
    save_file({"tokens": tokens, "valid": valid, "logits": logits}, tmp_path / "io.safetensors")
    script = tmp_path / "run.py"
    script.write_text(STANDALONE)
    out = subprocess.run(
        [sys.executable, str(script), str(package), str(tmp_path / "io.safetensors")],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] is False
    assert result["error"] <= 1e-5


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_onnx_equals_eager_in_onnxruntime(name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = ZOO[name]()
    params = model.init(fl.random.key(4))
    path = ex.to_onnx(ex.export_model(model, params), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    fn, _, _ = ex.signature(model, 1, 1)
    for b, t in ((1, 3), (4, 19)):
        x = _inputs(model, b, t, seed=t)
        feeds = {i.name: v.numpy() for i, v in zip(session.get_inputs(), x, strict=True)}
        got = [torch.from_numpy(y) for y in session.run(None, feeds)]
        torch.testing.assert_close(_flat(got), _flat(fn(params, *x)), rtol=1e-4, atol=1e-4)


def test_bad_export_requests_are_clear_errors() -> None:
    model = ZOO["gpt2"]()
    params = model.init(fl.random.key(0))
    with pytest.raises(ValueError, match="params_as must be 'constants' or 'inputs'"):
        ex.export_model(model, params, params_as="weights")  # type: ignore[arg-type]
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="dynamic has 2 entries for 1 inputs"):
        ex.export(lambda p, t: model.apply(p, t), params, x, dynamic=[None, None])
    program = ex.export_model(model, params).module()
    too_long = torch.zeros(2, MAX + 1, dtype=torch.long)
    with pytest.raises(Exception, match=str(MAX)):
        program(too_long, torch.ones_like(too_long, dtype=torch.bool))
