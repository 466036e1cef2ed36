"""The experiments on a Hugging Face folder: ``experiments.generate`` decodes a GPT-2 folder with
its ``tokenizer.json`` greedily as ``transformers`` does, and ``experiments.export`` writes
every format and reports each one equal to eager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from experiments import export as export_cli
from experiments import generate as generate_cli

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["hello world, hello there"] * 20, trainer)
    eot = tok.token_to_id("<|endoftext|>")
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32)
    config.update(dict(n_layer=2, n_head=4, bos_token_id=eot, eos_token_id=eot))
    tr.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_generate_decodes_a_hugging_face_folder_like_transformers(
    gpt2_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = generate_cli.main([str(gpt2_folder), "--prompt", "hello", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    fast = tr.AutoTokenizer.from_pretrained(gpt2_folder)
    reference = tr.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    prompt = torch.tensor([fast.encode("hello")])
    with torch.no_grad():
        want = reference.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    text = fast.decode(want[0], skip_special_tokens=True)
    assert text in printed
    assert result["tokens"] == want.shape[1] - prompt.shape[1]


def test_export_writes_every_format_equal_to_eager(
    gpt2_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    args = [str(gpt2_folder), "--out", str(tmp_path), "--batch", "3", "--length", "12"]
    table = export_cli.main([*args, "--repeats", "2"])
    assert set(table) == {"eager", "exported", "compiled", "aotinductor", "onnxruntime"}
    for name, row in table.items():
        assert row["max_abs_diff"] <= 1e-4, name
    assert "vs eager" in capsys.readouterr().out
    run = subprocess.run(
        [sys.executable, str(tmp_path / "run_package.py")], capture_output=True, text=True,
        check=True, cwd=tmp_path,
    )  # fmt: skip
    vocab = json.loads((gpt2_folder / "config.json").read_text())["vocab_size"]
    assert f"torch.Size([2, 16, {vocab}])" in run.stdout
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_cli.main([*args, "--skip", "aoti", "--skip", "compile", "--skip", "onnx"])
