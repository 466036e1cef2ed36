"""experiments/generate.py on a checkpoint that pretrain_gpt wrote: the same tokens as the
library's decoding, beam search and streaming, and user errors as one-line parse errors."""

import pytest
import torch

from experiments import generate as cli_generate
from experiments import pretrain_gpt
from functional_llm import checkpoint, random
from functional_llm import generate as G


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    (root / "text.txt").write_text("to be, or not to be: that is the question.\n" * 40)
    pretrain_gpt.main(["--data", str(root / "text.txt"), "--out-dir", str(root / "out"),
                       "--max-iters", "30", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                       "--block-size", "32", "--batch-size", "4", "--no-plot",
                       "--sample-chars", "40", "--eval-iters", "1"])  # fmt: skip
    return root / "out"


def test_greedy_output_is_the_librarys_decoding(run, capsys):
    result = cli_generate.main([str(run), "--prompt", "to be", "--prompt", "or", "--max-new-tokens",
                                "12"])  # fmt: skip
    said = capsys.readouterr().out
    model, params, tok = cli_generate.load(run)
    for prompt in ("to be", "or"):
        ids = torch.tensor([list(tok.encode(prompt))])
        want = G.generate(model, params, ids, max_new_tokens=12).tokens[0].tolist()
        assert f"--- {prompt!r} ---\n{tok.decode(want)}\n" in said
    assert result["tokens"] == 24 and "tokens/s" in said


def test_sampling_beams_streaming_and_a_checkpoint_file(run, capsys):
    newest = checkpoint.Checkpointer(run / "checkpoints").latest()
    path = run / "checkpoints" / f"step_{newest:08d}.safetensors"
    cli_generate.main([str(path), "--prompt", "to", "--num-beams", "3", "--num-return", "2",
                       "--max-new-tokens", "6"])  # fmt: skip
    said = capsys.readouterr().out
    assert "(#1, score " in said and "(#2, score " in said
    cli_generate.main([str(run), "--prompt", "to", "--temperature", "0.9", "--top-p", "0.9",
                       "--stream", "--max-new-tokens", "10", "--seed", "3"])  # fmt: skip
    streamed = capsys.readouterr().out.splitlines()[0]
    model, params, tok = cli_generate.load(run)
    keys = random.split(random.key(3), 1)
    want = G.generate(model, params, torch.tensor([list(tok.encode("to"))]), max_new_tokens=10,
                      key=keys, temperature=0.9, top_p=0.9)  # fmt: skip
    assert streamed == tok.decode(want.tokens[0, 2:].tolist())


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--top-p", "1.5", "--temperature", "1"], "--top-p must be in (0, 1], got 1.5"),
        (["--num-beams", "2", "--num-return", "3"], "--num-return 3 is more than --num-beams 2"),
        (["--top-k", "5"], "give a --temperature > 0"),
        (["--num-beams", "0"], "--num-beams: 0 must be > 0"),
    ],
)
def test_bad_flags_are_named(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_generate.parse_args(["somewhere", "--prompt", "x", *flags])
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_a_checkpoint_that_is_not_a_gpt_is_refused(tmp_path):
    path = tmp_path / "bert.safetensors"
    checkpoint.save(path, {"params": {"w": torch.ones(2)}}, {"config": {"type_vocab_size": 2}})
    with pytest.raises(checkpoint.CheckpointError, match="not a GPT checkpoint"):
        cli_generate.load(path)
