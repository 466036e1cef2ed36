"""Fill-in-the-middle: the PSM transformation round-trips on drawn sequences and keys, keeps
windows their length, and a model pretrained with --fim-rate infills through generate.py
(prompted in PSM order, stopping at <EOM>; what a longer run writes is in the README)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import generate as cli_generate
from experiments import pretrain_gpt
from functional_llm import random
from functional_llm.data.fim import FIM
from functional_llm.generate import Generation

SEEDS = st.integers(0, 2**32 - 1)


@settings(max_examples=50)
@given(seed=SEEDS, n=st.integers(0, 40), rate=st.sampled_from([0.0, 0.5, 1.0]))
def test_the_psm_transformation_round_trips(seed: int, n: int, rate: float) -> None:
    fim = FIM(base=50)
    ids = random.randint(random.key(seed), (n,), 0, 50)
    moved = fim.transform(random.key(seed + 1), ids, rate)
    assert torch.equal(fim.restore(moved), ids)
    assert torch.equal(moved, fim.transform(random.key(seed + 1), ids, rate))  # a key's function
    if rate == 1.0:
        assert len(moved) == n + 4 and int(moved[0]) == fim.id("prefix")
        assert int(moved[-1]) == fim.id("end")
        suffix_at, middle_at = (
            int((moved == fim.id(s)).nonzero()[0]) for s in ("suffix", "middle")
        )
        prompt = fim.prompt(moved[1:suffix_at], moved[suffix_at + 1 : middle_at])
        assert torch.equal(prompt, moved[: middle_at + 1])  # what a model continues from
    if rate == 0.0:
        assert torch.equal(moved, ids)


@settings(max_examples=20)
@given(seed=SEEDS, rate=st.floats(0.0, 1.0))
def test_fim_windows_keep_their_length_and_shift(seed: int, rate: float) -> None:
    fim = FIM(base=30)
    tokens = random.randint(random.key(seed), (6, 17), 0, 30)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    out = fim.windows(random.key(seed + 1), batch, rate)
    assert out["inputs"].shape == (6, 16) and torch.equal(
        out["inputs"][:, 1:], out["targets"][:, :-1]
    )
    for row, original in zip(
        torch.cat([out["inputs"], out["targets"][:, -1:]], 1), tokens, strict=True
    ):
        if int(row.max()) >= 30:  # rewritten: a PSM sequence, then the text that followed it
            at = int((row == fim.id("end")).nonzero()[0])
            assert torch.equal(
                torch.cat([fim.restore(row[: at + 1]), row[at + 1 :]]), original[:-4]
            )
        else:
            assert torch.equal(row, original)


def test_fim_windows_end_their_middles_anywhere() -> None:
    """<EOM> lands at many places of a window: a middle's length is not the window's rest."""
    fim = FIM(base=30)
    tokens = random.randint(random.key(0), (64, 33), 0, 30)
    out = fim.windows(random.key(1), {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, 1.0)
    rows = torch.cat([out["inputs"], out["targets"][:, -1:]], 1)
    ends = {int((row == fim.id("end")).nonzero()[0]) for row in rows}
    assert len(ends) > 10 and min(ends) < 16


def test_bad_fim_requests_are_clear_errors() -> None:
    fim = FIM(base=10)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        fim.transform(random.key(0), torch.arange(5), 1.5)
    with pytest.raises(ValueError, match="not a <PRE>"):
        fim.restore(torch.tensor([fim.id("middle"), 1, fim.id("prefix")]))


def test_generate_infills_in_psm_order_and_stops_at_the_end_sentinel(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The CLI's plumbing, with the model's choice of tokens fixed: the prompt it decodes from
    is <PRE> prefix <SUF> suffix <MID>, and the middle is what comes before <EOM>."""
    (tmp_path / "code.txt").write_text("def add(a, b):\n    return a + b\n\n" * 40)
    tiny = ["--data", str(tmp_path / "code.txt"), "--max-iters", "2", "--n-layer", "1",
            "--n-embd", "16", "--n-head", "2", "--batch-size", "2", "--no-plot",
            "--sample-chars", "5", "--eval-iters", "1"]  # fmt: skip
    fim_run, plain = tmp_path / "fim", tmp_path / "plain"
    pretrain_gpt.main([*tiny, "--out-dir", str(fim_run), "--block-size", "64", "--fim-rate", "0.5"])
    pretrain_gpt.main([*tiny, "--out-dir", str(plain), "--block-size", "16"])
    with pytest.raises(ValueError, match="pretrain with --fim-rate to infill"):
        cli_generate.main([str(plain), "--prompt", "def", "--suffix", "x"])

    tok = cli_generate.load(fim_run)[2]
    fim = FIM(tok.vocab_size)
    prefix, suffix, middle = "def add(a, b):\n    ", "\n\n", "return a + b"
    want = fim.prompt(torch.as_tensor(tok.encode(prefix)), torch.as_tensor(tok.encode(suffix)))

    def scripted(model, params, prompt, **kw):  # the model "writes" the middle, then <EOM>
        assert torch.equal(prompt[0], want) and kw["eos_id"] == fim.id("end")
        new = torch.as_tensor([*tok.encode(middle), fim.id("end"), 0])[None]
        tokens = torch.cat([prompt, new], dim=1)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        valid[0, -2:] = False  # generate keeps neither the EOS nor what follows it
        return Generation(tokens, valid)

    monkeypatch.setattr(cli_generate.G, "generate", scripted)
    result = cli_generate.main([str(fim_run), "--prompt", prefix, "--suffix", suffix,
                                "--max-new-tokens", "20"])  # fmt: skip
    assert capsys.readouterr().out.endswith(f"{prefix}\u27e8{middle}\u27e9{suffix}\n")
    assert result["stopped"] == 1.0 and result["middle_chars"] == len(middle)
