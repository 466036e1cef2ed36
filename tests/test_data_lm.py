"""Tokenizers round-trip any text; token files round-trip; windows are pure functions of a key."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functional_llm import data, random

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@given(text=texts)
def test_char_and_byte_tokenizers_round_trip(text):
    char = data.CharTokenizer.train(text or "x")
    assert char.decode(char.encode(text)) == text
    ids = data.ByteTokenizer().encode(text)
    assert data.ByteTokenizer().decode(ids) == text
    assert ids.max(initial=0) < 256


def test_tokenizers_save_load_and_unknown_characters(tmp_path):
    char = data.CharTokenizer.train("hello world")
    char.save(tmp_path / "char.json")
    assert data.load_tokenizer(tmp_path / "char.json") == char
    data.ByteTokenizer().save(tmp_path / "byte.json")
    assert isinstance(data.load_tokenizer(tmp_path / "byte.json"), data.ByteTokenizer)
    with pytest.raises(ValueError, match="character 'z' at position 4 is not in the vocabulary"):
        char.encode("helloz"[:4] + "z")
    assert char.vocab_size == 8


@given(ids=st.lists(st.integers(0, 70_000), max_size=50), big=st.booleans())
def test_token_files_round_trip(tmp_path_factory, ids, big):
    path = tmp_path_factory.mktemp("tok") / "train.bin"
    ids = [i % 65_536 for i in ids] if not big else ids
    data.write_tokens(path, np.array(ids, dtype=np.int64))
    wide = max(ids, default=0) >= 65_536
    back = data.read_tokens(path, "uint32" if wide else "uint16")
    assert back.tolist() == ids


def test_windows_are_a_pure_function_of_the_key_and_shift_by_one(tmp_path):
    tokens = np.arange(1000) % 97
    data.write_tokens(tmp_path / "t.bin", tokens)
    mapped = data.read_tokens(tmp_path / "t.bin")
    key = random.key(3)
    a = data.sample_windows(mapped, key, 8, 16)
    b = data.sample_windows(torch.from_numpy(tokens), key, 8, 16)
    for name in ("inputs", "targets"):
        assert torch.equal(a[name], b[name]) and a[name].shape == (8, 16)
    assert torch.equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    c = data.sample_windows(mapped, random.key(4), 8, 16)
    assert not torch.equal(a["inputs"], c["inputs"])
    # Every window is a contiguous slice: in this corpus consecutive tokens differ by 1 mod 97.
    assert ((a["inputs"][:, 1:] - a["inputs"][:, :-1]) % 97 == 1).all()


def test_eval_windows_cover_each_token_once_and_dataset_agrees():
    tokens = torch.arange(103)
    batches = list(data.eval_windows(tokens, batch_size=4, block_size=10))
    inputs = torch.cat([b["inputs"] for b in batches])
    assert torch.equal(inputs.flatten(), torch.arange(100))
    dataset = data.TokenWindows(tokens, 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    assert torch.equal(torch.cat([b["inputs"] for b in loader]), inputs)
    assert len(list(data.eval_windows(tokens, 4, 10, max_batches=2))) == 2
    with pytest.raises(ValueError, match="cannot fill a window"):
        data.sample_windows(tokens[:5], random.key(0), 2, 10)
