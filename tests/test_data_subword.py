"""Subword tokenizers: offsets point back into the text, byte-level BPE is lossless, pairs get
BERT's template and truncation, and a saved tokenizer encodes exactly as before."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from functional_llm.data import SubwordTokenizer, load_tokenizer

WORDS = "the cat sat on a mat while dogs ran far away and birds sang songs of old".split()  # noqa: SIM905
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) + "." for i in range(len(WORDS))] * 20


@pytest.fixture(scope="module")
def wordpiece():
    return SubwordTokenizer.train(CORPUS, vocab_size=120, kind="wordpiece")


@pytest.fixture(scope="module")
def bpe():
    return SubwordTokenizer.train(CORPUS, vocab_size=300, kind="bpe")


sentences = st.lists(
    st.sampled_from([*WORDS, "Cats", "zebra", "!", ",", "x1"]), min_size=1, max_size=12
).map(" ".join)


@given(text=sentences)
def test_wordpiece_offsets_recover_each_token(wordpiece, text):
    enc = wordpiece.tokenize(text)
    for i, (start, end) in zip(enc.ids, enc.offsets, strict=True):
        piece = wordpiece.token(int(i))
        if piece != "[UNK]":
            assert text[start:end].lower() == piece.removeprefix("##")


@given(text=st.text(max_size=60))
def test_byte_level_bpe_is_lossless(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@given(text=sentences)
def test_bpe_offsets_cover_the_text_without_spaces(bpe, text):
    enc = bpe.tokenize(text)
    covered = "".join(text[s:e] for s, e in enc.offsets)
    assert covered == text.replace(" ", "")


@given(a=sentences, b=sentences, max_length=st.integers(5, 30))
def test_pairs_follow_bert_template_and_truncate_longest_first(wordpiece, a, b, max_length):
    enc = wordpiece.encode_example(a, b, max_length=max_length)
    n_a, n_b = len(wordpiece.tokenize(a)), len(wordpiece.tokenize(b))
    assert len(enc) == min(n_a + n_b + 3, max_length)
    cls, sep = wordpiece.id_of("cls"), wordpiece.id_of("sep")
    assert enc.ids[0] == cls and enc.ids[-1] == sep
    seps = np.flatnonzero(enc.ids == sep)
    assert len(seps) == 2 and (enc.token_types[: seps[0] + 1] == 0).all()
    assert (enc.token_types[seps[0] + 1 :] == 1).all()
    kept_a, kept_b = seps[0] - 1, len(enc) - seps[0] - 2
    # Longest-first: the shorter part is cut only once the longer has come down to it.
    if kept_a < n_a and kept_b < n_b:
        assert abs(kept_a - kept_b) <= 1
    elif kept_a < n_a:  # ties cut a first, so a may end one below b
        assert kept_b == n_b and kept_a >= n_b - 1
    elif kept_b < n_b:
        assert kept_a == n_a and kept_b >= n_a
    assert enc.special.sum() == 3 and (enc.word_ids[enc.special] == -1).all()


def test_pretokenized_words_get_one_word_start_each(wordpiece):
    words = ["Cats", "sat", "zebra-like", "on", "mats"]
    enc = wordpiece.tokenize(words)
    assert enc.word_starts.sum() == len(words)
    assert sorted(set(enc.word_ids.tolist())) == list(range(len(words)))


def test_specials_are_single_tokens_with_distinct_ids(wordpiece, bpe):
    for tok in (wordpiece, bpe):
        roles = ["pad", "unk", "cls", "sep", "mask"]
        ids = [tok.id_of(r) for r in roles]
        assert len(set(ids)) == len(roles)
        assert tok.id_of("bos") == tok.id_of("eos")
        for i in ids:
            assert tok.encode(tok.token(i)).tolist() == [i]
    with pytest.raises(KeyError, match="roles"):
        wordpiece.id_of("start")


def test_save_and_load_round_trip(tmp_path, wordpiece, bpe):
    for tok in (wordpiece, bpe):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        again = load_tokenizer(path)
        assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
        text = "The cat sat, far away!"
        a, b = tok.encode_example(text, "old songs"), again.encode_example(text, "old songs")
        for field in ("ids", "token_types", "offsets", "word_ids", "segments"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def test_load_rejects_a_file_without_the_specials(tmp_path, wordpiece):
    data = wordpiece.to_json()
    data["backend"]["added_tokens"] = []
    vocab = data["backend"]["model"]["vocab"]
    data["backend"]["model"]["vocab"] = {k: v for k, v in vocab.items() if k != "[MASK]"}
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="MASK"):
        load_tokenizer(tmp_path / "t.json")


def test_bad_settings_are_rejected(wordpiece):
    with pytest.raises(ValueError, match="special"):
        SubwordTokenizer.train(CORPUS, vocab_size=5)
    with pytest.raises(ValueError, match="kind"):
        SubwordTokenizer.train(CORPUS, kind="unigram")
    with pytest.raises(ValueError, match="no room"):
        wordpiece.encode_example("a", "b", max_length=3)
